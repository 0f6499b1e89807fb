from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from chatapp.admin_base import ReadOnlyAdmin
from chatapp.errors import ServiceError
from messaging.models import Message, MessageEdit, Notification, Reaction
from messaging.services import message_delete, message_restore


class EditInline(admin.TabularInline):  # type: ignore[type-arg]
    model = MessageEdit
    fields = ("version", "previous_body", "editor", "edited_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("id", "thread", "sequence", "sender", "short_body", "created_at", "edited_at", "deleted_at")
    list_filter = (("deleted_at", admin.EmptyFieldListFilter), ("edited_at", admin.EmptyFieldListFilter))
    search_fields = ("body", "sender__username", "thread__title")
    list_select_related = ("thread", "sender")
    inlines = [EditInline]
    actions = ["soft_delete", "restore"]

    @admin.display(description="Body")
    def short_body(self, obj: Message) -> str:
        return "(deleted)" if obj.is_deleted else obj.body[:80]

    def _run(self, request: HttpRequest, queryset: QuerySet[Message], fn: object, verb: str) -> None:
        done = 0
        for message in queryset:
            try:
                fn(actor=request.user, message_id=message.pk)  # type: ignore[operator]
                done += 1
            except ServiceError as exc:
                self.message_user(request, f"Message {message.pk}: {exc.message}", messages.ERROR)
        self.message_user(request, f"{verb} {done} message(s).")

    @admin.action(description="Soft-delete selected messages (tombstone stays)")
    def soft_delete(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        self._run(request, queryset, message_delete, "Deleted")

    @admin.action(description="Restore selected moderated messages")
    def restore(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        self._run(request, queryset, message_restore, "Restored")


@admin.register(Reaction)
class ReactionAdmin(ReadOnlyAdmin):
    list_display = ("message", "user", "emoji", "created_at")
    search_fields = ("emoji", "user__username")


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    list_display = ("recipient", "kind", "thread", "message", "created_at", "read_at")
    list_filter = ("kind", ("read_at", admin.EmptyFieldListFilter))
    search_fields = ("recipient__username",)
