from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.models import AuditEntry, User, WebhookDelivery
from accounts.services import user_deactivate, user_reactivate
from chatapp.admin_base import PolicyAdmin, ReadOnlyAdmin


@admin.register(User)
class UserAdmin(PolicyAdmin, DjangoUserAdmin):  # type: ignore[misc]
    list_display = ("username", "display_name", "email", "system_role", "is_active", "clerk_id", "last_seen_at")
    list_filter = ("system_role", "is_active", "is_staff")
    search_fields = ("username", "display_name", "email", "clerk_id")
    ordering = ("username",)
    readonly_fields = (
        "clerk_id",
        "system_role",
        "is_staff",
        "is_superuser",
        "last_login",
        "date_joined",
        "last_seen_at",
        "deactivated_at",
    )
    fieldsets = (
        (None, {"fields": ("username", "display_name", "email", "avatar_url", "clerk_id")}),
        ("Access", {"fields": ("system_role", "is_active", "is_staff", "is_superuser", "deactivated_at")}),
        ("Activity", {"fields": ("last_login", "last_seen_at", "date_joined", "preferences")}),
    )
    actions = ["deactivate_users", "reactivate_users"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # Deactivation goes through the action (service + audit + socket close), not the checkbox.
        return (*self.readonly_fields, "is_active")

    @admin.action(description="Deactivate selected users (sockets closed, messages kept)")
    def deactivate_users(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        count = 0
        for user in queryset:
            if user.pk == request.user.pk:
                self.message_user(request, "You cannot deactivate yourself.", messages.WARNING)
                continue
            user_deactivate(actor=request.user, user=user, reason="admin")  # type: ignore[arg-type]
            count += 1
        self.message_user(request, f"Deactivated {count} user(s).")

    @admin.action(description="Reactivate selected users")
    def reactivate_users(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        for user in queryset:
            user_reactivate(actor=request.user, user=user)  # type: ignore[arg-type]
        self.message_user(request, f"Reactivated {queryset.count()} user(s).")


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
