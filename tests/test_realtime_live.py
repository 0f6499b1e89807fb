"""End to end: real daphne processes sharing one PostgreSQL and one Redis, real websocket clients.

Scale-out (two processes, every feature crosses between them) and the faults the design must
survive: a connection killed mid-stream, Redis stopped for 10 s while messages are sent, and a
server process stopped with SIGTERM while clients are connected.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import socket
import string
import time
import urllib.request
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from accounts.models import User
from bench.servers import ServerProcess
from messaging.models import Message
from tests.conftest import needs
from tests.live import Client, session_cookie, start_servers
from threads.models import Thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

SERVER_ENV = {"CHATAPP_SENDS_PER_MINUTE": "100000", "CHATAPP_MAX_CONNECTIONS_PER_USER": "3"}


@pytest.fixture(scope="module")
def pair(django_db_setup: None) -> Iterator[list[ServerProcess]]:
    """Two app processes for the module (they outlive each test's data, not each test's database)."""
    needs("postgres")
    needs("redis")
    servers = start_servers(2, **SERVER_ENV)
    yield servers
    for server in servers:
        server.close()


def load_testenv() -> ModuleType:
    spec = importlib.util.spec_from_file_location("testenv", "scripts/testenv.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def message_seqs(client: Client, thread_id: int) -> list[int]:
    return [f["seq"] for f in client.events("message.created", thread_id)]


async def open_once_a_slot_is_free(server: ServerProcess, cookie: str, timeout: float = 10.0) -> Client:
    """Open a socket, again while it is refused with 4429: a server counts a closed socket out of the
    connection limit (in Redis) after the close handshake, not before it, so a slot frees a moment later."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ws = await connect(
            server.ws_url,
            origin=server.origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": f"sessionid={cookie}"},
            max_size=None,
            open_timeout=10,
            ping_interval=None,
        )
        client = Client(ws)
        try:
            await client.wait_for(lambda f: f["type"] == "ready")
        except AssertionError:
            if client.close_code != 4429 or loop.time() >= deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            return client


async def send(client: Client, thread: Thread, body: str, client_msg_id: str) -> dict[str, Any]:
    ack = await client.request("message.send", thread_id=thread.pk, body=body, client_msg_id=client_msg_id)
    assert ack["type"] == "ack", ack
    return ack["data"]  # type: ignore[no-any-return]


def test_two_processes_carry_messages_edits_reactions_typing_presence_and_receipts(
    pair: list[ServerProcess], alice: User, bob: User, thread: Thread
) -> None:
    one, two = pair
    cookies = session_cookie(alice), session_cookie(bob)

    async def scenario() -> None:
        a = await Client.open(one, cookies[0])
        b = await Client.open(two, cookies[1], subprotocols=["chatapp.v1"])
        assert b.ws.subprotocol == "chatapp.v1"
        await a.request("subscribe", thread_id=thread.pk, last_seq=0)
        await b.request("subscribe", thread_id=thread.pk, last_seq=0)
        # Presence crosses processes: bob's snapshot shows alice (connected to the other process).
        snapshot = b.events("presence", thread.pk)[0]["data"]["users"]
        assert {"user_id": alice.pk, "online": True} in snapshot

        sent = await send(a, thread, "hello from one", "x-1")
        created = await b.wait_for(lambda f: f["type"] == "message.created")
        assert created["data"]["message"]["body"] == "hello from one"
        assert created["seq"] == sent["seq"]
        await a.wait_for(lambda f: f["type"] == "message.created" and f["seq"] == sent["seq"])

        edit = await a.request("message.edit", message_id=sent["message_id"], body="hello from process one", version=1)
        assert edit["data"]["version"] == 2
        updated = await b.wait_for(lambda f: f["type"] == "message.updated")
        assert updated["data"]["message"]["body"] == "hello from process one"

        assert (await b.request("reaction.add", message_id=sent["message_id"], emoji="🎉"))["data"]["changed"]
        added = await a.wait_for(lambda f: f["type"] == "reaction.added")
        assert added["data"]["reactions"] == [{"emoji": "🎉", "count": 1, "user_ids": [bob.pk]}]

        await b.request("typing.start", thread_id=thread.pk)
        typing = await a.wait_for(lambda f: f["type"] == "typing")
        assert typing["data"] == {"user_id": bob.pk, "typing": True, "expires_in": 6}

        await b.request("read", thread_id=thread.pk, seq=updated["seq"])
        receipt = await a.wait_for(lambda f: f["type"] == "receipt" and f["data"]["user_id"] == bob.pk)
        assert receipt["data"]["read"] == updated["seq"]

        await a.request("message.delete", message_id=sent["message_id"])
        deleted = await b.wait_for(lambda f: f["type"] == "message.deleted")
        assert deleted["data"]["message"]["deleted"] is True

        await a.wait_for(lambda f: f["type"] == "message.deleted")
        # Every thread event reached both sockets once, in order.
        assert a.seqs(thread.pk) == b.seqs(thread.pk) == list(range(1, deleted["seq"] + 1))
        assert not b.events("typing")  # never echoed to the typist

        await b.close()
        # Offline as soon as the last socket closes (not when the entry expires, 65 s later: the
        # sweeper's bound is for processes that die without closing their sockets).
        offline = await a.wait_for(
            lambda f: f["type"] == "presence" and f["data"]["users"][0]["online"] is False, timeout=20
        )
        assert offline["data"]["users"] == [{"user_id": bob.pk, "online": False}]
        await a.close()

    asyncio.run(scenario())


