"""``python -m bench.redis_freeze`` (inside scripts/testenv.py run): how long sends wait for their ack
while Redis is frozen for 30 s (SIGSTOP: a partition, not a refusal), with the shipped settings.

One app process (production settings, the pub/sub layer). A socket sends a message every 0.2 s and
a REST client (API token) every 0.5 s, for 5 s before the freeze, 30 s during it and 5 s after;
every ack's latency is recorded. Results are printed and written to ``bench/results/``.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import json
import os
import signal
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from bench.run import PUBSUB, RESULTS, app_servers, raise_fd_limit, seed, setup_django

BEFORE, FROZEN, AFTER = 5.0, 30.0, 5.0


def redis_pid() -> int:
    spec = importlib.util.spec_from_file_location("testenv", Path(__file__).parent.parent / "scripts" / "testenv.py")
    assert spec is not None
    assert spec.loader is not None
    testenv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(testenv)
    return int(testenv.load_state()["services"]["redis"]["pid"])


def summary(samples: list[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    taken = sorted(ms for at, ms in samples if start <= at < end)
    if not taken:
        return {"acks": 0}
    return {
        "acks": len(taken),
        "median_ms": round(statistics.median(taken), 1),
        "p99_ms": round(taken[min(len(taken) - 1, int(len(taken) * 0.99))], 1),
        "max_ms": round(taken[-1], 1),
    }


def prepare() -> tuple[int, str, str]:
    """The bench thread, bench0's session key and API token."""
    raise_fd_limit()
    setup_django()
    from accounts.models import User
    from accounts.services import user_token_issue

    thread_id, keys = seed(2, 2)
    return thread_id, keys[0], user_token_issue(user=User.objects.get(username="bench0"))


async def main(thread_id: int, session_key: str, token: str) -> dict[str, Any]:
    (server,) = app_servers(1, PUBSUB)
    pid = redis_pid()
    socket_acks: list[tuple[float, float]] = []
    rest_acks: list[tuple[float, float]] = []
    stop = asyncio.Event()
    try:
        cookie = {"Cookie": f"sessionid={session_key}"}
        origin: Any = server.origin
        async with connect(server.ws_url, origin=origin, additional_headers=cookie, max_size=None) as ws:
            json.loads(await ws.recv())  # ready

            async def socket_sender() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    started = time.monotonic()
                    frame = {"type": "message.send", "id": f"b{n}", "thread_id": thread_id, "body": "x"}
                    await ws.send(json.dumps({**frame, "client_msg_id": f"freeze-ws-{n}-{started}"}))
                    while True:
                        reply = json.loads(await ws.recv())
                        if reply.get("id") == f"b{n}":
                            break
                    socket_acks.append((started, (time.monotonic() - started) * 1000))
                    await asyncio.sleep(0.2)

            def rest_send(n: int) -> float:
                request = urllib.request.Request(
                    f"{server.origin}/api/v1/threads/{thread_id}/messages",
                    data=json.dumps({"body": "x", "client_msg_id": f"freeze-rest-{n}-{time.time()}"}).encode(),
                    headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
                    method="POST",
                )
                started = time.monotonic()
                with urllib.request.urlopen(request, timeout=120) as reply:
                    reply.read()
                return started

            async def rest_sender() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    started = await asyncio.to_thread(rest_send, n)
                    rest_acks.append((started, (time.monotonic() - started) * 1000))
                    await asyncio.sleep(0.5)

            senders = [asyncio.create_task(socket_sender()), asyncio.create_task(rest_sender())]
            begin = time.monotonic()
            await asyncio.sleep(BEFORE)
            frozen_at = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(FROZEN)
            finally:
                os.kill(pid, signal.SIGCONT)
            thawed_at = time.monotonic()
            await asyncio.sleep(AFTER)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*senders), 150)
    finally:
        server.close()
    return {
        "scenario": f"Redis frozen (SIGSTOP) for {FROZEN:.0f} s; CHATAPP_REDIS_TIMEOUT default",
        "socket": {
            "before": summary(socket_acks, begin, frozen_at),
            "frozen": summary(socket_acks, frozen_at, thawed_at),
            "after": summary(socket_acks, thawed_at, float("inf")),
        },
        "rest": {
            "before": summary(rest_acks, begin, frozen_at),
            "frozen": summary(rest_acks, frozen_at, thawed_at),
            "after": summary(rest_acks, thawed_at, float("inf")),
        },
    }


if __name__ == "__main__":
    result = asyncio.run(main(*prepare()))
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"redis-freeze-{stamp}.json").write_text(json.dumps(result, indent=2))
