from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.models import AuditEntry, User, WebhookDelivery
from accounts.services import user_deactivate, user_reactivate
from chatapp.admin_base import ReadOnlyAdmin
from chatapp.errors import ServiceError


@admin.register(User)
class UserAdmin(ReadOnlyAdmin, DjangoUserAdmin):  # type: ignore[misc]
    """Accounts are shown, not edited: a profile belongs to its user (or to Clerk), roles change through
    ``manage.py``/the service, and the password page is refused (ReadOnlyAdmin: no change permission).
    Moderation is the two actions, which go through the account services and their policy check.
    """

    list_display = ("username", "display_name", "email", "system_role", "is_active", "clerk_id", "last_seen_at")
    list_filter = ("system_role", "is_active", "is_staff")
    search_fields = ("username", "display_name", "email", "clerk_id")
    ordering = ("username",)
    fieldsets = (
        (None, {"fields": ("username", "display_name", "email", "avatar_url", "clerk_id")}),
        ("Access", {"fields": ("system_role", "is_active", "is_staff", "is_superuser", "deactivated_at")}),
        ("Activity", {"fields": ("last_login", "last_seen_at", "date_joined", "preferences")}),
    )
    actions = ["deactivate_users", "reactivate_users"]

    def _run(self, request: HttpRequest, queryset: QuerySet[User], fn: Any, verb: str, **kwargs: Any) -> None:
        done = 0
        for user in queryset:
            try:
                fn(actor=request.user, user=user, **kwargs)
                done += 1
            except ServiceError as exc:
                self.message_user(request, f"{user.username}: {exc.message}", messages.ERROR)
        self.message_user(request, f"{verb} {done} user(s).")

    @admin.action(description="Deactivate selected users (sockets closed, messages kept)")
    def deactivate_users(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        self._run(request, queryset, user_deactivate, "Deactivated", reason="admin")

    @admin.action(description="Reactivate selected users")
    def reactivate_users(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        self._run(request, queryset, user_reactivate, "Reactivated")


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "action", "actor", "target_type", "target_id", "thread_id")
    list_filter = ("action", "target_type")
    search_fields = ("action", "target_id", "actor__username")
    date_hierarchy = "created_at"


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    list_display = ("received_at", "event_type", "svix_id")
    list_filter = ("event_type",)
    search_fields = ("svix_id",)
