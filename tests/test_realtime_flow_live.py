"""End to end through real daphne processes: a large backlog is replayed at the pace the client
reads it, every close handshake is answered under connection churn, and frames over either size
limit are refused with a 1009 close frame (docs/realtime.md).

Deterministic by construction, never by timing: clients that must fill the server's buffers read
through a fixed 64 KB receive buffer (no autotuning), and the backlog is several times what the
kernel can hold for a socket (``tcp_wmem``'s maximum), so the server has to wait for the client
whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import string
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from accounts.models import User
from bench.servers import ServerProcess
from messaging import services
from tests.conftest import needs
from tests.live import Client, session_cookie, start_servers
from threads.models import Thread
from threads.services import thread_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

SERVER_ENV = {"CHATAPP_SENDS_PER_MINUTE": "100000", "CHATAPP_MAX_CONNECTIONS_PER_USER": "20"}
BODY_BYTES = 45_000  # a message.created event carries the body and its HTML: ~90 KB each
RECEIVE_BUFFER = 64 * 1024
WAIT = 120.0  # a bound for a hang on a loaded machine, never a speed requirement


@pytest.fixture(scope="module")
def pair(django_db_setup: None) -> Iterator[list[ServerProcess]]:
    needs("postgres")
    needs("redis")
    servers = start_servers(2, **SERVER_ENV)
    yield servers
    for server in servers:
        server.close()


def kernel_send_buffer_max() -> int:
    """The most the kernel buffers for one TCP socket's sends (``tcp_wmem``'s maximum)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024


def backlog_bytes() -> int:
    """Over 12 MB, and four times what the kernel can hold for the socket."""
    return max(16 * 1024 * 1024, 4 * kernel_send_buffer_max())


def make_backlog(sender: User, thread: Thread, settings: Any) -> list[int]:
    """Messages of incompressible text in ``thread`` adding up to ``backlog_bytes()`` of events; their seqs."""
    settings.CHAT_SENDS_PER_MINUTE = 100_000  # sent from this process: its budget, not the servers'
    body = "".join(random.choices(string.ascii_letters, k=BODY_BYTES))
    seqs = []
    for n in range(backlog_bytes() // (2 * BODY_BYTES) + 1):
        message, _ = services.message_send(
            sender=sender, thread_id=thread.pk, body=f"{n} {body}", client_msg_id=f"b-{n}"
        )
        seqs.append(message.sequence)
    return seqs


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"{server.origin}/metrics", timeout=15) as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


async def open_small_window(server: ServerProcess, cookie: str, **options: Any) -> ClientConnection:
    """A websocket whose TCP receive buffer is fixed at 64 KB: the server cannot push more ahead."""
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    return await connect(
        server.ws_url,
        sock=raw,
        origin=server.origin,  # type: ignore[arg-type]
        additional_headers={"Cookie": f"sessionid={cookie}"},
        max_size=None,
        ping_interval=None,
        open_timeout=30,
        **options,
    )


def log_offsets(servers: list[ServerProcess]) -> list[int]:
    return [Path(server.log.name).stat().st_size for server in servers]


