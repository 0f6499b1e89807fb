"""What the socket layer shares across connections and processes: presence, connection counts,
typing throttle, receipt debouncing, channel-layer health and graceful shutdown.

Presence and the connection limit live in Redis (``REDIS_URL``) so every daphne process sees
the same numbers; on the embedded default an in-process store stands in. Nothing here writes
to the database; presence reads a user's threads and a thread's members.

Redis keys (prefix ``<CHATAPP_CHANNEL_PREFIX>:rt:``, ``chatapp:rt:`` by default):

- ``procs`` sorted set: process id -> expiry (epoch seconds): each server process's heartbeat
  entry, refreshed every process beat (``CHAT_PROCESS_TTL_SECONDS`` / 3). A process whose entry
  has expired is gone (``kill -9``, a lost host): its connections stop counting at once.
- ``conns:<user_id>`` sorted set: ``<process id>|<connection id>`` -> expiry (epoch seconds),
  refreshed by heartbeats. A connection is live while its entry has not expired and its process's
  entry has not; a user is online while one connection is live; the connection limit counts
  live connections (the entries of gone processes are dropped when the limit is counted).
- ``conns`` sorted set: ``<user_id>:<process id>|<connection id>`` -> expiry, so the process
  beats and the scheduler (:func:`presence_expire_stale`) find the connections of a process that
  died without closing them and announce those users offline.
- ``typing:<thread_id>:<user_id>``: time of the last typing broadcast (expires with the indicator).
- ``epoch``: a token that disappears when Redis loses its data (restart, flush); a process that
  sees it change re-joins its channel-layer groups and catches its sockets up from the log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from chatapp import metrics
from chatapp.broadcast import group_send_now, layer_message, thread_group
from threads.models import Thread, ThreadParticipant

logger = logging.getLogger(__name__)

KEY_PREFIX = f"{getattr(settings, 'CHANNEL_PREFIX', 'chatapp')}:rt:"
# The design's limits (see docs/realtime.md).
MAX_FRAME_BYTES = 100 * 1024
BACKLOG_PAGE = 500
# A socket is closed (1013) when its client falls this far behind; it resumes from the log.
MAX_QUEUED_EVENTS = 10_000
MAX_UNSENT_BYTES = 8 * 1024 * 1024
RESYNC_OVER = 5000
TYPING_THROTTLE_SECONDS = 2.0
TYPING_SHOWN_SECONDS = 6
RECEIPT_FLUSH_SECONDS = 1.0
DRAIN_SECONDS = 5.0
HEALTH_CHECK_SECONDS = 1.0


def heartbeat_seconds() -> float:
    return float(settings.CHAT_HEARTBEAT_SECONDS)


def idle_timeout_seconds() -> float:
    return float(settings.CHAT_IDLE_TIMEOUT_SECONDS)


def presence_ttl_seconds() -> float:
    """How long a connection counts without a heartbeat: two missed beats and a margin."""
    return 2 * heartbeat_seconds() + 5


def process_ttl_seconds() -> float:
    """How long a process counts as alive after its last beat (``CHATAPP_PROCESS_TTL_SECONDS``)."""
    return float(settings.CHAT_PROCESS_TTL_SECONDS)


def process_beat_seconds() -> float:
    """How often a process refreshes its heartbeat entry and re-checks its sockets' credentials."""
    return process_ttl_seconds() / 3


_process: tuple[int, str] | None = None


def process_id() -> str:
    """This server process's id in the presence store: host, pid and a random part (made per pid,
    so a forked child never shares its parent's)."""
    global _process
    if _process is None or _process[0] != os.getpid():
        host = "".join(ch for ch in socket.gethostname() if ch.isalnum() or ch in "-.")[:64] or "host"
        _process = (os.getpid(), f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    return _process[1]


def stop_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop while an exception was being handled.

    redis-py's read timeout can turn a cancellation into ``redis.TimeoutError`` (the cancel arrives
    as its own deadline fires); a retry loop that catches it would then never end, and a process
    shutting down (or a test's event loop closing) would wait on it for ever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def db(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Run ORM code off the event loop, closing the connection afterwards (channels' database_sync_to_async).

    Not thread-sensitive: in an ASGI server every socket would otherwise queue behind one shared
    sync thread. Each call runs on its own pooled connection, so one socket's frames (awaited in
    order) stay ordered while different sockets use the database concurrently.
    """
    return database_sync_to_async(fn, thread_sensitive=False)  # type: ignore[no-any-return]


# --- Reads -------------------------------------------------------------------------------------


def thread_last_sequences(*, thread_ids: list[int]) -> dict[int, int]:
    """Each thread's newest logged sequence (committed events only)."""
    return dict(Thread.objects.filter(pk__in=thread_ids).values_list("pk", "last_sequence"))


