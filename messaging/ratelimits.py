"""The message-send budget (60 per minute per user by default), one for REST and socket alike.

Counted by django-ratelimit in the configured cache (Redis when ``REDIS_URL`` is set, so
every process shares it). If the cache is unreachable the budget fails open: refusing
every message because Redis blinked would lose more than it protects.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django_ratelimit.core import get_usage

from chatapp.errors import RateLimited

logger = logging.getLogger(__name__)

SEND_GROUP = "chat.message_send"


def _user_key(group: str, request: Any) -> str:
    return str(request.pk)


def send_budget_consume(*, user: Any) -> None:
    """Spend one send from ``user``'s budget or raise RateLimited with ``retry_after``."""
    rate = f"{settings.CHAT_SENDS_PER_MINUTE}/m"
    try:
        # django-ratelimit's key functions receive "the request"; the user is all this key needs.
        usage = get_usage(user, group=SEND_GROUP, key=_user_key, rate=rate, increment=True)
    except Exception:
        logger.warning("send budget unavailable (cache error); allowing the send", exc_info=True)
        from chatapp import metrics

        metrics.ratelimit_errors.inc()
        return
    if usage and usage["should_limit"]:
        from chatapp import metrics

        metrics.ratelimit_refusals.labels(scope="send").inc()
        raise RateLimited(
            f"At most {settings.CHAT_SENDS_PER_MINUTE} messages per minute.", retry_after=max(1, usage["time_left"])
        )
