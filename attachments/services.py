"""Writes for attachments: uploads (direct and presigned), binding to messages, revoking, cleanup.

Every upload runs the same checks (``_inspect``), synchronously in the request: size caps,
type by magic bytes against the allowlist, the virus scanner, then kind-specific processing
(images re-encoded without metadata, with a thumbnail). Only then is a file stored under a
key that is ever served, and only CLEAN attachments can be attached or downloaded.

Uploads are private to their uploader until a message carries them, so they broadcast
nothing; ``message.created`` (messaging.services.message_send) announces them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import AuditEntry, User
from attachments import storage
from attachments.models import Attachment, AttachmentKind, ScanStatus
from attachments.scanning import get_scanner
from attachments.validation import (
    FileType,
    Refused,
    check_size,
    check_upload_size,
    declared_kind,
    download_name,
    image_process,
    sniff,
)
from chatapp.cache import invalidate_on_commit
from chatapp.errors import Conflict, InvalidInput, NotFound, TooLarge, Unavailable
from messaging.models import Message
from threads import policy
from threads.selectors import thread_get_for_member

logger = logging.getLogger(__name__)

MAX_ATTACHMENTS_PER_MESSAGE = 10
MAX_NAME_LENGTH = 255


class Infected(InvalidInput):
    """The virus scanner recognised the file (400, reason ``infected``)."""

    def __init__(self, signature: str) -> None:
        super().__init__("The file was recognised as malware and refused.", reason="infected", signature=signature)
        self.signature = signature


@dataclass
class _Checked:
    """A file that passed every check, ready to be stored."""

    ftype: FileType
    size: int
    checksum: str
    scan_detail: str
    path: Path  # the bytes to store: the re-encoded image, or the upload itself
    width: int | None = None
    height: int | None = None
    thumbnail: bytes | None = None


def _clean_name(name: str) -> str:
    """The client's file name, for display and Content-Disposition only: no path, no control characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip().strip(".") or "file"
    if len(name) > MAX_NAME_LENGTH:
        stem, dot, ext = name.rpartition(".")
        name = f"{stem[: MAX_NAME_LENGTH - len(ext) - 1]}.{ext}" if dot and len(ext) <= 16 else name[:MAX_NAME_LENGTH]
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _inspect(path: Path, *, workdir: Path) -> _Checked:
    """Every check, cheapest first. Raises TooLarge, Refused, Infected or ScannerUnavailable.

    The scanner sees every file within the caps, including types about to be refused, so
    malware is recorded as such whatever it pretends to be.
    """
    size = path.stat().st_size
    check_upload_size(size)
    refusal: Refused | None = None
    ftype: FileType | None = None
    try:
        ftype = sniff(path)
    except Refused as exc:
        refusal = exc
    if ftype is not None:
        check_size(kind=ftype.kind, size=size)
    result = get_scanner().scan(path)
    if result.infected:
        raise Infected(result.detail)
    if refusal is not None or ftype is None:
        raise refusal or Refused("This type of file is not accepted.", reason="unsupported_type")
    checked = _Checked(ftype=ftype, size=size, checksum=_sha256(path), scan_detail=result.detail, path=path)
    if ftype.kind == AttachmentKind.IMAGE:
        image = image_process(path, ftype, workdir=workdir)
        checked.path = image.path
        checked.size = image.path.stat().st_size
        checked.width, checked.height, checked.thumbnail = image.width, image.height, image.thumbnail
    return checked


def _store_checked(checked: _Checked, *, thread_id: int, name: str) -> tuple[str, str]:
    """Store a checked file (and thumbnail) under fresh keys; returns (storage_key, thumbnail_key)."""
    token = storage.new_token()
    key = storage.file_key(thread_id=thread_id, token=token, extension=checked.ftype.extension)
    thumb = storage.thumbnail_key(thread_id=thread_id, token=token) if checked.thumbnail else ""
    try:
        with open(checked.path, "rb") as f:
            storage.store(
                key,
                f,
                content_type=checked.ftype.mime,
                content_disposition=storage.disposition(
                    name=download_name(name, checked.ftype.mime), inline=checked.ftype.inline
                ),
            )
        if checked.thumbnail:
            storage.store(
                thumb,
                io.BytesIO(checked.thumbnail),
                content_type=storage.THUMBNAIL_TYPE,
                content_disposition=storage.disposition(name="thumbnail.webp", inline=True),
            )
    except Unavailable:
        raise  # S3 is down: deleting would wait out its timeouts again (the cleanup job removes strays)
    except BaseException:
        storage_delete_keys([key, thumb])
        raise
    return key, thumb


