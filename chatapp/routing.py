"""Websocket routes (the chat consumer is added by the real-time layer)."""

from __future__ import annotations

from typing import Any

websocket_urlpatterns: list[Any] = []
