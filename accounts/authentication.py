"""DRF authentication for Clerk session tokens (``Authorization: Bearer <jwt>`` or the ``__session`` cookie).

The class only claims what is Clerk's: a JWT-shaped Bearer value, or, when the request has no
Authorization header at all, the ``__session`` cookie. Everything else (``Token <key>``, a
Bearer value that is not a JWT, no credentials) is left to the next class in
``DEFAULT_AUTHENTICATION_CLASSES``. A claimed token that does not verify is a 401, never a
fall-through. With no ``CLERK_ISSUER`` configured the class claims nothing.
"""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions
from rest_framework.request import Request

from accounts.clerk import SESSION_COOKIE, ClerkTokenError, clerk_enabled, looks_like_jwt, user_for_session_token


def request_session_token(request: Request) -> tuple[str, str] | None:
    """(token, "bearer" | "cookie") for a request carrying a Clerk session token, else None."""
    header = authentication.get_authorization_header(request)
    if header:
        parts = header.split()
        if len(parts) == 2 and parts[0].lower() == b"bearer" and looks_like_jwt(parts[1]):
            return parts[1].decode("ascii"), "bearer"
        return None
    cookie = request.COOKIES.get(SESSION_COOKIE)
    if cookie:
        return cookie, "cookie"
    return None


class ClerkJWTAuthentication(authentication.BaseAuthentication):
    """A Clerk session token -> the local user (created from its claims on first sight); ``request.auth`` = claims."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        if not clerk_enabled():
            return None
        found = request_session_token(request)
        if found is None:
            return None
        token, source = found
        try:
            user, claims = user_for_session_token(token)
        except ClerkTokenError as exc:
            raise exceptions.AuthenticationFailed(f"Invalid Clerk session token ({exc.reason}).") from None
        if source == "cookie":
            # The browser sends the cookie on its own, like Django's session cookie: same CSRF rule.
            authentication.SessionAuthentication().enforce_csrf(request)
        return user, claims

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