def test_the_connection_limit_is_counted_across_processes(pair: list[ServerProcess], alice: User) -> None:
    one, two = pair
    cookie = session_cookie(alice)

    async def scenario() -> None:
        kept = [await Client.open(one, cookie), await Client.open(two, cookie), await Client.open(one, cookie)]
        fourth = await connect(two.ws_url, origin=two.origin, additional_headers={"Cookie": f"sessionid={cookie}"})  # type: ignore[arg-type]
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(fourth.recv(), 10)
        assert fourth.close_code == 4429
        await kept[0].close()
        fifth = await open_once_a_slot_is_free(two, cookie)  # a slot is free again
        for client in [*kept[1:], fifth]:
            await client.close()

    asyncio.run(scenario())


def test_a_killed_process_stops_counting_as_soon_as_its_heartbeat_expires(
    alice: User, bob: User, thread: Thread
) -> None:
    """``kill -9``: the process closes nothing and removes nothing. Its connections stop counting
    toward the limit, and its users go offline, once its heartbeat entry in Redis expires (2 s
    here), not when the connections' own entries would (2 heartbeats + 5 s: 65 s)."""
    needs("postgres")
    needs("redis")
    killed, live = start_servers(2, **SERVER_ENV, CHATAPP_PROCESS_TTL_SECONDS="2")
    cookies = session_cookie(alice), session_cookie(bob)
    try:

        async def scenario() -> None:
            at_the_limit = [await Client.open(killed, cookies[0]) for _ in range(3)]  # CHATAPP_MAX_... = 3
            watcher = await Client.open(live, cookies[1])
            await watcher.request("subscribe", thread_id=thread.pk)
            assert {"user_id": alice.pk, "online": True} in watcher.events("presence", thread.pk)[0]["data"]["users"]
            await asyncio.to_thread(killed.kill)  # SIGKILL
            gone = {"user_id": alice.pk, "online": False}
            await watcher.wait_for(lambda f: f["type"] == "presence" and gone in f["data"]["users"], timeout=30)
            # Her tabs reconnect to the live process: accepted, not refused with 4429 for a minute.
            back = [await Client.open(live, cookies[0]) for _ in range(3)]
            assert not any(client.closed for client in back)
            for client in [*back, watcher]:
                await client.close()
            for client in at_the_limit:
                await client.wait_closed(timeout=30)  # the connection died with its process

        asyncio.run(scenario())
    finally:
        killed.close()
        live.close()


def test_a_revocation_nobody_announced_closes_the_users_sockets_on_every_process(
    pair: list[ServerProcess], alice: User, bob: User
) -> None:
    """A deactivation written straight to the database (no signal, no notice: as if the layer lost
    it) is found by each process's beat, which re-checks all its sockets' credentials in one batch."""
    one, two = pair
    cookies = session_cookie(alice), session_cookie(bob)

    def deactivate_silently() -> None:
        User.objects.filter(pk=alice.pk).update(is_active=False)

    async def scenario() -> None:
        hers = [await Client.open(one, cookies[0]), await Client.open(two, cookies[0])]
        his = await Client.open(one, cookies[1])
        await asyncio.to_thread(deactivate_silently)
        for client in hers:
            # The beat is every 4 s (CHATAPP_PROCESS_TTL_SECONDS / 3); the bound leaves room for a slow machine.
            assert await client.wait_closed(timeout=30) == 4403
            assert client.events("auth.ended")[0]["data"] == {"reason": "user_inactive"}
        assert (await his.request("ping"))["type"] == "pong"
        await his.close()

    asyncio.run(scenario())


