"""The socket protocol, frame by frame, with the consumer in this process (channels' communicator).

The consumer talks to the real channel layer, database and Redis; what differs from production
is only the transport (no daphne) and authentication (the user is put in the scope, as
accounts/ws_auth.py does). End-to-end runs through daphne are in test_realtime_live.py.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from accounts.models import User
from chatapp import metrics
from chatapp.broadcast import layer_message, thread_group
from messaging import consumers, realtime, services
from messaging.consumers import ChatConsumer
from messaging.models import Message
from tests.conftest import needs
from threads.models import Thread, ThreadParticipant

pytestmark = pytest.mark.django_db(transaction=True)

db = realtime.db

# How long to wait for something that is expected to happen (a frame, the consumer ending). It
# involves the database, Redis and the channel layer, which a loaded CI machine can slow down a lot:
# a bound for a hang, never a speed requirement (the waits return as soon as it happens).
WAIT = 10.0


class Closed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


class Socket:
    """One client socket on the consumer; keeps the frames it has read."""

    def __init__(self, user: Any, *, query: str = "", subprotocols: list[str] | None = None) -> None:
        path = "/ws/" + (f"?{query}" if query else "")
        self.comm = WebsocketCommunicator(ChatConsumer.as_asgi(), path, subprotocols=subprotocols)
        self.comm.scope["user"] = user
        self.frames: list[dict[str, Any]] = []
        self.binary = 0
        self.ids = 0

    @classmethod
    async def signed_in(cls, user: Any, session_key: str) -> Socket:
        """A socket through the real authentication middleware, signed in by the session cookie."""
        from django.conf import settings

        from accounts.ws_auth import WebsocketAuthMiddleware

        sock = cls(user)
        cookie = (b"cookie", f"{settings.SESSION_COOKIE_NAME}={session_key}".encode())
        sock.comm = WebsocketCommunicator(WebsocketAuthMiddleware(ChatConsumer.as_asgi()), "/ws/", headers=[cookie])
        assert (await sock.comm.connect(timeout=WAIT))[0]
        assert (await sock.next("ready"))["data"]["user_id"] == user.pk  # signed in by the cookie
        return sock

    async def connect(self) -> tuple[bool, Any]:
        connected, detail = await self.comm.connect(timeout=WAIT)
        if connected:
            ready = await self.next("ready")
            assert ready["data"]["user_id"] == self.comm.scope["user"].pk
        return connected, detail

    async def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        if self.comm.future.done():
            self.comm.future.result()
        message = await asyncio.wait_for(self.comm.output_queue.get(), timeout)
        if message["type"] == "websocket.close":
            raise Closed(message.get("code"))
        if message.get("bytes") is not None:
            self.binary += 1
            frame = json.loads(zlib.decompress(message["bytes"], -15))
        else:
            frame = json.loads(message["text"])
        self.frames.append(frame)
        return frame  # type: ignore[no-any-return]

    async def next(
        self, type: str | None = None, where: Callable[[dict[str, Any]], bool] | None = None, timeout: float = WAIT
    ) -> dict[str, Any]:
        """The next frame of ``type`` (matching ``where``); frames before it are kept but skipped."""
        while True:
            frame = await self.recv(timeout)
            if (type is None or frame["type"] == type) and (where is None or where(frame)):
                return frame

    async def drain(self, seconds: float = 0.5) -> list[dict[str, Any]]:
        """Everything that arrives within ``seconds``."""
        got = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                got.append(await self.recv(left))
            except TimeoutError:
                break
        return got

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.comm.send_to(text_data=frame if isinstance(frame, str) else json.dumps(frame))

    async def request(self, type: str, **fields: Any) -> dict[str, Any]:
        self.ids += 1
        request_id = f"q{self.ids}"
        await self.send({"type": type, "id": request_id, **fields})
        return await self.next(where=lambda f: f.get("id") == request_id and f["type"] in ("ack", "error", "pong"))

    async def subscribe(self, thread_id: int, last_seq: int | None = None) -> dict[str, Any]:
        fields = {"thread_id": thread_id} if last_seq is None else {"thread_id": thread_id, "last_seq": last_seq}
        reply = await self.request("subscribe", **fields)
        assert reply["type"] == "ack", reply
        return reply

    async def close(self) -> None:
        # The consumer's way out flushes pending receipts (a database write), counts the connection
        # out of Redis and may broadcast presence: channels' default of 1 s is too short under load.
        await self.comm.disconnect(timeout=WAIT)


async def send_message(user: User, thread: Thread, body: str, client_msg_id: str) -> Message:
    message, _ = await db(services.message_send)(
        sender=user, thread_id=thread.pk, body=body, client_msg_id=client_msg_id
    )
    return message  # type: ignore[no-any-return]


@pytest.mark.smoke
async def test_connect_refuses_anonymous_and_inactive_users_before_accept(make_user: Callable[..., User]) -> None:
    connected, code = await Socket(AnonymousUser()).connect()
    assert (connected, code) == (False, consumers.CLOSE_UNAUTHENTICATED)
    gone = await db(make_user)("gone", is_active=False)
    connected, code = await Socket(gone).connect()
    assert (connected, code) == (False, consumers.CLOSE_UNAUTHENTICATED)


@pytest.mark.smoke
async def test_only_the_one_endpoint_accepts_sockets(alice: User) -> None:
    from chatapp.asgi import application
    from chatapp.routing import CLOSE_NOT_FOUND

    origin = [(b"origin", b"http://localhost")]
    elsewhere = WebsocketCommunicator(application, "/ws/elsewhere/", headers=origin)
    assert await elsewhere.connect(timeout=WAIT) == (False, CLOSE_NOT_FOUND)
    anonymous = WebsocketCommunicator(application, "/ws/", headers=origin)
    assert await anonymous.connect(timeout=WAIT) == (False, consumers.CLOSE_UNAUTHENTICATED)  # the route is there


@pytest.mark.smoke
async def test_connect_accepts_the_chatapp_subprotocol(alice: User) -> None:
    sock = Socket(alice, subprotocols=["chatapp.v1", "bearer.x"])
    assert await sock.connect() == (True, "chatapp.v1")
    await sock.close()


@pytest.mark.smoke
async def test_malformed_frames_get_errors_and_the_socket_survives(alice: User, thread: Thread) -> None:
    sock = Socket(alice)
    await sock.connect()
    await sock.send("not json")
    assert (await sock.next("error"))["error"]["code"] == "malformed"
    await sock.comm.send_to(bytes_data=b"\x00\x01")
    assert (await sock.next("error"))["error"]["code"] == "malformed"
    await sock.send("[1, 2]")
    assert (await sock.next("error"))["error"]["code"] == "malformed"
    reply = await sock.request("no.such.thing")
    assert reply["error"]["code"] == "unknown_type"
    reply = await sock.request("message.send", thread_id=thread.pk)
    assert reply["type"] == "error"
    assert reply["error"]["code"] == "invalid"
    assert set(reply["error"]["fields"]) == {"client_msg_id"}
    reply = await sock.request("subscribe", thread_id="three")
    assert reply["error"]["fields"]["thread_id"]
    # JSON nested past the decoder's depth is malformed, not a server error.
    await sock.send("[" * 100_000)
    assert (await sock.next("error"))["error"]["code"] == "malformed"
    # Ids past any stored one, numbers where text belongs, NUL characters: invalid, naming the field.
    for fields, bad in (
        ({"attachment_ids": [10**20], "body": "x", "client_msg_id": "big"}, "attachment_ids"),
        ({"reply_to": 10**20, "body": "x", "client_msg_id": "big"}, "reply_to"),
        ({"body": 12345, "client_msg_id": "num"}, "body"),
        ({"body": "x", "client_msg_id": 77}, "client_msg_id"),
    ):
        reply = await sock.request("message.send", thread_id=thread.pk, **fields)
        assert reply["error"]["code"] == "invalid", fields
        assert set(reply["error"]["fields"]) == {bad}, reply
    reply = await sock.request("reaction.add", message_id=1, emoji="\x00")
    assert reply["error"]["fields"]["emoji"] == ["Must not contain NUL characters."]
    reply = await sock.request("read", thread_id=10**20, seq=1)
    assert set(reply["error"]["fields"]) == {"thread_id"}
    pong = await sock.request("ping")
    assert pong["type"] == "pong"
    assert not await db(Message.objects.exists)()  # nothing of that was stored
    await sock.close()


@pytest.mark.smoke
async def test_receipts_for_a_thread_you_cannot_see_are_refused_not_acknowledged(
    alice: User, carol: User, thread: Thread
) -> None:
    outsider = Socket(carol)
    await outsider.connect()
    for kind in ("read", "delivered"):
        reply = await outsider.request(kind, thread_id=thread.pk, seq=1)
        assert reply["type"] == "error", reply
        assert reply["error"]["code"] == "not_found"
    assert [f for f in await outsider.drain(1.5) if f["type"] in ("ack", "error")] == []  # no late second reply
    # A member who has not subscribed yet (a receipt flushed just after a reconnect) is acknowledged.
    member = Socket(alice)
    await member.connect()
    assert (await member.request("read", thread_id=thread.pk, seq=0))["type"] == "ack"
    await member.close()
    await outsider.close()


@pytest.mark.smoke
async def test_message_send_acks_and_the_sender_gets_the_broadcast_copy(alice: User, bob: User, thread: Thread) -> None:
    a, b = Socket(alice), Socket(bob)
    await a.connect()
    await b.connect()
    await a.subscribe(thread.pk)
    await b.subscribe(thread.pk)
    before = metrics.messages_sent.labels(via="ws")._value.get()
    ack = await a.request("message.send", thread_id=thread.pk, body="hello", client_msg_id="c-1")
    message = await db(Message.objects.get)(client_msg_id="c-1")
    assert ack == {
        "type": "ack",
        "id": ack["id"],
        "data": {
            "message_id": message.pk,
            "thread_id": thread.pk,
            "seq": message.sequence,
            "client_msg_id": "c-1",
            "created": True,
        },
    }
    for sock in (a, b):
        event = await sock.next("message.created")
        assert event["seq"] == message.sequence
        assert event["data"]["message"]["body"] == "hello"
    assert metrics.messages_sent.labels(via="ws")._value.get() == before + 1
    # A retry of the same client_msg_id is the same message, not a second one.
    again = await a.request("message.send", thread_id=thread.pk, body="hello", client_msg_id="c-1")
    assert again["data"]["message_id"] == message.pk
    assert again["data"]["created"] is False
    assert await b.drain(0.3) == []
    await a.close()
    await b.close()


@pytest.mark.smoke
async def test_service_errors_become_error_frames_with_the_request_id(
    alice: User, bob: User, carol: User, thread: Thread, settings: Any
) -> None:
    settings.CHAT_SENDS_PER_MINUTE = 2
    outsider = Socket(carol)
    await outsider.connect()
    reply = await outsider.request("message.send", thread_id=thread.pk, body="hi", client_msg_id="x-1")
    assert reply["type"] == "error"
    assert reply["error"]["code"] == "not_found"
    reply = await outsider.request("subscribe", thread_id=thread.pk)
    assert reply["error"]["code"] == "not_found"
    await outsider.close()

    sock = Socket(alice)
    await sock.connect()
    for n in range(2):
        assert (await sock.request("message.send", thread_id=thread.pk, body="x", client_msg_id=f"r-{n}"))[
            "type"
        ] == "ack"
    limited = await sock.request("message.send", thread_id=thread.pk, body="x", client_msg_id="r-3")
    assert limited["error"]["code"] == "rate_limited"
    assert limited["error"]["retry_after"] >= 1
    assert (await sock.request("ping"))["type"] == "pong"  # the connection stays open

    message = await db(Message.objects.get)(client_msg_id="r-0")
    first = await sock.request("message.edit", message_id=message.pk, body="one two three", version=1)
    assert first["data"]["version"] == 2
    stale = await sock.request("message.edit", message_id=message.pk, body="four", version=1)
    assert stale["error"]["code"] == "conflict"
    assert stale["error"]["current"]["body"] == "one two three"
    others = Socket(bob)
    await others.connect()
    reply = await others.request("message.delete", message_id=message.pk)
    assert reply["error"]["code"] == "forbidden"
    await others.close()
    await sock.close()


@pytest.mark.smoke
async def test_subscribe_replays_the_missed_events_in_order_then_goes_live(
    alice: User, bob: User, thread: Thread
) -> None:
    for n in range(12):
        await send_message(alice, thread, f"m{n}", f"c{n}")
    edited = await db(Message.objects.get)(client_msg_id="c3")
    await db(services.message_edit)(actor=alice, message_id=edited.pk, body="m3!", expected_version=1)
    await db(services.reaction_add)(actor=bob, message_id=edited.pk, emoji="+1")
    last = (await db(Thread.objects.get)(pk=thread.pk)).last_sequence
    sock = Socket(bob)
    await sock.connect()
    ack = await sock.subscribe(thread.pk, last_seq=5)
    assert ack["data"]["seq"] == last
    replayed = [f for f in sock.frames if "seq" in f and "data" in f]
    assert [f["seq"] for f in replayed] == list(range(6, last + 1))
    assert [f["type"] for f in replayed[-2:]] == ["message.updated", "reaction.added"]
    presence = [f for f in sock.frames if f["type"] == "presence"]
    assert presence[0]["data"]["users"] == [{"user_id": alice.pk, "online": False}, {"user_id": bob.pk, "online": True}]
    newer = await send_message(alice, thread, "live", "c-live")
    event = await sock.next("message.created")
    assert event["seq"] == newer.sequence == last + 1
    assert await sock.drain(0.3) == []
    await sock.close()


@pytest.mark.smoke
async def test_backlog_is_paged_and_a_large_gap_asks_for_a_resync(
    alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(realtime, "BACKLOG_PAGE", 3)
    monkeypatch.setattr(realtime, "RESYNC_OVER", 8)
    for n in range(9):
        await send_message(alice, thread, f"m{n}", f"c{n}")
    sock = Socket(bob)
    await sock.connect()
    ack = await sock.subscribe(thread.pk, last_seq=2)  # 8 missing: replayed in pages of 3
    assert [f["seq"] for f in sock.frames if f["type"] == "message.created"] == list(range(3, 11))
    assert ack["data"]["seq"] == 10
    other = Socket(bob)
    await other.connect()
    ack = await other.subscribe(thread.pk, last_seq=1)  # 9 missing: reload over REST
    resync = next(f for f in other.frames if f["type"] == "resync")
    assert resync == {"type": "resync", "thread_id": thread.pk, "seq": 10, "reason": "gap_too_large"}
    assert not [f for f in other.frames if f["type"] == "message.created"]
    ahead = await other.subscribe(thread.pk, last_seq=99)
    assert ahead["data"]["seq"] == 10
    assert other.frames[-3]["type"] == "resync"
    assert other.frames[-3]["reason"] == "ahead"
    await sock.close()
    await other.close()


@pytest.mark.smoke
async def test_live_duplicates_are_dropped_and_a_gap_is_filled_from_the_log(
    alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = Socket(bob)
    await sock.connect()
    await sock.subscribe(thread.pk)
    first = await send_message(alice, thread, "one", "g1")
    assert (await sock.next("message.created"))["seq"] == first.sequence
    # The layer delivers the same event again: dropped.
    from threads.models import ThreadEvent

    logged = await db(ThreadEvent.objects.get)(thread_id=thread.pk, sequence=first.sequence)
    await get_channel_layer().group_send(thread_group(thread.pk), layer_message(logged.payload))
    assert await sock.drain(0.3) == []
    # The layer loses the next event: the one after it brings both, in order.
    from chatapp import broadcast

    real_send = broadcast.group_send_now
    lost: list[str] = []
    monkeypatch.setattr(broadcast, "group_send_now", lambda group, message: lost.append(group))
    await send_message(alice, thread, "two", "g2")
    assert lost == [thread_group(thread.pk)]
    monkeypatch.setattr(broadcast, "group_send_now", real_send)
    start = len(sock.frames)
    third = await send_message(alice, thread, "three", "g3")
    await sock.next("message.created", where=lambda f: f["seq"] == third.sequence)
    got = [f for f in sock.frames[start:] if f["type"] == "message.created"]
    assert [(f["seq"], f["data"]["message"]["body"]) for f in got] == [
        (third.sequence - 1, "two"),
        (third.sequence, "three"),
    ]
    assert not [f for f in await sock.drain(0.5) if f["type"] == "message.created"]  # and nothing twice
    await sock.close()


@pytest.mark.smoke
async def test_one_broken_socket_does_not_stop_the_hub(
    alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = Socket(alice), Socket(bob)
    for sock in (a, b):
        await sock.connect()
        await sock.subscribe(thread.pk, last_seq=0)
    (broken,) = [c for c in realtime.live if c.user_id == alice.pk]

    def fail(message: dict[str, Any]) -> bool:
        raise RuntimeError("this socket is broken")

    monkeypatch.setattr(broken, "take", fail)
    for n in (1, 2):  # the hub survives the failure and keeps delivering
        sent = await send_message(alice, thread, f"still here {n}", f"hub-{n}")
        created = await b.next("message.created")
        assert created["seq"] == sent.sequence
    monkeypatch.undo()
    await a.close()
    await b.close()


@pytest.mark.smoke
async def test_the_hub_stops_when_cancelled_even_if_redis_py_reports_a_timeout(alice: User) -> None:
    """redis-py can turn a cancellation into its TimeoutError; the hub's retry loop must still end."""
    import redis.exceptions

    from messaging.hub import Hub

    class Layer:
        disguised = 0

        async def new_channel(self) -> str:
            return "hub-test!"

        async def receive(self, channel: str) -> dict[str, Any]:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if self.disguised:  # once, so that a failing run can still end at teardown
                    raise
                self.disguised += 1
                raise redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1") from None
            raise AssertionError("unreachable")

    loop_hub = Hub(asyncio.get_running_loop())
    loop_hub.layer = Layer()
    await loop_hub._start()
    assert loop_hub.task is not None
    await asyncio.sleep(0.05)
    loop_hub.task.cancel()
    await asyncio.wait({loop_hub.task}, timeout=WAIT)
    assert loop_hub.task.cancelled()


