"""Writes for attachments. Uploading, scanning and storage come from attachments.storage."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from accounts.models import User
from attachments.models import Attachment, ScanStatus
from chatapp.errors import InvalidInput
from messaging.models import Message

logger = logging.getLogger(__name__)

MAX_ATTACHMENTS_PER_MESSAGE = 10


def attachments_attach(*, uploader: User, message: Message, attachment_ids: Sequence[int]) -> list[Attachment]:
    """Bind clean, unattached uploads of ``uploader`` for the message's thread to ``message``.

    Runs inside message_send's transaction. Quarantined, infected, foreign or already used
    uploads are refused with InvalidInput, and the whole send rolls back.
    """
    ids = list(dict.fromkeys(int(i) for i in attachment_ids))
    if len(ids) > MAX_ATTACHMENTS_PER_MESSAGE:
        raise InvalidInput(fields={"attachment_ids": [f"At most {MAX_ATTACHMENTS_PER_MESSAGE} attachments."]})
    rows = list(
        Attachment.objects.select_for_update().filter(
            pk__in=ids,
            uploader=uploader,
            thread_id=message.thread_id,
            message__isnull=True,
            deleted_at__isnull=True,
        )
    )
    by_id = {a.pk: a for a in rows}
    problems = []
    for attachment_id in ids:
        attachment = by_id.get(attachment_id)
        if attachment is None:
            problems.append(f"{attachment_id}: no such upload of yours for this thread, or already attached.")
        elif attachment.scan_status != ScanStatus.CLEAN:
            problems.append(f"{attachment_id}: not usable ({attachment.scan_status.lower()}).")
    if problems:
        raise InvalidInput("Some attachments cannot be used.", fields={"attachment_ids": problems})
    now = timezone.now()
    Attachment.objects.filter(pk__in=ids).update(message=message, attached_at=now)
    return [by_id[i] for i in ids]


def attachments_revoke_for_message(*, message: Message) -> int:
    """Mark a deleted message's files gone and delete the stored objects after commit."""
    rows = list(Attachment.objects.filter(message=message, deleted_at__isnull=True))
    if not rows:
        return 0
    Attachment.objects.filter(pk__in=[a.pk for a in rows]).update(deleted_at=timezone.now())
    keys = [k for a in rows for k in (a.storage_key, a.thumbnail_key) if k]
    transaction.on_commit(lambda: storage_delete_keys(keys))
    return len(rows)


def storage_delete_keys(keys: Sequence[str]) -> None:
    for key in keys:
        try:
            default_storage.delete(key)
        except Exception:
            logger.exception("could not delete stored file %s; the cleanup command retries", key)
