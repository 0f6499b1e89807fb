"""A dependency fails under a running server: Redis frozen (stopped with SIGSTOP: a partition, not a
refusal), PostgreSQL stopped. Real daphne processes, real clients over HTTP and the websocket.

Run in make test's fault step (with tests/test_realtime_live.py, on their own PostgreSQL and Redis):
each test freezes or stops a server that everything else uses, and always brings it back (finally).
Time bounds are asserted with a wide margin over what the mechanism guarantees (a configured timeout).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

from accounts.models import User
from accounts.services import user_token_issue
from bench.servers import ServerProcess
from messaging.models import Message
from tests.conftest import needs
from tests.live import Client, session_cookie, start_servers
from tests.test_ops_health import load_testenv
from threads.models import Thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

# The servers' CHATAPP_REDIS_TIMEOUT: a frozen Redis costs a request at most one of these (after a
# failed call the process skips Redis for a moment), so five of them is a wide margin.
REDIS_TIMEOUT = 1.0
REDIS_ACK_BOUND = 5 * REDIS_TIMEOUT
# The servers' CHATAPP_DB_POOL_TIMEOUT: PostgreSQL down costs a request at most one wait for a pooled
# connection; the issue's "a few seconds at most" is asserted with ten of them.
POOL_TIMEOUT = 1.0
DB_DOWN_BOUND = 10 * POOL_TIMEOUT


def rest_send(server: ServerProcess, token: str, thread_id: int, body: str, cid: str) -> tuple[int, Any, Any, float]:
    """POST a message with an API token: (status, JSON body, headers, seconds taken)."""
    request = urllib.request.Request(
        f"{server.origin}/api/v1/threads/{thread_id}/messages",
        data=json.dumps({"body": body, "client_msg_id": cid}).encode(),
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            status, raw, headers = reply.status, reply.read(), reply.headers
    except urllib.error.HTTPError as refused:
        status, raw, headers = refused.code, refused.read(), refused.headers
    return status, json.loads(raw), headers, time.monotonic() - started


def rest_get(server: ServerProcess, token: str, path: str, *, cookie: str = "") -> tuple[int, Any, Any]:
    """GET with an API token, or with a session cookie (``cookie``) as the web page does."""
    auth = {"Cookie": f"sessionid={cookie}"} if cookie else {"Authorization": f"Token {token}"}
    request = urllib.request.Request(f"{server.origin}{path}", headers=auth)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read()), reply.headers
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read()), refused.headers


def page_status(server: ServerProcess, cookie: str) -> tuple[int, Any]:
    """GET the chat page signed in by a session cookie: (status, headers)."""
    request = urllib.request.Request(f"{server.origin}/", headers={"Cookie": f"sessionid={cookie}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.headers
    except urllib.error.HTTPError as refused:
        return refused.code, refused.headers


async def timed(request: Any) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    reply = await request
    return reply, time.monotonic() - started


@pytest.fixture
def redis_pid() -> Iterator[int]:
    needs("redis")
    pid = load_testenv().load_state()["services"]["redis"]["pid"]
    assert pid
    yield int(pid)
    os.kill(pid, signal.SIGCONT)  # never leave it frozen, whatever happened


def test_sends_are_acknowledged_while_redis_is_frozen(redis_pid: int, alice: User, bob: User, thread: Thread) -> None:
    needs("postgres")
    (server,) = start_servers(1, CHATAPP_REDIS_TIMEOUT=str(REDIS_TIMEOUT), CHATAPP_SENDS_PER_MINUTE="1000")
    token = user_token_issue(user=alice)
    cookies = session_cookie(alice), session_cookie(bob)

    async def scenario() -> list[int]:
        a, b = await Client.open(server, cookies[0]), await Client.open(server, cookies[1])
        for client in (a, b):
            await client.request("subscribe", thread_id=thread.pk, last_seq=0)
        seqs = [
            (await a.request("message.send", thread_id=thread.pk, body="before", client_msg_id="f-0"))["data"]["seq"]
        ]
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            # Long enough for the process to skip Redis, try it again, and skip it again.
            for n in range(1, 7):
                status, body, _, took = await asyncio.to_thread(
                    rest_send, server, token, thread.pk, f"rest {n}", f"f-r{n}"
                )
                assert status == 201, body
                assert took < REDIS_ACK_BOUND, f"REST send {n} answered in {took:.1f} s"
                seqs.append(body["seq"])
                reply, took = await timed(
                    a.request("message.send", thread_id=thread.pk, body=f"ws {n}", client_msg_id=f"f-w{n}", timeout=60)
                )
                assert reply["type"] == "ack", reply
                assert took < REDIS_ACK_BOUND, f"socket send {n} acknowledged in {took:.1f} s"
                seqs.append(reply["data"]["seq"])
                # Signed in by a session cookie (sessions are cached in Redis): read from the database.
                started = time.monotonic()
                status, body, _ = await asyncio.to_thread(rest_get, server, "", "/api/v1/threads", cookie=cookies[0])
                assert status == 200, body
                assert time.monotonic() - started < REDIS_ACK_BOUND
                await asyncio.sleep(0.3)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        # Acknowledged is delivered: once Redis answers again the other member's socket has every one.
        await b.wait_for(lambda f: set(seqs) <= set(b.seqs(thread.pk)), timeout=30)
        assert not b.closed
        for client in (a, b):
            await client.close()
        return seqs

    try:
        seqs = asyncio.run(scenario())
    finally:
        server.close()
    assert Message.objects.filter(thread=thread).count() == len(seqs) == 13


def _reset_connections() -> None:
    connections.close_all()
    for alias in connections:
        close_pool = getattr(connections[alias], "close_pool", None)
        if close_pool is not None:
            close_pool()


def test_postgres_down_is_a_quick_retryable_503_and_an_error_frame_on_a_surviving_socket(
    alice: User, thread: Thread
) -> None:
    needs("postgres")
    needs("redis")
    testenv = load_testenv()
    (server,) = start_servers(
        1, CHATAPP_DB_POOL_TIMEOUT=str(POOL_TIMEOUT), CHATAPP_DB_CONNECT_TIMEOUT="2", CHATAPP_SENDS_PER_MINUTE="1000"
    )
    token = user_token_issue(user=alice)
    cookie = session_cookie(alice)

    async def scenario() -> dict[str, Any]:
        a = await Client.open(server, cookie)
        await a.request("subscribe", thread_id=thread.pk, last_seq=0)
        await asyncio.to_thread(testenv.stop_service, "postgres")
        try:
            for n in range(3):
                status, body, headers, took = await asyncio.to_thread(
                    rest_send, server, token, thread.pk, "while down", f"d-r{n}"
                )
                assert status == 503, body
                assert body["error"]["code"] == "unavailable", body
                assert body["error"]["retry_after"] >= 1
                assert int(headers["Retry-After"]) == body["error"]["retry_after"]
                assert took < DB_DOWN_BOUND, f"REST send answered in {took:.1f} s"

                reply, took = await timed(
                    a.request("message.send", thread_id=thread.pk, body="while down", client_msg_id="d-w", timeout=60)
                )
                assert reply["type"] == "error", reply
                assert reply["error"]["code"] == "unavailable"
                assert reply["error"]["retry_after"] >= 1
                assert took < DB_DOWN_BOUND, f"socket send answered in {took:.1f} s"
            # The class, not the send: any endpoint that needs the database answers the same way.
            status, body, headers = await asyncio.to_thread(rest_get, server, token, "/api/v1/threads")
            assert (status, body["error"]["code"]) == (503, "unavailable"), body
            assert "Retry-After" in headers
            # Outside the API too (Django's own error handler): the chat page is a 503, not a 500.
            page = await asyncio.to_thread(page_status, server, cookie)
            assert (page[0], "Retry-After" in page[1]) == (503, True)
            assert (await a.request("ping"))["type"] == "pong"  # the socket stays open
        finally:
            await asyncio.to_thread(testenv.start_service, "postgres")
        # Back: the same socket's retry (same client_msg_id) is stored, once the pool has reconnected.
        deadline = time.monotonic() + 60
        while True:
            reply = await a.request("message.send", thread_id=thread.pk, body="while down", client_msg_id="d-w")
            if reply["type"] == "ack" or time.monotonic() > deadline:
                break
            assert reply["error"]["code"] == "unavailable", reply
            await asyncio.sleep(0.5)
        assert reply["type"] == "ack", reply
        assert not a.closed
        await a.close()
        return reply

    connections.close_all()  # this process's connection goes back to the pool before the server stops
    try:
        reply = asyncio.run(scenario())
    finally:
        server.close()
        _reset_connections()
    assert reply["data"]["created"] is True
    assert list(Message.objects.filter(thread=thread).values_list("client_msg_id", flat=True)) == ["d-w"]
