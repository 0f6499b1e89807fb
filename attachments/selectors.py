"""Permission-checked reads for attachments."""

from __future__ import annotations

from accounts.models import User
from attachments.models import Attachment, ScanStatus
from chatapp.errors import NotFound
from threads import policy
from threads.selectors import thread_get_for_member


def attachment_get_for_member(*, attachment_id: int, user: User) -> Attachment:
    """An attachment ``user`` may see: a thread member's view of a sent file, or the uploader's own upload.

    Uploads not yet sent with a message are visible to their uploader only. NotFound otherwise
    (non-members, deleted messages and files, other people's pending uploads), never Forbidden.
    """
    try:
        attachment = Attachment.objects.select_related("message").get(pk=attachment_id)
    except (Attachment.DoesNotExist, ValueError, TypeError):
        raise NotFound("Attachment not found.") from None
    if attachment.deleted_at is not None:
        raise NotFound("Attachment not found.")
    try:
        thread_get_for_member(thread_id=attachment.thread_id, user=user, action=policy.Action.VIEW)
    except NotFound:
        raise NotFound("Attachment not found.") from None
    if attachment.message is None:
        if attachment.uploader_id != user.pk:
            raise NotFound("Attachment not found.")
    elif attachment.message.deleted_at is not None:
        raise NotFound("Attachment not found.")
    return attachment


def attachment_get_for_download(*, attachment_id: int, user: User, variant: str = "file") -> Attachment:
    """As :func:`attachment_get_for_member`, and only a CLEAN file (a thumbnail if asked for one)."""
    attachment = attachment_get_for_member(attachment_id=attachment_id, user=user)
    if attachment.scan_status != ScanStatus.CLEAN or (variant == "thumbnail" and not attachment.thumbnail_key):
        raise NotFound("Attachment not found.")
    return attachment
