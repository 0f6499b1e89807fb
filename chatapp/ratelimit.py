"""General API rate limits (django-ratelimit on the shared cache) and the trusted client IP."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from django_ratelimit.core import get_usage

from chatapp import known_device, metrics
from chatapp.errors import RateLimited

logger = logging.getLogger(__name__)


def client_ip(request: HttpRequest) -> str:
    """The client's address as a budget key: ``REMOTE_ADDR``, which chatapp.proxy computed from the TCP
    peer and the trusted proxies only (never from what the client writes); an IPv6 client's whole /64,
    since a subscriber is handed at least that many addresses to choose from."""
    address = request.META.get("REMOTE_ADDR") or ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unknown"  # no peer address (a unix socket without a trusted proxy): one shared budget
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False).network_address) + "/64"
    return str(ip)


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


def password_attempt_check(request: HttpRequest, *, username: str) -> None:
    """One password attempt, counted before the password is checked, for every place a password is
    typed (the API token, the sign-in page, the admin's): from the client address's budget
    (``AUTH_TOKEN_RATE_PER_IP``), then from the account's (``AUTH_RATE_PER_ACCOUNT``, whatever the
    address: a guess spread over many addresses), unless this browser signed in to the account before
    (a known-device cookie): then from that browser's own budget, so guessers cannot lock the owner out.
    Raises RateLimited (429 + Retry-After)."""
    try:
        _check(request, group="auth.token", key=_ip_key, rate=settings.AUTH_TOKEN_RATE_PER_IP, scope="auth_token")
    except RateLimited as exc:
        raise RateLimited("Too many sign-in attempts from your address.", retry_after=exc.retry_after) from None
    account = known_device.account_key(username)
    device = known_device.device_for(request, account=account)
    group, value = ("auth.device", device) if device else ("auth.account", account)
    try:
        _check(
            request,
            group=group,
            key=lambda _group, _request: value,
            rate=settings.AUTH_RATE_PER_ACCOUNT,
            scope=group.replace(".", "_"),
        )
    except RateLimited as exc:
        raise RateLimited("Too many sign-in attempts for this account.", retry_after=exc.retry_after) from None
