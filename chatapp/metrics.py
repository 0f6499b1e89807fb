"""Prometheus metrics (prometheus-client). Exposed by the metrics endpoint (chatapp/metrics_view.py).

Who updates what:

- ``open_sockets``: the socket consumer (inc on accept, dec on disconnect);
- ``messages_sent``: ``via="api"`` in the REST send view, ``via="ws"`` in the consumer;
- ``fanout_latency``: the hub (messaging/hub.py), once it has written an event to its sockets;
- ``socket_writes_buffered``: messaging/wire.py, when a socket's send buffer is full;
- ``sockets_closed_behind``: the socket consumer, when it closes a client that fell too far behind;
- ``replay_pages`` / ``replays_stopped``: the socket consumer's backlog replay (messaging/backlog.py);
- ``ratelimit_refusals`` / ``ratelimit_errors``: chatapp/ratelimit.py and messaging/ratelimits.py;
- ``channel_layer_errors``: chatapp/broadcast.py;
- ``slow_queries``: chatapp/db.py;
- the ``chatapp_db_pool_*`` family is read from psycopg_pool at scrape time (``DatabasePoolCollector``).

With several daphne processes on one host, set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory,
the same for all of them, wiped before they start) and any of them answers for all; see
docs/operations.md.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

open_sockets = Gauge(
    "chatapp_open_sockets",
    "Websocket connections open (in this process; summed over live processes in multiprocess mode)",
    multiprocess_mode="livesum",
)
messages_sent = Counter("chatapp_messages_sent_total", "Messages stored", ["via"])
fanout_latency = Histogram(
    "chatapp_fanout_latency_seconds",
    "Time from commit to the event being written to a socket",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ratelimit_refusals = Counter("chatapp_ratelimit_refusals_total", "Requests refused by a rate limit", ["scope"])
ratelimit_errors = Counter("chatapp_ratelimit_errors_total", "Rate-limit checks that failed open (cache errors)")
channel_layer_errors = Counter("chatapp_channel_layer_errors_total", "Channel-layer sends that failed")
revocation_check_errors = Counter(
    "chatapp_revocation_check_errors_total",
    "Revoked-session checks that could not read the cache and allowed the token (fail-open)",
)
socket_writes_buffered = Counter(
    "chatapp_socket_writes_buffered_total",
    "Event frames the kernel did not take whole (a slow or stalled client): the rest waits in the server",
)
sockets_closed_behind = Counter(
    "chatapp_sockets_closed_behind_total",
    "Sockets closed with 1013 because their client fell too far behind (it resumes from the log)",
)
slow_queries = Counter("chatapp_slow_queries_total", "Database queries slower than CHATAPP_SLOW_QUERY_SECONDS")
replay_pages = Counter("chatapp_replay_pages_total", "Pages of the event log read to replay a backlog to a socket")
replays_stopped = Counter(
    "chatapp_replays_stopped_total", "Backlog replays stopped before the end because their socket closed"
)

# Series that exist from the first scrape, so rate() and alerts see zeros instead of gaps.
for _via in ("api", "ws"):
    messages_sent.labels(via=_via)
for _scope in ("send", "api_ip", "api_user"):
    ratelimit_refusals.labels(scope=_scope)


class DatabasePoolCollector(Collector):
    """psycopg_pool statistics of this process's Django connection pools, read at scrape time."""

    GAUGES = {
        "pool_size": ("chatapp_db_pool_size", "Connections managed by the pool (in use or idle)"),
        "pool_available": ("chatapp_db_pool_available", "Idle connections in the pool"),
        "pool_max": ("chatapp_db_pool_max", "Maximum size of the pool"),
        "requests_waiting": ("chatapp_db_pool_requests_waiting", "Requests waiting for a connection now"),
    }
    COUNTERS = {
        "requests_num": ("chatapp_db_pool_requests", "Connections requested from the pool"),
        "requests_queued": ("chatapp_db_pool_requests_queued", "Requests that had to wait for a connection"),
        "requests_errors": ("chatapp_db_pool_requests_errors", "Requests that failed (timeout, closed pool)"),
        "connections_errors": ("chatapp_db_pool_connection_errors", "Failed attempts to open a connection"),
        "connections_lost": ("chatapp_db_pool_connections_lost", "Connections found broken and discarded"),
    }
    MS_COUNTERS = {
        "requests_wait_ms": ("chatapp_db_pool_wait_seconds", "Time spent waiting for a connection"),
        "usage_ms": ("chatapp_db_pool_usage_seconds", "Time connections were lent out"),
    }

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.extra_labels = labels or {}

    def _pools(self) -> Iterator[tuple[str, dict[str, int]]]:
        from django.db import connections

        for alias in connections:
            wrapper = connections[alias]
            pool = getattr(wrapper, "pool", None) if wrapper.vendor == "postgresql" else None
            if pool is not None:
                yield alias, pool.get_stats()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        label_names = ["alias", *self.extra_labels]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for key, (name, doc) in self.GAUGES.items():
            families[key] = GaugeMetricFamily(name, doc, labels=label_names)
        for key, (name, doc) in (self.COUNTERS | self.MS_COUNTERS).items():
            families[key] = CounterMetricFamily(name, doc, labels=label_names)
        for alias, stats in self._pools():
            values = [alias, *self.extra_labels.values()]
            for key, family in families.items():
                value = float(stats.get(key, 0))
                family.add_metric(values, value / 1000 if key in self.MS_COUNTERS else value)
        yield from families.values()

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(())


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def exposition_registry() -> CollectorRegistry:
    """The registry to serve: this process's, or every process's through the shared directory."""
    if not multiprocess_enabled():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    # Pool statistics cannot be shared through the directory: they describe the answering process.
    registry.register(DatabasePoolCollector(labels={"pid": str(os.getpid())}))
    return registry


def multiprocess_setup() -> None:
    """On exit, drop this process's live gauges (open sockets) from the shared directory."""
    if multiprocess_enabled():
        atexit.register(mark_process_dead, os.getpid())


if not multiprocess_enabled():
    REGISTRY.register(DatabasePoolCollector())
