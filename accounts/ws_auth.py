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

from http.cookies import SimpleCookie
from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from django.contrib.auth.models import AnonymousUser

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


def socket_session_token(scope: dict[str, Any]) -> str | None:
    """A Clerk token from the ``bearer.<jwt>`` subprotocol, else from the ``__session`` cookie."""
    for item in offered_subprotocols(scope):
        if item.startswith(BEARER_PREFIX) and len(item) > len(BEARER_PREFIX):
            return item[len(BEARER_PREFIX) :]
    cookies = scope.get("cookies")
    if cookies is None:
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(_header(scope, b"cookie"))
        cookies = {key: morsel.value for key, morsel in parsed.items()}
    token = cookies.get(SESSION_COOKIE)
    return token or None


class ClerkWebsocketMiddleware(BaseMiddleware):
    """Runs inside channels' AuthMiddlewareStack: a Clerk token, when offered, decides ``scope["user"]``."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        scope = dict(scope)
        user = scope.get("user")
        scope["auth_method"] = "session" if user is not None and user.is_authenticated else None
        session = scope.get("session")
        if scope["auth_method"] == "session" and session is not None and session.session_key:
            scope["auth_session_id"] = local_session_id(session.session_key)
        token = socket_session_token(scope) if clerk_enabled() else None
        if token is not None:
            try:
                user, claims = await database_sync_to_async(user_for_session_token)(token)
            except ClerkTokenError as exc:
                scope["user"] = AnonymousUser()
                scope["auth_error"] = exc.reason
                scope["auth_method"] = None
            else:
                scope["user"] = user
                scope["auth_method"] = "clerk"
                scope["auth_session_id"] = claims["sid"]
        return await super().__call__(scope, receive, send)


def WebsocketAuthMiddleware(inner: Any) -> Any:  # noqa: N802 - reads like a class at the call site
    """Cookies -> Django session -> session user -> Clerk token (which wins when one is offered)."""
    return AuthMiddlewareStack(ClerkWebsocketMiddleware(inner))