def test_a_killed_connection_resumes_with_exactly_the_missed_messages(
    pair: list[ServerProcess], alice: User, bob: User, thread: Thread
) -> None:
    one, two = pair
    cookies = session_cookie(alice), session_cookie(bob)

    async def scenario() -> None:
        a = await Client.open(one, cookies[0])
        b = await Client.open(two, cookies[1])
        await b.request("subscribe", thread_id=thread.pk, last_seq=0)
        first = await send(a, thread, "before", "k-0")
        await b.wait_for(lambda f: f.get("seq") == first["seq"] and f["type"] == "message.created")
        last_seen = max(b.seqs(thread.pk))
        b.ws.transport.abort()  # the network drops: no close frame
        acked = [await send(a, thread, f"while away {n}", f"k-{n + 1}") for n in range(50)]
        back = await Client.open(one, cookies[1])  # reconnects to the other process
        ack = await back.request("subscribe", thread_id=thread.pk, last_seq=last_seen)
        missed = back.events("message.created", thread.pk)
        assert [f["seq"] for f in missed] == [m["seq"] for m in acked]
        assert [f["data"]["message"]["body"] for f in missed] == [f"while away {n}" for n in range(50)]
        assert ack["data"]["seq"] == acked[-1]["seq"]
        after = await send(a, thread, "after", "k-after")
        await back.wait_for(lambda f: f["type"] == "message.created" and f["seq"] == after["seq"])
        await asyncio.sleep(0.3)
        assert message_seqs(back, thread.pk) == [m["seq"] for m in acked] + [after["seq"]]
        await a.close()
        await back.close()

    asyncio.run(scenario())


def test_a_stalled_reader_gets_every_event_in_order_once_it_reads_again(
    pair: list[ServerProcess], alice: User, bob: User, thread: Thread
) -> None:
    """Events are written straight to the socket while it keeps up (messaging/wire.py); once the
    client stops reading and the kernel's buffers fill, the rest waits in the server, in order."""
    one, _ = pair
    cookies = session_cookie(alice), session_cookie(bob)
    body = "".join(random.choices(string.ascii_letters, k=60_000))  # ~60 KB frames, incompressible
    # 4.8 MB in all: more than the server's send buffer can grow to (tcp_wmem's 4 MB) plus bob's
    # receive buffer, so some writes must wait in the server whatever the kernel's autotuning does.
    count = 80

    def buffered_writes() -> float:
        with urllib.request.urlopen(f"{one.origin}/metrics", timeout=15) as reply:
            text = reply.read().decode()
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("chatapp_socket_writes_buffered_total ")
        )

    async def scenario() -> None:
        a = await Client.open(one, cookies[0])
        # bob reads through a fixed 64 KB receive buffer (no autotuning), and the client library
        # stops reading from the socket after one queued frame: the server's writes back up as
        # soon as he stops. (Much smaller windows crawl, and daphne's 30 s ping timeout cuts in.)
        raw = socket.create_connection(("127.0.0.1", int(one.origin.rsplit(":", 1)[1])))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        slow = await connect(
            one.ws_url,
            sock=raw,
            origin=one.origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": f"sessionid={cookies[1]}"},
            max_size=None,
            max_queue=1,
            ping_interval=None,
        )
        frames: list[dict[str, Any]] = []

        async def recv_until(predicate: Any) -> dict[str, Any]:
            while True:
                frame = json.loads(await asyncio.wait_for(slow.recv(), 20))
                frames.append(frame)
                if predicate(frame):
                    return frame

        packed = await Client.open(one, cookies[0], query="compress=deflate-raw")  # the web page's way
        await packed.request("subscribe", thread_id=thread.pk, last_seq=0)
        await recv_until(lambda f: f["type"] == "ready")
        await slow.send(json.dumps({"type": "subscribe", "id": "s", "thread_id": thread.pk, "last_seq": 0}))
        await recv_until(lambda f: f.get("id") == "s")
        before = buffered_writes()
        acked = [await send(a, thread, f"{n} {body}", f"slow-{n}") for n in range(count)]  # bob is not reading
        after = buffered_writes()
        await recv_until(lambda f: f["type"] == "message.created" and f["seq"] == acked[-1]["seq"])
        created = [f for f in frames if f["type"] == "message.created"]
        assert [f["seq"] for f in created] == [m["seq"] for m in acked]
        assert [f["data"]["message"]["body"] for f in created] == [f"{n} {body}" for n in range(count)]
        assert after > before  # the buffers did fill: the buffered path was taken, not only the direct one
        # Over 10 KB, a socket that asked for it gets each event as one compressed binary frame.
        await packed.wait_for(lambda f: f["type"] == "message.created" and f["seq"] == acked[-1]["seq"])
        assert [f["data"]["message"]["body"] for f in packed.events("message.created")] == [
            f"{n} {body}" for n in range(count)
        ]
        assert packed.binary_frames == count
        await packed.close()
        await slow.close()
        await a.close()

    asyncio.run(scenario())


