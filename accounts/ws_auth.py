"""Websocket authentication, and the credentials a socket keeps for as long as it is open.

Credentials are looked for in this order; the first one offered decides, so a refused credential
never falls through to a cookie:

1. a Clerk session token in the ``Sec-WebSocket-Protocol`` header (the client offers the
   subprotocols ``["chatapp.v1", "bearer.<jwt>"]``), when Clerk is on;
2. an API token (bots and programs; the same DRF token as ``Authorization: Token <key>`` over
   REST): the subprotocol ``token.<key>``, or the header ``Authorization: Token <key>``;
3. Clerk's ``__session`` cookie, when Clerk is on;
4. Django's session cookie (local login).

Never from the query string, which ends up in access logs. Clerk tokens are verified by the same
code as the REST API (:mod:`accounts.clerk`).

What the consumer finds in the scope (see docs/auth.md):

- ``scope["user"]``: the user, or AnonymousUser when no credential was offered or one was refused.
- ``scope["auth_error"]``: set when a credential was offered and refused: ``token_invalid``,
  ``token_expired``, ``session_revoked``, ``session_pending`` or ``user_inactive``.
- ``scope["auth_method"]``: ``"clerk"``, ``"token"`` or ``"session"``; ``scope["auth_session_id"]``:
  the Clerk ``sid``, for a Django session :func:`accounts.services.local_session_id` of its key,
  for an API token :func:`accounts.services.api_token_session_id` of its key. A
  ``session.revoked`` user event naming that id closes the socket with 4401.
- ``scope["auth_credentials"]``: :class:`SocketCredentials`, what :func:`credentials_check`
  checks again once the socket receives its notices and on every process beat.

The consumer closes with 4401 before accepting when the user is anonymous, and otherwise accepts
with :func:`accepted_subprotocol` (``"chatapp.v1"``, never the entry that holds a credential).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user
from django.contrib.auth.models import AnonymousUser
from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore
from django.db import close_old_connections
from django.http import HttpRequest
from django.utils import timezone

from accounts.clerk import (
    SESSION_COOKIE,
    SESSION_REVOKED,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    USER_INACTIVE,
    ClerkTokenError,
    clerk_enabled,
    revoked_sessions,
    user_for_session_token,
)
from accounts.models import User
from accounts.services import api_token_session_id, local_session_id

SUBPROTOCOL = "chatapp.v1"
BEARER_PREFIX = "bearer."
TOKEN_PREFIX = "token."  # noqa: S105 - a subprotocol prefix, not a secret
# DRF's keys are 40 hex characters; anything far longer is not one.
MAX_API_TOKEN_LENGTH = 128

# Why a socket's credentials no longer hold (besides the ClerkTokenError reasons).
TOKEN_REVOKED = "token_revoked"  # noqa: S105 - a reason code, not a secret
PASSWORD_CHANGED = "password_changed"  # noqa: S105 - a reason code, not a secret


@dataclass(eq=False)
class SocketCredentials:
    """What a socket was opened (or last re-authenticated) with. The secrets stay in this process.

    ``method`` None: the scope named a user without saying how (a test, a trusted caller); only
    the user's standing is checked then.
    """

    user_id: int
    method: str | None = None  # "clerk", "token" or "session"
    session_id: str | None = None  # the public id ``session.revoked`` notices name
    secret: str = field(default="", repr=False)  # the Django session key or the API token key
    auth_hash: str = field(default="", repr=False)  # session: the user's session auth hash at sign-in
    expires_at: float | None = None  # clerk: the token's ``exp`` (unix seconds)

    def expired(self, now: float) -> bool:
        """A Clerk token past its expiry and the configured clock leeway."""
        return self.expires_at is not None and now > self.expires_at + settings.CLERK_LEEWAY_SECONDS


def scope_credentials(scope: dict[str, Any]) -> SocketCredentials:
    """The credentials the middleware put in the scope, else the bare user's (see ``method`` None)."""
    found = scope.get("auth_credentials")
    if isinstance(found, SocketCredentials):
        return found
    return SocketCredentials(
        user_id=int(scope["user"].pk), method=scope.get("auth_method"), session_id=scope.get("auth_session_id")
    )