def user_thread_ids(*, user_id: int) -> list[int]:
    """The live threads a user takes part in (where their presence is shown)."""
    return list(
        ThreadParticipant.objects.filter(user_id=user_id, thread__deleted_at__isnull=True).values_list(
            "thread_id", flat=True
        )
    )


# --- Presence, connection limit and typing: the store ------------------------------------------


class Store(Protocol):
    async def connection_open(self, *, user_id: int, conn_id: str, limit: int) -> tuple[bool, bool]:
        """Count a connection in (or refresh it). Returns (allowed, user_came_online); over ``limit``: refused."""

    async def connection_close(self, *, user_id: int, conn_id: str) -> bool:
        """Count a connection out. Returns whether that was the user's last live connection."""

    async def connections_refresh(self, entries: list[tuple[int, str]]) -> list[bool]:
        """Keep ``(user_id, conn_id)`` entries counted; True for each whose user had dropped out."""

    async def online(self, user_ids: Iterable[int]) -> set[int]: ...

    async def process_beat(self) -> bool:
        """Refresh this process's heartbeat entry. True if it was missing or expired: this process
        was (or could have been) taken for gone, by a stall of its own or a Redis outage."""

    async def expire_gone_processes(self) -> list[int]:
        """Drop the connections of processes whose heartbeat expired; the users who went offline."""

    async def typing_start(self, *, thread_id: int, user_id: int) -> bool:
        """Whether to broadcast this typing.start (at most one per TYPING_THROTTLE_SECONDS)."""

    async def typing_stop(self, *, thread_id: int, user_id: int) -> bool:
        """Whether others may still show the user typing (so a stop is worth broadcasting)."""

    async def epoch(self) -> str: ...


# A connection entry counts while it has not expired and its process's heartbeat entry has not
# (entries without a process part, written before processes had one, count by their expiry alone).
_LIVE = """
local function live(procs, entry, now)
  local sep = string.find(entry, '|', 1, true)
  if not sep then return true end
  local alive = redis.call('ZSCORE', procs, string.sub(entry, 1, sep - 1))
  return alive ~= false and tonumber(alive) > now
end
"""

_OPEN = (
    _LIVE
    + """
local key, all, procs = KEYS[1], KEYS[2], KEYS[3]
local now, expires, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, uid, ttl = ARGV[4], ARGV[5], tonumber(ARGV[6])
redis.call('ZADD', procs, ARGV[8], ARGV[7])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
for _, entry in ipairs(redis.call('ZRANGE', key, 0, -1)) do
  if not live(procs, entry, now) then
    redis.call('ZREM', key, entry)
    redis.call('ZREM', all, uid .. ':' .. entry)
  end
end
local present = redis.call('ZSCORE', key, member)
local n = redis.call('ZCARD', key)
if not present and n >= limit then return -1 end
redis.call('ZADD', key, expires, member)
redis.call('EXPIRE', key, ttl)
redis.call('ZADD', all, expires, uid .. ':' .. member)
if not present and n == 0 then return 2 end
return 1
"""
)

_CLOSE = (
    _LIVE
    + """
local key, all, procs = KEYS[1], KEYS[2], KEYS[3]
local now, member, uid = tonumber(ARGV[1]), ARGV[2], ARGV[3]
redis.call('ZREM', all, uid .. ':' .. member)
if redis.call('ZREM', key, member) == 0 then return 0 end
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', key, now, '+inf')) do
  if live(procs, entry, now) then return 0 end
end
return 1
"""
)

_ONLINE = (
    _LIVE
    + """
local now = tonumber(ARGV[1])
local found = {}
for i = 2, #KEYS do
  local on = 0
  for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], now, '+inf')) do
    if live(KEYS[1], entry, now) then on = 1 break end
  end
  found[i - 1] = on
end
return found
"""
)

