"""Structured logs: JSON lines with the request/connection id, the request-id middleware under
ASGI, and slow-query logging on every connection (sync, thread and async paths)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator
from django.db import connection

from accounts.models import User
from chatapp.logging import (
    ContextFilter,
    JsonFormatter,
    PlainFormatter,
    connection_id_bind,
    connection_id_var,
    request_id_var,
)
from tests.conftest import needs

LogLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_log() -> Iterator[LogLines]:
    """Everything logged (at DEBUG and up) while the test runs, as parsed JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    watched = [logging.getLogger(name) for name in ("chatapp.access", "chatapp.slow_query", "django.request")]
    levels = [(logger, logger.level) for logger in [root, *watched]]
    root.addHandler(handler)
    for logger in [root, *watched]:
        logger.setLevel(logging.DEBUG)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]

    yield lines
    root.removeHandler(handler)
    for logger, level in levels:
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def _fresh_context() -> Iterator[None]:
    tokens = (request_id_var.set(None), connection_id_var.set(None))
    yield
    request_id_var.reset(tokens[0])
    connection_id_var.reset(tokens[1])


@pytest.fixture
async def close_thread_connections() -> Any:
    """Async ORM calls and sync_to_async helpers use a worker thread's connection; return it to
    the pool when the test ends (nothing else does outside a request)."""
    yield
    from django.db import connections

    await sync_to_async(connections.close_all)()


def _record(message: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.getLogger("chatapp.test").makeRecord(
        "chatapp.test", logging.WARNING, __file__, 1, message, args or ("world",), None, extra=extra
    )
    ContextFilter().filter(record)
    return record


@pytest.mark.smoke
def test_json_formatter_writes_one_object_per_line_with_ids_and_extras() -> None:
    request_id_var.set("req-1")
    connection_id_bind("conn-1")
    line = JsonFormatter().format(_record(thread_id=7, tags=("a", "b"), when=None))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "chatapp.test"
    assert entry["message"] == "hello world"
    assert entry["request_id"] == "req-1"
    assert entry["connection_id"] == "conn-1"
    assert entry["thread_id"] == 7
    assert entry["tags"] == ["a", "b"]
    assert entry["when"] is None
    assert entry["ts"].endswith("+00:00")


@pytest.mark.smoke
def test_json_formatter_includes_the_traceback_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info()
        )
    ContextFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["exc_type"] == "ValueError"
    assert "boom\nsecond line" in entry["exc"]
    assert "request_id" not in entry  # unknown ids are left out, not null


@pytest.mark.smoke
def test_plain_formatter_shows_the_ids() -> None:
    request_id_var.set("req-2")
    assert " [req-2] hello world" in PlainFormatter().format(_record())


@pytest.mark.smoke
def test_connection_id_bind_keeps_sane_ids_and_replaces_others() -> None:
    assert connection_id_bind("ws-abc_1.2") == "ws-abc_1.2"
    generated = connection_id_bind("bad id\nforged: line")
    assert len(generated) == 32
    assert connection_id_var.get() == generated


@pytest.mark.smoke
def test_logging_settings_choose_json_unless_debug(settings: Any) -> None:
    assert settings.LOGGING["handlers"]["console"]["formatter"] == settings.LOG_FORMAT
    assert ("plain" if settings.DEBUG else "json") == settings.LOG_FORMAT


@pytest.mark.smoke
def test_request_id_middleware_echoes_a_sane_id_and_replaces_a_bad_one(client: Any, json_log: LogLines) -> None:
    response = client.get("/healthz", HTTP_X_REQUEST_ID="lb-1234.abcd")
    assert response["X-Request-ID"] == "lb-1234.abcd"
    response = client.get("/healthz", HTTP_X_REQUEST_ID='"><script>' + "x" * 10)
    generated = response["X-Request-ID"]
    assert len(generated) == 32
    assert all(c in "0123456789abcdef" for c in generated)
    response = client.get("/healthz")
    assert response["X-Request-ID"] not in (generated, "lb-1234.abcd")
    access = [line for line in json_log() if line["logger"] == "chatapp.access"]
    assert [line["request_id"] for line in access] == ["lb-1234.abcd", generated, response["X-Request-ID"]]
    assert access[0]["path"] == "/healthz"
    assert access[0]["status"] == 200


