"""JSON-safe payloads for attachments carried in message events."""

from __future__ import annotations

from typing import Any

from attachments.models import Attachment, ScanStatus
from messaging.models import Message


def attachment_payload(attachment: Attachment) -> dict[str, Any]:
    return {
        "id": attachment.pk,
        "name": attachment.original_name,
        "size": attachment.size,
        "kind": attachment.kind,
        "content_type": attachment.content_type,
        "width": attachment.width,
        "height": attachment.height,
        "has_thumbnail": bool(attachment.thumbnail_key),
        # Files are fetched through the API, which asks the permission policy and mints a short-lived URL.
        "url": f"/api/v1/attachments/{attachment.pk}/download",
        "thumbnail_url": f"/api/v1/attachments/{attachment.pk}/thumbnail" if attachment.thumbnail_key else None,
    }


def attachments_payload(message: Message) -> list[dict[str, Any]]:
    return [
        attachment_payload(a)
        for a in message.attachments.all()
        if a.scan_status == ScanStatus.CLEAN and a.deleted_at is None
    ]
