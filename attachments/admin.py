from __future__ import annotations

from django.contrib import admin

from attachments.models import Attachment
from chatapp.admin_base import ReadOnlyAdmin


@admin.register(Attachment)
class AttachmentAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "original_name",
        "kind",
        "content_type",
        "size",
        "scan_status",
        "uploader",
        "thread",
        "message",
        "created_at",
    )
    list_filter = ("scan_status", "kind")
    search_fields = ("original_name", "checksum", "uploader__username", "scan_detail")
    list_select_related = ("uploader", "thread")
