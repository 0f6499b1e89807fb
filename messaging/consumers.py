"""The one websocket endpoint (``/ws/``): every thread of the user, multiplexed. Protocol: docs/realtime.md.

The consumer is an adapter: it parses a frame, calls the same service the REST API calls and
answers with an ``ack`` or an ``error``. Events reach it through the channel layer already
serialised (and, over 10 KB, compressed) once for every member, and it forwards them as they are.

Lossless resume: every thread event carries its ``seq``. The consumer keeps, per subscribed
thread, the highest sequence it has sent (``high``). A subscribe joins the thread's group
*before* reading the log after the client's ``last_seq``, so an event committed after the read
arrives live; frames and layer messages are handled one at a time, so live events that arrive
while the backlog is being read wait in the channel and are dropped on arrival when their seq is
not above ``high``. A live event that skips ahead (the layer dropped or reordered one, or Redis
was down) makes the consumer read the missing range from the log first.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections import deque
from typing import Any
from urllib.parse import parse_qs

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.utils import await_many_dispatch
from django.conf import settings
from django.db import DataError
from rest_framework import serializers

import messaging.credentials as auth
from attachments.services import MAX_ATTACHMENTS_PER_MESSAGE
from chatapp import metrics, storable
from chatapp.api import IntField, TextField
from chatapp.broadcast import event_dumps, layer_message, thread_group, user_group
from chatapp.errors import InvalidInput, NotFound, ServiceError, unavailable_for
from messaging import realtime, services, wire
from messaging.backlog import FIRST_PAGE, UNSENT_MARK, next_limit, thread_events_page
from messaging.hub import Hub, hub
from messaging.realtime import db
from threads import policy
from threads.selectors import thread_get_for_member, thread_member_ids

logger = logging.getLogger(__name__)

SUBPROTOCOL = "chatapp.v1"
COMPRESSION = "deflate-raw"

# Close codes (docs/realtime.md). 1xxx are standard; 4xxx are ours.
CLOSE_TOO_BIG = 1009
CLOSE_RESTART = 1012
CLOSE_BEHIND = 1013  # "try again later": this socket fell too far behind; reconnect and resume
CLOSE_UNAUTHENTICATED = 4401
CLOSE_DEACTIVATED = 4403
CLOSE_IDLE = 4408
CLOSE_TOO_MANY = 4429

realtime.daphne_close_codes()
wire.daphne_fail_with_close_frame()


class Malformed(ServiceError):
    status = 400
    code = "malformed"
    default_message = "Frames are JSON objects with a string 'type'."


class UnknownType(ServiceError):
    status = 400
    code = "unknown_type"
    default_message = "Unknown frame type."


class NotSubscribed(ServiceError):
    status = 409
    code = "not_subscribed"
    default_message = "Subscribe to the thread first."


# --- Frame shapes (types only: the rules live in the services) ----------------------------------


class Frame(serializers.Serializer):
    """DRF deep-copies a serializer's declared fields for every instance, which for a socket frame
    costs more than validating it. Frames are parsed on the event loop's thread, start to finish
    without a pause (:func:`parse`), and these fields keep no state between uses, so a shallow
    copy of each is enough."""

    def get_fields(self) -> dict[str, serializers.Field]:
        return {name: copy.copy(field) for name, field in self._declared_fields.items()}  # type: ignore[attr-defined]


class HelloFrame(Frame):
    compress = serializers.ChoiceField(choices=[COMPRESSION, "none"], required=False)


class ThreadFrame(Frame):
    thread_id = IntField(min_value=1)


class SubscribeFrame(ThreadFrame):
    last_seq = IntField(min_value=0, required=False, allow_null=True)


class SendFrame(ThreadFrame):
    body = TextField(allow_blank=True, trim_whitespace=False, default="")
    client_msg_id = TextField(max_length=services.CLIENT_MSG_ID_MAX_LENGTH)
    reply_to = IntField(min_value=1, required=False, allow_null=True)
    attachment_ids = serializers.ListField(
        child=IntField(min_value=1), max_length=MAX_ATTACHMENTS_PER_MESSAGE, default=list
    )


class MessageFrame(Frame):
    message_id = IntField(min_value=1)


class EditFrame(MessageFrame):
    body = TextField(trim_whitespace=False)
    version = IntField(min_value=1)


class ReactionFrame(MessageFrame):
    emoji = TextField(max_length=services.MAX_EMOJI_LENGTH)


class MarkFrame(ThreadFrame):
    seq = IntField(min_value=0)


def decode_frame(text: str) -> dict[str, Any]:
    """A client frame as a JSON object (or :class:`Malformed`). Its values are checked by
    :func:`chatapp.storable.json_problem` next, once the request id is known."""
    try:
        frame = json.loads(text, parse_constant=storable.refuse_constant)
    except (ValueError, RecursionError):
        raise Malformed("The frame is not valid JSON (or is nested too deeply).") from None
    if not isinstance(frame, dict):
        raise Malformed()
    return frame


def frame_request_id(frame: dict[str, Any]) -> str | int | None:
    """The frame's ``id`` to echo in its ack or error: a short string or an integer, else None."""
    request_id = frame.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)) or len(str(request_id)) > 64:
        return None
    if isinstance(request_id, str) and storable.text_problem(request_id):
        return None
    return request_id


