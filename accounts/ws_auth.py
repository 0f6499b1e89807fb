"""Websocket authentication: the Django session cookie (local login).

Clerk tokens are added by the Clerk verifier (cookie or Sec-WebSocket-Protocol, never the query string).
"""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack


def WebsocketAuthMiddleware(inner: Any) -> Any:  # noqa: N802 - reads like a class at the call site
    return AuthMiddlewareStack(inner)
