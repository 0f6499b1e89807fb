"""The send budget means what it says (a sliding log, shared by REST and socket, spent before the
thread's lock) and REST answers tell clients where they stand (RateLimit-* headers)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.core.cache import caches
from django.db import connection
from rest_framework.test import APIClient

from accounts.models import User
from chatapp.cache_backend import SharedRedisCache
from messaging import services
from messaging.models import Message
from tests.test_realtime_protocol import Socket
from threads.models import Thread

Api = Callable[[User | None], APIClient]


def send(client: APIClient, thread: Thread, cid: str, body: str = "hi") -> Any:
    return client.post(f"/api/v1/threads/{thread.pk}/messages", {"body": body, "client_msg_id": cid}, format="json")


@pytest.mark.smoke
@pytest.mark.django_db
def test_no_more_than_the_budget_passes_in_any_window(api: Api, bob: User, thread: Thread, settings: Any) -> None:
    """One send, a pause of most of a window, then sends tried steadily until more than two budgets
    have passed. A fixed window, wherever its edges fall (a clock's, or from the first send), lets the
    rest of one budget through late in a window and a whole budget just after its edge: more than a
    budget within a window. The sliding log passes a send only once the one a budget earlier is a
    window old."""
    budget, window = 3, 2
    settings.CHAT_SENDS_PER_MINUTE, settings.CHAT_SEND_WINDOW_SECONDS = budget, window
    client = api(bob)
    passed: list[tuple[float, float]] = []  # (before, after) the request, for each send that passed
    refusals: list[int] = []
    deadline = time.monotonic() + 60
    n = 0
    while len(passed) < 2 * budget + 1 and time.monotonic() < deadline:
        before = time.time()
        reply = send(client, thread, f"w{n}")
        after = time.time()
        n += 1
        if reply.status_code == 201:
            passed.append((before, after))
        else:
            assert reply.status_code == 429, reply.json()
            refusals.append(int(reply["Retry-After"]))
        time.sleep(0.75 * window if n == 1 else window / 10)
    assert len(passed) == 2 * budget + 1, "the window slides: sends pass again as the oldest leave it"
    assert all(1 <= wait <= window for wait in refusals)  # until the oldest logged send leaves the window
    # The server logged each send between its request's before and after, so a send that passed a
    # budget after another passed more than a window after it: after(i + budget) - before(i) > window.
    for first, later in zip(passed, passed[budget:], strict=False):
        assert later[1] - first[0] > window, [round(b - passed[0][0], 2) for b, _ in passed]


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
async def test_rest_and_socket_share_one_budget(bob: User, thread: Thread, settings: Any) -> None:
    settings.CHAT_SENDS_PER_MINUTE = 2
    client = APIClient()
    client.force_authenticate(bob)
    assert (await sync_to_async(send)(client, thread, "s-1")).status_code == 201
    sock = Socket(bob)
    await sock.connect()
    assert (await sock.request("message.send", thread_id=thread.pk, body="x", client_msg_id="s-2"))["type"] == "ack"
    refused = await sock.request("message.send", thread_id=thread.pk, body="x", client_msg_id="s-3")
    assert refused["error"]["code"] == "rate_limited"
    assert (await sync_to_async(send)(client, thread, "s-4")).status_code == 429
    # Retries of stored messages are answered, on either side, however spent the budget is.
    retried = await sock.request("message.send", thread_id=thread.pk, body="hi", client_msg_id="s-1")
    assert (retried["type"], retried["data"]["created"]) == ("ack", False)
    assert (await sync_to_async(send)(client, thread, "s-2")).status_code == 200
    await sock.close()
    assert await Message.objects.filter(thread=thread).acount() == 2


@contextlib.contextmanager
def record_order(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """What a send does, in order: "budget" (spent), "lock" (the thread's row, taken by the sequence
    UPDATE), "redis" (any command of the cache's Redis client), "returned" (the send is done: in a
    request, its transaction has committed)."""
    order: list[str] = []
    spend = services.send_budget_consume

    def budget(*, user: Any) -> Any:
        order.append("budget")
        return spend(user=user)

    def statements(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.lstrip().upper().startswith("UPDATE") and "last_sequence" in sql:
            order.append("lock")
        return execute(sql, params, many, context)

    monkeypatch.setattr(services, "send_budget_consume", budget)
    cache = caches["default"]
    if isinstance(cache, SharedRedisCache):
        pool = cache.redis_client().connection_pool
        watch = pool.watch

        @contextlib.contextmanager
        def redis_call() -> Iterator[None]:
            order.append("redis")
            with watch():
                yield

        monkeypatch.setattr(pool, "watch", redis_call)
    with connection.execute_wrapper(statements):
        yield order


@pytest.mark.smoke
@pytest.mark.django_db
def test_nothing_waits_on_redis_while_a_send_holds_the_threads_lock(
    bob: User, alice: User, thread: Thread, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    """A frozen Redis used to stall every send of a thread: the budget was spent in Redis while the
    send held the thread's row lock. Now nothing between the lock and the commit talks to Redis (a
    reply, which changes its parent's cached payload, included)."""
    parent, _ = services.message_send(sender=alice, thread_id=thread.pk, body="question?", client_msg_id="p")
    with django_capture_on_commit_callbacks(execute=True), record_order(monkeypatch) as order:
        services.message_send(sender=bob, thread_id=thread.pk, body="answer", client_msg_id="r", reply_to_id=parent.pk)
        order.append("returned")
    assert order.index("budget") < order.index("lock")
    held = order[order.index("lock") : order.index("returned")]
    assert "redis" not in held, order
    if isinstance(caches["default"], SharedRedisCache):
        assert "redis" in order[: order.index("lock")]  # the budget's own call, before the lock
        assert "redis" in order[order.index("returned") :]  # the parent's cached payload, after commit


@pytest.mark.smoke
@pytest.mark.django_db
def test_rest_answers_carry_ratelimit_headers(api: Api, bob: User, thread: Thread, settings: Any) -> None:
    settings.CHAT_SENDS_PER_MINUTE = 3
    settings.API_RATE_PER_USER = "50/h"
    client = api(bob)
    listed = client.get("/api/v1/threads")
    assert listed.status_code == 200
    # The general budget (the per-user one is closer to running out than the per-address one).
    assert (listed["RateLimit-Limit"], listed["RateLimit-Remaining"]) == ("50", "49")
    assert 0 <= int(listed["RateLimit-Reset"]) <= 3600
    # Send endpoints: the send budget, which is the one a sender runs into.
    for remaining in ("2", "1", "0"):
        sent = send(client, thread, f"h{remaining}")
        assert sent.status_code == 201
        assert (sent["RateLimit-Limit"], sent["RateLimit-Remaining"]) == ("3", remaining)
        assert 1 <= int(sent["RateLimit-Reset"]) <= django_settings.CHAT_SEND_WINDOW_SECONDS
    refused = send(client, thread, "h-over")
    assert refused.status_code == 429
    assert (refused["RateLimit-Limit"], refused["RateLimit-Remaining"]) == ("3", "0")
    assert refused["RateLimit-Reset"] == refused["Retry-After"]
    # The general budget's refusal says the same.
    settings.API_RATE_PER_USER = "1/h"
    client.get("/api/v1/threads")
    over = client.get("/api/v1/threads")
    assert over.status_code == 429
    assert (over["RateLimit-Limit"], over["RateLimit-Remaining"]) == ("1", "0")
    assert over["RateLimit-Reset"] == over["Retry-After"]
