"""Slow-query logging for every database connection, sync or async.

``slow_query_install`` runs on Django's ``connection_created`` signal (connected in
chatapp/apps.py), so it reaches every connection wrapper: request threads, the threads that
``sync_to_async``/``database_sync_to_async`` use for daphne's async paths, management commands
and the scheduler. Queries slower than ``settings.SLOW_QUERY_SECONDS`` are logged on
``chatapp.slow_query`` (SQL text without parameters, which may hold user data) and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("chatapp.slow_query")

MAX_SQL_CHARS = 2000


def slow_query_wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    """An execute wrapper (see Django's "Database instrumentation") that times each query."""
    started = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        elapsed = time.perf_counter() - started
        if elapsed >= settings.SLOW_QUERY_SECONDS:
            from chatapp import metrics

            metrics.slow_queries.inc()
            text = str(sql)
            logger.warning(
                "slow query: %.0f ms",
                elapsed * 1000,
                extra={
                    "duration_ms": round(elapsed * 1000, 1),
                    "sql": text if len(text) <= MAX_SQL_CHARS else text[:MAX_SQL_CHARS] + "...",
                    "many": many,
                    "db_alias": context["connection"].alias,
                },
            )


def slow_query_install(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """``connection_created`` receiver: put the wrapper first (outermost) on the connection, once.

    First, not last: ``connection.execute_wrapper()`` removes the last wrapper when its block
    ends, so a wrapper installed while such a block is open must not be the last one.
    """
    if slow_query_wrapper not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, slow_query_wrapper)
