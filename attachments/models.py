from __future__ import annotations

from django.conf import settings
from django.db import models

from messaging.models import Message
from threads.models import Thread


class AttachmentKind(models.TextChoices):
    IMAGE = "IMAGE", "Image"
    VIDEO = "VIDEO", "Video"
    DOCUMENT = "DOCUMENT", "Document"


class ScanStatus(models.TextChoices):
    PENDING = "PENDING", "Pending (quarantined)"
    CLEAN = "CLEAN", "Clean"
    INFECTED = "INFECTED", "Infected"
    REJECTED = "REJECTED", "Rejected"


class Attachment(models.Model):
    """A file uploaded for a thread; usable only once ``scan_status`` is CLEAN.

    ``message`` is null until a message is sent with it; unattached uploads are removed after 24 h.
    ``content_type`` and ``kind`` come from sniffing the bytes; ``declared_type`` is what the
    client claimed (kept for staff, never trusted). A presigned upload's row exists from the
    request on, PENDING with ``storage_key`` under ``quarantine/``, until "complete" checks it.
    """

    uploader = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="attachments")
    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="attachments")
    message = models.ForeignKey(Message, null=True, blank=True, on_delete=models.SET_NULL, related_name="attachments")
    storage_key = models.CharField(max_length=512, unique=True)
    original_name = models.CharField(max_length=255)
    content_type = models.CharField(max_length=100, blank=True)
    declared_type = models.CharField(max_length=100, blank=True)
    declared_size = models.BigIntegerField(default=0)
    size = models.BigIntegerField(default=0)
    checksum = models.CharField(max_length=64, blank=True)
    kind = models.CharField(max_length=8, choices=AttachmentKind.choices, default=AttachmentKind.DOCUMENT)
    scan_status = models.CharField(max_length=8, choices=ScanStatus.choices, default=ScanStatus.PENDING)
    scan_detail = models.CharField(max_length=255, blank=True)
    scanned_at = models.DateTimeField(null=True, blank=True)
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    thumbnail_key = models.CharField(max_length=512, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    attached_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["message"], name="attachment_message_idx"),
            models.Index(fields=["scan_status", "created_at"], name="attachment_status_idx"),
            models.Index(
                fields=["created_at"], condition=models.Q(message__isnull=True), name="attachment_unattached_idx"
            ),
        ]

    def __str__(self) -> str:
        return self.original_name