def parse(serializer_class: type[serializers.Serializer], frame: dict[str, Any]) -> dict[str, Any]:
    serializer = serializer_class(data=frame)
    if not serializer.is_valid():
        raise InvalidInput("Some fields are invalid.", fields=json.loads(json.dumps(serializer.errors)))
    return dict(serializer.validated_data)


class Subscription:
    """A thread this socket receives: ``high`` is the highest sequence sent to the client.

    While the thread's backlog is being replayed (``replaying``), its live events are not queued:
    ``pending`` keeps the highest sequence seen live, and the replay reads on to it from the log.
    """

    __slots__ = ("high", "pending", "replaying")

    def __init__(self, high: int) -> None:
        self.high = high
        self.pending = 0
        self.replaying = False


class ChatConsumer(AsyncWebsocketConsumer):
    """One socket of one user. Handles client frames and channel-layer events one at a time."""

    FRAMES = {
        "hello": "frame_hello",
        "ping": "frame_ping",
        "pong": "frame_pong",
        "subscribe": "frame_subscribe",
        "unsubscribe": "frame_unsubscribe",
        "message.send": "frame_message_send",
        "message.edit": "frame_message_edit",
        "message.delete": "frame_message_delete",
        "reaction.add": "frame_reaction_add",
        "reaction.remove": "frame_reaction_remove",
        "typing.start": "frame_typing_start",
        "typing.stop": "frame_typing_stop",
        "read": "frame_read",
        "delivered": "frame_delivered",
        "auth": "frame_auth",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user: Any = None
        self.user_id = 0
        self.credentials: auth.SocketCredentials | None = None  # what opened it (messaging/credentials.py)
        self.expiry_timer: asyncio.TimerHandle | None = None  # closes it when its Clerk token expires
        self.conn_id = uuid.uuid4().hex
        self.accepted = False
        self.counted = False
        self.closing = False
        self.compress = False
        self.subs: dict[int, Subscription] = {}
        self.last_heard = time.monotonic()
        self.receipts: realtime.ReceiptBatcher | None = None  # made at the first read/delivered mark
        self.hub: Hub = hub()  # built inside the event loop (channels' as_asgi), so this is its hub
        self.inbox: deque[dict[str, Any]] | None = None  # events for this socket's task (slow path)
        self.waiter: asyncio.Future[None] | None = None
        self.busy = False  # handling a frame or an inbox event: live events wait in the inbox
        self.protocol: Any = None  # daphne's autobahn protocol (messaging/wire.py), or None
        self.outflow: wire.Outflow | None = None  # made when a replay first waits for the client

    # --- ASGI plumbing ---------------------------------------------------------------------------

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Channels' loop over the client's frames and this socket's inbox; no channel of its own.

        Events come from the process's hub (:mod:`messaging.hub`): written at once when this socket
        is idle and the event is next in sequence, else queued in the inbox and handled here, in
        order. Per socket: this task and its two receive tasks; the heartbeat is one task per
        process (:class:`messaging.realtime.Beats`); receipts get a batcher only once used.
        """
        self.scope = scope
        self.base_send = wire.send_guard(send, self._client_gone)
        self.protocol = wire.daphne_protocol(send)  # events go out as frames prepared once
        try:
            await await_many_dispatch([receive, self._inbox_receive], self.dispatch)
        except StopConsumer:
            pass
        finally:
            await self._cleanup()

    async def _inbox_receive(self) -> dict[str, Any]:
        while not self.inbox:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        self.busy = True  # from the pop until it is handled: later events must not overtake it
        return self.inbox.popleft()

    def queue(self, message: dict[str, Any]) -> None:
        """Hand an event to this socket's task (the slow path)."""
        if self.inbox is None:
            self.inbox = deque()
        self.inbox.append(message)
        if len(self.inbox) > realtime.MAX_QUEUED_EVENTS:
            self.fall_behind()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def take(self, message: dict[str, Any]) -> bool:
        """Called by the hub for each event of a group this socket is in. True: write it now (the
        hub does, with :meth:`forward`). False: dropped, or queued for this socket's task."""
        if self.closing:
            return False
        thread_id = message.get("thread_id")
        replaying = self.subs.get(thread_id) if thread_id is not None else None
        if replaying is not None and replaying.replaying and message.get("seq") is not None:
            # Its replay reads on to it from the log (flow-controlled): nothing waits in the inbox.
            replaying.pending = max(replaying.pending, message["seq"])
            return False
        if self.busy or self.inbox or thread_id is None:
            self.queue(message)
            return False
        sub = self.subs.get(thread_id)
        if sub is None:
            return False
        seq = message.get("seq")
        if seq is None:
            return bool(message.get("from_user") != self.user_id)  # typing: everyone but its sender
        if seq <= sub.high:
            return False
        if seq > sub.high + 1 or message["text"].startswith('{"type":"thread.'):
            self.queue(message)  # a gap to fill from the log, or a membership change to apply
            return False
        sub.high = seq
        return True

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Unlike channels' dispatch, no close_old_connections hop per message: every database call
        # here goes through realtime.db, which closes its connection itself.
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            logger.warning("no handler for %s", message["type"])
            return
        self.busy = True
        try:
            await handler(message)
        finally:
            self.busy = False

    async def send_frame(self, frame: dict[str, Any]) -> None:
        if not self.closing:
            await self.send(text_data=event_dumps(frame))

    async def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closing = True
        self._stop_outflow()
        await super().close(code=code, reason=reason)

    def _client_gone(self) -> None:
        """A frame was sent after the client's close (wire.send_guard): stop writing; the disconnect follows."""
        self.closing = True
        self._stop_outflow()

    def _stop_outflow(self) -> None:
        if self.outflow is not None:
            self.outflow.stop()

    # --- Connect / disconnect --------------------------------------------------------------------

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        user = self.scope.get("user")
        if not policy.is_usable(user):
            await self.close(code=CLOSE_UNAUTHENTICATED)  # before accept: the handshake is refused
            raise StopConsumer()
        self.user, self.user_id = user, int(user.pk)
        auth.adopt(self)
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in self.scope.get("subprotocols", []) else None
        query = parse_qs(self.scope.get("query_string", b"").decode(errors="replace"))
        self.compress = COMPRESSION in query.get("compress", [])
        await self.accept(subprotocol)
        self.accepted = True
        metrics.open_sockets.inc()
        realtime.live.add(self)
        if realtime.draining:
            await self.close(code=CLOSE_RESTART)
            return
        realtime.server_setup()
        first = False
        try:
            allowed, first = await realtime.store().connection_open(
                user_id=self.user_id, conn_id=self.conn_id, limit=settings.CHAT_MAX_CONNECTIONS_PER_USER
            )
        except Exception:
            # Without Redis the limit cannot be counted; refusing everyone would be worse.
            logger.warning("presence store unavailable; connection not counted", exc_info=True)
            allowed = True
        if not allowed:
            await self.close(code=CLOSE_TOO_MANY)
            return
        self.counted = True
        try:
            await self.hub.join(user_group(self.user_id), self)
        except Exception:
            logger.warning("group_add failed; will re-join when Redis is back", exc_info=True)
            self.hub.join_later(user_group(self.user_id), self)
            realtime.health.report_failure()
        if not await auth.recheck(self):  # revoked between the handshake and the join: no notice came
            return
        if settings.REDIS_URL:
            realtime.health.watch(self.hub)
        await self.send_frame(
            {
                "type": "ready",
                "data": {
                    "connection_id": self.conn_id,
                    "user_id": self.user_id,
                    "heartbeat": settings.CHAT_HEARTBEAT_SECONDS,
                    "idle_timeout": settings.CHAT_IDLE_TIMEOUT_SECONDS,
                    "max_frame_bytes": realtime.MAX_FRAME_BYTES,
                    "compress": COMPRESSION if self.compress else None,
                    **auth.expiry(self),
                },
            }
        )
        if first:
            await realtime.presence_broadcast(user_id=self.user_id, online=True)
        realtime.beats.start()

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        raise StopConsumer()

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        if not self.closing:  # closed (its credentials ended, ...): frames still in flight do nothing
            await super().websocket_receive(message)

    async def _cleanup(self) -> None:
        """Runs once however the consumer ends: client close, our close, cancellation at shutdown."""
        if not self.accepted:
            return
        self.accepted = False
        try:
            if self.receipts is not None:
                await self.receipts.close()
        except Exception:
            logger.warning("receipt flush on disconnect failed", exc_info=True)
        for group in [user_group(self.user_id), *(thread_group(tid) for tid in self.subs)]:
            self.hub.leave(group, self)
        self.subs.clear()
        if self.counted and await self._uncount():
            await realtime.presence_broadcast(user_id=self.user_id, online=False)
        metrics.open_sockets.dec()
        realtime.live.discard(self)

    async def _uncount(self) -> bool:
        """Remove this connection from the store; True if it was the user's last (they went offline)."""
        for attempt in range(3):
            try:
                return await realtime.store().connection_close(user_id=self.user_id, conn_id=self.conn_id)
            except Exception:
                logger.warning("presence store: close failed (attempt %d)", attempt + 1, exc_info=True)
                await asyncio.sleep(0.2 * (attempt + 1))
        return False  # Redis is down: the entry expires and a sweeper announces the user offline

    async def beat(self, *, now: float, beat: float, idle: float) -> bool:
        """A heartbeat tick: ping a quiet client, close a silent one. True if it stays (and counts)."""
        silent = now - self.last_heard
        if silent >= idle:
            await self.close(code=CLOSE_IDLE)
            return False
        if silent >= beat:
            await self.send_frame({"type": "ping", "data": {"ts": time.time()}})
        return True

    def fall_behind(self) -> None:
        """Too much waits for this client (events queued here, or bytes it does not read): close with
        1013 instead of holding them. Its next connection resumes from the log, which loses nothing."""
        if not self.closing:
            self.closing = True  # nothing more is queued or written for it
            self._stop_outflow()
            if self.inbox:
                self.inbox.clear()
            metrics.sockets_closed_behind.inc()
            asyncio.get_running_loop().create_task(super().close(code=CLOSE_BEHIND))

    def shutdown(self) -> None:
        """The process is stopping (SIGTERM): close with 1012 so the client reconnects elsewhere."""
        asyncio.get_running_loop().create_task(self.close(code=CLOSE_RESTART))

    async def rt_recover(self, message: dict[str, Any]) -> None:
        """Redis is back (or lost its data) and the hub has re-joined the groups: catch up from the log."""
        await self._refresh_presence()
        for thread_id in list(self.subs):
            await self._replay(thread_id)

    async def _refresh_presence(self) -> None:
        """Keep this connection counted; if the store had lost us (Redis restarted), we are online again."""
        try:
            _, back = await realtime.store().connection_open(user_id=self.user_id, conn_id=self.conn_id, limit=1 << 30)
        except Exception:
            logger.debug("presence refresh failed (Redis down?)", exc_info=True)
            return
        if back:
            await realtime.presence_broadcast(user_id=self.user_id, online=True)

    # --- Client frames ---------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.last_heard = time.monotonic()
        if text_data is not None:
            # A character is at most 4 bytes: most frames are measured without encoding them.
            size = len(text_data) if len(text_data) * 4 <= realtime.MAX_FRAME_BYTES else len(text_data.encode())
        else:
            size = len(bytes_data or b"")
        if size > realtime.MAX_FRAME_BYTES:
            await self.close(code=CLOSE_TOO_BIG)
            return
        request_id = None
        try:
            if text_data is None:
                raise Malformed("Binary frames are not accepted; send JSON text.")
            frame = decode_frame(text_data)
            request_id = frame_request_id(frame)
            refused = storable.json_problem(frame)  # after the id is known: the error frame names it
            if refused is not None:
                raise InvalidInput("Some fields are invalid.", fields=refused.fields())
            if not isinstance(frame.get("type"), str):
                raise Malformed()
            name = self.FRAMES.get(frame["type"])
            if name is None:
                raise UnknownType(f"Unknown frame type {frame['type'][:64]!r}.")
            await getattr(self, name)(frame, request_id)
        except ServiceError as exc:
            await self.send_frame({"type": "error", "id": request_id, "error": exc.as_dict()})
        except (DataError, UnicodeEncodeError):
            # The backstop: every field is checked before it gets here; a value that still reaches the
            # database unstorable is the client's error (and a check to add), not the server's.
            logger.warning("bad input reached the database (a check is missing at the edge)", exc_info=True)
            refusal = InvalidInput(fields={"non_field_errors": ["A value cannot be stored."]})
            await self.send_frame({"type": "error", "id": request_id, "error": refusal.as_dict()})
        except Exception as exc:
            realtime.stop_if_cancelled()
            unavailable = unavailable_for(exc)  # PostgreSQL (or storage) down: retryable, as over REST
            if unavailable is not None:
                logger.warning("socket frame answered unavailable: %s", unavailable.message, exc_info=True)
                error = unavailable.as_dict()
            else:
                logger.exception("socket frame failed")
                error = {"code": "server_error", "message": "Something went wrong on our side."}
            await self.send_frame({"type": "error", "id": request_id, "error": error})

    async def ack(self, request_id: Any, data: dict[str, Any] | None = None) -> None:
        await self.send_frame({"type": "ack", "id": request_id, "data": data or {}})

    async def frame_hello(self, frame: dict[str, Any], request_id: Any) -> None:
        data = parse(HelloFrame, frame)
        if "compress" in data:
            self.compress = data["compress"] == COMPRESSION
        await self.ack(request_id, {"compress": COMPRESSION if self.compress else None})

    async def frame_ping(self, frame: dict[str, Any], request_id: Any) -> None:
        await self.send_frame({"type": "pong", "id": request_id, "data": {"ts": time.time()}})

    async def frame_pong(self, frame: dict[str, Any], request_id: Any) -> None:
        """The answer to our ping: hearing it is all that matters."""

    async def frame_auth(self, frame: dict[str, Any], request_id: Any) -> None:
        await auth.frame_auth(self, frame, request_id)

    async def frame_subscribe(self, frame: dict[str, Any], request_id: Any) -> None:
        data = parse(SubscribeFrame, frame)
        thread_id, last_seq = data["thread_id"], data.get("last_seq")
        group = thread_group(thread_id)
        # Join first: whatever commits after the permission check's read arrives live.
        await self.hub.join(group, self)
        try:
            access = await db(thread_get_for_member)(thread_id=thread_id, user=self.user, action=policy.Action.VIEW)
        except ServiceError:
            if thread_id not in self.subs:
                self.hub.leave(group, self)
            raise
        current = access.thread.last_sequence
        if last_seq is None:
            self.subs[thread_id] = Subscription(current)
        elif last_seq > current or current - last_seq > realtime.RESYNC_OVER:
            self.subs[thread_id] = Subscription(current)
            reason = "ahead" if last_seq > current else "gap_too_large"
            await self.send_frame({"type": "resync", "thread_id": thread_id, "seq": current, "reason": reason})
        else:
            self.subs[thread_id] = Subscription(last_seq)
            # The access check passed at ``current``: a removal (or delete) logged before it was undone
            # since (re-added, restored), so the backlog's earlier removals do not end the subscription.
            await self._replay(thread_id, upto=current, allowed_through=current)
        sub = self.subs.get(thread_id)
        if sub is None:  # the backlog ended with our removal
            raise NotFound("Thread not found.")
        await self._send_presence(thread_id)
        await self.ack(request_id, {"thread_id": thread_id, "seq": sub.high})

    async def frame_unsubscribe(self, frame: dict[str, Any], request_id: Any) -> None:
        thread_id = parse(ThreadFrame, frame)["thread_id"]
        self._drop(thread_id)
        await self.ack(request_id, {"thread_id": thread_id})

    async def frame_message_send(self, frame: dict[str, Any], request_id: Any) -> None:
        data = parse(SendFrame, frame)
        message, created = await db(services.message_send)(
            sender=self.user,
            thread_id=data["thread_id"],
            body=data["body"],
            client_msg_id=data["client_msg_id"],
            reply_to_id=data.get("reply_to"),
            attachment_ids=data["attachment_ids"],
        )
        if created:
            metrics.messages_sent.labels(via="ws").inc()
        await self.ack(
            request_id,
            {
                "message_id": message.pk,
                "thread_id": message.thread_id,
                "seq": message.sequence,
                "client_msg_id": message.client_msg_id,
                "created": created,
            },
        )

    async def frame_message_edit(self, frame: dict[str, Any], request_id: Any) -> None:
        data = parse(EditFrame, frame)
        message, merged = await db(services.message_edit)(
            actor=self.user, message_id=data["message_id"], body=data["body"], expected_version=data["version"]
        )
        await self.ack(request_id, {"message_id": message.pk, "version": message.version, "merged": merged})

    async def frame_message_delete(self, frame: dict[str, Any], request_id: Any) -> None:
        message_id = parse(MessageFrame, frame)["message_id"]
        await db(services.message_delete)(actor=self.user, message_id=message_id)
        await self.ack(request_id, {"message_id": message_id})

    async def frame_reaction_add(self, frame: dict[str, Any], request_id: Any) -> None:
        data = parse(ReactionFrame, frame)
        changed = await db(services.reaction_add)(actor=self.user, message_id=data["message_id"], emoji=data["emoji"])
        await self.ack(request_id, {"message_id": data["message_id"], "emoji": data["emoji"], "changed": changed})

    async def frame_reaction_remove(self, frame: dict[str, Any], request_id: Any) -> None:
        data = parse(ReactionFrame, frame)
        changed = await db(services.reaction_remove)(
            actor=self.user, message_id=data["message_id"], emoji=data["emoji"]
        )
        await self.ack(request_id, {"message_id": data["message_id"], "emoji": data["emoji"], "changed": changed})

    def _subscribed(self, frame: dict[str, Any]) -> int:
        thread_id = int(parse(ThreadFrame, frame)["thread_id"])
        if thread_id not in self.subs:
            # Typing never touches the database: the subscription is the permission check.
            raise NotSubscribed()
        return thread_id

    async def frame_typing_start(self, frame: dict[str, Any], request_id: Any) -> None:
        await self._typing(self._subscribed(frame), True, request_id)

    async def frame_typing_stop(self, frame: dict[str, Any], request_id: Any) -> None:
        await self._typing(self._subscribed(frame), False, request_id)

    async def _typing(self, thread_id: int, typing: bool, request_id: Any) -> None:
        current = realtime.store()
        kwargs = {"thread_id": thread_id, "user_id": self.user_id}
        try:
            announce = await (current.typing_start(**kwargs) if typing else current.typing_stop(**kwargs))
        except Exception:
            announce = True  # without Redis, no throttle; typing is best effort
        if announce:
            event = realtime.typing_event(thread_id=thread_id, user_id=self.user_id, typing=typing)
            await realtime.group_send(thread_group(thread_id), event, from_user=self.user_id)
        await self.ack(request_id, {"thread_id": thread_id})

    async def frame_read(self, frame: dict[str, Any], request_id: Any) -> None:
        data = await self._mark_frame(frame)
        self._receipts().mark(data["thread_id"], read=data["seq"], request_id=request_id)
        await self.ack(request_id, {"thread_id": data["thread_id"], "seq": data["seq"]})

    async def frame_delivered(self, frame: dict[str, Any], request_id: Any) -> None:
        data = await self._mark_frame(frame)
        self._receipts().mark(data["thread_id"], delivered=data["seq"], request_id=request_id)
        await self.ack(request_id, {"thread_id": data["thread_id"], "seq": data["seq"]})

    async def _mark_frame(self, frame: dict[str, Any]) -> dict[str, Any]:
        """A receipt is acknowledged only for a thread the user may see: a subscribed one (checked when
        subscribing, dropped on removal) costs nothing; any other is asked of the policy first (404)."""
        data = parse(MarkFrame, frame)
        if data["thread_id"] not in self.subs:
            await db(thread_get_for_member)(thread_id=data["thread_id"], user=self.user, action=policy.Action.VIEW)
        return data

    def _receipts(self) -> realtime.ReceiptBatcher:
        if self.receipts is None:
            self.receipts = realtime.ReceiptBatcher(self._flush_receipts)
        return self.receipts

    async def _flush_receipts(self, thread_id: int, mark: realtime.Mark) -> None:
        try:
            await db(services.receipt_mark)(
                user=self.user, thread_id=thread_id, read_up_to=mark.read, delivered_up_to=mark.delivered
            )
        except ServiceError as exc:
            request_id = mark.request_ids[-1] if mark.request_ids else None
            await self.send_frame({"type": "error", "id": request_id, "error": exc.as_dict()})

    # --- Events from the channel layer ----------------------------------------------------------

    async def chat_event(self, message: dict[str, Any]) -> None:
        thread_id = message.get("thread_id")
        if thread_id is None:
            await self._user_event(message)
            return
        sub = self.subs.get(thread_id)
        if sub is None:
            return  # not (or no longer) subscribed
        seq = message.get("seq")
        if seq is None:
            if message.get("from_user") != self.user_id:  # typing goes to everyone but its sender
                await self.forward(message)
            return
        if seq <= sub.high:
            return  # already sent (from the backlog, or a duplicate)
        if seq > sub.high + 1:
            await self._replay(thread_id, upto=seq)  # a gap: read it from the log, in order
            return
        sub.high = seq
        await self.forward(message)
        if message["text"].startswith('{"type":"thread.'):
            self._apply_thread_event(thread_id, json.loads(message["text"]))

    async def chat_catch_up(self, message: dict[str, Any]) -> None:
        """From the heartbeat (:meth:`messaging.realtime.Beats.catch_up`): the log has events up to
        ``seq`` that never arrived here; send them from the log, in order."""
        sub = self.subs.get(message["thread_id"])
        if sub is not None and sub.high < message["seq"]:
            await self._replay(message["thread_id"], upto=message["seq"])

    async def forward(self, message: dict[str, Any]) -> None:
        """Write an event's frame as serialised (or compressed) once for everyone."""
        if self.closing:
            return
        zipped = self.compress and "z" in message
        if self.protocol is not None:
            waiting = wire.write_event(self.protocol, message, zipped=zipped)
            if waiting and wire.unsent_bytes(self.protocol) > realtime.MAX_UNSENT_BYTES:
                self.fall_behind()
        elif zipped:
            await self.base_send({"type": "websocket.send", "bytes": message["z"]})
        else:
            await self.base_send({"type": "websocket.send", "text": message["text"]})

    def _drop(self, thread_id: Any) -> None:
        """Stop receiving a thread (unsubscribed, removed, or the thread is gone)."""
        if self.subs.pop(thread_id, None) is not None:
            self.hub.leave(thread_group(thread_id), self)

    def _apply_thread_event(self, thread_id: int, event: dict[str, Any]) -> None:
        """Safety net: stop a thread this socket may no longer see, even if the user notice was lost."""
        removed = event["type"] == "thread.participant_removed" and event["data"].get("user_id") == self.user_id
        if removed or event["type"] == "thread.deleted":
            self._drop(thread_id)

    async def _user_event(self, message: dict[str, Any]) -> None:
        event = json.loads(message["text"])
        kind = event.get("type")
        if kind in ("thread.removed", "thread.deleted"):
            self._drop(event.get("data", {}).get("thread_id"))
        await self.forward(message)
        if kind == "user.deactivated":
            await self.close(code=CLOSE_DEACTIVATED)
        elif kind == "session.revoked" and event["data"].get("session_id") == self.scope.get("auth_session_id"):
            await self.close(code=CLOSE_UNAUTHENTICATED)  # signed out (or revoked in Clerk): sign in again
        elif kind == "user.password_changed" and self.scope.get("auth_method") == "session":
            await self.close(code=CLOSE_UNAUTHENTICATED)  # its session ended with the old password

    async def _replay(self, thread_id: int, upto: int | None = None, allowed_through: int = 0) -> None:
        """Send the logged events after ``high`` in order, a page at a time: up to ``upto`` at least
        (to the end of the log without it), and on to whatever arrived live meanwhile.

        Flow-controlled (docs/realtime.md, "Resuming a large backlog"): under daphne a page is read,
        and each event written, only while at most ``UNSENT_MARK`` of this socket's writes
        wait in the server; so a client is sent its backlog as fast as it reads it, the process
        holds about one page (``messaging.backlog``) per resuming socket, and the slow-client rule
        (1013) never sees the replay. Live events of the thread are not queued meanwhile
        (:meth:`take`). The replay stops as soon as the socket closes.

        Removals up to ``allowed_through`` (a sequence at which the user's access was checked) are
        sent but do not end the subscription.
        """
        sub = self.subs.get(thread_id)
        if sub is None:
            return
        sub.replaying = True
        try:
            limit = min(FIRST_PAGE, realtime.BACKLOG_PAGE)
            while self.subs.get(thread_id) is sub:
                if not await self._replay_may_write():
                    return
                rows, more = await db(thread_events_page)(thread_id=thread_id, after=sub.high, limit=limit)
                metrics.replay_pages.inc()
                for seq, payload in rows:
                    if self.subs.get(thread_id) is not sub or not await self._replay_may_write():
                        return
                    sub.high = seq
                    await self._replay_write(layer_message(payload, compressed=self.compress))
                    if seq > allowed_through and payload.get("type", "").startswith("thread."):
                        self._apply_thread_event(thread_id, payload)
                if not rows or (sub.high >= max(upto or 0, sub.pending) and (upto is not None or not more)):
                    return
                limit = next_limit(len(rows), realtime.BACKLOG_PAGE)
        finally:
            sub.replaying = False

    async def _replay_may_write(self) -> bool:
        """Wait until this socket's client has taken what was written for it (down to the mark); False
        once the socket is closing, when the replay stops (``chatapp_replays_stopped_total``)."""
        mark = UNSENT_MARK
        if not self.closing and self.protocol is not None and wire.unsent_bytes(self.protocol) > mark:
            if self.outflow is None:
                self.outflow = wire.Outflow(self.protocol)
            if await self.outflow.drain(mark):
                self.last_heard = time.monotonic()  # it reads what we send: alive (see beat())
        if self.closing or (self.protocol is not None and self.protocol.state != self.protocol.STATE_OPEN):
            metrics.replays_stopped.inc()
            return False
        return True

    async def _replay_write(self, message: dict[str, Any]) -> None:
        """Write a replayed event; unlike :meth:`forward`, never counted against the slow-client rule:
        the replay itself keeps what waits for this client down (:meth:`_replay_may_write`)."""
        if self.protocol is None:
            await self.forward(message)
        else:
            wire.write_event(self.protocol, message, zipped=self.compress and "z" in message)

    async def _send_presence(self, thread_id: int) -> None:
        members = await db(thread_member_ids)(thread_id=thread_id)
        try:
            online = await realtime.store().online(members)
        except Exception:
            return
        await self.send_frame(realtime.presence_event(thread_id, {uid: uid in online for uid in members}))