def test_redis_down_for_10s_loses_no_acknowledged_message(
    pair: list[ServerProcess], alice: User, bob: User, thread: Thread
) -> None:
    env = load_testenv()
    one, two = pair
    cookies = session_cookie(alice), session_cookie(bob)

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], Client, Client]:
        a = await Client.open(one, cookies[0])
        b = await Client.open(two, cookies[1])
        for client in (a, b):
            await client.request("subscribe", thread_id=thread.pk, last_seq=0)
        acked: list[dict[str, Any]] = []
        n = 0

        async def send_for(seconds: float) -> list[dict[str, Any]]:
            """Send a message every 0.1 s for ``seconds`` (at least once); the acks that came back."""
            nonlocal n
            got = []
            end = time.monotonic() + seconds
            while True:
                reply = await a.request("message.send", thread_id=thread.pk, body=f"m{n}", client_msg_id=f"o-{n}")
                n += 1
                if reply["type"] == "ack":
                    got.append(reply["data"])
                if time.monotonic() >= end:
                    return got
                await asyncio.sleep(0.1)

        try:
            acked += await send_for(2)
            await asyncio.to_thread(env.stop_service, "redis")
            during = await send_for(10)  # every one of these was sent and answered while Redis was down
            acked += during
        finally:
            await asyncio.to_thread(env.start_service, "redis")
        acked += await send_for(3)
        # Both sockets survived and catch up by themselves once Redis is back.
        want = {m["seq"] for m in acked}
        for client in (a, b):
            await client.wait_for(lambda f, c=client: want <= set(message_seqs(c, thread.pk)), timeout=30)  # type: ignore[misc]
            assert not client.closed  # the socket stayed open through the outage
        return acked, during, a, b

    acked, during, a, b = asyncio.run(scenario())
    assert during  # sending does not need Redis: messages were acknowledged while it was down
    stored = dict(Message.objects.filter(thread=thread).values_list("client_msg_id", "sequence"))
    assert all(stored.get(m["client_msg_id"]) == m["seq"] for m in acked)
    for client in (a, b):
        got = message_seqs(client, thread.pk)
        assert got == sorted(set(got))  # in order, once


def test_sigterm_closes_sockets_with_1012_and_clients_resume_elsewhere(alice: User, bob: User, thread: Thread) -> None:
    needs("postgres")
    needs("redis")
    leaving, staying = start_servers(2, **SERVER_ENV)
    cookies = session_cookie(alice), session_cookie(bob)
    try:

        async def scenario() -> None:
            a = await Client.open(leaving, cookies[0])
            b = await Client.open(staying, cookies[1])
            await a.request("subscribe", thread_id=thread.pk, last_seq=0)
            await b.request("subscribe", thread_id=thread.pk, last_seq=0)
            first = await send(b, thread, "one", "t-1")
            await a.wait_for(lambda f: f["type"] == "message.created" and f["seq"] == first["seq"])
            stopping = asyncio.get_running_loop().run_in_executor(None, leaving.stop)
            assert await a.wait_closed() == 1012
            assert await stopping == 0
            acked = [await send(b, thread, f"while restarting {n}", f"t-{n + 2}") for n in range(5)]
            again = await Client.open(staying, cookies[0])
            await again.request("subscribe", thread_id=thread.pk, last_seq=max(a.seqs(thread.pk)))
            assert message_seqs(again, thread.pk) == [m["seq"] for m in acked]
            await again.close()
            await b.close()

        asyncio.run(scenario())
    finally:
        leaving.close()
        staying.close()
