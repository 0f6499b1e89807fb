"""The app (chatapp.asgi) with a database-query counter the harness reads at ``GET /bench/queries``.

Counts every statement Django executes in this process (``connection.execute_wrappers`` on
each connection as it is made). Only for the benchmark: ``daphne bench.instrumented:application``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from django.db.backends.signals import connection_created

from chatapp.asgi import application as app

_queries = itertools.count()
_seen = [0]


def _count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    _seen[0] = next(_queries) + 1
    return execute(sql, params, many, context)


def _instrument(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _count not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count)


connection_created.connect(_instrument)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == "/bench/queries":
        body = json.dumps({"queries": _seen[0]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    await app(scope, receive, send)
