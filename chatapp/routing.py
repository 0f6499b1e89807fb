"""Websocket routing: one endpoint per client that multiplexes all of the user's threads (docs/realtime.md).

A path check rather than channels' ``URLRouter``: there is one route, and the router's copy of the
scope (with ``url_route``) would be kept for the life of every socket. Any other path is refused
before accept with 4404.
"""

from __future__ import annotations

from typing import Any

from messaging.consumers import ChatConsumer

WEBSOCKET_PATH = "/ws/"
CLOSE_NOT_FOUND = 4404

chat_consumer = ChatConsumer.as_asgi()


async def websocket_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope.get("path") in (WEBSOCKET_PATH, WEBSOCKET_PATH.rstrip("/")):
        await chat_consumer(scope, receive, send)
        return
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": CLOSE_NOT_FOUND})
