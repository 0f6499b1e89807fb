"""The load generator: websocket clients (the ``websockets`` package) that send at a paced rate and
time every delivery. Pure asyncio, loopback only, every loop bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# The body carries (step, index, send time); receivers find it without parsing the whole frame.
BODY_RE = re.compile(r'"body":"bench:(\d+):(\d+):([0-9.]+)')
P99_BUDGET = 0.100
WARM_UP_RATE = 10


@dataclass
class Target:
    """Where and how clients connect: the app (sessions, subscribe, message.send) or a bare relay."""

    urls: list[str]
    origins: list[str]
    app: bool
    cookies: list[str] = field(default_factory=list)
    thread_id: int = 0


@dataclass
class Step:
    rate: int
    sent: int = 0
    expected: int = 0
    received: int = 0
    duplicates: int = 0
    acks: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.expected - self.received

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("inf")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.errors == 0 and self.percentile(0.99) <= P99_BUDGET

    def summary(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "sent": self.sent,
            "deliveries": self.received,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "errors": self.errors,
            "p50_ms": round(self.percentile(0.50) * 1000, 1),
            "p99_ms": round(self.percentile(0.99) * 1000, 1),
            "max_ms": round(max(self.latencies, default=float("inf")) * 1000, 1),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 1) if self.latencies else None,
            "ok": self.ok,
        }


def relay_frame(body: str, seq: int) -> str:
    """What a relay baseline carries: a frame shaped and sized like the app's message.created."""
    message = {
        "id": seq,
        "thread_id": 1,
        "seq": seq,
        "sender": {"id": 1, "username": "bench0", "name": "Bench0", "avatar_url": "", "active": True},
        "body": body,
        "html": f"<p>{body}</p>",
        "reply_to": None,
        "client_msg_id": f"b-{seq}",
        "version": 1,
        "created_at": "2025-01-01T00:00:00.000000+00:00",
        "edited_at": None,
        "deleted": False,
        "deleted_at": None,
        "reactions": [],
        "attachments": [],
        "reply_count": None,
    }
    event = {"type": "message.created", "thread_id": 1, "seq": seq, "data": {"message": message}}
    return json.dumps(event, separators=(",", ":"))


async def open_client(target: Target, index: int) -> ClientConnection:
    url = target.urls[index % len(target.urls)]
    origin = target.origins[index % len(target.origins)]
    headers = {"Cookie": f"sessionid={target.cookies[index]}"} if target.app else {}
    ws = await connect(
        url,
        origin=origin,  # type: ignore[arg-type]
        additional_headers=headers,
        max_size=None,
        compression=None,
        ping_interval=None,
        open_timeout=30,
        close_timeout=2,
    )
    if target.app:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if ready.get("type") != "ready":
            raise RuntimeError(f"expected ready, got {ready}")
    return ws