def crashes(servers: list[ServerProcess], offsets: list[int]) -> str:
    """Consumers that ended in an exception since ``offsets`` (daphne logs each, within a second)."""
    found = []
    for server, offset in zip(servers, offsets, strict=True):
        with Path(server.log.name).open(errors="replace") as log:
            log.seek(offset)
            found += [line for line in log if "Exception inside application" in line]
    return "".join(found)


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def test_a_client_resuming_a_large_backlog_reads_all_of_it_in_order_without_1013(
    pair: list[ServerProcess], alice: User, bob: User, thread: Thread, settings: Any
) -> None:
    """The client subscribes, reads the first event, pauses (as a browser tab or a mobile link
    does) until the server could not hand a frame whole to the kernel, then reads everything.

    Without flow control the replay had by then written the whole backlog into the server's buffer
    (one page, written without a pause), and the slow-client rule (over 8 MiB unread) closed the
    client with 1013. With it, the replay waits for the client and sends it all.
    """
    one, _ = pair
    seqs = make_backlog(alice, thread, settings)
    cookie = session_cookie(bob)

    async def scenario() -> None:
        # max_queue=1: while this client is not reading, websockets stops reading the socket too.
        ws = await open_small_window(one, cookie, max_queue=1)
        frames = [json.loads(await asyncio.wait_for(ws.recv(), 30))]
        assert frames[0]["type"] == "ready"
        buffered = metric(one, "chatapp_socket_writes_buffered_total")
        stopped = metric(one, "chatapp_replays_stopped_total")
        await ws.send(json.dumps({"type": "subscribe", "id": "s", "thread_id": thread.pk, "last_seq": 0}))
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        assert frames[-1]["seq"] == 1  # the replay has begun (thread.created)
        await eventually(
            lambda: metric(one, "chatapp_socket_writes_buffered_total") > buffered, "the kernel's buffers to fill"
        )
        while frames[-1].get("id") != "s":
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), WAIT)))
        ack = frames[-1]
        assert ack["type"] == "ack", ack
        assert ack["data"]["seq"] == seqs[-1]
        created = [f for f in frames if f["type"] == "message.created"]
        assert [f["seq"] for f in created] == seqs  # all of it, in order, once
        assert [f["data"]["message"]["body"].split(" ", 1)[0] for f in created] == [str(n) for n in range(len(seqs))]
        assert metric(one, "chatapp_replays_stopped_total") == stopped
        # Live from there, on the same socket.
        message, _ = await asyncio.to_thread(
            services.message_send, sender=alice, thread_id=thread.pk, body="after", client_msg_id="after"
        )
        while frames[-1].get("seq") != message.sequence:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), WAIT)))
        await ws.close()

    asyncio.run(scenario())


def test_a_client_that_closes_mid_replay_stops_the_replay(
    pair: list[ServerProcess], alice: User, bob: User, thread: Thread, settings: Any
) -> None:
    """The server reads a page of the log only once the client has taken the last one: a client that
    stops reading and closes leaves most of the backlog unread (chatapp_replay_pages_total), and
    the replay ends (chatapp_replays_stopped_total) instead of waiting on a dead socket."""
    one, _ = pair
    make_backlog(alice, thread, settings)
    cookie = session_cookie(bob)

    async def replay_pages(**subscribe: Any) -> float:
        """Pages one full replay of the backlog reads, to a client that reads everything."""
        before = metric(one, "chatapp_replay_pages_total")
        client = Client(await open_small_window(one, cookie))
        await client.wait_for(lambda f: f["type"] == "ready")
        assert (await client.request("subscribe", timeout=WAIT, **subscribe))["type"] == "ack"
        await client.close()
        return metric(one, "chatapp_replay_pages_total") - before

    async def scenario() -> None:
        full = await replay_pages(thread_id=thread.pk, last_seq=0)
        # This client takes one frame into its queue, then reads no more (websockets stops reading
        # the socket while its queue is full): the server's writes back up.
        logged = log_offsets([one])
        stalled = await open_small_window(one, cookie, max_queue=1, close_timeout=5)
        assert json.loads(await asyncio.wait_for(stalled.recv(), 30))["type"] == "ready"
        pages_before = metric(one, "chatapp_replay_pages_total")
        stopped_before = metric(one, "chatapp_replays_stopped_total")
        buffered = metric(one, "chatapp_socket_writes_buffered_total")
        await stalled.send(json.dumps({"type": "subscribe", "id": "s", "thread_id": thread.pk, "last_seq": 0}))
        first = json.loads(await asyncio.wait_for(stalled.recv(), 30))
        assert first["seq"] == 1  # the replay has begun (thread.created, then the messages)
        await eventually(
            lambda: metric(one, "chatapp_socket_writes_buffered_total") > buffered, "the kernel's buffers to fill"
        )
        # Its close frame reaches the server, whose answer waits behind what the kernel could not take:
        # the client gives up after close_timeout (the server dropping the rest is not its business).
        await stalled.close()
        await eventually(lambda: metric(one, "chatapp_replays_stopped_total") > stopped_before, "the replay to stop")
        read = metric(one, "chatapp_replay_pages_total") - pages_before
        assert metric(one, "chatapp_replays_stopped_total") == stopped_before + 1
        # The server read only the pages the kernel could hold for the client, a fraction of the backlog.
        assert 1 <= read <= full / 2, (read, full)
        # And it has stopped reading pages: after a round trip on another socket, the same count.
        assert await replay_pages(thread_id=thread.pk) == 0  # (a live-only subscribe reads none)
        assert metric(one, "chatapp_replay_pages_total") - pages_before == read
        # The consumer answers the subscribe after the replay stopped, on a socket the client has
        # closed (its TCP connection lingers until the backlog's bytes drain or the client gives
        # up): the frames are dropped, and the consumer ends with the disconnect, not a crash.
        await eventually(lambda: metric(one, "chatapp_open_sockets") == 0, "the consumers to end")
        with contextlib.suppress(AssertionError):
            await eventually(lambda: bool(crashes([one], logged)), "a crash to be logged", timeout=5)
        assert not crashes([one], logged)

    asyncio.run(scenario())