# Expired connections (unless ARGV[3] is "1": only those of gone processes), and every connection
# of a process whose heartbeat expired (one pass over all entries, once per process that died).
_SWEEP = (
    _LIVE
    + """
local all, procs = KEYS[1], KEYS[2]
local now, prefix = tonumber(ARGV[1]), ARGV[2]
local candidates = {}
if ARGV[3] ~= '1' then
  candidates = redis.call('ZRANGEBYSCORE', all, '-inf', now, 'LIMIT', 0, 1000)
end
local dead = redis.call('ZRANGEBYSCORE', procs, '-inf', now)
if #dead > 0 then
  local gone_procs = {}
  for _, proc in ipairs(dead) do gone_procs[proc] = true end
  for _, entry in ipairs(redis.call('ZRANGE', all, 0, -1)) do
    local colon, bar = string.find(entry, ':', 1, true), string.find(entry, '|', 1, true)
    if colon and bar and gone_procs[string.sub(entry, colon + 1, bar - 1)] then
      table.insert(candidates, entry)
    end
  end
  redis.call('ZREM', procs, unpack(dead))
end
local gone, seen = {}, {}
for _, entry in ipairs(candidates) do
  redis.call('ZREM', all, entry)
  local sep = string.find(entry, ':', 1, true)
  local uid, member = string.sub(entry, 1, sep - 1), string.sub(entry, sep + 1)
  local key = prefix .. uid
  local score = redis.call('ZSCORE', key, member)
  if score and (tonumber(score) <= now or not live(procs, member, now)) then
    redis.call('ZREM', key, member)
    local online = false
    for _, other in ipairs(redis.call('ZRANGEBYSCORE', key, now, '+inf')) do
      if live(procs, other, now) then online = true break end
    end
    if not online and not seen[uid] then
      seen[uid] = true
      table.insert(gone, uid)
    end
  end
end
return gone
"""
)

_TYPING = """
local last = redis.call('GET', KEYS[1])
if last and (tonumber(ARGV[1]) - tonumber(last)) < tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""

_CONNS = f"{KEY_PREFIX}conns"
_PROCS = f"{KEY_PREFIX}procs"
# Fail fast: a slow answer here delays a handshake or a heartbeat, never a message.
_REDIS_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 1, "socket_timeout": 2}


class RedisStore:
    """The store on Redis: every process of the deployment shares it (Lua keeps each step atomic)."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(url, **_REDIS_OPTIONS)
        self._open = self.client.register_script(_OPEN)
        self._close = self.client.register_script(_CLOSE)
        self._online = self.client.register_script(_ONLINE)
        self._sweep = self.client.register_script(_SWEEP)
        self._typing = self.client.register_script(_TYPING)

    @staticmethod
    def _open_args(user_id: int, conn_id: str, limit: int) -> tuple[list[str], list[float | str]]:
        now = time.time()
        ttl = presence_ttl_seconds()
        args: list[float | str] = [
            now,
            now + ttl,
            limit,
            f"{process_id()}|{conn_id}",
            user_id,
            math.ceil(ttl),
            process_id(),
            now + process_ttl_seconds(),
        ]
        return [f"{_CONNS}:{user_id}", _CONNS, _PROCS], args

    async def connection_open(self, *, user_id: int, conn_id: str, limit: int) -> tuple[bool, bool]:
        keys, args = self._open_args(user_id, conn_id, limit)
        result = int(await self._open(keys=keys, args=args))
        return result >= 0, result == 2

    async def connection_close(self, *, user_id: int, conn_id: str) -> bool:
        keys = [f"{_CONNS}:{user_id}", _CONNS, _PROCS]
        return bool(await self._close(keys=keys, args=[time.time(), f"{process_id()}|{conn_id}", user_id]))

    async def connections_refresh(self, entries: list[tuple[int, str]]) -> list[bool]:
        """Keep many connections counted in one round trip; True where the store had lost the user."""
        if not entries:
            return []
        pipe = self.client.pipeline(transaction=False)
        for user_id, conn_id in entries:
            keys, args = self._open_args(user_id, conn_id, 1 << 30)
            await self._open(keys=keys, args=args, client=pipe)
        return [int(result) == 2 for result in await pipe.execute()]

    async def online(self, user_ids: Iterable[int]) -> set[int]:
        ids = list(user_ids)
        if not ids:
            return set()
        found = await self._online(keys=[_PROCS, *(f"{_CONNS}:{uid}" for uid in ids)], args=[time.time()])
        return {uid for uid, on in zip(ids, found, strict=True) if int(on)}

    async def process_beat(self) -> bool:
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zscore(_PROCS, process_id())
        pipe.zadd(_PROCS, {process_id(): now + process_ttl_seconds()})
        previous, _ = await pipe.execute()
        return previous is None or float(previous) <= now

    async def expire_gone_processes(self) -> list[int]:
        gone = await self._sweep(keys=[_CONNS, _PROCS], args=[time.time(), f"{_CONNS}:", "1"])
        return sorted({int(uid) for uid in gone})

    async def typing_start(self, *, thread_id: int, user_id: int) -> bool:
        key = f"{KEY_PREFIX}typing:{thread_id}:{user_id}"
        args = [time.time(), TYPING_THROTTLE_SECONDS, TYPING_SHOWN_SECONDS * 1000]
        return bool(await self._typing(keys=[key], args=args))

    async def typing_stop(self, *, thread_id: int, user_id: int) -> bool:
        return bool(await self.client.delete(f"{KEY_PREFIX}typing:{thread_id}:{user_id}"))

    async def epoch(self) -> str:
        key = f"{KEY_PREFIX}epoch"
        await self.client.set(key, uuid.uuid4().hex, nx=True)
        value = await self.client.get(key)
        return value.decode() if isinstance(value, bytes) else str(value)


