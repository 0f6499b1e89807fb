from __future__ import annotations

from django.contrib import admin

from attachments.models import Attachment
from chatapp.admin_base import ReadOnlyAdmin


class AttachedFilter(admin.SimpleListFilter):
    title = "sent"
    parameter_name = "sent"

    def lookups(self, request, model_admin):  # type: ignore[no-untyped-def]
        return [("yes", "Sent with a message"), ("no", "Not sent (upload only)")]

    def queryset(self, request, queryset):  # type: ignore[no-untyped-def]
        if self.value() == "yes":
            return queryset.filter(message__isnull=False)
        if self.value() == "no":
            return queryset.filter(message__isnull=True)
        return queryset


@admin.register(Attachment)
class AttachmentAdmin(ReadOnlyAdmin):
    """Staff review of uploads: infected and rejected files are recorded here (the files themselves are gone)."""

    list_display = (
        "id",
        "original_name",
        "kind",
        "content_type",
        "declared_type",
        "size",
        "scan_status",
        "scan_detail",
        "uploader",
        "thread",
        "message",
        "created_at",
        "scanned_at",
        "deleted_at",
    )
    list_filter = ("scan_status", "kind", AttachedFilter, "created_at", "deleted_at")
    search_fields = ("original_name", "checksum", "uploader__username", "scan_detail")
    list_select_related = ("uploader", "thread", "message")
    date_hierarchy = "created_at"
    fieldsets = (
        (None, {"fields": ("original_name", "uploader", "thread", "message")}),
        ("Checks", {"fields": ("scan_status", "scan_detail", "scanned_at", "checksum")}),
        ("File", {"fields": ("kind", "content_type", "declared_type", "size", "declared_size", "width", "height")}),
        ("Storage", {"fields": ("storage_key", "thumbnail_key")}),
        ("Lifecycle", {"fields": ("created_at", "attached_at", "deleted_at")}),
    )
    readonly_fields = (
        "original_name",
        "uploader",
        "thread",
        "message",
        "scan_status",
        "scan_detail",
        "scanned_at",
        "checksum",
        "kind",
        "content_type",
        "declared_type",
        "size",
        "declared_size",
        "width",
        "height",
        "storage_key",
        "thumbnail_key",
        "created_at",
        "attached_at",
        "deleted_at",
    )