def _checked_fields(checked: _Checked) -> dict[str, Any]:
    return {
        "size": checked.size,
        "checksum": checked.checksum,
        "kind": checked.ftype.kind,
        "content_type": checked.ftype.mime,
        "width": checked.width,
        "height": checked.height,
        "scan_status": ScanStatus.CLEAN,
        "scan_detail": checked.scan_detail[:255],
        "scanned_at": timezone.now(),
    }


def _refusal_fields(exc: Exception) -> dict[str, Any]:
    infected = isinstance(exc, Infected)
    detail = exc.signature if isinstance(exc, Infected) else getattr(exc, "message", str(exc))
    return {
        "scan_status": ScanStatus.INFECTED if infected else ScanStatus.REJECTED,
        "scan_detail": detail[:255],
        "scanned_at": timezone.now(),
    }


def _audit_infected(attachment: Attachment, *, checksum: str) -> None:
    logger.warning(
        "infected upload refused: attachment %s by user %s: %s",
        attachment.pk,
        attachment.uploader_id,
        attachment.scan_detail,
    )
    AuditEntry.record(
        actor=attachment.uploader,
        action="attachment.infected",
        target=attachment,
        thread_id=attachment.thread_id,
        signature=attachment.scan_detail,
        name=attachment.original_name,
        size=attachment.size,
        sha256=checksum,
    )


def _thread_for_upload(*, uploader: User, thread_id: int) -> None:
    """Uploading is part of sending: NotFound for non-members, Forbidden if their role cannot send."""
    thread_get_for_member(thread_id=thread_id, user=uploader, action=policy.Action.SEND)


def attachment_upload(*, uploader: User, thread_id: int, path: Path, name: str, declared_type: str = "") -> Attachment:
    """Check and store a file uploaded through the API (already streamed to ``path`` on disk).

    Returns the CLEAN attachment, ready for ``message_send(attachment_ids=...)``. A refused file
    leaves a REJECTED or INFECTED row for staff (INFECTED also an AuditEntry) and raises
    TooLarge (413), Refused/Infected (400) or ScannerUnavailable (503).
    """
    _thread_for_upload(uploader=uploader, thread_id=thread_id)
    name = _clean_name(name)
    declared_size = path.stat().st_size
    declared_type = declared_type[:100]
    with tempfile.TemporaryDirectory(prefix="attachment-") as workdir:
        try:
            checked = _inspect(path, workdir=Path(workdir))
        except (Refused, Infected, TooLarge) as exc:
            with transaction.atomic():
                attachment = Attachment.objects.create(
                    uploader=uploader,
                    thread_id=thread_id,
                    storage_key=storage.quarantine_key(storage.new_token()),  # nothing is stored there
                    original_name=name,
                    size=declared_size,
                    declared_size=declared_size,
                    declared_type=declared_type,
                    **_refusal_fields(exc),
                )
                if isinstance(exc, Infected):
                    _audit_infected(attachment, checksum=_sha256(path))
            raise
        key, thumb = _store_checked(checked, thread_id=thread_id, name=name)
    try:
        with transaction.atomic():
            return Attachment.objects.create(
                uploader=uploader,
                thread_id=thread_id,
                storage_key=key,
                thumbnail_key=thumb,
                original_name=name,
                declared_size=declared_size,
                declared_type=declared_type,
                **_checked_fields(checked),
            )
    except BaseException:
        storage_delete_keys([key, thumb])
        raise


def attachment_upload_request(
    *, uploader: User, thread_id: int, name: str, size: int, content_type: str = ""
) -> tuple[Attachment, dict[str, Any]]:
    """Start a direct-to-storage upload: a PENDING row and where to send exactly ``size`` bytes.

    The declared size is checked against the cap its declared type suggests (413 before any
    byte moves); the real type and cap are decided on "complete".
    """
    _thread_for_upload(uploader=uploader, thread_id=thread_id)
    if size < 1:
        raise InvalidInput(fields={"size": ["Must be at least 1 byte."]})
    check_upload_size(size)
    check_size(kind=declared_kind(content_type), size=size)
    with transaction.atomic():
        attachment = Attachment.objects.create(
            uploader=uploader,
            thread_id=thread_id,
            storage_key=storage.quarantine_key(storage.new_token()),
            original_name=_clean_name(name),
            declared_type=content_type[:100],
            declared_size=size,
            scan_status=ScanStatus.PENDING,
        )
    upload = storage.presigned_upload(
        attachment_id=attachment.pk, key=attachment.storage_key, size=size, content_type=content_type
    )
    return attachment, upload


