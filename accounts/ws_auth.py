"""Websocket authentication: a Clerk session token, else the Django session cookie (local login).

The Clerk token comes from the ``Sec-WebSocket-Protocol`` header (the client offers the
subprotocols ``["chatapp.v1", "bearer.<jwt>"]``) or from the ``__session`` cookie; never from the
query string, which ends up in access logs. It is verified by the same code as the REST API
(:mod:`accounts.clerk`).

What the consumer finds in the scope (see docs/auth.md):

- ``scope["user"]``: the user, or AnonymousUser when no credential was offered or a token was refused.
- ``scope["auth_error"]``: set when a token was offered and refused: ``token_invalid``, ``token_expired``,
  ``session_revoked`` or ``user_inactive``.
- ``scope["auth_method"]``: ``"clerk"`` or ``"session"``; ``scope["auth_session_id"]``: the Clerk ``sid``,
  or for a Django session :func:`accounts.services.local_session_id` of its key. A ``session.revoked``
  user event naming that id closes the socket with 4401.

The consumer closes with 4401 before accepting when the user is anonymous, and otherwise accepts
with :func:`accepted_subprotocol` (``"chatapp.v1"``, never the ``bearer.`` entry that holds the token).
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user
from django.contrib.auth.models import AnonymousUser
from django.db import close_old_connections
from django.http import HttpRequest

from accounts.clerk import SESSION_COOKIE, ClerkTokenError, clerk_enabled, user_for_session_token
from accounts.services import local_session_id

SUBPROTOCOL = "chatapp.v1"
BEARER_PREFIX = "bearer."


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
    """The subprotocol to accept with: ``"chatapp.v1"`` if offered, else None. Never the bearer entry."""
    return SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(scope) else None


def socket_session_token(scope: dict[str, Any], cookies: dict[str, str]) -> str | None:
    """A Clerk token from the ``bearer.<jwt>`` subprotocol, else from the ``__session`` cookie."""
    for item in offered_subprotocols(scope):
        if item.startswith(BEARER_PREFIX) and len(item) > len(BEARER_PREFIX):
            return item[len(BEARER_PREFIX) :]
    return cookies.get(SESSION_COOKIE) or None


def authenticate_socket(scope: dict[str, Any], cookies: dict[str, str]) -> dict[str, Any]:
    """What the scope learns about the client: ``user``, ``auth_method``, and ``auth_session_id`` or
    ``auth_error``. Synchronous (database and cache reads); run once per handshake in a worker thread."""
    token = socket_session_token(scope, cookies) if clerk_enabled() else None
    if token is not None:
        try:
            user, claims = user_for_session_token(token)
        except ClerkTokenError as exc:
            return {"user": AnonymousUser(), "auth_method": None, "auth_error": exc.reason}
        return {"user": user, "auth_method": "clerk", "auth_session_id": claims["sid"]}
    session_key = cookies.get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return {"user": AnonymousUser(), "auth_method": None}
    request = HttpRequest()  # django.contrib.auth.get_user reads the session off a request
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    session_user = get_user(request)
    if not session_user.is_authenticated:
        return {"user": session_user, "auth_method": None}
    return {"user": session_user, "auth_method": "session", "auth_session_id": local_session_id(session_key)}


class WebsocketAuthMiddleware:
    """Cookies -> Django session user, or a Clerk token (which wins when one is offered and Clerk is on).

    One middleware instead of channels' cookie/session/auth stack: one worker-thread hop per
    handshake (not the shared sync thread, which serialised connect storms), and the scope the
    socket keeps for its lifetime holds the user but not the session, cookies or their wrappers.
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
