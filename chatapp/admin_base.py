"""Admin access goes through the permission policy: active system OWNER/ADMIN only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from chatapp.views import password_attempts_limited
from threads import policy


def _site_has_permission(request: HttpRequest) -> bool:
    return policy.can_use_admin(getattr(request, "user", None))  # type: ignore[arg-type]


admin.site.has_permission = _site_has_permission  # type: ignore[method-assign]
# The admin's own sign-in form spends the same password budget as every other.
admin.site.login = password_attempts_limited(admin.site.login)  # type: ignore[method-assign]
admin.site.site_header = "chatapp moderation"
admin.site.site_title = "chatapp admin"


class PolicyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Model permissions come from the system role, not Django's per-model permissions."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return _site_has_permission(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _site_has_permission(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _site_has_permission(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyAdmin(PolicyAdmin):
    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