class MemoryStore:
    """The same store inside one process, for the embedded default (one process, no Redis)."""

    def __init__(self) -> None:
        self.conns: dict[int, dict[str, float]] = {}
        self.typing: dict[tuple[int, int], float] = {}
        self.token = uuid.uuid4().hex

    def _live(self, user_id: int, now: float) -> dict[str, float]:
        conns = {c: exp for c, exp in self.conns.get(user_id, {}).items() if exp > now}
        self.conns[user_id] = conns
        return conns

    async def connection_open(self, *, user_id: int, conn_id: str, limit: int) -> tuple[bool, bool]:
        conns = self._live(user_id, time.time())
        present = conn_id in conns
        if not present and len(conns) >= limit:
            return False, False
        first = not present and not conns
        conns[conn_id] = time.time() + presence_ttl_seconds()
        return True, first

    async def connection_close(self, *, user_id: int, conn_id: str) -> bool:
        if self.conns.get(user_id, {}).pop(conn_id, None) is None:
            return False
        return not self._live(user_id, time.time())

    async def connections_refresh(self, entries: list[tuple[int, str]]) -> list[bool]:
        return [(await self.connection_open(user_id=uid, conn_id=conn, limit=1 << 30))[1] for uid, conn in entries]

    async def online(self, user_ids: Iterable[int]) -> set[int]:
        now = time.time()
        return {uid for uid in user_ids if self._live(uid, now)}

    async def process_beat(self) -> bool:
        return False  # one process: it is never taken for gone

    async def expire_gone_processes(self) -> list[int]:
        return []

    def sweep(self) -> list[int]:
        now = time.time()
        gone = [uid for uid, conns in self.conns.items() if conns and not self._live(uid, now)]
        self.conns = {uid: conns for uid, conns in self.conns.items() if conns}
        return gone

    async def typing_start(self, *, thread_id: int, user_id: int) -> bool:
        now = time.time()
        last = self.typing.get((thread_id, user_id))
        if last is not None and now - last < TYPING_THROTTLE_SECONDS:
            return False
        self.typing = {k: v for k, v in self.typing.items() if now - v < TYPING_SHOWN_SECONDS}
        self.typing[(thread_id, user_id)] = now
        return True

    async def typing_stop(self, *, thread_id: int, user_id: int) -> bool:
        last = self.typing.pop((thread_id, user_id), None)
        return last is not None and time.time() - last < TYPING_SHOWN_SECONDS

    async def epoch(self) -> str:
        return self.token


_stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Store] = weakref.WeakKeyDictionary()
_memory_store = MemoryStore()


def store() -> Store:
    """The store for the running event loop (redis-py's asyncio clients belong to one loop)."""
    if not settings.REDIS_URL:
        return _memory_store
    loop = asyncio.get_running_loop()
    found = _stores.get(loop)
    if found is None:
        found = _stores[loop] = RedisStore(settings.REDIS_URL)
    return found


