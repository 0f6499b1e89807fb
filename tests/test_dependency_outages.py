"""One slow dependency never stalls a request: Redis frozen (SIGSTOP: a partition, not a refusal), the
channel layer hanging, S3 hanging or refusing. The real servers, in this process; the live-server
versions (daphne, sockets, PostgreSQL stopped) are in tests/test_faults_live.py.

Time bounds are asserted with a wide margin over what the mechanism guarantees (configured timeouts);
every frozen server is thawed in a ``finally`` (and by a timer, should the test itself hang).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from botocore.config import Config
from django.core.cache import cache, caches
from rest_framework.test import APIClient

from accounts.models import User
from attachments.models import Attachment
from chatapp.broadcast import broadcaster, thread_group
from chatapp.cache_backend import RedisSkipped
from tests.conftest import EventCapture, needs
from tests.test_attachments import png_bytes, upload
from tests.test_ops_health import load_testenv
from threads.models import Thread

Api = Callable[[User | None], APIClient]

THAW_AFTER = 30.0  # a safety net: a hung test still thaws Redis (and then fails on its bound)


@contextlib.contextmanager
def frozen_redis() -> Iterator[None]:
    """Redis stopped (SIGSTOP): connections are accepted by the kernel and never answered."""
    needs("redis")
    pid = int(load_testenv().load_state()["services"]["redis"]["pid"])
    safety = threading.Timer(THAW_AFTER, os.kill, (pid, signal.SIGCONT))
    os.kill(pid, signal.SIGSTOP)
    safety.start()
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        safety.cancel()
        # The next tests find Redis answering at once, not skipped for a moment more: the events
        # handed over meanwhile have been sent (or have failed) before the skipping is forgotten.
        broadcaster.flush(timeout=THAW_AFTER)
        caches["default"].redis_client().connection_pool.skip_until = 0.0  # type: ignore[attr-defined]
        broadcaster.skip_until = 0.0


def send(client: APIClient, thread: Thread, cid: str) -> Any:
    return client.post(f"/api/v1/threads/{thread.pk}/messages", {"body": "hi", "client_msg_id": cid}, format="json")


@pytest.mark.django_db
def test_after_a_redis_call_fails_the_cache_skips_redis_and_requests_are_still_answered(
    api: Api, bob: User, thread: Thread, settings: Any
) -> None:
    settings.REDIS_SKIP_SECONDS = 120  # outlasts this test however slow the machine is
    with frozen_redis():
        with pytest.raises(redis.exceptions.TimeoutError):  # waited out CHATAPP_REDIS_TIMEOUT once
            cache.get("anything")
        with pytest.raises(RedisSkipped):  # then not called at all
            cache.get("anything")
        # Budgets fail open, cached payloads are read from the database.
        assert api(bob).get("/api/v1/threads").status_code == 200
        assert send(api(bob), thread, "skip-1").status_code == 201


@pytest.mark.django_db(transaction=True)
def test_an_ack_never_waits_for_the_channel_layer(
    settings: Any, events: Callable[..., EventCapture], api: Api, bob: User, thread: Thread
) -> None:
    """The layer hangs (Redis frozen and, here, no socket timeout on the layer): the send is answered
    anyway, and its event leaves once Redis answers again."""
    layer = settings.CHANNEL_LAYERS["default"]
    hosts = [{k: v for k, v in host.items() if k != "socket_timeout"} for host in layer["CONFIG"]["hosts"]]
    settings.CHANNEL_LAYERS = {"default": {**layer, "CONFIG": {**layer["CONFIG"], "hosts": hosts}}}
    capture = events(thread_group(thread.pk))
    with frozen_redis():
        started = time.monotonic()
        sent = send(api(bob), thread, "hang-1")
        took = time.monotonic() - started
    assert sent.status_code == 201, sent.json()
    assert took < 10 * settings.REDIS_TIMEOUT_SECONDS, f"answered in {took:.1f} s"
    (event,) = capture.receive_all(timeout=5)
    assert (event["type"], event["seq"]) == ("message.created", sent.json()["seq"])


@pytest.mark.django_db(transaction=True)
def test_a_redis_restart_costs_no_failed_call(
    events: Callable[..., EventCapture], api: Api, bob: User, thread: Thread, settings: Any
) -> None:
    """Pooled connections that Redis closed when it restarted are replaced on their next use: the
    cache answers, and the broadcaster's next event is delivered (neither skips Redis)."""
    needs("redis")
    testenv = load_testenv()
    assert send(api(bob), thread, "warm-1").status_code == 201  # the broadcaster's connection is open
    cache.set("before-restart", 1)
    testenv.stop_service("redis")
    testenv.start_service("redis")
    assert cache.get("before-restart") is None  # Redis lost its data, and the call did not fail
    assert caches["default"].redis_client().connection_pool.skip_until == 0.0  # type: ignore[attr-defined]
    capture = events(thread_group(thread.pk))
    sent = send(api(bob), thread, "after-restart")
    assert sent.status_code == 201
    (event,) = capture.receive_all(timeout=5)
    assert event["seq"] == sent.json()["seq"]


