"""General API rate limits (django-ratelimit on the shared cache) and the trusted client IP."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from django_ratelimit.core import get_usage

from chatapp import metrics
from chatapp.errors import RateLimited

logger = logging.getLogger(__name__)


def client_ip(request: HttpRequest) -> str:
    """REMOTE_ADDR, or the address our ``CHATAPP_TRUSTED_PROXY_COUNT`` proxies saw.

    X-Forwarded-For is read from the right: each trusted proxy appended one entry, so the
    entry just left of theirs is the client. Anything further left is client-controlled.
    """
    remote = request.META.get("REMOTE_ADDR", "") or "0.0.0.0"  # noqa: S104 - a key, not a bind address
    hops = settings.TRUSTED_PROXY_COUNT
    if hops <= 0:
        return remote
    forwarded = [p.strip() for p in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if p.strip()]
    if len(forwarded) < hops:
        return remote
    candidate = forwarded[-hops]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return remote


def _ip_key(group: str, request: Any) -> str:
    return client_ip(request)


def _user_key(group: str, request: Any) -> str:
    return str(request.user.pk)


def _check(request: HttpRequest, *, group: str, key: Any, rate: str, scope: str) -> None:
    try:
        usage = get_usage(request, group=group, key=key, rate=rate, increment=True)
    except Exception:
        logger.warning("rate limit %s unavailable (cache error); allowing", group, exc_info=True)
        metrics.ratelimit_errors.inc()
        return
    if not usage:
        return
    if usage["should_limit"]:
        metrics.ratelimit_refusals.labels(scope=scope).inc()
        raise RateLimited(retry_after=max(1, usage["time_left"]), limit=usage["limit"])
    budget_seen(request, limit=usage["limit"], remaining=usage["limit"] - usage["count"], reset=usage["time_left"])


def budget_seen(request: HttpRequest, *, limit: int, remaining: int, reset: int) -> None:
    """Note a budget this request counted against, for its RateLimit-* headers
    (chatapp.middleware.RateLimitHeadersMiddleware): of several, the one closest to running out."""
    target: Any = getattr(request, "_request", request)  # DRF's Request wraps Django's
    remaining = max(0, remaining)
    seen = getattr(target, "ratelimit_budget", None)
    if seen is None or remaining < seen[1]:
        target.ratelimit_budget = (limit, remaining, max(0, reset))


def api_rate_check(request: HttpRequest) -> None:
    """Per-IP for everyone, per-user for signed-in users. Raises RateLimited (429 + Retry-After)."""
    _check(request, group="api.ip", key=_ip_key, rate=settings.API_RATE_PER_IP, scope="api_ip")
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        _check(request, group="api.user", key=_user_key, rate=settings.API_RATE_PER_USER, scope="api_user")


def password_attempt_check(request: HttpRequest) -> None:
    """``AUTH_TOKEN_RATE_PER_IP`` password attempts per client IP, one budget for every place a
    password is typed (the API token, the sign-in page, the admin's), counted before it is checked."""
    _check(request, group="auth.token", key=_ip_key, rate=settings.AUTH_TOKEN_RATE_PER_IP, scope="auth_token")
