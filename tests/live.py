"""Real daphne processes and real websocket clients for the end-to-end socket tests.

``start_servers`` runs ``daphne chatapp.asgi:application`` in subprocesses, each on a socket
bound here to port 0 and handed over with ``--fd`` (bench/servers.py), against the test database
of pytest-django and the suite's Redis. Clients authenticate with a Django session cookie and an
allowed Origin, like the chat page does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import zlib
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlparse, urlunparse

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.db import connection
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.servers import ServerProcess, start_all


def session_cookie(user: Any) -> str:
    """A logged-in Django session for ``user`` (as the login view would make); returns the cookie value."""
    from importlib import import_module

    store = import_module(settings.SESSION_ENGINE).SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.save()
    return str(store.session_key)


def test_database_url() -> str:
    """DATABASE_URL pointing at the test database pytest-django created (its name differs)."""
    parsed = urlparse(os.environ["DATABASE_URL"])
    return urlunparse(parsed._replace(path="/" + str(connection.settings_dict["NAME"])))


def daphne_env(servers: Iterable[ServerProcess], **extra: str) -> dict[str, str]:
    """Environment for app servers: the test database, the suite's Redis, our origins allowed."""
    env = {
        "DJANGO_SETTINGS_MODULE": "chatapp.settings",
        "CHATAPP_TESTING": "1",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "CHATAPP_WS_ALLOWED_ORIGINS": ",".join(s.origin for s in servers),
        "CHATAPP_DB_POOL_MAX": "8",
    }
    if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        env["DATABASE_URL"] = test_database_url()
    return {**env, **extra}


def start_servers(count: int, **env: str) -> list[ServerProcess]:
    """Start ``count`` daphne processes of the app sharing the test database and Redis."""
    servers = [ServerProcess.daphne() for _ in range(count)]
    return start_all(servers, daphne_env(servers, **env))


_ids = itertools.count(1)


class Client:
    """A websocket client that keeps every frame it receives and matches acks to requests by id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.binary_frames = 0
        self.closed = False
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls,
        server: ServerProcess,
        cookie: str,
        *,
        origin: str | None = None,
        query: str = "",
        subprotocols: list[str] | None = None,
    ) -> Client:
        ws = await connect(
            server.ws_url + (f"?{query}" if query else ""),
            origin=origin or server.origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": f"sessionid={cookie}"},
            subprotocols=subprotocols,  # type: ignore[arg-type]
            max_size=None,
            open_timeout=10,
            ping_interval=None,
        )
        client = cls(ws)
        await client.wait_for(lambda f: f["type"] == "ready")
        return client

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    self.binary_frames += 1
                    raw = zlib.decompress(raw, -15).decode()
                self.frames.append(json.loads(raw))
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self._changed.set()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first frame received so far or later that matches ``predicate``."""
        deadline = asyncio.get_running_loop().time() + timeout
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if predicate(frame):
                    return frame
            seen = len(self.frames)
            if self.closed:
                raise AssertionError(f"socket closed ({self.close_code}) before the expected frame")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; last frames: {self.frames[-5:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.close_code

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def request(self, type: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send a frame and return its ``ack`` (or ``error``) frame."""
        request_id = f"r{next(_ids)}"
        await self.send({"type": type, "id": request_id, **fields})
        return await self.wait_for(
            lambda f: f.get("id") == request_id and f["type"] in ("ack", "error", "pong"), timeout
        )

    def events(self, type: str, thread_id: int | None = None) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == type and (thread_id is None or f.get("thread_id") == thread_id)]

    def seqs(self, thread_id: int) -> list[int]:
        """Sequences of the thread events received, in arrival order."""
        return [f["seq"] for f in self.frames if f.get("thread_id") == thread_id and "seq" in f and "data" in f]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
