"""Baseline: a bare Channels consumer on the app's channel layer, without database or authentication.

Every client joins one group; every text frame it sends is group_sent to all of them. It is
channels' stock ``AsyncWebsocketConsumer`` (including its per-message ``close_old_connections``
hop), served by daphne: ``daphne bench.baseline_channels:application``.
"""

from __future__ import annotations

import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

GROUP = "bench.relay"


class Relay(AsyncWebsocketConsumer):
    groups = [GROUP]

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is not None:
            await self.channel_layer.group_send(GROUP, {"type": "relay", "text": text_data})

    async def relay(self, message: dict[str, Any]) -> None:
        await self.send(text_data=message["text"])


async def not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"not found"})


application = ProtocolTypeRouter({"http": not_found, "websocket": URLRouter([path("ws/", Relay.as_asgi())])})
