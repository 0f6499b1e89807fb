"""Shared fixtures. Under ``make test`` the suite runs against the real PostgreSQL, Redis and
S3 server that scripts/testenv.py started; a missing service is a failure, never a skip."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from channels.layers import get_channel_layer
from django.conf import settings
from rest_framework.test import APIClient

from accounts.models import SystemRole, User
from chatapp.broadcast import broadcaster
from tests.factories import UserFactory
from threads.models import Thread

REQUIRE_SERVICES = os.environ.get("CHATAPP_REQUIRE_SERVICES") == "1"


def pytest_report_header(config: pytest.Config) -> list[str]:
    db = settings.DATABASES["default"]
    return [
        f"chatapp: database {db['ENGINE'].rsplit('.', 1)[-1]} ({db.get('HOST') or db.get('NAME')}), "
        f"channel layer {settings.CHANNEL_LAYERS['default']['BACKEND']}, "
        f"cache {settings.CACHES['default']['BACKEND'].rsplit('.', 1)[-1]}, "
        f"storage {settings.STORAGES['default']['BACKEND'].rsplit('.', 1)[-1]}"
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under make test, the real services must be configured: fail loudly instead of testing the fallbacks."""
    if not REQUIRE_SERVICES:
        return
    missing = [
        name
        for name, ok in (
            ("DATABASE_URL (PostgreSQL)", settings.DATABASES["default"]["ENGINE"].endswith("postgresql")),
            ("REDIS_URL (channels-redis)", "redis" in str(settings.CHANNEL_LAYERS["default"]["BACKEND"]).lower()),
            ("AWS_STORAGE_BUCKET_NAME (S3)", bool(settings.AWS_STORAGE_BUCKET_NAME)),
        )
        if not ok
    ]
    if missing:
        raise pytest.UsageError(f"CHATAPP_REQUIRE_SERVICES=1 but not configured: {', '.join(missing)}")


def needs(service: str) -> None:
    """Fail (never skip) a test that needs a real service which is not configured."""
    configured = {
        "postgres": settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
        "redis": bool(settings.REDIS_URL),
        "s3": bool(settings.AWS_STORAGE_BUCKET_NAME),
        "clamd": bool(os.environ.get("CHATAPP_CLAMD_SOCKET")),
        "chromium": bool(os.environ.get("CHATAPP_CHROMIUM")),
    }[service]
    if not configured:
        pytest.fail(f"this test needs the real {service}; run it through `make test` (scripts/testenv.py)")


@pytest.fixture(scope="session", autouse=True)
def _close_db_pool(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Close Django's PostgreSQL pool before the test database is dropped (pooled connections keep it busy)."""
    yield
    from django.db import connections

    with django_db_blocker.unblock():
        default = connections["default"]
        if default.vendor == "postgresql":
            # Live servers and worker threads may leave sessions behind; the test database must drop.
            with default.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
        for conn in connections.all():
            conn.close()  # hand the connection back to the pool, then close the pool itself
            close_pool = getattr(conn, "close_pool", None)
            if close_pool is not None:
                close_pool()


@pytest.fixture(autouse=True)
def _clear_cache() -> None:
    """Empty the Django cache between tests. On Redis only the cache's own keys go: FLUSHDB would
    also wipe the channel layer's groups and the presence keys a live server relies on."""
    from django.core.cache import cache

    from messaging import realtime

    if settings.CACHES["default"]["BACKEND"].endswith("RedisCache"):
        client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
        prefix = settings.CACHES["default"].get("KEY_PREFIX", "")
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        # Presence and typing state of earlier tests' sockets goes too (not the channel layer's groups).
        keys += list(client.scan_iter(match=f"{realtime.KEY_PREFIX}conns*", count=1000))
        keys += list(client.scan_iter(match=f"{realtime.KEY_PREFIX}typing*", count=1000))
        if keys:
            client.delete(*keys)
    else:
        cache.clear()
        from tests.budgets import clear_send_budgets

        clear_send_budgets()  # the embedded default keeps the send budgets in this process


@pytest.fixture
def make_user(db: None) -> Callable[..., User]:
    def make(username: str | None = None, *, role: str = SystemRole.MEMBER, **kwargs: Any) -> User:
        if username is not None:
            kwargs["username"] = username
        return cast(User, UserFactory(system_role=role, **kwargs))

    return make


@pytest.fixture
def alice(make_user: Callable[..., User]) -> User:
    return make_user("alice")


@pytest.fixture
def bob(make_user: Callable[..., User]) -> User:
    return make_user("bob")


@pytest.fixture
def carol(make_user: Callable[..., User]) -> User:
    return make_user("carol")


@pytest.fixture
def thread(alice: User, bob: User) -> Thread:
    """A group thread: alice OWNER, bob MEMBER."""
    from threads.services import thread_create

    created, _ = thread_create(creator=alice, title="General", participant_ids=[bob.pk])
    return created


@pytest.fixture
def api() -> Callable[[User | None], APIClient]:
    def client_for(user: User | None = None) -> APIClient:
        client = APIClient()
        if user is not None:
            client.force_authenticate(user)
        return client

    return client_for


class EventCapture:
    """Listens on channel-layer groups like a socket would; events are JSON-decoded from the wire text.

    channels-redis binds a channel's receive queue to the event loop that first used it, so every
    layer call of one capture runs on the capture's own loop.
    """

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.layer = get_channel_layer()
        self.channel = self.loop.run_until_complete(self.layer.new_channel())
        self.groups: list[str] = []

    def join(self, group: str) -> None:
        # Events are sent from the process's broadcaster thread after commit (chatapp.broadcast): let
        # those of the test's setup leave first, so that a capture hears only what happens after it.
        assert broadcaster.flush(timeout=30), "the broadcaster did not send the setup's events within 30 s"
        self.loop.run_until_complete(self.layer.group_add(group, self.channel))
        self.groups.append(group)

    def receive_all(self, timeout: float = 0.5) -> list[dict[str, Any]]:
        import asyncio

        async def drain() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            while True:
                try:
                    message = await asyncio.wait_for(self.layer.receive(self.channel), timeout)
                except TimeoutError:
                    return out
                out.append(json.loads(message["text"]))

        return self.loop.run_until_complete(drain())

    def close(self) -> None:
        for group in self.groups:
            self.loop.run_until_complete(self.layer.group_discard(group, self.channel))

        async def release() -> None:
            # Core layer: close this loop's pools. Pub/sub layer (per-loop state, so looked up inside
            # the loop): flush unsubscribes and closes this loop's connections; Redis keeps nothing.
            close_pools = getattr(self.layer, "close_pools", None)
            await (close_pools() if close_pools is not None else self.layer.flush())

        self.loop.run_until_complete(release())
        self.loop.close()


@pytest.fixture
def events() -> Iterator[Callable[..., EventCapture]]:
    """``events("thread.1", "user.2")`` -> a capture listening on those groups."""
    captures: list[EventCapture] = []

    def listen(*groups: str) -> EventCapture:
        capture = EventCapture()
        for group in groups:
            capture.join(group)
        captures.append(capture)
        return capture

    yield listen
    for capture in captures:
        capture.close()
