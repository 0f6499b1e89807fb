from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractUser, UserManager
from django.db import models


class SystemRole(models.TextChoices):
    OWNER = "OWNER", "Owner"
    ADMIN = "ADMIN", "Admin"
    MEMBER = "MEMBER", "Member"


class User(AbstractUser):
    """A person, synced from Clerk (``clerk_id`` set) or a local login (``clerk_id`` null).

    ``is_staff`` mirrors the system role (OWNER/ADMIN are staff); services keep it in sync.
    A deactivated user keeps their messages; ``is_active`` is False and ``deactivated_at`` set.
    """

    clerk_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    system_role = models.CharField(max_length=8, choices=SystemRole.choices, default=SystemRole.MEMBER)
    display_name = models.CharField(max_length=150, blank=True)
    avatar_url = models.URLField(max_length=500, blank=True)
    preferences = models.JSONField(default=dict, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    deactivated_at = models.DateTimeField(null=True, blank=True)
    # Clerk's updated_at (ms) of the newest webhook applied, to ignore out-of-order updates.
    clerk_updated_at = models.BigIntegerField(null=True, blank=True)

    objects: UserManager[User] = UserManager()  # type: ignore[assignment,misc]

    class Meta:
        indexes = [models.Index(fields=["system_role"], name="user_system_role_idx")]

    def __str__(self) -> str:
        return self.display_name or self.username

    @property
    def name(self) -> str:
        return self.display_name or self.get_full_name() or self.username


class WebhookDelivery(models.Model):
    """One received webhook, keyed by its ``svix-id`` so a redelivery changes nothing."""

    svix_id = models.CharField(max_length=100, unique=True)
    event_type = models.CharField(max_length=64)
    received_at = models.DateTimeField(auto_now_add=True)
    payload = models.JSONField(default=dict)

    def __str__(self) -> str:
        return f"{self.event_type} {self.svix_id}"


class AuditEntry(models.Model):
    """A security-relevant action: role changes, removals, moderation, deactivations, admin actions."""

    actor = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    thread_id = models.BigIntegerField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["action", "-created_at"], name="audit_action_idx")]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.action} {self.target_type}:{self.target_id}"

    @classmethod
    def record(
        cls, *, actor: Any, action: str, target: Any = None, thread_id: int | None = None, **data: Any
    ) -> AuditEntry:
        return cls.objects.create(
            actor=actor if getattr(actor, "pk", None) else None,
            action=action,
            target_type=type(target).__name__ if target is not None else "",
            target_id=str(getattr(target, "pk", "")) if target is not None else "",
            thread_id=thread_id,
            data=data,
        )
