"""The backlog replay, with the consumer in this process (channels' communicator): live events of the
thread being replayed are read from the log by the replay, not queued, and pages are bounded in bytes.

Flow control against a real socket (daphne) is in test_realtime_flow_live.py.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from accounts.models import User
from messaging import backlog, consumers, realtime
from tests.test_realtime_protocol import WAIT, Closed, Socket, db, send_message
from threads.models import Thread

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.smoke
async def test_live_events_during_a_replay_are_read_from_the_log_not_queued(
    alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay is held at its first page while ten live events of the thread arrive. Queued, they
    would pass the slow-client limit (lowered to 5 here) and close the socket 1013 although the
    client reads everything; instead the replay reads on to them and sends all, in order, once."""
    monkeypatch.setattr(realtime, "MAX_QUEUED_EVENTS", 5)
    backlog_messages = [await send_message(alice, thread, f"old {n}", f"old-{n}") for n in range(3)]
    entered, release = threading.Event(), threading.Event()
    read = consumers.thread_events_page

    def held_page(**kwargs: Any) -> Any:
        if not entered.is_set():
            entered.set()
            assert release.wait(WAIT)
        return read(**kwargs)

    monkeypatch.setattr(consumers, "thread_events_page", held_page)
    sock = Socket(bob)
    await sock.connect()
    (consumer,) = [c for c in realtime.live if c.user_id == bob.pk]
    await sock.send({"type": "subscribe", "id": "s", "thread_id": thread.pk, "last_seq": 0})
    assert await asyncio.to_thread(entered.wait, WAIT)
    live = [await send_message(alice, thread, f"live {n}", f"live-{n}") for n in range(10)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT

    def arrived() -> bool:  # all ten reached the socket (or made it give up)
        sub = consumer.subs.get(thread.pk)
        return consumer.closing or (sub is not None and sub.pending >= live[-1].sequence)

    while not arrived():
        assert loop.time() < deadline, "the live events did not reach the socket"
        await asyncio.sleep(0.02)
    assert not consumer.inbox  # none of them waits in the inbox
    release.set()
    try:
        ack = await sock.next("ack")
    except Closed as closed:
        raise AssertionError(f"closed with {closed.code} during its own replay") from None
    assert ack["data"]["seq"] == live[-1].sequence
    created = [f for f in sock.frames if f["type"] == "message.created"]
    assert [f["seq"] for f in created] == [m.sequence for m in backlog_messages + live]
    assert [f["seq"] for f in sock.frames if "seq" in f and "data" in f] == list(range(1, live[-1].sequence + 1))
    newer = await send_message(alice, thread, "after", "after")
    assert (await sock.next("message.created"))["seq"] == newer.sequence  # live from there
    await sock.close()


@pytest.mark.smoke
async def test_a_replay_page_is_bounded_in_bytes_not_only_in_count(alice: User, thread: Thread) -> None:
    """Events of ~40 KB (a body of 20 KB of one repeated letter and its HTML, which PostgreSQL stores
    compressed to almost nothing): a page of 100 KB holds three of them, whatever the count limit."""
    for n in range(12):
        await send_message(alice, thread, "x" * 20_000, f"big-{n}")
    rows, more = await db(backlog.thread_events_page)(thread_id=thread.pk, after=1, limit=500, max_bytes=100_000)
    assert [seq for seq, _ in rows] == [2, 3, 4]  # the third starts under 100 KB and ends past it
    assert more
    assert all(payload["data"]["message"]["body"] == "x" * 20_000 for _, payload in rows)
    rows, more = await db(backlog.thread_events_page)(thread_id=thread.pk, after=10, limit=500, max_bytes=100_000)
    assert [seq for seq, _ in rows] == [11, 12, 13]
    assert not more  # the end of the log
    rows, more = await db(backlog.thread_events_page)(thread_id=thread.pk, after=0, limit=2, max_bytes=10**9)
    assert [seq for seq, _ in rows] == [1, 2]
    assert more  # the count limit, not the end
    rows, _ = await db(backlog.thread_events_page)(thread_id=thread.pk, after=1, limit=500, max_bytes=1)
    assert [seq for seq, _ in rows] == [2]  # the first event always comes, however large
