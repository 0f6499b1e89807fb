from __future__ import annotations

from django.conf import settings
from django.db import models

from threads.models import Thread


class Message(models.Model):
    """A message. ``sequence`` is the thread sequence of its ``message.created`` event.

    Deleting is soft: ``deleted_at`` is set and ``body``/``body_html`` are emptied (a tombstone).
    ``version`` starts at 1 and grows by one per edit (optimistic concurrency for edits).
    """

    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="messages")
    sender = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="messages")
    body = models.TextField(blank=True)
    body_html = models.TextField(blank=True)
    reply_to = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replies")
    client_msg_id = models.CharField(max_length=64)
    sequence = models.BigIntegerField()
    version = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    edited_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)
    deleted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["sender", "client_msg_id"], name="message_unique_client_msg_id"),
            models.UniqueConstraint(fields=["thread", "sequence"], name="message_unique_thread_sequence"),
        ]
        indexes = [models.Index(fields=["reply_to"], name="message_reply_to_idx")]

    def __str__(self) -> str:
        return f"{self.thread_id}#{self.sequence}"

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None


class MessageEdit(models.Model):
    """The body a message had at ``version`` before an edit replaced it."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="edits")
    version = models.PositiveIntegerField()
    previous_body = models.TextField()
    editor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    edited_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["message", "version"], name="edit_unique_message_version")]
        ordering = ["message_id", "version"]


class Reaction(models.Model):
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="reactions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    emoji = models.CharField(max_length=32)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["message", "user", "emoji"], name="reaction_unique_message_user_emoji")
        ]


class NotificationKind(models.TextChoices):
    MENTION = "MENTION", "Mention"
    REPLY = "REPLY", "Reply"
    DIRECT = "DIRECT", "Direct message"


class Notification(models.Model):
    recipient = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    kind = models.CharField(max_length=8, choices=NotificationKind.choices)
    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="+")
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="+")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["recipient", "message", "kind"], name="notification_unique_per_message")
        ]
        indexes = [models.Index(fields=["recipient", "read_at", "-id"], name="notification_recipient_idx")]
        ordering = ["-id"]