def test_every_client_close_is_answered_under_connection_churn(
    pair: list[ServerProcess], make_user: Callable[..., User]
) -> None:
    """50 sockets of 50 members of one thread open, subscribe and close at once, for several rounds
    (each opening and closing announces presence to the others): every client-initiated close
    gets the server's close frame (1000, never 1006), and no close makes the consumer crash.

    The clients read every frame, as browsers do. A client that stops reading cannot receive the
    answer to its close: the ``websockets`` library stops reading the socket once 16 frames wait
    unread (``max_queue``), so the answer stays in the kernel and the client times out with 1006
    (python-websockets/websockets#1555). That is how this was first seen (1-2.5% of closes).
    """
    users = [make_user(f"churn{n}") for n in range(50)]
    thread, _ = thread_create(creator=users[0], title="churn", participant_ids=[u.pk for u in users[1:]])
    cookies = [session_cookie(user) for user in users]
    logged = log_offsets(pair)

    async def one_socket(index: int, wait_for_ack: bool) -> int | None:
        server = pair[index % 2]
        ws = await connect(
            server.ws_url,
            origin=server.origin,  # type: ignore[arg-type]
            additional_headers={"Cookie": f"sessionid={cookies[index]}"},
            ping_interval=None,
            open_timeout=60,
            close_timeout=60,  # a bound for a hang: an unanswered close shows as 1006 after it
        )
        acked = asyncio.Event()

        async def read() -> None:
            async for raw in ws:
                if '"type":"ack"' in str(raw):
                    acked.set()

        reader = asyncio.get_running_loop().create_task(read())
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "thread_id": thread.pk, "last_seq": 0}))
        if wait_for_ack:
            await asyncio.wait_for(acked.wait(), 60)
        await ws.close()  # at once: the answer to the subscribe may still be on its way
        await asyncio.wait_for(reader, 60)
        return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd is not None else None

    async def scenario() -> None:
        for round_ in range(4):
            codes = await asyncio.gather(*(one_socket(n, wait_for_ack=round_ % 2 == 1) for n in range(50)))
            assert codes == [1000] * 50, f"round {round_}: {codes}"

    asyncio.run(scenario())
    assert not crashes(pair, logged)  # e.g. the answer to a subscribe sent after the client's close


@pytest.mark.parametrize(
    ("frame", "limit"),
    [
        ("x" * (100 * 1024 + 1), "the app's 100 KB frame limit"),
        ("x" * (1024 * 1024 + 1), "daphne's 1 MiB frame limit"),
        (["x" * (600 * 1024), "x" * (600 * 1024)], "daphne's 1 MiB message limit (two fragments)"),
    ],
)
def test_a_frame_over_either_size_limit_is_refused_with_a_1009_close_frame(
    pair: list[ServerProcess], alice: User, frame: str | list[str], limit: str
) -> None:
    """Over 1 MiB, autobahn used to fail the connection by dropping TCP: the client saw 1006."""
    one, _ = pair
    cookie = session_cookie(alice)

    async def scenario() -> None:
        client = await Client.open(one, cookie)
        await client.ws.send(frame if isinstance(frame, str) else iter(frame))
        assert await client.wait_closed(timeout=60) == 1009, limit
        assert client.ws.protocol.close_rcvd is not None  # a close frame, not a lost connection
        # The socket's next connection works as before.
        again = await Client.open(one, cookie)
        assert (await again.request("ping"))["type"] == "pong"
        await again.close()

    asyncio.run(scenario())
