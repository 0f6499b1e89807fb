"""Refuse websocket handshakes from origins that are not ours, before accept."""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings


def allowed_origins() -> list[str]:
    if settings.WEBSOCKET_ALLOWED_ORIGINS:
        return list(settings.WEBSOCKET_ALLOWED_ORIGINS)
    # Same-host pages: Channels matches these against the Origin header's host (and port, if given).
    return [h for h in settings.ALLOWED_HOSTS if h != "*"] or ["127.0.0.1", "localhost"]


def origin_validator(app: Any) -> OriginValidator:
    return OriginValidator(app, allowed_origins())
