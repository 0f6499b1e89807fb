"""/metrics: access rules, and live counts moved by the real code paths (REST send, rate limit,
an open socket), the database pool gauges, and multiprocess mode across processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, Client
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from accounts.models import User
from tests.conftest import needs
from threads.models import Thread

pytestmark = pytest.mark.django_db

BASE_DIR = Path(__file__).resolve().parent.parent


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from Prometheus text."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client: Client | None = None, **headers: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.smoke
def test_metrics_without_token_answer_loopback_only(client: Client, settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 200
    refused = client.get("/metrics", REMOTE_ADDR="203.0.113.9")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    # No proxy trusted (CHATAPP_TRUSTED_PROXY_COUNT=0): a forwarding header means an undeclared one.
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="127.0.0.1").status_code == 403


@pytest.mark.smoke
def test_metrics_with_token_need_the_bearer_token(client: Client, settings: Any) -> None:
    settings.METRICS_TOKEN = "s3cret-scrape-token"
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["error"]["code"] == "unauthenticated"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    ok = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape-token", REMOTE_ADDR="203.0.113.9")
    assert ok.status_code == 200
    assert "chatapp_open_sockets" in ok.content.decode()


@pytest.mark.smoke
def test_metrics_expose_every_family_from_the_first_scrape() -> None:
    samples = scrape()
    names = {name for name, _ in samples}
    for expected in (
        "chatapp_open_sockets",
        "chatapp_messages_sent_total",
        "chatapp_fanout_latency_seconds_count",
        "chatapp_ratelimit_refusals_total",
        "chatapp_ratelimit_errors_total",
        "chatapp_channel_layer_errors_total",
        "chatapp_slow_queries_total",
    ):
        assert expected in names, expected
    assert ("chatapp_messages_sent_total", (("via", "ws"),)) in samples
    assert ("chatapp_ratelimit_refusals_total", (("scope", "send"),)) in samples


@pytest.mark.smoke
def test_rest_sends_and_rate_limit_refusals_are_counted(
    alice: User, thread: Thread, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.CHAT_SENDS_PER_MINUTE = 2
    api = APIClient()
    api.force_authenticate(alice)
    before = scrape()
    url = f"/api/v1/threads/{thread.pk}/messages"
    with django_capture_on_commit_callbacks(execute=True):
        assert api.post(url, {"body": "one", "client_msg_id": "m-1"}, format="json").status_code == 201
        assert api.post(url, {"body": "one", "client_msg_id": "m-1"}, format="json").status_code == 200  # retry
        assert api.post(url, {"body": "two", "client_msg_id": "m-2"}, format="json").status_code == 201
        assert api.post(url, {"body": "three", "client_msg_id": "m-3"}, format="json").status_code == 429
    after = scrape()
    sent = "chatapp_messages_sent_total"
    refusals = "chatapp_ratelimit_refusals_total"
    assert sample(after, sent, via="api") - sample(before, sent, via="api") == 2  # retries are not new messages
    assert sample(after, refusals, scope="send") - sample(before, refusals, scope="send") == 1


@pytest.mark.django_db(transaction=True)
async def test_open_sockets_follow_a_real_socket(make_user: Callable[..., User]) -> None:
    """A socket through the chat consumer moves the gauge up while open and down when closed."""
    from channels.testing import WebsocketCommunicator

    from messaging.consumers import ChatConsumer

    user = await sync_to_async(make_user)("ops-socket")
    scraper = AsyncClient()

    async def open_sockets() -> float:
        response = await scraper.get("/metrics")
        assert response.status_code == 200
        return sample(parse(response.content.decode()), "chatapp_open_sockets")

    before = await open_sockets()
    communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/", subprotocols=["chatapp.v1"])
    communicator.scope["user"] = user
    connected, _ = await communicator.connect(timeout=10)
    try:
        assert connected
        assert await open_sockets() == before + 1
    finally:
        await communicator.disconnect()
    assert await open_sockets() == before
    from django.db import connections

    await sync_to_async(connections.close_all)()


def test_database_pool_gauges_are_read_at_scrape_time(client: Client, settings: Any, alice: User) -> None:
    needs("postgres")
    samples = scrape(client)
    pool_max = settings.DATABASES["default"]["OPTIONS"]["pool"]["max_size"]
    assert sample(samples, "chatapp_db_pool_max", alias="default") == pool_max
    assert sample(samples, "chatapp_db_pool_size", alias="default") >= 1
    assert sample(samples, "chatapp_db_pool_requests_total", alias="default") >= 1
    assert ("chatapp_db_pool_wait_seconds_total", (("alias", "default"),)) in samples


MULTIPROCESS_WORKER = textwrap.dedent(
    """
    import sys
    import django

    django.setup()
    from chatapp import metrics, metrics_view
    from prometheus_client import generate_latest

    if sys.argv[1] == "serve":
        metrics.open_sockets.inc()
        metrics.messages_sent.labels(via="ws").inc(3)
        print("up", flush=True)
        sys.stdin.read()  # stay alive (and keep the socket "open") until the test closes stdin
    else:
        sys.stdout.write(generate_latest(metrics.exposition_registry()).decode())
    """
)


def test_multiprocess_mode_sums_live_processes(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR any process answers for all; a process that exits drops its sockets."""
    env = os.environ | {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "chatapp.settings",
        "CHATAPP_TESTING": "1",
    }
    argv = [sys.executable, "-c", MULTIPROCESS_WORKER]

    def scrape_other_process() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        result = subprocess.run([*argv, "scrape"], env=env, cwd=BASE_DIR, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return parse(result.stdout)

    worker = subprocess.Popen(
        [*argv, "serve"], env=env, cwd=BASE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "up"
        live = scrape_other_process()
        assert sample(live, "chatapp_open_sockets") == 1
        assert sample(live, "chatapp_messages_sent_total", via="ws") == 3
    finally:
        assert worker.stdin is not None
        worker.stdin.close()
        worker.wait(timeout=30)
    assert worker.returncode == 0
    after = scrape_other_process()
    assert sample(after, "chatapp_open_sockets") == 0
    assert sample(after, "chatapp_messages_sent_total", via="ws") == 3