# --------------------------------------------------------------------------- S3


@contextlib.contextmanager
def hanging_endpoint() -> Iterator[str]:
    """An HTTP endpoint that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join()
        for conn in held:
            conn.close()
        server.close()


def refused_endpoint() -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


S3_TIMEOUT = 0.5  # connect and read timeouts of the test's storage client


def storage_at(settings: Any, endpoint: str) -> None:
    """The attachments' S3 storage with the shipped client settings, at ``endpoint``, with short timeouts."""
    default = settings.STORAGES["default"]
    options = dict(default["OPTIONS"])
    shipped = options.get("client_config") or Config()
    options["endpoint_url"] = endpoint
    options["client_config"] = shipped.merge(Config(connect_timeout=S3_TIMEOUT, read_timeout=S3_TIMEOUT))
    settings.STORAGES = {**settings.STORAGES, "default": {**default, "OPTIONS": options}}


def unavailable(response: Any, took: float) -> None:
    assert response.status_code == 503, response.json()
    error = response.json()["error"]
    assert error["code"] == "unavailable", error
    assert int(response["Retry-After"]) == error["retry_after"] >= 1
    # Two tries of (1 s + one timeout) each and a backoff under 1 s: 4 s; the bound is 10 s.
    assert took < 10, f"answered in {took:.1f} s"


@pytest.mark.django_db
def test_s3_hanging_or_refusing_is_a_quick_503_and_text_sends_go_on(
    api: Api, alice: User, bob: User, thread: Thread, settings: Any
) -> None:
    needs("s3")
    needs("clamd")
    # Shipped defaults: a storage call ends within 10 s (a hanging endpoint: per try, an upload's wait
    # for "100 Continue" (1 s) and the read timeout; the backoff before the second try is under 1 s).
    per_try = 1 + max(settings.S3_CONNECT_TIMEOUT_SECONDS, settings.S3_READ_TIMEOUT_SECONDS)
    assert settings.S3_MAX_ATTEMPTS * per_try + 1 <= 10
    shipped = settings.STORAGES["default"]["OPTIONS"]["client_config"]
    assert (shipped.connect_timeout, shipped.read_timeout) == (
        settings.S3_CONNECT_TIMEOUT_SECONDS,
        settings.S3_READ_TIMEOUT_SECONDS,
    )
    assert shipped.retries == {"max_attempts": settings.S3_MAX_ATTEMPTS, "mode": "standard"}

    stored = upload(api(bob), thread, "before.png", png_bytes(), "image/png")
    assert stored.status_code == 201
    attached = api(bob).post(
        f"/api/v1/threads/{thread.pk}/messages",
        {"body": "", "client_msg_id": "with-file", "attachment_ids": [stored.json()["id"]]},
        format="json",
    )
    assert attached.status_code == 201
    pending = api(bob).post(
        f"/api/v1/threads/{thread.pk}/attachments/uploads", {"name": "later.png", "size": 100}, format="json"
    )
    assert pending.status_code == 201
    pending_id = pending.json()["attachment"]["id"]

    with hanging_endpoint() as hanging:
        for endpoint in (hanging, refused_endpoint()):
            storage_at(settings, endpoint)
            started = time.monotonic()
            unavailable(upload(api(bob), thread, "during.png", png_bytes(), "image/png"), time.monotonic() - started)
            started = time.monotonic()
            unavailable(api(bob).post(f"/api/v1/attachments/{pending_id}/complete"), time.monotonic() - started)
            # Downloads are links signed here (S3 is not asked), and text sends never touch storage.
            link = api(alice).get(f"/api/v1/attachments/{stored.json()['id']}/download", {"format": "json"})
            assert link.status_code == 200
            assert send(api(bob), thread, f"text-{endpoint[-5:]}").status_code == 201
    assert Attachment.objects.get(pk=pending_id).scan_status == "PENDING"  # complete can be called again
