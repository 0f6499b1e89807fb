"""The one way events leave a transaction: sequenced, logged, and sent only after commit.

Services call :func:`thread_event_record` for anything a reconnecting client must be able
to replay (it allocates the thread's next sequence, appends the event to the durable
``ThreadEvent`` log and schedules the broadcast), and :func:`broadcast_on_commit` for
notices addressed to a user or ephemeral ones. Each event is serialised once here; the
socket consumer forwards the prepared text (or compressed bytes) to every member.

The channel layer is only a fast notice: channels-redis may drop a message for a channel
that is over capacity, so clients resume from the log by sequence. Nothing that writes waits for
it: events leave after commit from a thread of the process's own (:class:`Broadcaster`), so an ack
is never held up by a slow or frozen Redis.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import threading
import time
import zlib
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

EVENT_MESSAGE_TYPE = "chat.event"


def thread_group(thread_id: int) -> str:
    return f"thread.{thread_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def event_dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, cls=DjangoJSONEncoder, separators=(",", ":"), ensure_ascii=False)


def compress(text: str) -> bytes:
    """Raw DEFLATE (RFC 1951), readable in browsers with DecompressionStream('deflate-raw')."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return compressor.compress(text.encode()) + compressor.flush()


def layer_message(event: dict[str, Any], *, compressed: bool = True) -> dict[str, Any]:
    """The channel-layer message for an event: serialised (and compressed) once for all members.

    ``compressed=False``: no compressed copy (a socket's replay, for a client that did not ask for it).
    """
    text = event_dumps(event)
    message: dict[str, Any] = {"type": EVENT_MESSAGE_TYPE, "text": text}
    if "thread_id" in event:
        message["thread_id"] = event["thread_id"]
    if "seq" in event:
        message["seq"] = event["seq"]
    if compressed and len(text.encode()) > settings.CHAT_COMPRESS_OVER_BYTES:
        message["z"] = compress(text)
    return message


def group_send_now(group: str, message: dict[str, Any]) -> None:
    """Hand a message to the channel layer without waiting for it; a failure is logged, never raised
    (the DB has the record). On Redis it is sent by this process's :class:`Broadcaster`, in order."""
    layer = get_channel_layer()
    if layer is None:
        return
    if isinstance(layer, InMemoryChannelLayer):
        # In-process queues, bound to the event loop of the sockets: sent from here (it never waits).
        try:
            async_to_sync(layer.group_send)(group, _stamped(group, message))
        except Exception:
            _failed(group)
        return
    broadcaster.submit(group, message)


def _stamped(group: str, message: dict[str, Any]) -> dict[str, Any]:
    # "group": how each process's hub routes it (messaging/hub.py); "ts": when it left, for the
    # fan-out latency metric.
    return {**message, "group": group, "ts": time.time()}


def _failed(group: str, *, quiet: bool = False) -> None:
    from chatapp import metrics

    if not quiet:
        logger.exception("channel layer send to %s failed; clients will resume from the log", group)
    metrics.channel_layer_errors.inc()


