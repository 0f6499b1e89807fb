"""Refuse websocket handshakes from origins that are not ours, before accept."""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings


def allowed_origins() -> list[str]:
    """``CHATAPP_WS_ALLOWED_ORIGINS`` when set; else pages of our own hosts.

    From the allowed hosts only exact names are taken (``.example.com`` would admit every
    subdomain, whose pages are same-site and get our cookies: list those explicitly). In
    production they must be HTTPS pages; in development (``DJANGO_DEBUG``) any scheme.
    """
    if settings.WEBSOCKET_ALLOWED_ORIGINS:
        return list(settings.WEBSOCKET_ALLOWED_ORIGINS)
    hosts = [h for h in settings.ALLOWED_HOSTS if h != "*" and not h.startswith(".")]
    if settings.DEBUG or settings.TESTING:
        # Channels matches a pattern without a scheme against the Origin's host (and port, if given).
        return hosts or ["127.0.0.1", "localhost"]
    return [f"https://{host}" for host in hosts]


def origin_validator(app: Any) -> OriginValidator:
    return OriginValidator(app, allowed_origins())