class Fanout:
    """``members`` clients in one thread (or one relay group); ``senders`` of them send in turn."""

    def __init__(self, target: Target, members: int, senders: int) -> None:
        self.target = target
        self.members = members
        self.senders = senders
        self.clients: list[ClientConnection] = []
        self.readers: list[asyncio.Task[None]] = []
        self.steps: dict[int, Step] = {}
        self.seen: set[tuple[int, int, int]] = set()
        self.subscribed = 0

    async def start(self) -> None:
        self.clients = list(await asyncio.gather(*(open_client(self.target, i) for i in range(self.members))))
        loop = asyncio.get_running_loop()
        self.readers = [loop.create_task(self._read(i, ws)) for i, ws in enumerate(self.clients)]
        if self.target.app:
            for ws in self.clients:
                await ws.send(json.dumps({"type": "subscribe", "id": "sub", "thread_id": self.target.thread_id}))
            deadline = time.monotonic() + 30
            while self.subscribed < self.members and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.subscribed < self.members:
                raise RuntimeError(f"only {self.subscribed}/{self.members} clients subscribed")

    async def _read(self, index: int, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._read_frames(index, ws)

    async def _read_frames(self, index: int, ws: ClientConnection) -> None:
        async for raw in ws:
            now = time.time()
            if isinstance(raw, bytes):
                continue
            found = BODY_RE.search(raw, 0, 2000)
            if found is None:
                if raw.startswith('{"type":"ack"'):
                    if '"id":"sub"' in raw:
                        self.subscribed += 1
                    elif '"id":"s' in raw:
                        self._step_of_ack(raw, ok=True)
                elif raw.startswith('{"type":"error"'):
                    self._step_of_ack(raw, ok=False)
                continue
            step_no, msg_no, sent_at = int(found[1]), int(found[2]), float(found[3])
            step = self.steps.get(step_no)
            if step is None:
                continue
            key = (step_no, msg_no, index)
            if key in self.seen:
                step.duplicates += 1
                continue
            self.seen.add(key)
            step.received += 1
            step.latencies.append(now - sent_at)

    def _step_of_ack(self, raw: str, *, ok: bool) -> None:
        found = re.search(r'"id":"s(\d+)-', raw)
        if found is None:
            return
        step = self.steps.get(int(found[1]))
        if step is not None:
            if ok:
                step.acks += 1
            else:
                step.errors += 1

    async def run_step(self, number: int, rate: int, seconds: float, drain: float = 3.0) -> Step:
        step = self.steps[number] = Step(rate=rate)
        count = max(1, int(rate * seconds))
        step.expected = count * self.members
        start = time.monotonic()
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            ws = self.clients[i % self.senders]
            body = f"bench:{number}:{i}:{time.time():.6f}"
            if self.target.app:
                frame = {
                    "type": "message.send",
                    "id": f"s{number}-{i}",
                    "thread_id": self.target.thread_id,
                    "body": body,
                    "client_msg_id": f"b{number}-{i}-{start:.0f}",
                }
                await ws.send(json.dumps(frame))
            else:
                await ws.send(relay_frame(body, i))
            step.sent += 1
        deadline = time.monotonic() + drain
        while step.received < step.expected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # late duplicates would show here
        return step

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.clients), return_exceptions=True)


async def rising_rates(
    target: Target,
    rates: Sequence[int],
    *,
    cpu: Callable[[], float],
    members: int = 100,
    senders: int = 10,
    seconds: float = 4.0,
) -> list[dict[str, Any]]:
    """Run the rates in order until one misses the budget (p99 > 100 ms or any loss); all results.

    ``cpu()`` returns the servers' CPU seconds so far, for the CPU cost per delivery of each step.
    """
    fanout = Fanout(target, members, senders)
    await fanout.start()
    results = []
    try:
        await fanout.run_step(0, WARM_UP_RATE, 2.0)  # connection pools, caches, lazy imports: not measured
        number = 0
        for rate in rates:
            # A 30-100 ms pause (a full garbage collection, a checkpoint) can push one short step over the
            # budget: a rate that misses it gets a second attempt before the search stops.
            for attempt in (1, 2):
                number += 1
                before = cpu()
                step = await fanout.run_step(number, rate, seconds)
                summary = step.summary()
                summary["attempt"] = attempt
                summary["server_cpu_us_per_delivery"] = round((cpu() - before) / max(1, step.received) * 1e6, 1)
                results.append(summary)
                print(f"    {rate:>5}/s  {summary}", flush=True)
                await asyncio.sleep(1.0)
                if step.ok or step.lost or step.percentile(0.5) > P99_BUDGET:
                    break  # passed, or clearly saturated: no second attempt
            if not step.ok:
                break
    finally:
        await fanout.close()
    return results


async def connect_storm(
    target: Target, count: int, concurrency: int = 100, skip: int = 0
) -> tuple[list[ClientConnection], float, int]:
    """Open ``count`` connections (at most ``concurrency`` handshakes at once) as the clients numbered
    from ``skip``: clients, seconds, failures."""
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(index: int) -> ClientConnection | None:
        nonlocal failures
        async with gate:
            try:
                return await open_client(target, index)
            except Exception:
                failures += 1
                return None

    start = time.monotonic()
    opened = await asyncio.gather(*(one(i) for i in range(skip, skip + count)))
    elapsed = time.monotonic() - start
    return [ws for ws in opened if ws is not None], elapsed, failures
