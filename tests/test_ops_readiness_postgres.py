"""Readiness follows a stopped and restarted PostgreSQL.

In its own module because stopping the test database breaks every connection of the session:
the test closes Django's connections and pools before and after, and the server is always
started again (``finally``) before the test ends.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.db import connections
from django.test import Client

from tests.conftest import needs
from tests.test_ops_health import bounded, load_testenv, readyz


def _reset_connections() -> None:
    connections.close_all()
    for alias in connections:
        close_pool = getattr(connections[alias], "close_pool", None)
        if close_pool is not None:
            close_pool()


@pytest.mark.django_db(transaction=True)
def test_readyz_follows_postgres_stopped_and_started(client: Client, settings: Any) -> None:
    needs("postgres")
    testenv = load_testenv()
    status, body, _ = readyz(client)
    assert status == 200, body
    connections.close_all()
    testenv.stop_service("postgres")
    try:
        for _ in range(2):  # the first probe may draw a pooled connection that the stop broke
            status, body, elapsed = readyz(client)
            assert status == 503, body
            assert body["checks"]["database"]["ok"] is False
            assert body["checks"]["storage"]["ok"] is True
            assert elapsed < bounded(settings)
    finally:
        testenv.start_service("postgres")
    try:
        # The pool notices the server is back by itself: no reset before readiness turns green.
        deadline = time.monotonic() + 30
        while True:
            status, body, _ = readyz(client)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200, body
        assert body["checks"]["database"]["ok"] is True
    finally:
        _reset_connections()
