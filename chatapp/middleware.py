"""HTTP middleware for operations: the request id, the access log line, the probe endpoints, and
the refusal of paths, query strings and headers that hold text PostgreSQL cannot store.

Both classes work natively in async (ASGI/daphne) and sync mode. They come first in
``MIDDLEWARE``: the request id must be set before anything logs, and probes must be answered
before host validation and the HTTPS redirect (a balancer probes the instance address over
plain HTTP).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.db import DataError
from django.http import HttpRequest, HttpResponseBase
from django.urls import Resolver404, resolve
from django.utils.module_loading import import_string

from chatapp import storable
from chatapp.errors import bad_input_response, ratelimit_headers
from chatapp.logging import connection_id_var, request_id_bind

access_logger = logging.getLogger("chatapp.access")
logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# Probe and scrape paths, answered by HealthCheckMiddleware; their access lines are DEBUG only.
PROBE_VIEWS = {
    "/healthz": "chatapp.views.healthz",
    "/readyz": "chatapp.health.readyz",
    "/metrics": "chatapp.metrics_view.metrics",
}

GetResponse = Callable[[HttpRequest], Any]


class RequestIdMiddleware:
    """Binds a request id (the client's ``X-Request-ID`` if it is a sane token, else a new one)
    to every log line of the request, returns it in the ``X-Request-ID`` response header and
    writes one access line on ``chatapp.access``.

    The id is not reset when the response leaves this middleware: Django logs 4xx/5xx responses
    (``django.request``) just after the middleware chain, and those lines need it too. Under
    ASGI every request runs in its own task, so nothing leaks between requests.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        started = self._start(request)
        response = self.get_response(request)
        return self._finish(request, response, started)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        started = self._start(request)
        response = await self.get_response(request)
        return self._finish(request, response, started)

    @staticmethod
    def _start(request: HttpRequest) -> float:
        request.request_id = request_id_bind(request.headers.get(REQUEST_ID_HEADER))  # type: ignore[attr-defined]
        connection_id_var.set(None)
        return time.perf_counter()

    @staticmethod
    def _finish(request: HttpRequest, response: HttpResponseBase, started: float) -> HttpResponseBase:
        response[REQUEST_ID_HEADER] = request.request_id  # type: ignore[attr-defined]
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        level = logging.DEBUG if request.path_info in PROBE_VIEWS else logging.INFO
        access_logger.log(
            level,
            "%s %s %s",
            request.method,
            request.path,
            response.status_code,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": duration_ms,
            },
        )
        return response


class HealthCheckMiddleware:
    """Answers ``/healthz``, ``/readyz`` and ``/metrics`` before the rest of the stack.

    Balancers and Prometheus reach an instance by its address, over plain HTTP, so these
    requests must not meet ALLOWED_HOSTS validation (400) or the HTTPS redirect (301). The
    views only report state; ``/metrics`` checks its own bearer token.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        self.views: dict[str, Callable[[HttpRequest], HttpResponseBase]] = {
            path: import_string(dotted) for path, dotted in PROBE_VIEWS.items()
        }

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        view = self.views.get(request.path_info)
        if view is None:
            return self.get_response(request)
        return view(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        view = self.views.get(request.path_info)
        if view is None:
            response: Awaitable[HttpResponseBase] = self.get_response(request)
            return await response
        return await sync_to_async(view)(request)


class StorableInputMiddleware:
    """A 400 for a request whose path, query string or header values hold text PostgreSQL cannot
    store (NUL; :mod:`chatapp.storable`), or whose declared charset can decode to it, before any
    view (the admin's and the pages' too) puts it in a query. Bodies are checked by the API's
    parsers; Django's forms refuse NUL themselves.

    Also the backstop: bad input that still reaches the database (a ``DataError``, or text psycopg
    cannot encode) is answered 400 and logged as a missing check, not a 500.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        return self.refusal(request) or self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        response: HttpResponseBase = await self.get_response(request)
        return response

    @staticmethod
    def refusal(request: HttpRequest) -> HttpResponseBase | None:
        # Django decodes the query string and form bodies with the charset the request declares;
        # some (utf-7, unicode_escape) turn plain bytes into lone surrogates.
        if request.encoding and not storable.safe_charset(request.encoding):
            return bad_input_response(request, malformed=f"Unsupported charset {request.encoding!r}: send UTF-8.")
        problems = request_problems(request)
        return bad_input_response(request, problems) if problems else None

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponseBase | None:
        if not isinstance(exception, (DataError, UnicodeEncodeError)):
            return None
        logger.warning("bad input reached the database (a check is missing at the edge)", exc_info=exception)
        return bad_input_response(request, {"non_field_errors": ["A value cannot be stored."]})


def request_problems(request: HttpRequest) -> dict[str, list[str]]:
    """What in the path, query string and headers cannot be stored, by path parameter, query
    parameter or header name."""
    problems: dict[str, list[str]] = {}
    path_problem = storable.text_problem(request.path_info)
    if path_problem:
        try:
            kwargs = resolve(request.path_info).kwargs
        except Resolver404:
            kwargs = {}
        named = {k: [path_problem] for k, v in kwargs.items() if isinstance(v, str) and storable.text_problem(v)}
        problems.update(named or {"path": [path_problem]})
    problems.update(storable.pairs_problems((k, v) for k, values in request.GET.lists() for v in values))
    headers = ((name, value) for name, value in request.headers.items() if isinstance(value, str))
    problems.update(storable.pairs_problems(headers))
    return problems


class RateLimitHeadersMiddleware:
    """Adds the RateLimit-Limit/-Remaining/-Reset headers (IETF draft) of the budget a request counted
    against (:func:`chatapp.ratelimit.budget_seen`), so clients can pace themselves before a 429.
    A refusal's own headers (set with the 429) are kept."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        return self._headers(request, self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> Any:
        return self._headers(request, await self.get_response(request))

    @staticmethod
    def _headers(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        budget = getattr(request, "ratelimit_budget", None)
        if budget is not None and "RateLimit-Limit" not in response:
            limit, remaining, reset = budget
            for name, value in ratelimit_headers(limit=limit, remaining=remaining, reset=reset).items():
                response[name] = value
        return response
