"""Websocket routes: one endpoint per client that multiplexes all of the user's threads (docs/realtime.md)."""

from __future__ import annotations

from typing import Any

from django.urls import path

from messaging.consumers import ChatConsumer

websocket_urlpatterns: list[Any] = [path("ws/", ChatConsumer.as_asgi())]
