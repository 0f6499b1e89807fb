"""The process's fan-out hub: one channel-layer channel for every socket of the process.

Channels' usual shape gives each socket its own layer channel and group memberships, so an event
for a thread of 100 members is queued 100 times in the process and wakes 100 tasks. Here the
process joins each group once (reference-counted by the sockets that need it), receives each
event once, and hands it to the sockets of that group:

- **fast path**: a socket that is idle (not handling a frame, nothing queued) and for which the
  event is the next in sequence gets the already-serialised frame written at once, from the hub's
  task, with no task switch and no copy;
- **slow path**: anything else (the socket is busy, the event skips ahead or is a ``thread.*`` or
  user event) goes to the socket's own inbox, handled in order by its task (gap fill from the log,
  group changes, closes). Ordering per socket is therefore the same as with a channel per socket.

When Redis comes back after an outage the hub re-joins its groups and tells every socket to catch
up from the event log (``rt.recover``). With the core layer a group membership expires after a
day (channels-redis' ``group_expiry``); the hub re-joins its groups every hour.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from channels.layers import get_channel_layer

from chatapp import metrics
from chatapp.broadcast import thread_group

logger = logging.getLogger(__name__)

REJOIN_SECONDS = 3600.0


class Hub:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the registry below is keyed by the loop: no strong cycle
        self.layer: Any = get_channel_layer()
        self.channel: str | None = None
        self.members: dict[str, set[Any]] = {}
        self.lock = asyncio.Lock()  # group joins and leaves reach the layer in the order they happen
        self.task: asyncio.Task[None] | None = None
        self.joined_at = time.monotonic()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:
            raise RuntimeError("the hub's event loop is gone")
        return loop

    def _usable(self) -> bool:
        loop = self._loop()
        return loop is not None and not loop.is_closed()

    # --- Membership ------------------------------------------------------------------------------

    async def _start(self) -> None:
        if self.channel is None:
            self.channel = await self.layer.new_channel()
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._run())

    async def join(self, group: str, socket: Any) -> None:
        """Add ``socket`` to ``group``; returns once the process receives the group's events.

        Raises if the layer cannot be reached and the group is new here (the socket is not added).
        """
        members = self.members.get(group)
        if members is not None and socket in members:
            return
        async with self.lock:
            await self._start()
            members = self.members.get(group)
            if members is None:
                await self.layer.group_add(group, self.channel)
                members = self.members[group] = set()
            members.add(socket)

    def join_later(self, group: str, socket: Any) -> None:
        """Add ``socket`` without the layer (Redis is down): the group is joined at recovery."""
        self.members.setdefault(group, set()).add(socket)

    def leave(self, group: str, socket: Any) -> None:
        members = self.members.get(group)
        if members is None or socket not in members:
            return
        members.discard(socket)
        if not members:
            del self.members[group]
            self.loop.create_task(self._discard(group))

    async def _discard(self, group: str) -> None:
        async with self.lock:
            if group in self.members or self.channel is None:
                return  # joined again meanwhile
            try:
                await self.layer.group_discard(group, self.channel)
            except Exception:
                logger.warning("group_discard %s failed; its events are dropped here", group, exc_info=True)

    async def rejoin(self) -> None:
        """Join every group again (after an outage, or before the core layer's membership expires)."""
        async with self.lock:
            if self.channel is None:
                return
            for group in list(self.members):
                await self.layer.group_add(group, self.channel)
            self.joined_at = time.monotonic()

    # --- Events ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        from messaging import realtime

        delay = 0.1
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except Exception:
                realtime.stop_if_cancelled()
                if realtime.health.up:
                    logger.warning("channel layer receive failed; retrying", exc_info=True)
                realtime.health.report_failure()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            await self.deliver(message)

    async def deliver(self, message: dict[str, Any]) -> None:
        group = message.get("group")
        if group is None and "thread_id" in message:
            group = thread_group(message["thread_id"])
        members = self.members.get(group) if group else None
        if not members:
            return
        for socket in list(members):
            try:
                if socket.take(message):
                    await socket.forward(message)
            except Exception:
                # One socket's failure must not stop the others, nor the hub (every socket of the
                # process depends on it); that socket catches up from the log when it resumes.
                logger.exception("delivering an event to a socket failed")
        sent_at = message.get("ts")
        if sent_at is not None:
            metrics.fanout_latency.observe(max(0.0, time.time() - sent_at))

    def layer_recovered(self) -> None:
        """Redis is back (or lost its data): join the groups again, then every socket catches up."""
        if self._usable():
            self.loop.create_task(self._recover())

    async def _recover(self) -> None:
        from messaging import realtime

        try:
            await self._start()
            await self.rejoin()
        except Exception:
            realtime.health.report_failure()  # the next recovery tries again
            return
        sockets = {socket for members in self.members.values() for socket in members}
        for socket in sockets:
            socket.queue({"type": "rt.recover"})

    def maybe_rejoin(self) -> None:
        if time.monotonic() - self.joined_at > REJOIN_SECONDS and self._usable():
            self.joined_at = time.monotonic()
            self.loop.create_task(self._rejoin_quietly())

    async def _rejoin_quietly(self) -> None:
        try:
            await self.rejoin()
        except Exception:
            logger.warning("periodic group re-join failed", exc_info=True)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """The hub of the running event loop (one per process in production; one per test loop in tests)."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(loop)
    if found is None:
        found = _hubs[loop] = Hub(loop)
    return found
