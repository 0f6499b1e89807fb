"""Writes for users: profile, system role, deactivation. Each broadcasts after commit."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts.models import AuditEntry, SystemRole, User
from chatapp.broadcast import user_event_on_commit
from chatapp.cache import invalidate_on_commit
from chatapp.errors import Forbidden, InvalidInput

PREFERENCES_MAX_KEYS = 50


@transaction.atomic
def user_update_profile(
    *,
    user: User,
    display_name: str | None = None,
    avatar_url: str | None = None,
    preferences: dict[str, Any] | None = None,
) -> User:
    """Change my own display name, avatar and preferences (never my role or staff flag)."""
    fields = []
    if display_name is not None:
        user.display_name = display_name.strip()[:150]
        fields.append("display_name")
    if avatar_url is not None:
        user.avatar_url = avatar_url
        fields.append("avatar_url")
    if preferences is not None:
        if not isinstance(preferences, dict) or len(preferences) > PREFERENCES_MAX_KEYS:
            raise InvalidInput(fields={"preferences": [f"An object with at most {PREFERENCES_MAX_KEYS} keys."]})
        user.preferences = {**user.preferences, **preferences}
        fields.append("preferences")
    if fields:
        user.save(update_fields=fields)
        invalidate_on_commit("user", [user.pk])
        user_event_on_commit(user_id=user.pk, type="user.updated", data={"id": user.pk, "name": user.name})
    return user


@transaction.atomic
def user_set_system_role(*, actor: User | None, user: User, role: str) -> User:
    """Set a system role; OWNER/ADMIN are staff for the admin. Only a system OWNER (or a script) may do it."""
    if role not in SystemRole.values:
        raise InvalidInput(fields={"system_role": [f"Must be one of {', '.join(SystemRole.values)}."]})
    if actor is not None and actor.system_role != SystemRole.OWNER:
        raise Forbidden("Only a system owner can change system roles.")
    previous = user.system_role
    user.system_role = role
    user.is_staff = role in (SystemRole.OWNER, SystemRole.ADMIN)
    user.is_superuser = role == SystemRole.OWNER
    user.save(update_fields=["system_role", "is_staff", "is_superuser"])
    invalidate_on_commit("user", [user.pk])
    AuditEntry.record(actor=actor, action="user.system_role", target=user, role=role, previous=previous)
    return user


@transaction.atomic
def user_deactivate(*, actor: User | None, user: User, anonymise: bool = False, reason: str = "") -> User:
    """Deactivate a user (their messages stay). ``anonymise`` also erases their identity (Clerk deletion).

    Broadcasts ``user.deactivated`` to the user's group after commit: their open sockets close.
    """
    user.is_active = False
    user.deactivated_at = user.deactivated_at or timezone.now()
    fields = ["is_active", "deactivated_at"]
    if anonymise:
        user.username = f"deleted-{user.pk}"
        user.display_name = "Deleted user"
        user.first_name = user.last_name = ""
        user.email = ""
        user.avatar_url = ""
        user.preferences = {}
        user.set_unusable_password()
        fields += [
            "username",
            "display_name",
            "first_name",
            "last_name",
            "email",
            "avatar_url",
            "preferences",
            "password",
        ]
    user.save(update_fields=fields)
    invalidate_on_commit("user", [user.pk])
    from rest_framework.authtoken.models import Token

    Token.objects.filter(user=user).delete()
    AuditEntry.record(actor=actor, action="user.deactivate", target=user, anonymise=anonymise, reason=reason)
    user_event_on_commit(user_id=user.pk, type="user.deactivated", data={"id": user.pk})
    return user


@transaction.atomic
def user_reactivate(*, actor: User | None, user: User) -> User:
    user.is_active = True
    user.deactivated_at = None
    user.save(update_fields=["is_active", "deactivated_at"])
    invalidate_on_commit("user", [user.pk])
    AuditEntry.record(actor=actor, action="user.reactivate", target=user)
    return user
