"""The message-send budget, one for REST and socket alike: at most ``CHAT_SENDS_PER_MINUTE`` sends
per user in any span of ``CHAT_SEND_WINDOW_SECONDS`` (60 s).

A sliding log (the ``limits`` library's moving window): every accepted send is logged with its time,
and a send is refused while a full budget of sends is logged within the last window. Fixed windows
(which the budget used before) let twice the budget through across a window's edge.

With Redis (``REDIS_URL``) the log is a list per user, checked and appended by one Lua script, so
every process shares it; the script runs through the cache's own connection pool, with its short
timeouts and its skipping of a Redis that just failed (chatapp/cache_backend.py). On the embedded
default (one process, no Redis) the log is kept in the process's memory.

The send spends its budget before it takes the thread's lock (nothing that waits on Redis runs under
that lock) and gives it back when it turns out to be a retry of a stored message (a retry never
costs a send). If Redis cannot be reached the budget fails open: refusing every message because
Redis blinked would lose more than it protects (docs/operations.md).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import caches
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from chatapp import metrics
from chatapp.cache_backend import SharedRedisCache
from chatapp.errors import RateLimited

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetState:
    """What a client may still do: ``remaining`` of ``limit`` now, one more in ``reset`` seconds."""

    limit: int
    remaining: int
    reset: int


@dataclass(frozen=True)
class Spent:
    """One send taken from a budget (``key`` None: nothing was logged, the budget failed open)."""

    storage: Storage | None = None
    key: str | None = None

    def give_back(self) -> None:
        """Un-log the send (a retry of a stored message). The newest entry of the user's log goes:
        entries are bare times, and the newest is this send's or one a moment later of the same user."""
        if self.storage is None or self.key is None:
            return
        try:
            # limits has no "release"; its moving-window logs are a Redis list (newest first) and, in
            # memory, a list of entries (newest first) under a per-key lock.
            if isinstance(self.storage, RedisStorage):
                client: Any = self.storage.get_connection()
                client.lpop(self.storage.prefixed_key(self.key))
            elif isinstance(self.storage, MemoryStorage):
                with self.storage.locks[self.key]:
                    entries = self.storage.events.get(self.key)
                    if entries:
                        entries.pop(0)
        except Exception:
            logger.warning("could not give a send back to its budget", exc_info=True)


def _item() -> RateLimitItem:
    return RateLimitItemPerSecond(settings.CHAT_SENDS_PER_MINUTE, settings.CHAT_SEND_WINDOW_SECONDS, namespace="send")


@functools.cache
def _memory_storage() -> MemoryStorage:
    return MemoryStorage()


@functools.lru_cache(maxsize=4)
def _redis_storage(pool: Any, key_prefix: str) -> RedisStorage:
    return RedisStorage(settings.REDIS_URL, connection_pool=pool, key_prefix=key_prefix)


def budget_storage() -> Storage:
    """Where the send budgets are logged: beside the cache on its Redis, else in this process."""
    cache = caches["default"]
    if isinstance(cache, SharedRedisCache):
        return _redis_storage(cache.redis_client().connection_pool, f"{cache.key_prefix}:budget")
    return _memory_storage()


def _refusal() -> str:
    budget, window = settings.CHAT_SENDS_PER_MINUTE, settings.CHAT_SEND_WINDOW_SECONDS
    return f"At most {budget} messages per minute." if window == 60 else f"At most {budget} messages in {window} s."


def _state(storage: Storage, item: RateLimitItem, user: Any) -> BudgetState:
    stats = MovingWindowRateLimiter(storage).get_window_stats(item, str(user.pk))
    remaining = max(0, stats.remaining)
    # reset_time: when the oldest logged send leaves the window (nothing logged: nothing to wait for).
    reset = 0 if remaining >= item.amount else max(1, math.ceil(stats.reset_time - time.time()))
    return BudgetState(limit=item.amount, remaining=remaining, reset=reset)


def send_budget_consume(*, user: Any) -> Spent:
    """Spend one send from ``user``'s budget, or raise RateLimited with ``retry_after`` (the seconds
    until the oldest logged send leaves the window). Returns what to give back if the send is not new."""
    item, storage = _item(), budget_storage()
    try:
        accepted = MovingWindowRateLimiter(storage).hit(item, str(user.pk))
    except Exception:
        logger.warning("send budget unavailable (cache error); allowing the send", exc_info=True)
        metrics.ratelimit_errors.inc()
        return Spent()
    if accepted:
        return Spent(storage, item.key_for(str(user.pk)))
    metrics.ratelimit_refusals.labels(scope="send").inc()
    try:
        retry_after = _state(storage, item, user).reset
    except Exception:
        retry_after = settings.CHAT_SEND_WINDOW_SECONDS
    raise RateLimited(_refusal(), retry_after=retry_after, limit=item.amount)


def send_budget_state(*, user: Any) -> BudgetState | None:
    """``user``'s send budget as it stands (None when Redis cannot say)."""
    try:
        return _state(budget_storage(), _item(), user)
    except Exception:
        logger.warning("send budget unavailable (cache error)", exc_info=True)
        return None