# --- Finding the credential --------------------------------------------------------------------


def _header(scope: dict[str, Any], name: bytes) -> str:
    values = [value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name]
    return ",".join(values)


def offered_subprotocols(scope: dict[str, Any]) -> list[str]:
    """The subprotocols the client offered (daphne parses them into the scope; the header is the fallback)."""
    offered = scope.get("subprotocols")
    if not offered:
        offered = _header(scope, b"sec-websocket-protocol").split(",")
    return [item.strip() for item in offered if item and item.strip()]


def accepted_subprotocol(scope: dict[str, Any]) -> str | None:
    """The subprotocol to accept with: ``"chatapp.v1"`` if offered, else None. Never a credential entry."""
    return SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(scope) else None


def _offered(scope: dict[str, Any], prefix: str) -> str | None:
    for item in offered_subprotocols(scope):
        if item.startswith(prefix) and len(item) > len(prefix):
            return item[len(prefix) :]
    return None


def socket_session_token(scope: dict[str, Any], cookies: dict[str, str]) -> str | None:
    """A Clerk token from the ``bearer.<jwt>`` subprotocol, else from the ``__session`` cookie."""
    return _offered(scope, BEARER_PREFIX) or cookies.get(SESSION_COOKIE) or None


def socket_api_token(scope: dict[str, Any]) -> str | None:
    """An API token from the ``token.<key>`` subprotocol, else from ``Authorization: Token <key>``."""
    offered = _offered(scope, TOKEN_PREFIX)
    if offered is not None:
        return offered
    parts = _header(scope, b"authorization").split()
    if len(parts) == 2 and parts[0].lower() == "token":
        return parts[1]
    return None


def _refused(reason: str) -> dict[str, Any]:
    return {"user": AnonymousUser(), "auth_method": None, "auth_error": reason}


def _signed_in(user: User, credentials: SocketCredentials) -> dict[str, Any]:
    return {
        "user": user,
        "auth_method": credentials.method,
        "auth_session_id": credentials.session_id,
        "auth_credentials": credentials,
    }


def clerk_credentials(token: str) -> tuple[User, SocketCredentials]:
    """The user of a Clerk session token and the credentials a socket keeps; ClerkTokenError if refused."""
    user, claims = user_for_session_token(token)
    credentials = SocketCredentials(
        user_id=user.pk, method="clerk", session_id=claims["sid"], expires_at=float(claims["exp"])
    )
    return user, credentials


def _api_token_found(key: str) -> dict[str, Any]:
    from rest_framework.authentication import TokenAuthentication
    from rest_framework.exceptions import AuthenticationFailed

    if len(key) > MAX_API_TOKEN_LENGTH:
        return _refused(TOKEN_INVALID)
    try:
        # DRF's own lookup, as over REST: the key exists and its user is active.
        user, _ = TokenAuthentication().authenticate_credentials(key)
    except AuthenticationFailed:
        return _refused(TOKEN_INVALID)
    credentials = SocketCredentials(user_id=user.pk, method="token", session_id=api_token_session_id(key), secret=key)
    return _signed_in(user, credentials)


def authenticate_socket(scope: dict[str, Any], cookies: dict[str, str]) -> dict[str, Any]:
    """What the scope learns about the client: ``user``, ``auth_method``, and ``auth_session_id`` and
    ``auth_credentials`` or ``auth_error``. Synchronous (database and cache reads); run once per
    handshake in a worker thread."""
    bearer = _offered(scope, BEARER_PREFIX) if clerk_enabled() else None
    api_token = socket_api_token(scope) if bearer is None else None
    if api_token is not None:
        return _api_token_found(api_token)
    token = bearer or (cookies.get(SESSION_COOKIE) if clerk_enabled() else None)
    if token:
        try:
            user, credentials = clerk_credentials(token)
        except ClerkTokenError as exc:
            return _refused(exc.reason)
        return _signed_in(user, credentials)
    session_key = cookies.get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return {"user": AnonymousUser(), "auth_method": None}
    request = HttpRequest()  # django.contrib.auth.get_user reads the session off a request
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    session_user = get_user(request)
    if not session_user.is_authenticated:
        return {"user": session_user, "auth_method": None}
    credentials = SocketCredentials(
        user_id=session_user.pk,
        method="session",
        session_id=local_session_id(session_key),
        secret=session_key,
        auth_hash=session_user.get_session_auth_hash(),
    )
    return _signed_in(session_user, credentials)  # type: ignore[arg-type]


