"""DRF authentication for Clerk session tokens (Authorization: Bearer or the __session cookie)."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication
from rest_framework.request import Request


class ClerkJWTAuthentication(authentication.BaseAuthentication):
    """Placeholder until the Clerk verifier lands: declines every request so other classes run."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        return None

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
