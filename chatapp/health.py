"""Readiness: can this process serve? ``GET /readyz`` checks PostgreSQL, Redis and storage.

Each check runs in a small thread pool and is bounded twice: by its own client timeouts
(connect and read) and by ``settings.HEALTH_CHECK_TIMEOUT_SECONDS`` overall, so a dead or
black-holed service turns the probe red quickly instead of hanging it. The body is::

    {"ready": true, "checks": {"database": {"ok": true, "ms": 1.2, "backend": "postgresql"}, ...}}

with status 200 when every configured service answers, 503 otherwise. An unconfigured Redis
(the embedded default) reports ``"state": "not configured"`` and does not fail readiness.
Failures are logged on ``chatapp.health`` when a check changes state, not on every probe.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

logger = logging.getLogger("chatapp.health")

NOT_CONFIGURED = "not configured"
CheckResult = dict[str, Any]

_executor = ThreadPoolExecutor(max_workers=6, thread_name_prefix="readyz")
_last_ok: dict[str, bool] = {}
_s3_client: Any = None
_lock = threading.Lock()


def _timeout() -> float:
    return float(settings.HEALTH_CHECK_TIMEOUT_SECONDS)


# --- the checks: each returns extra fields for its result or raises -------------------------


def check_database() -> CheckResult:
    """``SELECT 1`` through Django's connection pool (PostgreSQL) or connection (SQLite).

    Using the pool, not a side connection, is deliberate: after a database restart a probe
    that draws a broken pooled connection fails, and the pool discards that connection.
    """
    wrapper = connections[DEFAULT_DB_ALIAS]
    if wrapper.vendor != "postgresql":
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return {"backend": wrapper.vendor}
    pool = getattr(wrapper, "pool", None)
    if pool is None:
        import psycopg

        params = wrapper.get_connection_params()
        with psycopg.connect(**params, connect_timeout=max(1, round(_timeout()))) as conn:
            conn.execute("SELECT 1")
        return {"backend": "postgresql"}
    pool.open(wait=False)
    conn = pool.getconn(timeout=_timeout())
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        if not conn.autocommit:
            conn.rollback()
    finally:
        pool.putconn(conn)
    stats = pool.get_stats()
    return {
        "backend": "postgresql",
        "pool": {key: stats.get(key, 0) for key in ("pool_size", "pool_available", "pool_max", "requests_waiting")},
    }


def check_redis() -> CheckResult:
    """PING on a fresh connection with short timeouts and no retries."""
    if not settings.REDIS_URL:
        return {"state": NOT_CONFIGURED}
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=_timeout(),
        socket_timeout=_timeout(),
        retry=Retry(NoBackoff(), 0),
    )
    try:
        if not client.ping():
            raise ConnectionError("PING was not answered with PONG")
    finally:
        client.close()
    return {}


def _s3() -> Any:
    global _s3_client
    with _lock:
        if _s3_client is None:
            import boto3
            from botocore.config import Config

            options = settings.STORAGES["default"].get("OPTIONS", {})
            _s3_client = boto3.session.Session().client(
                "s3",
                endpoint_url=options.get("endpoint_url") or settings.AWS_S3_ENDPOINT_URL,
                region_name=options.get("region_name") or settings.AWS_S3_REGION_NAME,
                aws_access_key_id=options.get("access_key") or settings.AWS_ACCESS_KEY_ID,
                aws_secret_access_key=options.get("secret_key") or settings.AWS_SECRET_ACCESS_KEY,
                config=Config(
                    connect_timeout=_timeout(),
                    read_timeout=_timeout(),
                    retries={"total_max_attempts": 1},
                    signature_version="s3v4",
                    s3={"addressing_style": options.get("addressing_style", "auto")},
                ),
            )
        return _s3_client


def check_storage() -> CheckResult:
    """S3: HeadBucket on the attachments bucket. Local files: the media folder is writable."""
    backend = settings.STORAGES["default"]["BACKEND"]
    if backend.endswith("S3Storage"):
        bucket = settings.STORAGES["default"].get("OPTIONS", {}).get("bucket_name") or settings.AWS_STORAGE_BUCKET_NAME
        _s3().head_bucket(Bucket=bucket)
        return {"backend": "s3"}
    location = getattr(default_storage, "location", None)
    if location is None:
        default_storage.exists("readyz-probe")
        return {"backend": backend.rsplit(".", 1)[-1]}
    os.makedirs(location, exist_ok=True)
    if not os.access(location, os.W_OK):
        raise PermissionError(f"media folder {location} is not writable")
    return {"backend": "filesystem"}


CHECKS: dict[str, Callable[[], CheckResult]] = {
    "database": check_database,
    "redis": check_redis,
    "storage": check_storage,
}


# --- running them ---------------------------------------------------------------------------


def _timed(check: Callable[[], CheckResult]) -> tuple[CheckResult, str]:
    """The public result (the error is only the exception type: /readyz answers anyone) and the
    full error text for the log."""
    started = time.perf_counter()
    detail = ""
    try:
        result: CheckResult = {"ok": True, **check()}
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"[:500]
        result = {"ok": False, "error": type(exc).__name__}
    result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result, detail


def readiness() -> tuple[bool, dict[str, CheckResult]]:
    """Run every check concurrently; each result is ``{"ok", "ms", ...}``."""
    budget = _timeout() + 0.5
    deadline = time.monotonic() + budget
    futures = {name: _executor.submit(_timed, check) for name, check in CHECKS.items()}
    results: dict[str, CheckResult] = {}
    for name, future in futures.items():
        try:
            results[name], detail = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            results[name], detail = {"ok": False, "error": "timeout", "ms": round(budget * 1000, 1)}, "timed out"
        _log_transition(name, results[name], detail)
    return all(result["ok"] for result in results.values()), results


def _log_transition(name: str, result: CheckResult, detail: str) -> None:
    with _lock:
        changed = _last_ok.get(name, True) != result["ok"]
        _last_ok[name] = result["ok"]
    if not changed:
        return
    fields = {"check": name, "ok": result["ok"], "duration_ms": result["ms"]}
    if result["ok"]:
        logger.info("readiness check %s recovered", name, extra=fields)
    else:
        logger.warning("readiness check %s failed: %s", name, detail, extra=fields)


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """200 ``{"ready": true, ...}`` when PostgreSQL, Redis and storage answer; 503 otherwise."""
    ready, checks = readiness()
    return JsonResponse({"ready": ready, "checks": checks}, status=200 if ready else 503)
