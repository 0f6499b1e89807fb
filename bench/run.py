"""``python -m bench.run`` (``make bench``, inside scripts/testenv.py): the socket layer under load,
against two baselines on the same machine. Results: printed, and written to ``bench/results/``.

Scenarios (docs/benchmarks.md):

1. Fan-out: one thread of 100 members, 10 of them sending in turn at rising rates; capacity is
   the highest rate with p99 delivery latency <= 100 ms and no loss. Run for the app on
   channels-redis' core layer and on its pub/sub layer, a bare ``websockets`` relay and a bare
   Channels consumer on the same layer.
2. Idle: 2,000 authenticated connections opened at once: connect-storm time and failures,
   memory per connection, database queries per connect (the app), against both baselines.
3. Scale-out: scenario 1 with the members spread over two app processes, against one.
4. History: in a 100,000-message thread, the first page against pages 50,000 and 90,000 back
   (bench/history.py), as ratios; ``--only history`` runs it alone (under a minute).

Everything runs on 127.0.0.1; every loop is bounded; a full run takes about 20-25 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import history
from bench.load import Target, connect_storm, rising_rates
from bench.servers import ServerProcess, start_all

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CORE = "channels_redis.core.RedisChannelLayer"
PUBSUB = "channels_redis.pubsub.RedisPubSubChannelLayer"
MEMBERS = 100
IDLE = 2000
ROUNDS = 3
RATES = (25, 50, 75, 90, 100, 110, 125, 150, 175, 200, 225, 250, 275, 300, 350, 400, 600, 800, 1200)
# Scenario 3 again with each app process held to this many CPUs (a cgroup quota, like a container's
# CPU limit): on a machine whose few CPUs the load generator, PostgreSQL and Redis share, processes
# without a budget measure the machine, not how the app scales out.
SCALE_BUDGET_CPUS = 0.4


def raise_fd_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


SECRET_KEY = "bench-only-secret-key-not-for-production-use"


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    os.environ.setdefault("CHATAPP_TESTING", "1")
    os.environ["DJANGO_SECRET_KEY"] = SECRET_KEY  # the servers check the sessions seeded here
    import django

    django.setup()


def seed(users: int, members: int) -> tuple[int, list[str]]:
    """Users bench0..bench<users-1> with a signed-in session each, and one thread of the first ``members``."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.hashers import make_password
    from django.contrib.sessions.backends.base import VALID_KEY_CHARS
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session
    from django.core.management import call_command
    from django.utils import timezone
    from django.utils.crypto import get_random_string

    from accounts.models import User
    from threads.services import thread_create

    call_command("migrate", verbosity=0, interactive=False)
    password = make_password("bench-password")
    existing = set(User.objects.filter(username__startswith="bench").values_list("username", flat=True))
    User.objects.bulk_create(
        [
            User(username=f"bench{n}", display_name=f"Bench {n}", password=password)
            for n in range(users)
            if f"bench{n}" not in existing
        ],
        batch_size=1000,
    )
    people = {u.username: u for u in User.objects.filter(username__startswith="bench")}
    ordered = [people[f"bench{n}"] for n in range(users)]
    thread, _ = thread_create(creator=ordered[0], title="bench", participant_ids=[u.pk for u in ordered[1:members]])
    store = SessionStore()
    expire = timezone.now() + datetime.timedelta(days=1)
    rows, keys = [], []
    for user in ordered:
        key = get_random_string(32, VALID_KEY_CHARS)
        data = {SESSION_KEY: str(user.pk), BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend"}
        data[HASH_SESSION_KEY] = user.get_session_auth_hash()
        rows.append(Session(session_key=key, session_data=store.encode(data), expire_date=expire))
        keys.append(key)
    Session.objects.bulk_create(rows, batch_size=1000)
    return thread.pk, keys


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.flushdb()
    client.close()


def app_servers(
    count: int, layer: str, cpus: float | None = None, extra_env: dict[str, str] | None = None
) -> list[ServerProcess]:
    """``count`` app processes on ``layer``; with ``cpus``, each held to that many CPUs (``CpuBudget``)."""
    servers = [ServerProcess.daphne("bench.instrumented:application") for _ in range(count)]
    if cpus is not None:
        for server in servers:
            server.limit_cpu(cpus)
    env = {
        "DJANGO_SETTINGS_MODULE": "chatapp.settings",
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "DJANGO_DEBUG": "0",
        "CHATAPP_TESTING": "0",
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "CHATAPP_WS_ALLOWED_ORIGINS": ",".join(s.origin for s in servers),
        "CHATAPP_SENDS_PER_MINUTE": "100000000",
        "CHATAPP_LOG_LEVEL": "WARNING",
        "CHATAPP_CHANNEL_LAYER": layer,
        **(extra_env or {}),
    }
    return start_all(servers, env)


def channels_baseline(layer: str) -> ServerProcess:
    server = ServerProcess.daphne("bench.baseline_channels:application")
    env = {"CHATAPP_CHANNEL_LAYER": layer, "CHATAPP_LOG_LEVEL": "WARNING", "CHATAPP_TESTING": "1"}
    return start_all([server], env)[0]


def websockets_baseline() -> ServerProcess:
    server = ServerProcess([sys.executable, "-m", "bench.baseline_ws", "--fd", "{fd}"], name="ws-baseline")
    return start_all([server])[0]


def app_target(servers: list[ServerProcess], cookies: list[str], thread_id: int) -> Target:
    return Target(
        urls=[s.ws_url for s in servers],
        origins=[s.origin for s in servers],
        app=True,
        cookies=cookies,
        thread_id=thread_id,
    )


def relay_target(server: ServerProcess) -> Target:
    return Target(urls=[server.ws_url], origins=[server.origin], app=False)


def queries(server: ServerProcess) -> int:
    with urllib.request.urlopen(f"{server.origin}/bench/queries", timeout=5) as reply:
        return int(json.load(reply)["queries"])


def capacity(steps: list[dict[str, Any]]) -> int:
    passing = [s["rate"] for s in steps if s["ok"]]
    return max(passing, default=0)


def at_capacity(run_: dict[str, Any]) -> dict[str, Any] | None:
    return next((s for s in run_["steps"] if s["rate"] == run_["capacity"] and s["ok"]), None)


def better(run_: dict[str, Any]) -> tuple[int, float]:
    """Higher capacity first, then lower p99 at capacity."""
    at = at_capacity(run_)
    return run_["capacity"], -(at["p99_ms"] if at else float("inf"))


async def fanout(
    label: str, target: Target, servers: list[ServerProcess], rates: tuple[int, ...], seconds: float
) -> dict[str, Any]:
    print(f"  fan-out: {label}", flush=True)

    def cpu() -> float:
        return sum(s.cpu_seconds() for s in servers)

    steps = await rising_rates(target, rates, cpu=cpu, members=MEMBERS, seconds=seconds)
    return {"label": label, "capacity": capacity(steps), "steps": steps}


async def idle(label: str, target: Target, server: ServerProcess, count: int) -> dict[str, Any]:
    """Open ``count`` sockets in two storms of half each: memory per connection over all of them
    (one-time costs such as connection pools included) and marginal, over the second half only."""
    print(f"  idle: {label} ({count} connections)", flush=True)
    warm, _, _ = await connect_storm(target, 2)
    await asyncio.sleep(1)
    rss_before = server.rss_bytes()
    queries_before = queries(server) if target.app else 0
    first, seconds_1, failures_1 = await connect_storm(target, count // 2)
    await asyncio.sleep(2)
    rss_mid = server.rss_bytes()
    second, seconds_2, failures_2 = await connect_storm(target, count - count // 2, skip=count // 2)
    await asyncio.sleep(2)
    rss_after = server.rss_bytes()
    queries_after = queries(server) if target.app else 0
    clients, seconds, failures = [*first, *second], seconds_1 + seconds_2, failures_1 + failures_2
    result = {
        "label": label,
        "connections": len(clients),
        "failures": failures,
        "storm_seconds": round(seconds, 2),
        "connects_per_second": round(len(clients) / seconds, 1) if seconds else None,
        "kib_per_connection": round((rss_after - rss_before) / max(1, len(clients)) / 1024, 1),
        "marginal_kib_per_connection": round((rss_after - rss_mid) / max(1, len(second)) / 1024, 1),
        "rss_mib": round(rss_after / 2**20, 1),
        "queries_per_connect": round((queries_after - queries_before) / max(1, len(clients)), 2) if target.app else 0,
    }
    print(f"    {result}", flush=True)
    await asyncio.gather(*(ws.close() for ws in [*warm, *clients]), return_exceptions=True)
    return result


def with_servers(servers: list[ServerProcess], body: Any) -> Any:
    try:
        return asyncio.run(body)
    finally:
        for server in servers:
            server.close()
        flush_redis()


def app_fanout(
    label: str, count: int, layer: str, members: list[str], thread_id: int, cpus: float | None = None, **kw: Any
) -> dict[str, Any]:
    servers = app_servers(count, layer, cpus)
    return with_servers(servers, fanout(label, app_target(servers, members, thread_id), servers, **kw))  # type: ignore[no-any-return]


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median capacity (ties: the lower p99), with every round's capacity attached."""
    ordered = sorted(runs, key=better)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds"] = [r["capacity"] for r in runs]
    return chosen


def scale_out(
    layer: str, members: list[str], thread_id: int, rounds: int, cpus: float | None, kw: dict[str, Any]
) -> dict[str, Any]:
    """One app process against two (members and senders split between them), in alternating rounds."""
    suffix = f", {cpus} CPU each" if cpus else ""
    one, two = [], []
    for _ in range(max(1, rounds - 1)):
        one.append(app_fanout(f"app, 1 process{suffix}", 1, layer, members, thread_id, cpus, **kw))
        two.append(app_fanout(f"app, 2 processes{suffix}", 2, layer, members, thread_id, cpus, **kw))
    return {"cpus": cpus, "one": median_run(one), "two": median_run(two)}


def history_pages(layer: str, cookie: str, rounds: int) -> dict[str, Any]:
    """Scenario 4 (bench/history.py): the first history page against pages deep in a long thread."""
    from accounts.models import User

    reader = User.objects.get(username="bench0")  # ``cookie`` is theirs
    thread_id, last = history.seed_history_thread(creator_id=reader.pk, member_ids=[], count=history.HISTORY_MESSAGES)
    plans = {}
    for depth in history.HISTORY_DEPTHS:
        anchor = {"before": last + 1 - depth} if depth else {}
        scans = history.page_plans(thread_id=thread_id, user_id=reader.pk, **anchor)
        plans[depth] = sorted({node for statement in scans for node in statement})
    # Only the pages are measured here, not the API's per-user budget.
    unlimited = {"CHATAPP_API_RATE_PER_USER": "100000000/m", "CHATAPP_API_RATE_PER_IP": "100000000/m"}
    servers = app_servers(1, layer, extra_env=unlimited)
    try:
        rows = history.measure(
            port=servers[0].port,
            cookie=cookie,
            thread_id=thread_id,
            last_sequence=last,
            depths=history.HISTORY_DEPTHS,
            rounds=rounds,
        )
    finally:
        for server in servers:
            server.close()
        flush_redis()
    for row in rows:
        row["plan"] = plans[row["depth"]]
        print(f"    {row}", flush=True)
    return {"messages": history.HISTORY_MESSAGES, "rounds": rounds, "pages": rows}


SCENARIOS = ("fanout", "idle", "scale", "history")


def run(quick: bool, only: set[str] | None = None) -> dict[str, Any]:
    fds = raise_fd_limit()
    setup_django()
    wanted = only or set(SCENARIOS)
    idle_count = 200 if quick else IDLE
    rounds = 1 if quick else ROUNDS
    kw: dict[str, Any] = {"rates": RATES[:4] if quick else RATES, "seconds": 2.0 if quick else 4.0}
    print(f"bench: seeding ({IDLE + MEMBERS} users); fd limit {fds}", flush=True)
    thread_id, cookies = seed(IDLE + MEMBERS, MEMBERS)
    flush_redis()
    members, idle_cookies = cookies[:MEMBERS], cookies[MEMBERS:]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "fanout": [],
        "idle": [],
        "chosen_layer": PUBSUB,
    }
    started = time.monotonic()

    if "fanout" in wanted:
        print(f"1. fan-out, one thread of 100 members ({rounds} rounds of the app on each layer)", flush=True)
        layers: dict[str, list[dict[str, Any]]] = {CORE: [], PUBSUB: []}
        bare: dict[str, list[dict[str, Any]]] = {CORE: [], PUBSUB: []}
        # Alternate the app and the bare Channels consumer on both layers, round after round, so a
        # noisy minute on a shared machine hits all four; each is reported by its median round.
        for _ in range(rounds):
            for layer, name in ((CORE, "core"), (PUBSUB, "pubsub")):
                layers[layer].append(app_fanout(f"app ({name} layer)", 1, layer, members, thread_id, **kw))
                server = channels_baseline(layer)
                label = f"bare Channels consumer ({name} layer)"
                bare[layer].append(with_servers([server], fanout(label, relay_target(server), [server], **kw)))
        report["fanout"] += [median_run(layers[CORE]), median_run(layers[PUBSUB])]
        server = websockets_baseline()
        report["fanout"].append(
            with_servers([server], fanout("bare websockets relay", relay_target(server), [server], **kw))
        )
        report["fanout"] += [median_run(bare[CORE]), median_run(bare[PUBSUB])]
        report["chosen_layer"] = CORE if better(report["fanout"][0]) > better(report["fanout"][1]) else PUBSUB
    layer = report["chosen_layer"]

    if "idle" in wanted:
        print("2. idle connections", flush=True)
        servers = app_servers(1, layer)
        report["idle"].append(
            with_servers(servers, idle("app", app_target(servers, idle_cookies, thread_id), servers[0], idle_count))
        )
        server = websockets_baseline()
        report["idle"].append(
            with_servers([server], idle("bare websockets relay", relay_target(server), server, idle_count))
        )
        server = channels_baseline(layer)
        report["idle"].append(
            with_servers([server], idle("bare Channels consumer", relay_target(server), server, idle_count))
        )

    if "scale" in wanted:
        print("3. two app processes against one (alternating rounds)", flush=True)
        report["scale_out"] = scale_out(layer, members, thread_id, rounds, None, kw)
        print(f"3b. the same with each process held to {SCALE_BUDGET_CPUS} CPU", flush=True)
        try:
            report["scale_out_budgeted"] = scale_out(layer, members, thread_id, rounds, SCALE_BUDGET_CPUS, kw)
        except OSError as exc:  # no writable cgroup CPU controller here: say so in the report
            print(f"    not measurable here: {exc}", flush=True)
            report["scale_out_budgeted"] = {"error": str(exc)}

    if "history" in wanted:
        print(f"4. history pages in a {history.HISTORY_MESSAGES:,}-message thread", flush=True)
        rounds = history.HISTORY_ROUNDS // 6 if quick else history.HISTORY_ROUNDS
        report["history"] = history_pages(layer, cookies[0], rounds)
    report["minutes"] = round((time.monotonic() - started) / 60, 1)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Machine: {report['machine']['cpus']} CPUs, Python {report['machine']['python']}; run took "
        f"{report['minutes']} min. Channel layer: `{report['chosen_layer']}`.",
        "",
    ]
    scales = [r for r in (report.get("scale_out"), report.get("scale_out_budgeted")) if r and "one" in r]
    runs = [*report["fanout"], *(run_ for scale in scales for run_ in (scale["one"], scale["two"]))]
    if runs:
        lines += [
            "| fan-out (100 members) | capacity (msg/s) | rounds | deliveries/s | p50 / p99 at capacity (ms) "
            "| server CPU per delivery (µs) |",
            "|---|---|---|---|---|---|",
        ]
    for run_ in runs:
        at = at_capacity(run_)
        cells = (f"{at['p50_ms']} / {at['p99_ms']}", at["server_cpu_us_per_delivery"]) if at else ("—", "—")
        rounds = ", ".join(str(c) for c in run_.get("rounds", [run_["capacity"]]))
        capacity = run_["capacity"]
        lines.append(f"| {run_['label']} | {capacity} | {rounds} | {capacity * MEMBERS} | {cells[0]} | {cells[1]} |")
    if report["idle"]:
        lines += [
            "",
            "| idle connections | connected | failures | storm (s) | KiB per connection (all / marginal) "
            "| queries per connect |",
            "|---|---|---|---|---|---|",
        ]
    for row in report["idle"]:
        lines.append(
            f"| {row['label']} | {row['connections']} | {row['failures']} | {row['storm_seconds']} | "
            f"{row['kib_per_connection']} / {row['marginal_kib_per_connection']} | {row['queries_per_connect']} |"
        )
    lines.append("")
    if report["fanout"]:
        app = max(better(r) for r in report["fanout"][:2])[0]
        for row in report["fanout"][2:]:
            if row["capacity"]:
                lines.append(f"- app (its better layer) / {row['label']}: {app / row['capacity']:.2f}")
        for app_row, bare_row in zip(report["fanout"][:2], report["fanout"][3:5], strict=False):
            if bare_row["capacity"]:
                ratio = app_row["capacity"] / bare_row["capacity"]
                lines.append(f"- same layer: {app_row['label']} / {bare_row['label']}: {ratio:.2f}")
    for scale in scales:
        if scale["one"]["capacity"]:
            budget = f" ({scale['cpus']} CPU each)" if scale["cpus"] else " (no CPU budget)"
            lines.append(f"- two processes / one{budget}: {scale['two']['capacity'] / scale['one']['capacity']:.2f}")
    if "error" in report.get("scale_out_budgeted", {}):
        lines.append(f"- two processes / one, CPU-budgeted: not measured ({report['scale_out_budgeted']['error']})")
    if "history" in report:
        lines += [
            "",
            f"| history page ({report['history']['messages']:,}-message thread, {report['history']['rounds']} rounds) "
            "| median (ms) | p90 (ms) | / first page | queries | message-table scans |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["history"]["pages"]:
            label = "first page" if row["depth"] == 0 else f"{row['depth']:,} back"
            lines.append(
                f"| {label} | {row['median_ms']} | {row['p90_ms']} | {row['ratio']} | {row['queries']} "
                f"| {', '.join(row['plan'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short sanity run (fewer steps, 200 idle sockets)")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only this scenario (repeatable)")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        print("bench needs PostgreSQL and Redis: run `make bench` (scripts/testenv.py run -- python -m bench.run)")
        return 2
    report = run(args.quick, set(args.only) if args.only else None)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (RESULTS / f"{stamp}.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
