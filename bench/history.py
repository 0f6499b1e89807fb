"""Scenario 4 of ``make bench``: history pages deep in a long thread cost what the first costs.

A thread of 100,000 messages (inserted in one statement, then ``ANALYZE``d as autovacuum would),
read through the REST API of one app process with a member's session: the newest page, and pages
50,000 and 90,000 messages back (``?before=``). Each page is fetched once to warm the message cache,
then in interleaved rounds (so a busy moment of the machine hits all of them); reported by the median
time per page, its ratio to the first page's, the queries per page, and the plan PostgreSQL chose
for each statement of the page on the message table (an index, or a sequential scan).

Also used by ``tests/test_history_depth.py`` (the plan check, on a smaller thread).
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

HISTORY_MESSAGES = 100_000
HISTORY_DEPTHS = (0, 50_000, 90_000)  # messages back from the newest; 0 is the first page
HISTORY_ROUNDS = 300


def seed_history_thread(*, creator_id: int, member_ids: list[int], count: int) -> tuple[int, int]:
    """A new thread of ``count`` messages (sequences 1..count after its creation event) and its last
    sequence. One ``INSERT ... SELECT generate_series`` (PostgreSQL), then ``ANALYZE``: the planner
    sees the thread as it is, as it would once autovacuum has run."""
    from django.db import connection, transaction

    from accounts.models import User
    from messaging.models import Message
    from threads.models import Thread
    from threads.services import thread_create

    creator = User.objects.get(pk=creator_id)
    thread, _ = thread_create(creator=creator, title="history", participant_ids=member_ids)
    start = thread.last_sequence
    meta, quote = Message._meta, connection.ops.quote_name
    column = {f.name: quote(str(f.column)) for f in meta.concrete_fields}
    names = ("thread", "sender", "body", "body_html", "client_msg_id", "sequence", "version", "created_at")
    # Identifiers from the model's metadata, values as parameters.
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(column[n] for n in names)}) "  # noqa: S608
        "SELECT %s, %s, 'message ' || g, '<p>message ' || g || '</p>', 'history-' || %s || '-' || g, "
        "%s + g, 1, now() - (%s - g) * interval '1 second' FROM generate_series(1, %s) AS g"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, [thread.pk, creator_id, thread.pk, start, count, count])
        Thread.objects.filter(pk=thread.pk).update(last_sequence=start + count)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {quote(meta.db_table)}")
    return thread.pk, start + count


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def message_table_scans(sql: str, params: Any) -> list[str]:
    """How PostgreSQL plans to read the message table in ``sql``: the plan's node types on it
    (e.g. ``Index Scan``, ``Index Only Scan``, ``Seq Scan``), from ``EXPLAIN (FORMAT JSON)``."""
    from django.db import connection

    from messaging.models import Message

    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        (document,) = cursor.fetchone()
    plan = (json.loads(document) if isinstance(document, str) else document)[0]["Plan"]
    table = Message._meta.db_table
    return [node["Node Type"] for node in _plan_nodes(plan) if node.get("Relation Name") == table]


def page_plans(*, thread_id: int, user_id: int, **anchor: int) -> list[list[str]]:
    """The message-table scans of every statement one history page runs, in this process. Run it on
    a page not read before: a cached page's payloads are not read from the table. ``anchor``:
    ``before``, ``after`` or ``around``, as the API takes them."""
    from django.db import connection

    from accounts.models import User
    from messaging.selectors import message_history
    from threads.selectors import thread_get_for_member

    user = User.objects.get(pk=user_id)
    access = thread_get_for_member(thread_id=thread_id, user=user)
    statements: list[tuple[str, Any]] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        statements.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        message_history(access=access, user=user, **anchor)
    return [message_table_scans(sql, params) for sql, params in statements if sql.lstrip().upper().startswith("SELECT")]


def _get(conn: http.client.HTTPConnection, path: str, cookie: str) -> float:
    started = time.perf_counter()
    conn.request("GET", path, headers={"Cookie": f"sessionid={cookie}", "Host": "127.0.0.1"})
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
    return elapsed


def _queries(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/bench/queries", headers={"Host": "127.0.0.1"})
    return int(json.loads(conn.getresponse().read())["queries"])


def measure(
    *, port: int, cookie: str, thread_id: int, last_sequence: int, depths: tuple[int, ...], rounds: int
) -> list[dict[str, Any]]:
    """Median, p90 and queries of each page over ``rounds`` interleaved rounds, one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    base = f"/api/v1/threads/{thread_id}/messages"
    paths = {d: base if d == 0 else f"{base}?before={last_sequence + 1 - d}" for d in depths}
    queries: dict[int, int] = {}
    for depth, path in paths.items():  # warm: the message and user caches hold every page's payloads
        _get(conn, path, cookie)
        before = _queries(conn)
        _get(conn, path, cookie)
        queries[depth] = _queries(conn) - before
    times: dict[int, list[float]] = {d: [] for d in depths}
    order = list(depths)
    for n in range(rounds):
        for depth in order[n % len(order) :] + order[: n % len(order)]:
            times[depth].append(_get(conn, paths[depth], cookie))
    conn.close()
    first = statistics.median(times[depths[0]])
    rows = []
    for depth in depths:
        median = statistics.median(times[depth])
        rows.append(
            {
                "depth": depth,
                "median_ms": round(median * 1000, 2),
                "p90_ms": round(statistics.quantiles(times[depth], n=10)[-1] * 1000, 2),
                "ratio": round(median / first, 2),
                "queries": queries[depth],
            }
        )
    return rows
