"""Prometheus metrics (prometheus-client). Exposed by the metrics endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

open_sockets = Gauge("chatapp_open_sockets", "Websocket connections open in this process")
messages_sent = Counter("chatapp_messages_sent_total", "Messages stored", ["via"])
fanout_latency = Histogram(
    "chatapp_fanout_latency_seconds",
    "Time from commit to the event being written to a socket",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ratelimit_refusals = Counter("chatapp_ratelimit_refusals_total", "Requests refused by a rate limit", ["scope"])
ratelimit_errors = Counter("chatapp_ratelimit_errors_total", "Rate-limit checks that failed open (cache errors)")
channel_layer_errors = Counter("chatapp_channel_layer_errors_total", "Channel-layer sends that failed")