def presence_event(thread_id: int, users: dict[int, bool]) -> dict[str, Any]:
    return {
        "type": "presence",
        "thread_id": thread_id,
        "data": {"users": [{"user_id": uid, "online": online} for uid, online in sorted(users.items())]},
    }


def presence_expire_stale() -> int:
    """Drop expired connections and those of processes that died without closing them; announce
    who went offline.

    Run by the scheduler (``settings.PRESENCE_EXPIRE_FUNCTION``, every ~30 s); every process beat
    also drops the connections of gone processes (:meth:`Beats.tick`). The sweep is one Lua
    script, so several runners never announce the same user twice. Returns how many users.
    """
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL, **_REDIS_OPTIONS)
        try:
            found = client.eval(_SWEEP, 2, _CONNS, _PROCS, time.time(), f"{_CONNS}:", "0")
            gone = sorted({int(uid) for uid in found})
        finally:
            client.close()
    else:
        gone = _memory_store.sweep()
    for user_id in gone:
        for thread_id in user_thread_ids(user_id=user_id):
            group_send_now(thread_group(thread_id), layer_message(presence_event(thread_id, {user_id: False})))
    return len(gone)


# --- Channel layer -----------------------------------------------------------------------------


async def group_send(group: str, event: dict[str, Any], **routing: Any) -> bool:
    """Send an event (serialised once) to a group from async code; a failure is logged, not raised.

    ``routing`` adds keys the consumer reads without parsing the text (e.g. ``from_user``).
    """
    layer = get_channel_layer()
    if layer is None:
        return False
    message = layer_message(event)
    message.update(routing)
    message["group"] = group
    message["ts"] = time.time()
    try:
        await layer.group_send(group, message)
    except Exception:
        logger.warning("channel layer send to %s failed", group, exc_info=True)
        metrics.channel_layer_errors.inc()
        health.report_failure()
        return False
    return True


async def presence_broadcast(*, user_id: int, online: bool) -> None:
    """Tell every thread the user shares that they came online or went offline."""
    for thread_id in await db(user_thread_ids)(user_id=user_id):
        await group_send(thread_group(thread_id), presence_event(thread_id, {user_id: online}))


def typing_event(*, thread_id: int, user_id: int, typing: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"user_id": user_id, "typing": typing}
    if typing:
        data["expires_in"] = TYPING_SHOWN_SECONDS
    return {"type": "typing", "thread_id": thread_id, "data": data}


class Health:
    """Watches Redis for this process and notices outages and restarts.

    After Redis comes back (or lost its data: the ``epoch`` token changed), every live consumer is
    told to re-join its groups and catch up from the event log, so nothing sent meanwhile is lost.
    """

    def __init__(self) -> None:
        self.up = True
        self.listeners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        self._epoch: str | None = None
        self.recovered_at = -math.inf  # monotonic time Redis was last found back

    def watch(self, listener: Any) -> None:
        """Register a listener (the hub: it has ``layer_recovered()``) and start the watcher if needed."""
        self.listeners.add(listener)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run())

    def report_failure(self) -> None:
        self.up = False

    async def _run(self) -> None:
        while self.listeners:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            await self.check()
            stop_if_cancelled()  # check() swallows errors, a disguised cancellation among them

    async def check(self) -> None:
        try:
            epoch = await store().epoch()
        except Exception:
            if self.up:
                logger.warning("Redis is unreachable; sockets stay open and will catch up when it returns")
            self.up = False
            return
        recovered = not self.up or (self._epoch is not None and epoch != self._epoch)
        self.up, self._epoch = True, epoch
        if recovered:
            self.recovered_at = time.monotonic()
            logger.warning("Redis is back; re-joining groups and catching up %d sockets", len(self.listeners))
            for listener in list(self.listeners):
                listener.layer_recovered()


health = Health()


# --- Receipts ----------------------------------------------------------------------------------


@dataclass
class Mark:
    read: int | None = None
    delivered: int | None = None
    request_ids: list[Any] = field(default_factory=list)

    def merge(self, *, read: int | None, delivered: int | None, request_id: Any) -> None:
        if read is not None:
            self.read = max(self.read or 0, read)
        if delivered is not None:
            self.delivered = max(self.delivered or 0, delivered)
        if request_id is not None:
            self.request_ids.append(request_id)


