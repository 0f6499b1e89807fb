"""``scripts/testenv.py run -- python -m bench.replay``: clients resuming a large backlog at once,
and what it costs the server. Results: printed, and written to ``bench/results/``.

One thread of 8 members holds ~12 MB of missed events (messages of ~45 KB of text, each event
~90 KB with its HTML). All 8 members connect, then subscribe with ``last_seq=0`` at the same moment
and read until the ``ack``: clients reading as fast as loopback allows; clients reading at ~2 MB/s
each (a slow network), so that the server must hold back what they have not read yet; and one
client alone, for scale. Each on a fresh app process. Measured: the daphne process's RSS (sampled
every 20 ms: baseline with the sockets open, peak during the replay), the time until every client
has its ``ack``, the pages of the event log read, and any socket closed (1013 would be the
slow-client rule). ``--tree PATH`` serves
another checkout of the app (e.g. an older commit) with this harness, for a before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench import servers as server_processes
from bench.run import RESULTS, app_servers, flush_redis, raise_fd_limit, seed, setup_django, with_servers
from bench.servers import ServerProcess

MEMBERS = 8
BODY_BYTES = 45_000
BACKLOG_BYTES = 12 * 1024 * 1024
SLOW_BYTES_PER_SECOND = 2 * 1024 * 1024


def seed_backlog(users: list[Any]) -> int:
    """A thread of ``users`` with ~12 MB of logged events; its id. Runs in the harness's process."""
    from django.conf import settings

    from messaging import services
    from threads.services import thread_create

    settings.CHAT_SENDS_PER_MINUTE = 10**9
    thread, _ = thread_create(creator=users[0], title="replay", participant_ids=[u.pk for u in users[1:]])
    body = "".join(random.choices(string.ascii_letters, k=BODY_BYTES))
    for n in range(BACKLOG_BYTES // (2 * BODY_BYTES) + 1):
        services.message_send(sender=users[0], thread_id=thread.pk, body=f"{n} {body}", client_msg_id=f"r-{n}")
    return int(thread.pk)


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"{server.origin}/metrics", timeout=15) as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


async def open_member(server: ServerProcess, cookie: str) -> ClientConnection:
    ws = await connect(
        server.ws_url,
        origin=server.origin,  # type: ignore[arg-type]
        additional_headers={"Cookie": f"sessionid={cookie}"},
        max_size=None,
        ping_interval=None,
        open_timeout=30,
        compression=None,
    )
    ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
    if ready.get("type") != "ready":
        raise RuntimeError(f"expected ready, got {ready}")
    return ws


async def resume(ws: ClientConnection, thread_id: int, pace: float | None) -> dict[str, Any]:
    """Subscribe from the start and read until the ack (at ``pace`` bytes/s if given)."""
    await ws.send(json.dumps({"type": "subscribe", "id": "r", "thread_id": thread_id, "last_seq": 0}))
    received = events = 0
    started = time.monotonic()
    while True:
        raw = await asyncio.wait_for(ws.recv(), 120)
        received += len(raw)
        if pace:
            ahead = started + received / pace - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        frame = json.loads(raw)
        if "seq" in frame and "data" in frame:
            events += 1
        if frame.get("id") == "r":
            return {"bytes": received, "events": events, "ack": frame["type"] == "ack"}


async def run_once(server: ServerProcess, cookies: list[str], thread_id: int, pace: float | None) -> dict[str, Any]:
    clients = [await open_member(server, cookie) for cookie in cookies]
    await asyncio.sleep(1)
    baseline = server.rss_bytes()
    pages_before = metric(server, "chatapp_replay_pages_total")
    peak = baseline
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, server.rss_bytes())
            await asyncio.sleep(0.02)

    sampler = asyncio.get_running_loop().create_task(sample())
    started = time.monotonic()
    results = await asyncio.gather(*(resume(ws, thread_id, pace) for ws in clients), return_exceptions=True)
    seconds = time.monotonic() - started
    done = True
    await sampler
    after = server.rss_bytes()
    closed = [ws.close_code for ws in clients if ws.close_code is not None]
    await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
    ok = [r for r in results if isinstance(r, dict) and r["ack"]]
    return {
        "readers": "paced, 2 MB/s each" if pace else "full speed",
        "clients": len(clients),
        "completed": len(ok),
        "closed": closed,
        "errors": [repr(r)[:200] for r in results if not isinstance(r, dict)],
        "mb_per_client": round(max((r["bytes"] for r in ok), default=0) / 2**20, 1),
        "events_per_client": max((r["events"] for r in ok), default=0),
        "seconds": round(seconds, 1),
        "pages_read": int(metric(server, "chatapp_replay_pages_total") - pages_before),
        "rss_baseline_mib": round(baseline / 2**20, 1),
        "rss_peak_mib": round(peak / 2**20, 1),
        "rss_peak_over_baseline_mib": round((peak - baseline) / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
    }


VARIANTS = ((MEMBERS, None), (MEMBERS, SLOW_BYTES_PER_SECOND), (1, None))


def scenario(cookies: list[str], thread_id: int) -> list[dict[str, Any]]:
    """Each variant (clients, pace) on a fresh app process, so that each starts from the same memory."""
    rows = []
    for clients, pace in VARIANTS:
        servers = app_servers(1, "channels_redis.pubsub.RedisPubSubChannelLayer")
        row = with_servers(servers, run_once(servers[0], cookies[:clients], thread_id, pace))
        print(f"    {row}", flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| clients resuming ~12 MB at once | completed | closed | MB each | seconds | log pages read "
        "| RSS baseline / peak (MiB) | peak over baseline (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['clients']}, {row['readers']} | {row['completed']}/{row['clients']} | {row['closed'] or 'none'} | "
            f"{row['mb_per_client']} | {row['seconds']} | {row['pages_read']} | "
            f"{row['rss_baseline_mib']} / {row['rss_peak_mib']} | {row['rss_peak_over_baseline_mib']} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="serve this checkout of the app instead (a before/after)")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        print("needs PostgreSQL and Redis: scripts/testenv.py run -- python -m bench.replay")
        return 2
    raise_fd_limit()
    setup_django()
    from accounts.models import User

    print(f"bench.replay: {MEMBERS} clients resuming ~12 MB at once", flush=True)
    _, cookies = seed(MEMBERS, MEMBERS)
    flush_redis()
    users = list(User.objects.filter(username__in=[f"bench{n}" for n in range(MEMBERS)]))
    users.sort(key=lambda user: int(user.username.removeprefix("bench")))
    thread_id = seed_backlog(users)
    if args.tree is not None:
        server_processes.ROOT = args.tree.resolve()  # the servers' working directory: that tree's code
    started = time.monotonic()
    rows = scenario(cookies, thread_id)
    report = {"tree": str(args.tree or "."), "rows": rows, "minutes": round((time.monotonic() - started) / 60, 1)}
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}-replay.json").write_text(json.dumps(report, indent=2))
    text = "\n".join(markdown(rows)) + "\n"
    (RESULTS / f"{stamp}-replay.md").write_text(text)
    print(text)
    return 0 if all(row["completed"] == row["clients"] and not row["closed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
