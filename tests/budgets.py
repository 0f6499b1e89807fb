"""Helpers for tests that spend a rate budget.

django-ratelimit counts in fixed windows (each key's window starts at its own offset within the
period), so a window boundary falling inside a test resets the count and the refusal it expects
never comes. Tests that expect a refusal first wait for a fresh stretch of the window.
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django_ratelimit.core import get_usage

from messaging.ratelimits import SEND_GROUP, _user_key


def send_window_left(user: Any) -> float:
    """Seconds left in ``user``'s current send-budget window (spends nothing)."""
    rate = f"{settings.CHAT_SENDS_PER_MINUTE}/m"
    usage = get_usage(user, group=SEND_GROUP, key=_user_key, rate=rate, increment=False)
    assert usage is not None
    return float(usage["time_left"])


def settle_send_window(user: Any, *, margin: float = 5.0) -> float:
    """How long to wait so that at least ``margin`` seconds of ``user``'s window are left.

    Zero when enough are left already; otherwise the rest of this window plus one second.
    """
    left = send_window_left(user)
    return 0.0 if left >= margin else left + 1.0


def wait_for_send_window(user: Any, *, margin: float = 5.0) -> None:
    """Block until ``user``'s send budget has at least ``margin`` seconds of its window left."""
    time.sleep(settle_send_window(user, margin=margin))


def clear_send_budgets() -> None:
    """Forget every rate budget in the shared Redis cache (django-ratelimit's keys start with rl:)."""
    client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
    prefix = settings.CACHES["default"].get("KEY_PREFIX", "")
    keys = list(client.scan_iter(match=f"{prefix}:*rl:*", count=1000))
    if keys:
        client.delete(*keys)
