from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from chatapp.admin_base import ReadOnlyAdmin
from chatapp.errors import ServiceError
from threads.models import Thread, ThreadEvent, ThreadParticipant
from threads.services import participant_remove


class ParticipantInline(admin.TabularInline):  # type: ignore[type-arg]
    model = ThreadParticipant
    fields = ("user", "role", "joined_at", "last_read_sequence", "muted", "archived_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Thread)
class ThreadAdmin(ReadOnlyAdmin):
    list_display = ("id", "title", "kind", "created_by", "created_at", "last_message_at", "last_sequence", "deleted_at")
    list_filter = ("kind", ("deleted_at", admin.EmptyFieldListFilter))
    search_fields = ("title", "participants__user__username")
    inlines = [ParticipantInline]


@admin.register(ThreadParticipant)
class ThreadParticipantAdmin(ReadOnlyAdmin):
    list_display = ("thread", "user", "role", "joined_at", "last_read_sequence", "muted")
    list_filter = ("role",)
    search_fields = ("user__username", "thread__title")
    list_select_related = ("thread", "user")
    actions = ["remove_participants"]

    @admin.action(description="Remove selected participants from their threads")
    def remove_participants(self, request: HttpRequest, queryset: QuerySet[ThreadParticipant]) -> None:
        removed = 0
        for participant in queryset:
            try:
                participant_remove(actor=request.user, thread_id=participant.thread_id, user_id=participant.user_id)  # type: ignore[arg-type]
                removed += 1
            except ServiceError as exc:
                self.message_user(request, f"{participant}: {exc.message}", messages.ERROR)
        self.message_user(request, f"Removed {removed} participant(s).")


@admin.register(ThreadEvent)
class ThreadEventAdmin(ReadOnlyAdmin):
    list_display = ("thread", "sequence", "type", "created_at")
    list_filter = ("type",)
    search_fields = ("thread__title",)
