"""Writes for users: profile, system role, deactivation, Clerk sync, API tokens. Each broadcasts after commit."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Any

from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator, validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.clerk import REVOKED_SESSION_TTL, revoked_session_key
from accounts.models import AuditEntry, SystemRole, User, WebhookDelivery
from chatapp import storable
from chatapp.broadcast import user_event_on_commit
from chatapp.cache import invalidate_on_commit
from chatapp.errors import Conflict, InvalidInput
from threads import policy

PREFERENCES_MAX_KEYS = 50
PREFERENCES_MAX_BYTES = 16 * 1024
DISPLAY_NAME_MAX_LENGTH = 150
AVATAR_URL_MAX_LENGTH = 500


@transaction.atomic
def user_create_local(
    *, username: str, password: str, display_name: str = "", system_role: str = SystemRole.MEMBER
) -> User:
    """Create a user who signs in with a local password (the embedded default; Clerk users come by webhook)."""
    if User.objects.filter(username=username).exists():
        raise InvalidInput(fields={"username": ["This username is taken."]})
    user = User.objects.create_user(username, password=password, display_name=display_name)
    if system_role != SystemRole.MEMBER:
        user_set_system_role(actor=None, user=user, role=system_role)
    AuditEntry.record(actor=None, action="user.create", target=user)
    return user


def _check_preferences(preferences: dict[str, Any]) -> dict[str, Any]:
    """A small JSON object (the page's settings, merged): at most 50 keys and 16 KB, and only what
    PostgreSQL's jsonb can hold (no NUL, no lone surrogate, finite numbers, bounded nesting)."""
    if len(preferences) > PREFERENCES_MAX_KEYS:
        raise InvalidInput(fields={"preferences": [f"An object with at most {PREFERENCES_MAX_KEYS} keys."]})
    problem = storable.json_problem(preferences)
    if problem is not None:
        raise InvalidInput(fields={"preferences": [problem.message]})
    try:
        encoded = json.dumps(preferences)
    except (TypeError, ValueError):
        raise InvalidInput(fields={"preferences": ["Must be plain JSON."]}) from None
    if len(encoded) > PREFERENCES_MAX_BYTES:
        raise InvalidInput(fields={"preferences": [f"At most {PREFERENCES_MAX_BYTES // 1024} KB."]})
    return preferences


def _check_display_name(value: str) -> str:
    value = value.strip()
    if len(value) > DISPLAY_NAME_MAX_LENGTH:
        raise InvalidInput(fields={"display_name": [f"At most {DISPLAY_NAME_MAX_LENGTH} characters."]})
    return value


def _check_avatar_url(value: str) -> str:
    value = value.strip()
    if value and _clean_url(value) != value:
        raise InvalidInput(fields={"avatar_url": [f"An http(s) URL of at most {AVATAR_URL_MAX_LENGTH} characters."]})
    return value


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
        user.display_name = _check_display_name(display_name)
        fields.append("display_name")
    if avatar_url is not None:
        user.avatar_url = _check_avatar_url(avatar_url)
        fields.append("avatar_url")
    if preferences is not None:
        if not isinstance(preferences, dict):
            raise InvalidInput(fields={"preferences": ["Must be an object."]})
        user.preferences = _check_preferences({**user.preferences, **preferences})
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
    policy.check_set_system_role(actor=actor)
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
    ``actor`` None is the system itself (a Clerk deletion, a script); a person must be allowed by
    the policy (staff, not themselves, an ADMIN never an OWNER).
    """
    if actor is not None:
        policy.check_manage_user(actor=actor, target=user)
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
    """Let a deactivated user sign in again; never one deleted in Clerk (their identity is erased)."""
    if actor is not None:
        policy.check_manage_user(actor=actor, target=user)
    if user.clerk_updated_at == CLERK_DELETED_MARK:
        raise Conflict("This account was deleted in Clerk and cannot be reactivated.", reason="deleted")
    user.is_active = True
    user.deactivated_at = None
    user.save(update_fields=["is_active", "deactivated_at"])
    invalidate_on_commit("user", [user.pk])
    AuditEntry.record(actor=actor, action="user.reactivate", target=user)
    return user


# --- Clerk ------------------------------------------------------------------

CLERK_USER_EVENTS = frozenset({"user.created", "user.updated", "user.deleted"})
CLERK_SESSION_END_EVENTS = frozenset({"session.revoked", "session.ended", "session.removed"})
# The deactivation reason of a user banned in Clerk (``banned: true`` in user.updated).
CLERK_BAN_REASON = "clerk user banned"
# ``clerk_updated_at`` of a user deleted in Clerk: newer than any update, so no late webhook revives them.
CLERK_DELETED_MARK = 2**63 - 1

_USERNAME_FORBIDDEN = re.compile(r"[^\w.@+-]")
_url_validator = URLValidator(schemes=["https", "http"])


def _clean_email(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 254:
        return ""
    try:
        validate_email(value)
    except ValidationError:
        return ""
    return value


def _clean_url(value: Any) -> str:
    """``value`` if it is an http(s) URL short enough to keep, else ""."""
    if not isinstance(value, str) or len(value) > AVATAR_URL_MAX_LENGTH:
        return ""
    try:
        _url_validator(value)
    except ValidationError:
        return ""
    return value


def _text(value: Any, limit: int = 150) -> str:
    return value.strip()[:limit] if isinstance(value, str) else ""


def _unique_username(wanted: str, *, clerk_id: str, exclude_pk: int | None = None) -> str:
    """``wanted`` made a valid, free username: ``alice``, else ``alice-2`` ... else a random suffix."""
    base = _USERNAME_FORBIDDEN.sub("", wanted)[:140] or _USERNAME_FORBIDDEN.sub("", clerk_id)[:140] or "user"
    others = User.objects.exclude(pk=exclude_pk) if exclude_pk is not None else User.objects.all()
    candidates = [base, *(f"{base}-{n}" for n in range(2, 6))]
    for candidate in candidates:
        if not others.filter(username=candidate).exists():
            return candidate
    return f"{base}-{secrets.token_hex(4)}"


def _clerk_profile(*, clerk_id: str, source: dict[str, Any], email: str) -> dict[str, Any]:
    """Local user fields from a Clerk user object or session claims (both use Clerk's field names)."""
    first_name = _text(source.get("first_name"))
    last_name = _text(source.get("last_name"))
    username = _text(source.get("username")) or email.partition("@")[0] or clerk_id
    return {
        "wanted_username": username,
        "first_name": first_name,
        "last_name": last_name,
        "display_name": f"{first_name} {last_name}".strip()[:150] or username[:150],
        "email": email,
        "avatar_url": _clean_url(source.get("image_url")),
    }


def _clerk_timestamp(value: Any) -> int | None:
    """Clerk's ``updated_at`` (ms since the epoch), or None if it is not a plausible one."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < CLERK_DELETED_MARK:
        return None
    return value


def _clerk_primary_email(data: dict[str, Any]) -> str:
    primary = data.get("primary_email_address_id")
    for entry in data.get("email_addresses") or []:
        if isinstance(entry, dict) and entry.get("id") == primary:
            return _clean_email(entry.get("email_address"))
    return ""


def _user_create_for_clerk(*, clerk_id: str, profile: dict[str, Any], **extra: Any) -> User:
    """Insert a local user for ``clerk_id`` (unusable password); a concurrent insert wins and is returned."""
    for _attempt in range(3):
        try:
            with transaction.atomic():
                user = User(
                    clerk_id=clerk_id,
                    username=_unique_username(profile["wanted_username"], clerk_id=clerk_id),
                    first_name=profile["first_name"],
                    last_name=profile["last_name"],
                    display_name=profile["display_name"],
                    email=profile["email"],
                    avatar_url=profile["avatar_url"],
                    **extra,
                )
                user.set_unusable_password()
                user.save()
                return user
        except IntegrityError:
            # Another request created this Clerk user (or took the username) meanwhile.
            existing = User.objects.filter(clerk_id=clerk_id).first()
            if existing is not None:
                return existing
    raise IntegrityError(f"could not create a local user for Clerk user {clerk_id}")


def user_get_or_create_from_clerk_claims(*, claims: dict[str, Any]) -> User:
    """The local user of a verified Clerk session token, created from its claims if the webhook has not yet.

    Session tokens carry few profile claims (``username``, ``email``, names and ``image_url`` only if the
    instance's session token is customised); ``user.created``/``user.updated`` fill in the rest.
    """
    clerk_id = str(claims["sub"])
    user = User.objects.filter(clerk_id=clerk_id).first()
    if user is not None:
        return user
    profile = _clerk_profile(clerk_id=clerk_id, source=claims, email=_clean_email(claims.get("email")))
    with transaction.atomic():
        return _user_create_for_clerk(clerk_id=clerk_id, profile=profile)


@transaction.atomic
def user_sync_from_clerk(*, data: dict[str, Any], event_type: str) -> tuple[User, bool]:
    """Apply a Clerk ``user.created``/``user.updated``/``user.deleted`` payload; returns (user, changed).

    An update older than the one stored (Clerk's ``updated_at``, ms) is ignored. ``public_metadata.role``
    (OWNER/ADMIN/MEMBER) sets the system role. ``user.deleted`` deactivates and anonymises the user
    (messages stay; broadcasts ``user.deactivated``) and marks them so no later webhook revives them.
    ``banned: true`` deactivates the user (their sockets close with 4403, their tokens are refused);
    ``banned: false`` reactivates them if that ban was their latest deactivation.
    Broadcasts ``user.updated`` to the user's group after a change.
    """
    clerk_id = data.get("id")
    if not isinstance(clerk_id, str) or not clerk_id or len(clerk_id) > 64:
        raise InvalidInput("The Clerk user payload has no valid id.", fields={"data.id": ["Required."]})
    if event_type not in CLERK_USER_EVENTS:
        raise InvalidInput(f"Not a Clerk user event: {event_type}.")
    user = User.objects.select_for_update().filter(clerk_id=clerk_id).first()
    if event_type == "user.deleted":
        return _user_delete_from_clerk(clerk_id=clerk_id, user=user)
    updated_at = _clerk_timestamp(data.get("updated_at"))
    profile = _clerk_profile(clerk_id=clerk_id, source=data, email=_clerk_primary_email(data))
    if user is None:
        created = _user_create_for_clerk(clerk_id=clerk_id, profile=profile)
        user = User.objects.select_for_update().get(pk=created.pk)
    if user.clerk_updated_at is not None and (updated_at is None or updated_at < user.clerk_updated_at):
        return user, False
    if user.username != profile["wanted_username"]:
        user.username = _unique_username(profile["wanted_username"], clerk_id=clerk_id, exclude_pk=user.pk)
    for name in ("first_name", "last_name", "display_name", "email", "avatar_url"):
        setattr(user, name, profile[name])
    user.clerk_updated_at = updated_at
    user.save(
        update_fields=[
            "username",
            "first_name",
            "last_name",
            "display_name",
            "email",
            "avatar_url",
            "clerk_updated_at",
        ]
    )
    metadata = data.get("public_metadata")
    role = metadata.get("role") if isinstance(metadata, dict) else None
    if isinstance(role, str) and role.upper() in SystemRole.values and role.upper() != user.system_role:
        user_set_system_role(actor=None, user=user, role=role.upper())
    banned = data.get("banned")
    if banned is True and user.is_active:
        user_deactivate(actor=None, user=user, reason=CLERK_BAN_REASON)
    elif banned is False and not user.is_active and _deactivated_by_clerk_ban(user):
        user_reactivate(actor=None, user=user)
    invalidate_on_commit("user", [user.pk])
    user_event_on_commit(user_id=user.pk, type="user.updated", data={"id": user.pk, "name": user.name})
    return user, True


def _deactivated_by_clerk_ban(user: User) -> bool:
    """Whether the user's latest deactivation was a Clerk ban (an unban undoes only that one)."""
    latest = (
        AuditEntry.objects.filter(action="user.deactivate", target_type="User", target_id=str(user.pk))
        .order_by("-created_at", "-id")
        .values_list("data", flat=True)
        .first()
    )
    return isinstance(latest, dict) and latest.get("reason") == CLERK_BAN_REASON


def _user_delete_from_clerk(*, clerk_id: str, user: User | None) -> tuple[User, bool]:
    if user is None:
        # Deleted before we heard of them: this tombstone keeps a late user.created from creating them.
        profile = _clerk_profile(clerk_id=clerk_id, source={}, email="")
        user = _user_create_for_clerk(clerk_id=clerk_id, profile=profile, is_active=False)
    if user.clerk_updated_at == CLERK_DELETED_MARK:
        return user, False
    user.clerk_updated_at = CLERK_DELETED_MARK
    user.save(update_fields=["clerk_updated_at"])
    user_deactivate(actor=None, user=user, anonymise=True, reason="clerk user.deleted")
    return user, True


def clerk_session_revoke(*, data: dict[str, Any]) -> str:
    """Refuse the tokens of a session Clerk reports revoked/ended/removed, for as long as they can live.

    Broadcasts ``session.revoked`` ({"session_id"}) to the user's group after commit, so sockets
    opened with that session can close.
    """
    session_id = data.get("id")
    if not isinstance(session_id, str) or not session_id or len(session_id) > 64:
        raise InvalidInput("The Clerk session payload has no valid id.", fields={"data.id": ["Required."]})
    # Written now, not on commit: a revocation must take effect even if the delivery is retried.
    cache.set(revoked_session_key(session_id), 1, REVOKED_SESSION_TTL)
    user_clerk_id = data.get("user_id")
    user = User.objects.filter(clerk_id=user_clerk_id).first() if isinstance(user_clerk_id, str) else None
    if user is not None:
        user_event_on_commit(user_id=user.pk, type="session.revoked", data={"session_id": session_id})
    return session_id


def local_session_id(session_key: str) -> str:
    """The public id of a Django (local login) session: a digest, never the cookie's value itself."""
    return "local_" + hashlib.sha256(session_key.encode()).hexdigest()[:24]


def api_token_session_id(key: str) -> str:
    """The public id of what an API token opened (a socket): a digest, never the key itself."""
    return "token_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def api_token_deleted(*, user_id: int, key: str) -> None:
    """An API token is gone (revoked, a new password, a deactivation, the admin): the sockets opened
    with it close (``session.revoked`` naming :func:`api_token_session_id`, after commit).

    Connected to the token's ``post_delete`` in :mod:`accounts.apps`, so every way of deleting one
    announces it.
    """
    user_event_on_commit(user_id=user_id, type="session.revoked", data={"session_id": api_token_session_id(key)})


def user_password_changed(*, user: User) -> None:
    """A new password ends what the old one opened: API tokens are deleted (their sockets close:
    :func:`api_token_deleted`), and sockets signed in with a session close (``user.password_changed``;
    Django already refuses those sessions on their next request, their hash no longer matches).
    Sockets signed in through Clerk are not affected."""
    from rest_framework.authtoken.models import Token

    Token.objects.filter(user=user).delete()
    AuditEntry.record(actor=None, action="user.password_changed", target=user)
    user_event_on_commit(user_id=user.pk, type="user.password_changed", data={"id": user.pk})


def session_signed_out(*, user_id: int, session_key: str | None) -> None:
    """A local sign-out: tell the user's sockets opened with that session to close (``session.revoked``).

    Django's logout deletes the session row itself; this only announces it. Connected to
    ``user_logged_out`` in :mod:`accounts.apps`.
    """
    if session_key:
        user_event_on_commit(
            user_id=user_id, type="session.revoked", data={"session_id": local_session_id(session_key)}
        )


@transaction.atomic
def clerk_webhook_process(*, svix_id: str, event: dict[str, Any]) -> str:
    """Apply one verified Clerk webhook exactly once (per ``svix-id``).

    Returns ``"processed"``, ``"ignored"`` (unknown type or an out-of-date update) or ``"duplicate"``
    (a redelivery, also when two copies race: the unique ``svix_id`` lets one in). The delivery row
    and its changes commit together, so a failed delivery is retried by Svix.
    """
    event_type = event.get("type")
    data = event.get("data")
    if not isinstance(event_type, str) or not event_type or not isinstance(data, dict):
        raise InvalidInput("A Clerk event has a string `type` and an object `data`.")
    if not svix_id or len(svix_id) > 100:
        raise InvalidInput("The svix-id header is invalid.")
    try:
        with transaction.atomic():
            WebhookDelivery.objects.create(
                svix_id=svix_id,
                event_type=event_type[:64],
                # Ids only: the payload's personal data would outlive a user.deleted here.
                payload={
                    "object_id": str(data.get("id", ""))[:64],
                    "updated_at": _clerk_timestamp(data.get("updated_at")),
                },
            )
    except IntegrityError:
        return "duplicate"
    if event_type in CLERK_USER_EVENTS:
        _, changed = user_sync_from_clerk(data=data, event_type=event_type)
        return "processed" if changed else "ignored"
    if event_type in CLERK_SESSION_END_EVENTS:
        clerk_session_revoke(data=data)
        return "processed"
    return "ignored"


# --- API tokens (local login) ---------------------------------------------------


@transaction.atomic
def user_token_issue(*, user: User) -> str:
    """My DRF API token (created on first use; the same key until revoked)."""
    from rest_framework.authtoken.models import Token

    token, _ = Token.objects.get_or_create(user=user)
    return str(token.key)


@transaction.atomic
def user_token_revoke(*, user: User) -> bool:
    """Delete my DRF API token; False if I had none."""
    from rest_framework.authtoken.models import Token

    deleted, _ = Token.objects.filter(user=user).delete()
    return deleted > 0