def _pending_upload(*, uploader: User, attachment_id: int) -> Attachment:
    attachment = Attachment.objects.filter(pk=attachment_id, uploader=uploader, deleted_at__isnull=True).first()
    if attachment is None:
        raise NotFound("Attachment not found.")
    try:
        _thread_for_upload(uploader=uploader, thread_id=attachment.thread_id)
    except NotFound:
        raise NotFound("Attachment not found.") from None
    return attachment


def attachment_upload_receive(*, uploader: User, attachment_id: int, path: Path) -> Attachment:
    """The file-system stand-in for a presigned POST: store the bytes at the upload's quarantine key.

    Like S3's policy, it accepts only the uploader, only while the upload window is open, only
    exactly the declared size. The bytes stay quarantined until "complete".
    """
    attachment = _pending_upload(uploader=uploader, attachment_id=attachment_id)
    if attachment.scan_status != ScanStatus.PENDING or not attachment.storage_key.startswith(storage.QUARANTINE_PREFIX):
        raise Conflict("This upload is already complete.", reason="not_pending")
    if timezone.now() > attachment.created_at + timedelta(seconds=settings.ATTACHMENT_UPLOAD_EXPIRE):
        raise Conflict("The upload window has closed; request a new upload.", reason="upload_expired")
    size = path.stat().st_size
    if size != attachment.declared_size:
        raise InvalidInput(
            f"Expected exactly {attachment.declared_size} bytes, got {size}.",
            reason="size_mismatch",
            fields={"file": ["Size differs from the declared size."]},
        )
    storage.delete(attachment.storage_key)
    with open(path, "rb") as f:
        storage.store(
            attachment.storage_key, f, content_type="application/octet-stream", content_disposition="attachment"
        )
    return attachment


def _refuse_pending(attachment: Attachment, exc: Exception, *, checksum: str = "") -> None:
    """Record why a presigned upload was refused and drop its quarantined bytes."""
    fields = _refusal_fields(exc)
    with transaction.atomic():
        Attachment.objects.filter(pk=attachment.pk, scan_status=ScanStatus.PENDING).update(**fields)
        for name, value in fields.items():
            setattr(attachment, name, value)
        if isinstance(exc, Infected):
            _audit_infected(attachment, checksum=checksum)
    storage_delete_keys([attachment.storage_key])


def _recorded_refusal(attachment: Attachment) -> InvalidInput:
    if attachment.scan_status == ScanStatus.INFECTED:
        return Infected(attachment.scan_detail)
    return InvalidInput(attachment.scan_detail or "This upload was refused.", reason="refused")


def attachment_upload_complete(*, uploader: User, attachment_id: int) -> Attachment:
    """Check a presigned upload's bytes and make it usable (CLEAN), or refuse it.

    The object must exist with exactly the declared size; then the same checks as a direct
    upload run on it. Idempotent: completing a CLEAN upload returns it, a refused one raises
    its recorded refusal. If the scanner is unavailable (503) the upload stays PENDING and
    "complete" can be called again.
    """
    attachment = _pending_upload(uploader=uploader, attachment_id=attachment_id)
    if attachment.scan_status == ScanStatus.CLEAN:
        return attachment
    if attachment.scan_status != ScanStatus.PENDING:
        raise _recorded_refusal(attachment)
    quarantined = attachment.storage_key
    stored = storage.object_size(quarantined)
    if stored is None:
        raise InvalidInput("Nothing has been uploaded for this attachment yet.", reason="not_uploaded")
    if stored != attachment.declared_size:
        mismatch = InvalidInput(
            f"Expected exactly {attachment.declared_size} bytes, found {stored}.", reason="size_mismatch"
        )
        _refuse_pending(attachment, mismatch)
        raise mismatch
    with tempfile.TemporaryDirectory(prefix="attachment-") as workdir:
        local = Path(workdir) / "upload"
        with open(local, "wb") as f:
            storage.fetch(quarantined, f)
        try:
            checked = _inspect(local, workdir=Path(workdir))
        except (Refused, Infected, TooLarge) as exc:
            _refuse_pending(attachment, exc, checksum=_sha256(local))
            raise
        key, thumb = _store_checked(checked, thread_id=attachment.thread_id, name=attachment.original_name)
    with transaction.atomic():
        updated = Attachment.objects.filter(
            pk=attachment.pk, scan_status=ScanStatus.PENDING, storage_key=quarantined
        ).update(storage_key=key, thumbnail_key=thumb, **_checked_fields(checked))
    if not updated:
        # A concurrent "complete" won; keep its files, not ours.
        storage_delete_keys([key, thumb])
    else:
        storage_delete_keys([quarantined])
    attachment.refresh_from_db()
    if attachment.scan_status != ScanStatus.CLEAN:
        raise _recorded_refusal(attachment)
    return attachment


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


