"""JSON-safe payloads for attachments carried in message events and upload responses."""

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


def upload_payload(attachment: Attachment) -> dict[str, Any]:
    """The uploader's view: the message-event shape plus where the upload stands."""
    clean = attachment.scan_status == ScanStatus.CLEAN
    payload = attachment_payload(attachment)
    if not clean:
        # Nothing is downloadable before the checks pass.
        payload.update(url=None, thumbnail_url=None, has_thumbnail=False)
    payload.update(
        {
            "thread_id": attachment.thread_id,
            "message_id": attachment.message_id,
            "status": attachment.scan_status,
            "detail": "" if clean else attachment.scan_detail,
            "created_at": attachment.created_at.isoformat() if attachment.created_at else None,
        }
    )
    return payload
