"""Structured logs: one JSON object per line, tagged with the request or connection being served.

The ids live in context variables, so they follow the work across ``await``, into
``sync_to_async``/``database_sync_to_async`` threads and back:

- ``RequestIdMiddleware`` (chatapp/middleware.py) sets the request id for every HTTP request;
- the socket consumer calls :func:`connection_id_bind` once when a connection opens;
- the scheduler sets a request id per job run.

``ContextFilter`` (on the handler) copies the ids onto every record, so both the JSON and the
plain format can show them; ``JsonFormatter`` also writes every ``extra=`` field.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import traceback
import uuid
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("chatapp_request_id", default=None)
connection_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("chatapp_connection_id", default=None)

# An incoming X-Request-ID is kept only if it looks like a token: no spaces, quotes or control
# characters that could forge log lines or headers, and bounded in length.
_SANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+/=-]{0,127}$")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "request_id", "connection_id", "context", "taskName"}
)
# Extras that Django attaches but that are objects, not data (the message already says what they hold).
_SKIPPED_EXTRAS = frozenset({"request", "scope", "connection"})


def new_id() -> str:
    return uuid.uuid4().hex


def sane_id(value: str | None) -> str | None:
    """``value`` if it is acceptable as a request id, else None."""
    if value and _SANE_ID.match(value):
        return value
    return None


def request_id_get() -> str | None:
    return request_id_var.get()


def request_id_bind(request_id: str | None = None) -> str:
    """Set the request id for the current context (a new one if none is given) and return it."""
    value = sane_id(request_id) or new_id()
    request_id_var.set(value)
    return value


def connection_id_bind(connection_id: str | None = None) -> str:
    """Tag every log line of the current websocket connection with a connection id, and return it.

    Call it once at the start of the consumer's connect handler: Channels runs one task per
    connection, so the id stays set for every frame of that connection and follows the work
    into ``database_sync_to_async`` threads.
    """
    value = sane_id(connection_id) or new_id()
    connection_id_var.set(value)
    return value


class ContextFilter(logging.Filter):
    """Copies the current request and connection ids onto the record (``None`` when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "connection_id", None) is None:
            record.connection_id = connection_id_var.get()
        return True


class PlainFormatter(logging.Formatter):
    """The development format: ``time LEVEL logger [id] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [i for i in (getattr(record, "request_id", None), getattr(record, "connection_id", None)) if i]
        record.context = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id/connection_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "connection_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in _SKIPPED_EXTRAS and key not in entry:
                entry[key] = _jsonable(value)
        if record.exc_info:
            entry["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)