class ReceiptBatcher:
    """Keeps the highest read/delivered mark per thread and writes each thread at most once per interval.

    The first mark of a quiet thread is written at once; marks arriving within the interval after
    a write are merged into the next one. ``close()`` writes whatever is pending (on disconnect).
    """

    def __init__(self, flush: Callable[[int, Mark], Awaitable[None]], interval: float = RECEIPT_FLUSH_SECONDS) -> None:
        self._flush = flush
        self.interval = interval
        self._pending: dict[int, Mark] = {}
        self._timers: dict[int, asyncio.Task[None]] = {}
        self._flushing: set[asyncio.Task[None]] = set()
        self._last: dict[int, float] = {}

    def mark(
        self, thread_id: int, *, read: int | None = None, delivered: int | None = None, request_id: Any = None
    ) -> None:
        self._pending.setdefault(thread_id, Mark()).merge(read=read, delivered=delivered, request_id=request_id)
        if thread_id not in self._timers:
            delay = max(0.0, self._last.get(thread_id, -math.inf) + self.interval - time.monotonic())
            self._timers[thread_id] = asyncio.get_running_loop().create_task(self._later(thread_id, delay))

    async def _later(self, thread_id: int, delay: float) -> None:
        await asyncio.sleep(delay)
        task = self._timers.pop(thread_id)
        self._flushing.add(task)
        try:
            self._last[thread_id] = time.monotonic()
            mark = self._pending.pop(thread_id, None)
            if mark is not None:
                await self._flush(thread_id, mark)
        finally:
            self._flushing.discard(task)

    async def close(self) -> None:
        for task in self._timers.values():
            task.cancel()
        self._timers.clear()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        pending, self._pending = self._pending, {}
        for thread_id, mark in pending.items():
            await self._flush(thread_id, mark)


# --- Live sockets of this process and graceful shutdown ----------------------------------------

# Every open consumer of this process (for the heartbeat and the SIGTERM drain).
live: weakref.WeakSet[Any] = weakref.WeakSet()


def socket_beat_seconds() -> float:
    return min(heartbeat_seconds(), idle_timeout_seconds() / 4)