class Broadcaster:
    """Sends this process's channel-layer messages from a thread and event loop of its own.

    A service's caller (the REST view answering, the socket acknowledging a send) never waits on
    Redis: it hands its events over after commit and goes on. The events leave one at a time, in the
    order they were handed over. When a send times out (Redis frozen or partitioned: the layer's socket
    timeout ends it) the ones queued in the next ``REDIS_SKIP_SECONDS`` are dropped without trying, as
    are any over ``MAX_PENDING``: sockets read what they missed from the event log when Redis is back
    (docs/realtime.md, "Delivery, fan-out and failures").
    """

    MAX_PENDING = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.skip_until = 0.0

    def submit(self, group: str, message: dict[str, Any]) -> None:
        try:
            self._running().call_soon_threadsafe(self._put, group, message)
        except RuntimeError:  # the loop is closed: the interpreter is exiting
            _failed(group, quiet=True)

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            thread = self._thread
            if self._loop is None or thread is None or not thread.is_alive() or self._pid != os.getpid():
                ready = threading.Event()
                thread = threading.Thread(target=self._run, args=(ready,), name="chatapp-broadcast", daemon=True)
                thread.start()
                ready.wait()
                if not self._pid:
                    atexit.register(self.flush, timeout=2.0)
                self._thread, self._pid = thread, os.getpid()
            assert self._loop is not None
            return self._loop

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop, self._queue = loop, asyncio.Queue()
        ready.set()
        loop.run_until_complete(self._work())

    def _put(self, group: str, message: dict[str, Any]) -> None:
        assert self._queue is not None
        if self._queue.qsize() >= self.MAX_PENDING:
            _failed(group, quiet=True)
            return
        self._queue.put_nowait((group, message))

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            group, message = await self._queue.get()
            try:
                await self._send(group, message)
            finally:
                self._queue.task_done()

    async def _send(self, group: str, message: dict[str, Any]) -> None:
        if time.monotonic() < self.skip_until:
            _failed(group, quiet=True)
            return
        try:
            await get_channel_layer().group_send(group, _stamped(group, message))
        except Exception as exc:
            if isinstance(exc, (RedisTimeoutError, TimeoutError)):  # frozen, not refused: skip it a moment
                self.skip_until = time.monotonic() + settings.REDIS_SKIP_SECONDS
            _failed(group)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the messages handed over so far to be sent (or dropped)."""
        loop, queue = self._loop, self._queue
        if loop is None or queue is None or self._pid != os.getpid() or not loop.is_running():
            return True
        try:
            asyncio.run_coroutine_threadsafe(queue.join(), loop).result(timeout)
        except (TimeoutError, RuntimeError):
            return False
        return True


broadcaster = Broadcaster()


def broadcast_on_commit(*, group: str, event: dict[str, Any]) -> None:
    """Send ``event`` to ``group`` after the current transaction commits; never after a rollback."""
    message = layer_message(event)
    transaction.on_commit(lambda: group_send_now(group, message))


def sequence_next(thread_id: int, *, last_message_at: datetime | None = None) -> int:
    """Allocate the thread's next event sequence (one ``UPDATE … RETURNING``). Must run inside a transaction.

    The UPDATE holds the thread row's lock until commit, so concurrent writers in one thread
    queue up and get distinct numbers; a rollback undoes the increment, so there are no gaps.
    ``last_message_at`` is set in the same statement when a message is stored. A deleted thread
    takes no more events (NotFound), even when it was deleted while this writer waited for the lock.
    """
    from threads.models import Thread

    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        raise RuntimeError("sequence_next must be called inside transaction.atomic")
    meta, quote = Thread._meta, connection.ops.quote_name
    sequence = quote(meta.get_field("last_sequence").column)
    assignments, params = [f"{sequence} = {sequence} + 1"], []
    if last_message_at is not None:
        assignments.append(f"{quote(meta.get_field('last_message_at').column)} = %s")
        params.append(connection.ops.adapt_datetimefield_value(last_message_at))
    # Identifiers come from the model's own metadata, quoted; values are parameters.
    table, pk = quote(meta.db_table), quote(meta.pk.column)
    deleted = quote(meta.get_field("deleted_at").column)
    sql = (
        f"UPDATE {table} SET {', '.join(assignments)} "  # noqa: S608
        f"WHERE {pk} = %s AND {deleted} IS NULL RETURNING {sequence}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, thread_id])
        row = cursor.fetchone()
    if row is None:
        from chatapp.errors import NotFound

        raise NotFound("Thread not found.")
    return int(row[0])


def thread_event_record(
    *, thread_id: int, type: str, data: dict[str, Any], message_id: int | None = None, sequence: int | None = None
) -> dict[str, Any]:
    """Append a sequenced event to the thread's log and broadcast it to the thread after commit.

    Pass ``sequence`` when the caller already allocated one (a message takes its event's number).
    Returns the event as sent: ``{"type", "thread_id", "seq", "data"}``.
    """
    from threads.models import ThreadEvent

    seq = sequence if sequence is not None else sequence_next(thread_id)
    event = {"type": type, "thread_id": thread_id, "seq": seq, "data": data}
    ThreadEvent.objects.create(thread_id=thread_id, sequence=seq, type=type, payload=event, message_id=message_id)
    broadcast_on_commit(group=thread_group(thread_id), event=event)
    return event


def user_event_on_commit(*, user_id: int, type: str, data: dict[str, Any]) -> dict[str, Any]:
    """A notice for every socket of one user (notifications, being added to or removed from a thread)."""
    event = {"type": type, "data": data}
    broadcast_on_commit(group=user_group(user_id), event=event)
    return event