# --- Checking it again ---------------------------------------------------------------------------


def _live_sessions(keys: list[str]) -> set[str]:
    """Which of these Django session keys still name an unexpired session."""
    if not keys:
        return set()
    engine = import_module(settings.SESSION_ENGINE).SessionStore
    if issubclass(engine, DatabaseSessionStore):  # db and cached_db: the table is the record
        model = engine.get_model_class()
        rows = model.objects.filter(session_key__in=keys, expire_date__gt=timezone.now())
        return set(rows.values_list("session_key", flat=True))
    return {key for key in keys if engine().exists(key)}


def credentials_check(entries: Sequence[SocketCredentials], *, now: float | None = None) -> list[str | None]:
    """For each socket's credentials: None while they hold, else why not (``user_inactive``,
    ``session_revoked``, ``password_changed``, ``token_revoked`` or ``token_expired``).

    Batched for a whole process: one query for the users (with their API token), one for the
    Django sessions if any socket has one, one cache read for revoked Clerk sessions. What it
    reads is what every revocation writes before it announces itself (a deactivated or deleted
    user, a deleted session or token, a changed password, a revoked Clerk session), so a socket
    checked after joining its user's notices either sees a revocation here or receives its notice.
    """
    now = time.time() if now is None else now
    user_ids = {entry.user_id for entry in entries}
    users: dict[int, tuple[bool, str, str | None]] = {}
    rows = User.objects.filter(pk__in=user_ids).values_list(
        "pk", "is_active", "deactivated_at", "password", "auth_token__key"
    )
    for pk, active, deactivated_at, password, token_key in rows:
        users[pk] = (bool(active and deactivated_at is None), password, token_key)
    sessions = _live_sessions([e.secret for e in entries if e.method == "session"])
    revoked = revoked_sessions([e.session_id for e in entries if e.method == "clerk" and e.session_id])
    hashes: dict[str, str] = {}

    def session_hash(password: str) -> str:
        if password not in hashes:
            hashes[password] = User(password=password).get_session_auth_hash()
        return hashes[password]

    reasons: list[str | None] = []
    for entry in entries:
        found = users.get(entry.user_id)
        reason: str | None = None
        if found is None or not found[0]:
            reason = USER_INACTIVE
        elif entry.method == "session":
            if entry.secret not in sessions:
                reason = SESSION_REVOKED
            elif session_hash(found[1]) != entry.auth_hash:
                reason = PASSWORD_CHANGED
        elif entry.method == "token":
            if found[2] != entry.secret:
                reason = TOKEN_REVOKED
        elif entry.method == "clerk":
            if entry.expired(now):
                reason = TOKEN_EXPIRED
            elif entry.session_id in revoked:
                reason = SESSION_REVOKED
        reasons.append(reason)
    return reasons


# --- The middleware --------------------------------------------------------------------------------


class WebsocketAuthMiddleware:
    """Cookies -> Django session user, or an API token, or a Clerk token (see the module's order).

    One middleware instead of channels' cookie/session/auth stack: one worker-thread hop per
    handshake (not the shared sync thread, which serialised connect storms), and the scope the
    socket keeps for its lifetime holds the user and its credentials but not the cookies or the
    session object.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        found = await _authenticate(scope, _cookies(scope))
        return await self.inner({**scope, **found}, receive, send)


def _cookies(scope: dict[str, Any]) -> dict[str, str]:
    parsed: SimpleCookie = SimpleCookie()
    try:
        parsed.load(_header(scope, b"cookie"))
    except CookieError:
        return {}
    return {key: morsel.value for key, morsel in parsed.items()}


def _authenticate_and_close(scope: dict[str, Any], cookies: dict[str, str]) -> dict[str, Any]:
    try:
        return authenticate_socket(scope, cookies)
    finally:
        close_old_connections()


_authenticate = sync_to_async(_authenticate_and_close, thread_sensitive=False)