class Beats:
    """One task per process (not one per socket) for the heartbeat of the process and its sockets.

    Every process beat (``CHAT_PROCESS_TTL_SECONDS`` / 3, 4 s by default) it refreshes the
    process's heartbeat entry in the store, runs the registered :attr:`hooks` with the open
    sockets (the credential re-check of :mod:`messaging.credentials`), and drops the connections
    of processes whose heartbeat expired, announcing their users offline.

    Every socket beat (``min(heartbeat, idle timeout / 4)`` seconds) it also asks each consumer to
    ``beat()``: ping it if it has been quiet for a heartbeat, close it if silent for the idle
    timeout. Then it catches up sockets whose thread's newest event never reached them
    (:meth:`catch_up`), refreshes every remaining connection's presence entry in one Redis round
    trip, and announces anyone the store had lost (Redis restarted) as online again.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._sockets_beat_at = 0.0  # monotonic
        self.hooks: list[Callable[[list[Any]], Awaitable[None]]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run())

    def _sockets(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        return [c for c in list(live) if c.hub.loop is loop and c.counted and not c.closing]

    async def _run(self) -> None:
        self._sockets_beat_at = time.monotonic()
        while self._sockets():
            await asyncio.sleep(min(socket_beat_seconds(), process_beat_seconds()))
            try:
                await self.tick(sockets=time.monotonic() - self._sockets_beat_at >= socket_beat_seconds())
            except Exception:
                stop_if_cancelled()
                logger.exception("heartbeat tick failed")

    async def tick(self, *, sockets: bool = True) -> None:
        """A process beat; with ``sockets`` (or when this process had been taken for gone), a socket beat too."""
        reachable = True
        try:
            taken_for_gone = await store().process_beat()
        except Exception:
            stop_if_cancelled()
            logger.debug("process beat failed (Redis down?)", exc_info=True)
            reachable = taken_for_gone = False
        if sockets or taken_for_gone:
            self._sockets_beat_at = time.monotonic()
            await self.sockets_beat()  # puts back connections a sweep removed meanwhile
        for hook in self.hooks:
            try:
                await hook(self._sockets())
            except Exception:
                stop_if_cancelled()
                logger.warning("process beat check %s failed", getattr(hook, "__name__", hook), exc_info=True)
        if taken_for_gone or not reachable or time.monotonic() - health.recovered_at < process_ttl_seconds():
            # Redis was away (or this process stalled): the other processes' heartbeat entries
            # expired too, and they may not have beaten since. Judge them once they have had a TTL.
            return
        try:
            gone = await store().expire_gone_processes()
            for user_id in gone:
                await presence_broadcast(user_id=user_id, online=False)
        except Exception:
            stop_if_cancelled()
            logger.warning("dropping the connections of gone processes failed", exc_info=True)

    async def sockets_beat(self) -> None:
        from messaging.hub import hub

        hub().maybe_rejoin()
        now, beat, idle = time.monotonic(), heartbeat_seconds(), idle_timeout_seconds()
        alive = [c for c in self._sockets() if await c.beat(now=now, beat=beat, idle=idle)]
        try:
            await self.catch_up(alive)
        except Exception:
            stop_if_cancelled()
            logger.warning("catch-up check failed (database down?)", exc_info=True)
        try:
            back = await store().connections_refresh([(c.user_id, c.conn_id) for c in alive])
        except Exception:
            logger.debug("presence refresh failed (Redis down?)", exc_info=True)
            return
        for consumer, came_back in zip(alive, back, strict=True):
            if came_back:
                await presence_broadcast(user_id=consumer.user_id, online=True)

    @staticmethod
    async def catch_up(consumers: list[Any]) -> None:
        """The channel layer may drop a notice (a full channel). A gap is filled when the thread's next
        event arrives, but a thread's *newest* event has no next one: compare what each socket has
        with the log (one query for the whole process) and have the socket replay what it lacks."""
        wanted = sorted({thread_id for c in consumers for thread_id in c.subs})
        if not wanted:
            return
        newest = await db(thread_last_sequences)(thread_ids=wanted)
        for consumer in consumers:
            for thread_id, sub in list(consumer.subs.items()):
                if newest.get(thread_id, 0) > sub.high:
                    consumer.queue({"type": "chat.catch_up", "thread_id": thread_id, "seq": newest[thread_id]})


beats = Beats()
draining = False
_server_ready = False


def daphne_close_codes() -> None:
    """Let the app close a socket with the server codes 1001-1014 (1009 too big, 1012 restart) on daphne.

    Daphne hands an ASGI ``websocket.close`` code to autobahn's ``sendClose``, which only accepts the
    codes a *browser* may send (1000, 3000-4999). RFC 6455 lets a server send the IANA codes; daphne
    itself sends 1011 with autobahn's ``sendCloseFrame``, which is what this uses for 1001-1014.
    """
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # pragma: no cover - another ASGI server passes the code through
        return
    if getattr(WebSocketProtocol.serverClose, "chatapp_patched", False):
        return
    original = WebSocketProtocol.serverClose

    def server_close(self: Any, code: int | None = None) -> None:
        if code is not None and 1001 <= code <= 1014:
            self.sendCloseFrame(code=code)
        else:
            original(self, code)

    server_close.chatapp_patched = True  # type: ignore[attr-defined]
    WebSocketProtocol.serverClose = server_close  # type: ignore[method-assign]


def server_setup() -> None:
    """Once per daphne process, at its first socket: the SIGTERM drain, and a frozen startup heap.

    SIGTERM: daphne's own handler stops the reactor and cancels the consumers, which drops the TCP
    connections without a close frame (clients see 1006). Installed here, when Twisted's handler
    is in place, ours asks every consumer to close with 1012, waits up to DRAIN_SECONDS for them
    to finish (receipts flushed, presence updated), then calls Twisted's handler.

    ``gc.freeze()``: the loaded app is ~100,000 long-lived objects that every full collection
    would scan again; frozen, a full collection pauses the event loop 30-45 ms instead of ~100 ms
    under load (docs/benchmarks.md).
    """
    global _server_ready
    reactor = sys.modules.get("twisted.internet.reactor")
    if _server_ready or reactor is None or not getattr(reactor, "running", False):
        return
    _server_ready = True
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(lambda: loop.create_task(_drain(previous, signum, frame)))

    signal.signal(signal.SIGTERM, on_sigterm)


async def _drain(previous: Any, signum: int, frame: FrameType | None) -> None:
    global draining
    if draining:
        return
    draining = True
    logger.warning("SIGTERM: closing %d sockets with 1012 before stopping", len(live))
    for consumer in list(live):
        consumer.shutdown()
    deadline = time.monotonic() + DRAIN_SECONDS
    while live and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
