"""A history page deep in a long thread costs what the first costs: every statement a page runs reads
the message table through the (thread, sequence) index, at any depth, and a page runs the same
statements at any depth. Asserted on PostgreSQL's plans (EXPLAIN, deterministic for given data and
statistics), not on timings; the timings are scenario 4 of ``make bench`` (docs/benchmarks.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from accounts.models import User
from bench.history import page_plans, seed_history_thread
from tests.conftest import needs

pytestmark = pytest.mark.django_db

# Long enough that the planner, with the table analysed, reckons most of the thread matches a probe
# from a page's edge (what made it choose a sequential scan); ANALYZE reads all of it (< 30,000 rows).
MESSAGES = 20_000


@pytest.fixture
def long_thread(alice: User, bob: User) -> tuple[int, int]:
    needs("postgres")
    return seed_history_thread(creator_id=alice.pk, member_ids=[bob.pk], count=MESSAGES)


@pytest.mark.parametrize("anchor", ["before", "after", "around"])
def test_a_history_page_reads_the_message_table_by_index_at_any_depth(
    long_thread: tuple[int, int], bob: User, anchor: str
) -> None:
    thread_id, last = long_thread
    for back in (60, MESSAGES // 2, MESSAGES * 9 // 10):
        plans = page_plans(thread_id=thread_id, user_id=bob.pk, **{anchor: last + 1 - back})
        scans = [node for plan in plans for node in plan]
        assert scans, plans
        assert "Seq Scan" not in scans, (anchor, back, plans)


def test_a_history_page_runs_the_same_queries_at_any_depth(
    long_thread: tuple[int, int], bob: User, api: Callable[[User | None], APIClient]
) -> None:
    thread_id, last = long_thread
    client = api(bob)
    url = f"/api/v1/threads/{thread_id}/messages"
    assert client.get(f"{url}?after=0").status_code == 200  # the people's cache warm; these pages are not

    def count(query: str) -> int:
        with CaptureQueriesContext(connection) as ctx:
            page: Any = client.get(f"{url}{query}").json()
        assert len(page["messages"]) == 50
        return len(ctx.captured_queries)

    first = count("")
    deep = [count(f"?before={last + 1 - back}") for back in (100, MESSAGES // 2, MESSAGES * 9 // 10)]
    assert deep == [deep[0]] * 3
    assert deep[0] == first + 1  # the one probe for newer messages (the first page has none newer)
