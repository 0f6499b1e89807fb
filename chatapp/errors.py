"""Domain errors raised by services and selectors, and the one JSON error shape.

Services raise these; the DRF exception handler turns them into HTTP responses and the
socket consumer into ``error`` frames, so a rule never has two copies of its failure.

Every error body is ``{"error": {"code": str, "message": str, ...}}`` with optional
``fields`` (validation errors per field), ``retry_after`` (seconds) or ``current``. A dependency
that is down (:func:`unavailable_for`) is a 503 ``unavailable`` with ``retry_after``, never a 500.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_default_handler

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 400
    code = "invalid"
    default_message = "The request is invalid."

    def __init__(self, message: str | None = None, *, fields: dict[str, Any] | None = None, **extra: Any) -> None:
        self.message = message or self.default_message
        self.fields = fields
        self.extra = extra
        super().__init__(self.message)

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        body.update(self.extra)
        return body


class InvalidInput(ServiceError):
    status = 400
    code = "invalid"


class Unauthenticated(ServiceError):
    status = 401
    code = "unauthenticated"
    default_message = "Authentication credentials were missing or invalid."


class Forbidden(ServiceError):
    """The actor can see the thread but their role does not allow the action."""

    status = 403
    code = "forbidden"
    default_message = "You do not have permission to do that."


class NotFound(ServiceError):
    """Also raised for things the actor may not know exist (non-members get 404)."""

    status = 404
    code = "not_found"
    default_message = "Not found."


class Conflict(ServiceError):
    status = 409
    code = "conflict"
    default_message = "The resource changed; reload and try again."


class TooLarge(ServiceError):
    status = 413
    code = "too_large"
    default_message = "The payload is too large."


class RateLimited(ServiceError):
    """A budget is spent. ``limit`` (the budget's size, when known) feeds the RateLimit-* headers."""

    status = 429
    code = "rate_limited"
    default_message = "Too many requests; slow down."

    def __init__(
        self, message: str | None = None, *, retry_after: int = 1, limit: int | None = None, **extra: Any
    ) -> None:
        super().__init__(message, retry_after=max(1, int(retry_after)), **extra)
        self.retry_after = max(1, int(retry_after))
        self.limit = limit


# Seconds a client is asked to wait after a 503 ``unavailable`` (PostgreSQL, file storage down).
UNAVAILABLE_RETRY_AFTER = 5


class Unavailable(ServiceError):
    """A service we depend on did not answer in time (PostgreSQL, file storage): nothing new was
    stored, and the same request may be sent again (sends are idempotent by ``client_msg_id``)."""

    status = 503
    code = "unavailable"
    default_message = "The service is temporarily unavailable; try again shortly."

    def __init__(self, message: str | None = None, *, retry_after: int = UNAVAILABLE_RETRY_AFTER, **extra: Any) -> None:
        super().__init__(message, retry_after=max(1, int(retry_after)), **extra)
        self.retry_after = max(1, int(retry_after))


def unavailable_for(exc: BaseException) -> Unavailable | None:
    """The 503 for an exception that means a dependency is down or too slow, else None.

    One classification for every entry point (DRF views, Django's own 500 handler for anything
    outside them, the socket's frame handler), so an outage is a retryable 503 wherever it shows:
    PostgreSQL unreachable (a pool timeout, a refused or broken connection, a cancelled statement:
    Django's OperationalError and InterfaceError), S3 unreachable or hanging (botocore's connection
    and timeout errors), Redis where a caller did not fail open.
    """
    from django.db import InterfaceError, OperationalError

    if isinstance(exc, Unavailable):
        return exc
    if isinstance(exc, (OperationalError, InterfaceError)):
        return Unavailable("The database is unavailable; try again shortly.")
    try:
        import psycopg

        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return Unavailable("The database is unavailable; try again shortly.")
    except ImportError:  # pragma: no cover - psycopg is a requirement
        pass
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    storage_down = isinstance(exc, (BotoConnectionError, HTTPClientError)) or (
        isinstance(exc, ClientError) and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    )
    if storage_down:
        return Unavailable("File storage is unavailable; try again shortly.")
    import redis

    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return Unavailable()
    return None


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


_DRF_CODES: dict[type[Exception], tuple[int, str]] = {
    drf_exceptions.NotAuthenticated: (401, "unauthenticated"),
    drf_exceptions.AuthenticationFailed: (401, "unauthenticated"),
    drf_exceptions.PermissionDenied: (403, "forbidden"),
    drf_exceptions.NotFound: (404, "not_found"),
    drf_exceptions.MethodNotAllowed: (405, "method_not_allowed"),
    drf_exceptions.NotAcceptable: (406, "not_acceptable"),
    drf_exceptions.UnsupportedMediaType: (415, "unsupported_media_type"),
    drf_exceptions.Throttled: (429, "rate_limited"),
    drf_exceptions.ParseError: (400, "malformed"),
}


def _flatten(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {key: _flatten(value) for key, value in detail.items()}
    if isinstance(detail, list):
        return [_flatten(item) for item in detail]
    return str(detail)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: every failure leaves the API in the one error shape."""
    unavailable = None if isinstance(exc, ServiceError) else unavailable_for(exc)
    if unavailable is not None:
        logger.warning("answered 503: %s", unavailable.message, exc_info=exc)
        exc = unavailable
    if isinstance(exc, ServiceError):
        service_response = Response(error_body(**exc.as_dict()), status=exc.status)
        if isinstance(exc, (RateLimited, Unavailable)):
            service_response["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, RateLimited) and exc.limit is not None:
            for name, value in ratelimit_headers(limit=exc.limit, remaining=0, reset=exc.retry_after).items():
                service_response[name] = value
        return service_response
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    handled = drf_default_handler(exc, context)
    if handled is None:
        return None
    response: Response = handled
    if isinstance(exc, drf_exceptions.ValidationError):
        fields = _flatten(exc.detail)
        if not isinstance(fields, dict):
            fields = {"non_field_errors": fields}
        response.data = error_body("invalid", "Some fields are invalid.", fields=fields)
        return response
    status, code = 500, "error"
    for klass, mapped in _DRF_CODES.items():
        if isinstance(exc, klass):
            status, code = mapped
            break
    else:
        status = response.status_code
        code = getattr(exc, "default_code", "error")
    detail = getattr(exc, "detail", None)
    message = str(detail) if detail is not None and not isinstance(detail, (dict, list)) else str(exc)
    extra: dict[str, Any] = {}
    wait = getattr(exc, "wait", None)
    if isinstance(exc, drf_exceptions.Throttled) and wait is not None:
        extra["retry_after"] = max(1, int(wait))
        response["Retry-After"] = str(extra["retry_after"])
    response.status_code = status
    response.data = error_body(code, message, **extra)
    return response


def ratelimit_headers(*, limit: int, remaining: int, reset: int) -> dict[str, str]:
    """The IETF draft's RateLimit-* fields (draft-ietf-httpapi-ratelimit-headers): the budget's size,
    what is left of it, and the seconds until more is available."""
    return {"RateLimit-Limit": str(limit), "RateLimit-Remaining": str(remaining), "RateLimit-Reset": str(reset)}


def json_error(request: HttpRequest, status: int, code: str, message: str, **extra: Any) -> JsonResponse:
    return JsonResponse(error_body(code, message, **extra), status=status)


def bad_input_response(request: HttpRequest, fields: dict[str, list[str]] | None = None, malformed: str = "") -> Any:
    """The 400 for input refused before (or, as a backstop, by) the database: the one error shape
    under /api/ (``invalid`` naming the fields, or ``malformed``), Django's 400 page elsewhere."""
    if request.path.startswith("/api/"):
        if malformed:
            return json_error(request, 400, "malformed", malformed)
        return json_error(request, 400, "invalid", "Some fields are invalid.", fields=fields)
    from django.views.defaults import bad_request

    return bad_request(request, Exception("unstorable input"))


def handler400(request: HttpRequest, exception: Exception | None = None) -> Any:
    """Django's own refusals of a request (SuspiciousOperation: too many form fields, a bad Host...)."""
    if request.path.startswith("/api/"):
        return json_error(request, 400, "malformed", "The request could not be read.")
    from django.views.defaults import bad_request

    return bad_request(request, exception or Exception())


def handler403(request: HttpRequest, exception: Exception | None = None) -> Any:
    if request.path.startswith("/api/"):
        return json_error(request, 403, "forbidden", "You do not have permission to do that.")
    from django.views.defaults import permission_denied

    return permission_denied(request, exception or Exception())


def handler404(request: HttpRequest, exception: Exception | None = None) -> Any:
    if request.path.startswith("/api/"):
        return json_error(request, 404, "not_found", "Not found.")
    from django.views.defaults import page_not_found

    return page_not_found(request, exception or Http404())


def handler500(request: HttpRequest) -> Any:
    # Django calls this while handling the exception (anywhere: a view outside DRF, a middleware).
    failure = sys.exc_info()[1]
    unavailable = unavailable_for(failure) if failure is not None else None
    if unavailable is not None:
        logger.warning("answered 503: %s", unavailable.message, exc_info=failure)
        response: HttpResponse
        if request.path.startswith("/api/"):
            response = json_error(
                request, 503, unavailable.code, unavailable.message, retry_after=unavailable.retry_after
            )
        else:
            response = HttpResponse(
                "Temporarily unavailable; try again shortly.", status=503, content_type="text/plain"
            )
        response["Retry-After"] = str(unavailable.retry_after)
        return response
    if request.path.startswith("/api/"):
        return json_error(request, 500, "server_error", "Something went wrong on our side.")
    from django.views.defaults import server_error

    return server_error(request)
