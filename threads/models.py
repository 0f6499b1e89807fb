from __future__ import annotations

from django.conf import settings
from django.db import models


class ThreadKind(models.TextChoices):
    DIRECT = "DIRECT", "Direct"
    GROUP = "GROUP", "Group"


class ThreadRole(models.TextChoices):
    OWNER = "OWNER", "Owner"
    ADMIN = "ADMIN", "Admin"
    MEMBER = "MEMBER", "Member"


class Thread(models.Model):
    """A conversation. ``last_sequence`` is the per-thread event counter (see chatapp.broadcast)."""

    title = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=8, choices=ThreadKind.choices, default=ThreadKind.GROUP)
    # "<low user id>:<high user id>" for a direct thread, so there is one per pair.
    direct_key = models.CharField(max_length=64, unique=True, null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_message_at = models.DateTimeField(null=True, blank=True)
    last_sequence = models.BigIntegerField(default=0)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["-last_message_at"], name="thread_last_message_idx")]

    def __str__(self) -> str:
        return self.title or f"Thread {self.pk}"


class ThreadParticipant(models.Model):
    """Membership with a thread role and this user's personal state (read marks, mute, archive)."""

    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="participants")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="participations")
    role = models.CharField(max_length=8, choices=ThreadRole.choices, default=ThreadRole.MEMBER)
    joined_at = models.DateTimeField(auto_now_add=True)
    # Receipts are "up to" marks by sequence, not a row per message per reader.
    last_read_sequence = models.BigIntegerField(default=0)
    last_delivered_sequence = models.BigIntegerField(default=0)
    muted = models.BooleanField(default=False)
    archived_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["thread", "user"], name="participant_unique_thread_user")]
        indexes = [models.Index(fields=["user", "thread"], name="participant_user_thread_idx")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.thread_id} ({self.role})"


class ThreadEvent(models.Model):
    """The durable per-thread event log a reconnecting client resumes from.

    One row per sequenced event (message created/edited/deleted, reactions, membership, receipts).
    ``payload`` is the exact JSON the socket carried; ``message_id`` lets a delete scrub old bodies.
    """

    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="events")
    sequence = models.BigIntegerField()
    type = models.CharField(max_length=48)
    payload = models.JSONField()
    message_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["thread", "sequence"], name="event_unique_thread_sequence")]
        indexes = [models.Index(fields=["message_id"], name="event_message_idx")]
        ordering = ["thread_id", "sequence"]

    def __str__(self) -> str:
        return f"{self.thread_id}#{self.sequence} {self.type}"
