"""/healthz and /readyz: shape, status codes, bounded checks, and readiness following a stopped
and restarted Redis (PostgreSQL has its own module: stopping it affects the whole session)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from django.test import Client

from tests.conftest import needs

pytestmark = pytest.mark.django_db


def load_testenv() -> ModuleType:
    """scripts/testenv.py, for its stop/start helpers (it is a script, not a package)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "testenv.py"
    spec = importlib.util.spec_from_file_location("chatapp_testenv", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readyz(client: Client) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = client.get("/readyz")
    return response.status_code, response.json(), time.monotonic() - started


def wait_ready(client: Client, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, body, _ = readyz(client)
        if status == 200 or time.monotonic() > deadline:
            assert status == 200, body
            return body
        time.sleep(0.2)


@pytest.mark.smoke
def test_healthz_answers_without_touching_services(client: Client, django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.smoke
def test_readyz_reports_every_check_with_latency(client: Client, settings: Any) -> None:
    response = client.get("/readyz")
    status, body = response.status_code, response.json()
    assert status == 200, body
    assert "no-cache" in response["Cache-Control"]
    assert body["ready"] is True
    assert set(body["checks"]) == {"database", "redis", "storage"}
    for check in body["checks"].values():
        assert check["ok"] is True
        assert isinstance(check["ms"], float)
    assert body["checks"]["database"]["backend"] == settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1].replace(
        "sqlite3", "sqlite"
    )


@pytest.mark.smoke
def test_readyz_without_redis_says_not_configured_and_stays_ready(client: Client, settings: Any) -> None:
    settings.REDIS_URL = ""
    status, body, _ = readyz(client)
    assert status == 200
    assert body["checks"]["redis"] == {"ok": True, "state": "not configured", "ms": body["checks"]["redis"]["ms"]}


@pytest.mark.smoke
def test_probes_skip_host_validation_and_the_https_redirect(client: Client, settings: Any) -> None:
    """A balancer probes http://<instance address>/readyz: no 400 for the host, no 301 to https."""
    settings.ALLOWED_HOSTS = ["chat.example.com"]
    settings.SECURE_SSL_REDIRECT = True
    for path in ("/healthz", "/readyz"):
        response = client.get(path, HTTP_HOST="10.1.2.3:8000")
        assert response.status_code == 200, (path, response.status_code)
    assert client.get("/accounts/login/", HTTP_HOST="10.1.2.3:8000").status_code == 400


def test_readyz_checks_the_real_services(client: Client) -> None:
    needs("postgres")
    needs("redis")
    needs("s3")
    status, body, _ = readyz(client)
    assert status == 200, body
    checks = body["checks"]
    assert checks["database"]["backend"] == "postgresql"
    assert checks["database"]["pool"]["pool_max"] >= 1
    assert checks["storage"]["backend"] == "s3"
    assert "state" not in checks["redis"]


def bounded(settings: Any) -> float:
    """A probe's time limit: its checks' timeout with room for a loaded machine (it must not hang; how
    fast it is belongs to no test)."""
    return float(settings.HEALTH_CHECK_TIMEOUT_SECONDS * 2 + 3)


def test_readyz_fails_fast_for_an_unreachable_redis(client: Client, settings: Any) -> None:
    """A black-holed address (TEST-NET-1 never answers) must not hang the probe."""
    settings.REDIS_URL = "redis://192.0.2.1:6379/0"
    status, body, elapsed = readyz(client)
    assert status == 503
    assert body["ready"] is False
    assert body["checks"]["redis"]["ok"] is False
    assert elapsed < bounded(settings)


def test_readyz_follows_redis_stopped_and_started(client: Client, settings: Any) -> None:
    needs("redis")
    testenv = load_testenv()
    wait_ready(client)
    testenv.stop_service("redis")
    try:
        status, body, elapsed = readyz(client)
        assert status == 503, body
        assert body["ready"] is False
        assert body["checks"]["redis"]["ok"] is False
        assert body["checks"]["redis"]["error"]
        assert body["checks"]["database"]["ok"] is True
        assert body["checks"]["storage"]["ok"] is True
        assert elapsed < bounded(settings)
    finally:
        testenv.start_service("redis")
    body = wait_ready(client, timeout=10)
    assert body["checks"]["redis"]["ok"] is True