async def _asgi_get(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    # What chatapp.asgi routes "http" to (get_asgi_application() without re-running django.setup(),
    # which would reconfigure logging under the test's handler).
    from django.core.handlers.asgi import ASGIHandler

    communicator = HttpCommunicator(ASGIHandler(), "GET", path, headers=[(b"host", b"localhost"), *headers])
    response = await communicator.get_response(timeout=10)
    await communicator.wait(timeout=10)  # let Django finish the request (request_finished closes connections)
    return response


@pytest.mark.smoke
async def test_request_id_on_every_line_of_an_asgi_request(json_log: LogLines) -> None:
    """Through daphne's path (the ASGI application): the access line and Django's own 404
    warning, which is logged after the middleware chain, carry the client's request id."""
    response = await _asgi_get("/no-such-page", [(b"x-request-id", b"asgi-req-42")])
    assert response["status"] == 404
    assert (b"X-Request-ID", b"asgi-req-42") in response["headers"]
    lines = [line for line in json_log() if line["logger"] in ("chatapp.access", "django.request")]
    assert {line["logger"] for line in lines} == {"chatapp.access", "django.request"}
    assert all(line.get("request_id") == "asgi-req-42" for line in lines)
    assert request_id_var.get() is None  # the request's context did not leak into the caller


@pytest.mark.smoke
@pytest.mark.django_db
def test_slow_query_is_logged_with_sql_and_duration(settings: Any, json_log: LogLines) -> None:
    from chatapp import metrics

    before = metrics.slow_queries._value.get()
    settings.SLOW_QUERY_SECONDS = 0
    User.objects.filter(username="nobody").count()
    slow = [line for line in json_log() if line["logger"] == "chatapp.slow_query"]
    assert slow
    assert "accounts_user" in slow[-1]["sql"]
    assert slow[-1]["duration_ms"] >= 0
    assert slow[-1]["level"] == "WARNING"
    assert "nobody" not in json.dumps(slow)  # parameters are never logged
    assert metrics.slow_queries._value.get() > before


@pytest.mark.django_db
def test_only_queries_over_the_threshold_are_logged_on_postgres(settings: Any, json_log: LogLines) -> None:
    needs("postgres")
    settings.SLOW_QUERY_SECONDS = 0.2
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.execute("SELECT pg_sleep(0.3)")
    slow = [line for line in json_log() if line["logger"] == "chatapp.slow_query"]
    assert [line["sql"] for line in slow] == ["SELECT pg_sleep(0.3)"]
    assert slow[0]["duration_ms"] >= 300


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_thread_connections")
async def test_slow_queries_are_logged_on_async_paths(settings: Any, json_log: LogLines) -> None:
    """New connections in sync_to_async threads (what database_sync_to_async and the async ORM use)."""
    settings.SLOW_QUERY_SECONDS = 0
    connection_id_bind("ws-conn-7")

    def in_a_thread() -> None:
        from django.db import connection as thread_connection

        with thread_connection.cursor() as cursor:
            cursor.execute("SELECT 42")
        thread_connection.close()

    await sync_to_async(in_a_thread, thread_sensitive=False)()
    await User.objects.filter(username="nobody").acount()
    slow = [line for line in json_log() if line["logger"] == "chatapp.slow_query"]
    assert any(line["sql"] == "SELECT 42" for line in slow)
    assert any("accounts_user" in line["sql"] for line in slow)
    assert all(line.get("connection_id") == "ws-conn-7" for line in slow)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_thread_connections")
async def test_slow_query_inside_an_asgi_request_carries_the_request_id(
    settings: Any, json_log: LogLines, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    from rest_framework.authtoken.models import Token

    user = await sync_to_async(make_user)("ops-logs")
    token = await Token.objects.acreate(user=user)
    settings.SLOW_QUERY_SECONDS = 0
    response = await _asgi_get(
        "/api/v1/threads", [(b"x-request-id", b"req-slow-1"), (b"authorization", f"Token {token.key}".encode())]
    )
    assert response["status"] == 200
    slow = [line for line in json_log() if line["logger"] == "chatapp.slow_query"]
    assert any("authtoken_token" in line["sql"] for line in slow)
    assert all(line.get("request_id") == "req-slow-1" for line in slow)