@pytest.mark.smoke
async def test_typing_is_throttled_never_echoed_and_needs_a_subscription(
    alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A throttle window far longer than the test: the three starts below fall in it however slow the machine.
    monkeypatch.setattr(realtime, "TYPING_THROTTLE_SECONDS", 60.0)
    a, b = Socket(alice), Socket(bob)
    await a.connect()
    await b.connect()
    reply = await a.request("typing.start", thread_id=thread.pk)
    assert reply["error"]["code"] == "not_subscribed"
    await a.subscribe(thread.pk)
    await b.subscribe(thread.pk)
    for _ in range(3):
        assert (await a.request("typing.start", thread_id=thread.pk))["type"] == "ack"
    typing = [await b.next("typing")] + [f for f in await b.drain(0.5) if f["type"] == "typing"]
    assert typing == [
        {"type": "typing", "thread_id": thread.pk, "data": {"user_id": alice.pk, "typing": True, "expires_in": 6}}
    ]
    await a.request("typing.stop", thread_id=thread.pk)
    stop = await b.next("typing")
    assert stop["data"] == {"user_id": alice.pk, "typing": False}
    # After a stop, the next start is announced at once.
    await a.request("typing.start", thread_id=thread.pk)
    assert (await b.next("typing"))["data"]["typing"] is True
    assert not [f for f in await a.drain(0.3) if f["type"] == "typing"]
    await a.close()
    await b.close()


@pytest.mark.smoke
async def test_read_marks_are_batched_into_one_write_per_second(alice: User, bob: User, thread: Thread) -> None:
    for n in range(10):
        await send_message(alice, thread, f"m{n}", f"c{n}")
    a, b = Socket(alice), Socket(bob)
    await a.connect()
    await b.connect()
    await a.subscribe(thread.pk)
    await b.subscribe(thread.pk)
    marks = range(2, 12)
    for seq in marks:
        assert (await b.request("read", thread_id=thread.pk, seq=seq))["type"] == "ack"
    last = await a.next("receipt", where=lambda f: f["data"].get("read") == marks[-1])
    receipts = [f for f in a.frames if f["type"] == "receipt"]
    assert all(f["data"]["user_id"] == bob.pk for f in receipts)
    reads = [f["data"]["read"] for f in receipts]
    # The first mark is written at once, the later ones merged into writes at most once a second
    # (how many writes depends on how fast the marks came in: fewer than the marks, in order).
    assert reads[0] == marks[0]
    assert receipts[-1] is last
    assert reads == sorted(reads)
    assert len(receipts) < len(marks)
    participant = await db(ThreadParticipant.objects.get)(thread=thread, user=bob)
    assert participant.last_read_sequence == 11
    # A mark still pending when the socket closes is written on the way out.
    await send_message(alice, thread, "more", "c-more")
    await b.request("delivered", thread_id=thread.pk, seq=12)
    await b.close()
    participant = await db(ThreadParticipant.objects.get)(thread=thread, user=bob)
    assert participant.last_delivered_sequence == 12
    await a.close()


@pytest.mark.smoke
async def test_a_removed_member_stops_receiving_the_thread(alice: User, bob: User, thread: Thread) -> None:
    from threads.services import participant_remove

    b = Socket(bob)
    await b.connect()
    await b.subscribe(thread.pk)
    await db(participant_remove)(actor=alice, thread_id=thread.pk, user_id=bob.pk)
    await b.next("thread.removed")
    await send_message(alice, thread, "secret", "s1")
    assert not [f for f in await b.drain(0.5) if f["type"] == "message.created"]
    reply = await b.request("typing.start", thread_id=thread.pk)
    assert reply["error"]["code"] == "not_subscribed"
    await b.close()


@pytest.mark.smoke
async def test_a_member_removed_and_added_back_resumes_across_the_removal(
    alice: User, bob: User, thread: Thread
) -> None:
    """Offline while removed and added back: the backlog shows both, and the subscription stays."""
    from threads.services import participant_add, participant_remove

    before = (await db(Thread.objects.get)(pk=thread.pk)).last_sequence
    await db(participant_remove)(actor=alice, thread_id=thread.pk, user_id=bob.pk)
    missed = await send_message(alice, thread, "while you were out", "out-1")
    await db(participant_add)(actor=alice, thread_id=thread.pk, user_id=bob.pk)
    b = Socket(bob)
    await b.connect()
    ack = await b.subscribe(thread.pk, last_seq=before)
    replayed = [f["type"] for f in b.frames if "seq" in f and "data" in f]
    assert replayed == ["thread.participant_removed", "message.created", "thread.participant_added"]
    assert ack["data"]["seq"] == before + 3
    live = await send_message(alice, thread, "welcome back", "out-2")
    event = await b.next("message.created", where=lambda f: f["seq"] == live.sequence)
    assert event["data"]["message"]["body"] == "welcome back"
    assert missed.sequence == before + 2
    await b.close()


@pytest.mark.smoke
async def test_a_dropped_newest_event_arrives_with_the_next_heartbeat(
    alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer drops a thread's last event (no later one reveals the gap): the heartbeat's check
    against the log sends it, once."""
    from chatapp import broadcast

    b = Socket(bob)
    await b.connect()
    await b.subscribe(thread.pk)
    real_send = broadcast.group_send_now
    monkeypatch.setattr(broadcast, "group_send_now", lambda group, message: group.startswith("user.") or None)
    lost = await send_message(alice, thread, "dropped by the layer", "lost-1")
    monkeypatch.setattr(broadcast, "group_send_now", real_send)
    assert not [f for f in await b.drain(0.5) if f["type"] == "message.created"]
    await realtime.beats.tick()
    event = await b.next("message.created")
    assert (event["seq"], event["data"]["message"]["body"]) == (lost.sequence, "dropped by the layer")
    await realtime.beats.tick()  # nothing is missing any more: nothing is sent again
    assert not [f for f in await b.drain(0.5) if f["type"] == "message.created"]
    await b.close()


@pytest.mark.smoke
async def test_a_socket_too_far_behind_is_closed_with_1013(alice: User, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realtime, "MAX_QUEUED_EVENTS", 5)
    before = metrics.sockets_closed_behind._value.get()
    sock = Socket(alice)
    await sock.connect()
    (consumer,) = [c for c in realtime.live if c.user_id == alice.pk]
    for n in range(6):  # more than the socket's task can take in one turn of the loop
        consumer.queue({"type": "chat.event", "thread_id": 10**9, "seq": n + 1, "text": "{}"})
    with pytest.raises(Closed) as closed:
        await sock.next("never")
    assert closed.value.code == consumers.CLOSE_BEHIND
    assert metrics.sockets_closed_behind._value.get() == before + 1


@pytest.mark.smoke
async def test_the_safety_net_drops_a_thread_when_only_the_thread_event_arrives(
    alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatapp import broadcast
    from threads.services import participant_remove

    b = Socket(bob)
    await b.connect()
    await b.subscribe(thread.pk)
    real_send = broadcast.group_send_now
    monkeypatch.setattr(
        broadcast, "group_send_now", lambda group, message: group.startswith("user.") or real_send(group, message)
    )
    await db(participant_remove)(actor=alice, thread_id=thread.pk, user_id=bob.pk)
    removed = await b.next("thread.participant_removed")
    assert removed["data"]["user_id"] == bob.pk
    monkeypatch.setattr(broadcast, "group_send_now", real_send)
    await send_message(alice, thread, "secret", "s1")
    assert not [f for f in await b.drain(0.5) if f["type"] == "message.created"]
    await b.close()


@pytest.mark.smoke
async def test_a_deactivated_users_sockets_are_closed(alice: User) -> None:
    from accounts.services import user_deactivate

    sock = Socket(alice)
    await sock.connect()
    await db(user_deactivate)(actor=None, user=alice)
    with pytest.raises(Closed) as closed:
        await sock.next("never")
    assert closed.value.code == consumers.CLOSE_DEACTIVATED


@pytest.mark.smoke
async def test_a_revoked_clerk_session_closes_only_its_own_sockets(alice: User) -> None:
    from accounts.services import clerk_session_revoke

    alice.clerk_id = "user_alice"
    await alice.asave(update_fields=["clerk_id"])
    revoked, other = Socket(alice), Socket(alice)
    revoked.comm.scope["auth_session_id"] = "sess_revoked"
    other.comm.scope["auth_session_id"] = "sess_other"
    await revoked.connect()
    await other.connect()
    await db(clerk_session_revoke)(data={"id": "sess_revoked", "user_id": "user_alice"})
    notice = await revoked.next("session.revoked")
    assert notice["data"] == {"session_id": "sess_revoked"}
    with pytest.raises(Closed) as closed:
        await revoked.next("never")
    assert closed.value.code == consumers.CLOSE_UNAUTHENTICATED
    # The user's other session hears of it and stays open.
    assert (await other.next("session.revoked"))["data"] == {"session_id": "sess_revoked"}
    assert (await other.request("ping"))["type"] == "pong"
    await other.close()


@pytest.mark.smoke
async def test_signing_out_closes_the_sockets_of_that_session_only(alice: User) -> None:
    from django.test import Client

    browsers = [Client(), Client()]
    sockets, keys = [], []
    for browser in browsers:
        await sync_to_async(browser.force_login)(alice)
        keys.append(browser.cookies["sessionid"].value)
        sockets.append(await Socket.signed_in(alice, keys[-1]))
    signed_out, staying = sockets
    response = await sync_to_async(browsers[0].post)("/accounts/logout/")
    assert response.status_code == 302
    session_id = (await signed_out.next("session.revoked"))["data"]["session_id"]
    assert session_id.startswith("local_")
    assert keys[0] not in session_id  # a digest: the cookie's value never goes on the wire
    with pytest.raises(Closed) as closed:
        await signed_out.next("never")
    assert closed.value.code == consumers.CLOSE_UNAUTHENTICATED
    assert (await staying.request("ping"))["type"] == "pong"
    await staying.close()


@pytest.mark.smoke
async def test_a_password_change_closes_session_sockets_and_ends_api_tokens(alice: User) -> None:
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from accounts.services import user_token_issue

    browser = Client()
    await sync_to_async(browser.force_login)(alice)
    sock = await Socket.signed_in(alice, browser.cookies["sessionid"].value)
    await db(user_token_issue)(user=alice)

    def change_password() -> None:  # what ``manage.py changepassword`` does
        user = User.objects.get(pk=alice.pk)
        user.set_password("a-new-Passw0rd!")
        user.save()

    await db(change_password)()
    assert (await sock.next("user.password_changed"))["data"] == {"id": alice.pk}
    with pytest.raises(Closed) as closed:
        await sock.next("never")
    assert closed.value.code == consumers.CLOSE_UNAUTHENTICATED
    assert not await db(Token.objects.filter(user=alice).exists)()
    # A profile save without a new password ends nothing.
    other = Client()
    await sync_to_async(other.force_login)(await db(User.objects.get)(pk=alice.pk))
    kept = await Socket.signed_in(alice, other.cookies["sessionid"].value)
    await db(services_user_rename)(alice.pk)
    assert (await kept.request("ping"))["type"] == "pong"
    await kept.close()


def services_user_rename(user_id: int) -> None:
    from accounts.services import user_update_profile

    user_update_profile(user=User.objects.get(pk=user_id), display_name="Alice B")


async def test_open_sockets_share_the_processs_redis_connections(make_user: Callable[..., User]) -> None:
    """Each socket's context gets its own Django cache object; they must not each open a Redis client."""
    import redis
    from asgiref.sync import sync_to_async
    from django.conf import settings

    from tests.live import session_cookie

    needs("redis")
    users = [await sync_to_async(make_user)(f"sharer{i}") for i in range(30)]
    cookies = [await sync_to_async(session_cookie)(user) for user in users]
    server = redis.Redis.from_url(settings.REDIS_URL)
    before = len(server.client_list())
    sockets = [await Socket.signed_in(user, cookie) for user, cookie in zip(users, cookies, strict=True)]
    assert len(server.client_list()) - before < 10  # was one more Redis client per socket
    for sock in sockets:
        await sock.close()
    server.close()


@pytest.mark.smoke
async def test_the_connection_limit_refuses_the_next_socket_with_4429(alice: User, settings: Any) -> None:
    settings.CHAT_MAX_CONNECTIONS_PER_USER = 2
    first, second, third = Socket(alice), Socket(alice), Socket(alice)
    await first.connect()
    await second.connect()
    assert await third.comm.connect(timeout=WAIT) == (True, None)
    with pytest.raises(Closed) as closed:
        await third.next()
    assert closed.value.code == consumers.CLOSE_TOO_MANY
    await third.close()
    await first.close()
    fourth = Socket(alice)  # a slot is free again
    await fourth.connect()
    await fourth.close()
    await second.close()


@pytest.mark.smoke
async def test_a_frame_over_100kb_closes_the_socket_with_1009(alice: User, thread: Thread) -> None:
    sock = Socket(alice)
    await sock.connect()
    await sock.send({"type": "message.send", "thread_id": thread.pk, "client_msg_id": "big", "body": "x" * 102_400})
    with pytest.raises(Closed) as closed:
        await sock.next()
    assert closed.value.code == consumers.CLOSE_TOO_BIG


@pytest.mark.smoke
async def test_big_events_reach_opted_in_sockets_compressed(alice: User, bob: User, thread: Thread) -> None:
    plain, packed = Socket(alice), Socket(bob, query="compress=deflate-raw")
    await plain.connect()
    await packed.connect()
    hello = Socket(bob)
    await hello.connect()
    assert (await hello.request("hello", compress="deflate-raw"))["data"] == {"compress": "deflate-raw"}
    for sock in (plain, packed, hello):
        await sock.subscribe(thread.pk)
    body = "lorem ipsum " * 1500  # 18 KB
    await plain.request("message.send", thread_id=thread.pk, body=body, client_msg_id="big-1")
    for sock in (plain, packed, hello):
        event = await sock.next("message.created")
        assert event["data"]["message"]["body"] == body
    assert (plain.binary, packed.binary, hello.binary) == (0, 1, 1)
    await plain.request("message.send", thread_id=thread.pk, body="small", client_msg_id="small-1")
    await packed.next("message.created")
    assert packed.binary == 1  # small events stay text
    for sock in (plain, packed, hello):
        await sock.close()


async def test_presence_is_announced_on_first_and_last_socket_and_expires(
    alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs("redis")
    a = Socket(alice)
    await a.connect()
    await a.subscribe(thread.pk)
    b1 = Socket(bob)
    await b1.connect()
    assert (await a.next("presence"))["data"]["users"] == [{"user_id": bob.pk, "online": True}]
    b2 = Socket(bob)
    await b2.connect()
    await b1.close()
    assert not [f for f in await a.drain(0.3) if f["type"] == "presence"]  # bob is still online
    await b2.close()
    assert (await a.next("presence"))["data"]["users"] == [{"user_id": bob.pk, "online": False}]
    # A connection whose process died is swept by the scheduler's job once it expires.
    with monkeypatch.context() as patch:
        patch.setattr(realtime, "presence_ttl_seconds", lambda: 0.5)
        await realtime.store().connection_open(user_id=bob.pk, conn_id="dead-process", limit=5)
    await asyncio.sleep(0.6)
    assert await db(realtime.presence_expire_stale)() == 1
    assert (await a.next("presence"))["data"]["users"] == [{"user_id": bob.pk, "online": False}]
    assert await db(realtime.presence_expire_stale)() == 0
    await a.close()


@pytest.mark.smoke
async def test_a_silent_socket_is_pinged_then_closed(alice: User, settings: Any) -> None:
    # Ticks every 0.3 s; the idle timeout leaves room for several, so a stalled event loop on a
    # loaded machine cannot skip from "not quiet yet" straight to "silent for too long".
    settings.CHAT_HEARTBEAT_SECONDS = 0.3
    settings.CHAT_IDLE_TIMEOUT_SECONDS = 3.0
    sock = Socket(alice)
    await sock.connect()
    assert (await sock.next("ping"))["type"] == "ping"
    with pytest.raises(Closed) as closed:
        await sock.next("never")
    assert closed.value.code == consumers.CLOSE_IDLE