def storage_delete_keys(keys: Iterable[str]) -> None:
    for key in keys:
        if not key:
            continue
        try:
            storage.delete(key)
        except Unavailable:
            logger.warning("storage unavailable; stored files %s are left to the cleanup command", list(keys))
            return  # the next deletes would wait out S3's timeouts too
        except Exception:
            logger.exception("could not delete stored file %s; the cleanup command retries", key)


@dataclass
class CleanupReport:
    unattached: int = 0  # upload rows removed (never sent within ATTACHMENT_ORPHAN_HOURS)
    revoked: int = 0  # attachments of deleted messages/threads marked deleted
    keys: list[str] = field(default_factory=list)  # stored objects deleted


def _chunks(items: Iterable[tuple[str, datetime]], size: int) -> Iterable[list[tuple[str, datetime]]]:
    chunk: list[tuple[str, datetime]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _orphan_objects(*, before: datetime) -> list[str]:
    """Stored keys that no live row points at, last written before ``before``."""
    orphans: list[str] = []
    for prefix in (storage.ATTACHMENT_PREFIX, storage.QUARANTINE_PREFIX):
        for chunk in _chunks(storage.iter_objects(prefix), 500):
            keys = [key for key, modified in chunk if modified < before]
            if not keys:
                continue
            live: set[str] = set()
            for key, thumb in Attachment.objects.filter(
                Q(storage_key__in=keys) | Q(thumbnail_key__in=keys), deleted_at__isnull=True
            ).values_list("storage_key", "thumbnail_key"):
                live.update((key, thumb))
            orphans.extend(k for k in keys if k not in live)
    return orphans


def attachments_cleanup(
    *, now: datetime | None = None, object_grace: timedelta = timedelta(hours=1), dry_run: bool = False
) -> CleanupReport:
    """Remove uploads never sent within ``ATTACHMENT_ORPHAN_HOURS``, the files of deleted messages
    and threads, and stored objects no row points at (orphaned thumbnails, abandoned presigned
    uploads). INFECTED rows stay (they hold no file) as the record staff review in the admin.

    ``object_grace`` spares unreferenced objects written moments ago (a direct upload stores its
    file just before its row commits). Safe to run repeatedly, and alongside uploads.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.ATTACHMENT_ORPHAN_HOURS)
    stale = list(
        Attachment.objects.filter(message__isnull=True, created_at__lt=cutoff)
        .exclude(scan_status=ScanStatus.INFECTED)
        .values_list("pk", "storage_key", "thumbnail_key")
    )
    gone = list(
        Attachment.objects.filter(deleted_at__isnull=True)
        .filter(Q(message__deleted_at__isnull=False) | Q(thread__deleted_at__isnull=False))
        .values_list("pk", "storage_key", "thumbnail_key", "message_id")
    )
    doomed = {str(key) for row in [*stale, *gone] for key in (row[1], row[2]) if key}
    report = CleanupReport(unattached=len(stale), revoked=len(gone))
    if dry_run:
        report.keys = sorted(doomed | set(_orphan_objects(before=now - object_grace)))
        return report
    with transaction.atomic():
        # Re-filtered: an upload sent with a message since the read above is kept.
        Attachment.objects.filter(pk__in=[row[0] for row in stale], message__isnull=True).delete()
        Attachment.objects.filter(pk__in=[row[0] for row in gone]).update(deleted_at=now)
        invalidate_on_commit("message", sorted({row[3] for row in gone if row[3] is not None}))
    live = set(
        Attachment.objects.filter(deleted_at__isnull=True, pk__in=[row[0] for row in stale]).values_list(
            "storage_key", "thumbnail_key"
        )
    )
    doomed -= {key for pair in live for key in pair}
    report.keys = sorted(doomed | set(_orphan_objects(before=now - object_grace)))
    storage_delete_keys(report.keys)
    return report
