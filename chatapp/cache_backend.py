"""Django's Redis cache backend with one client, and so one connection pool, per process.

Django keeps a cache object per async context (``caches`` is an asgiref ``Local``), and each
``RedisCache`` object builds its own client with its own connection pool. Under ASGI that meant a
new Redis connection for every HTTP request and one held open for the life of every websocket
(measured: 200 sockets, 206 Redis clients). Here every cache object of the process with the same
servers and options shares one client; redis-py's pools are thread-safe and fork-aware.

Django's client also builds a new ``redis.Redis`` object for every cache call (~40 µs: its
response-callback table is rebuilt each time; a rate-limit check makes two calls). redis-py's
client objects are thread-safe, so here each pool gets one, made once.

Its pool (:class:`SkippingConnectionPool`) gives up on a Redis that timed out a moment ago instead of
waiting out a timeout on every call (a frozen or partitioned Redis, docs/operations.md).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import redis
from django.conf import settings
from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.utils.functional import cached_property

logger = logging.getLogger(__name__)


class ReusedClientRedisCacheClient(RedisCacheClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redis_clients: dict[int, Any] = {}

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        # django-stubs do not declare RedisCacheClient's private attributes.
        pool = self._get_connection_pool(write)  # type: ignore[attr-defined]
        client = self._redis_clients.get(id(pool))
        if client is None:
            client = self._redis_clients.setdefault(id(pool), self._client(connection_pool=pool))  # type: ignore[attr-defined]
        return client


class SharedRedisCache(RedisCache):
    _clients: ClassVar[dict[str, ReusedClientRedisCacheClient]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @cached_property
    def _cache(self) -> Any:
        # django-stubs do not declare RedisCache's private attributes.
        servers, options = self._servers, self._options  # type: ignore[attr-defined]
        key = repr((servers, sorted(options.items())))
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = ReusedClientRedisCacheClient(servers, **options)
        return client

    def redis_client(self) -> Any:
        """The redis-py client of the cache's (primary) server: its pool, timeouts and skipping."""
        return self._cache.get_client(write=True)


class RedisSkipped(redis.exceptions.ConnectionError):
    """Raised instead of calling Redis while the pool skips it after a timeout."""


class SkippingConnectionPool(redis.ConnectionPool):
    """A redis-py pool that stops calling Redis for ``REDIS_SKIP_SECONDS`` after a call times out.

    Each call already gives up after the socket timeouts (``CHATAPP_REDIS_TIMEOUT``), but a request
    makes several cache calls (sessions, two API budgets, the send budget, cached payloads): against a
    frozen or partitioned Redis each would wait its full timeout. After the first timeout the next
    calls fail at once with :class:`RedisSkipped`, which every caller already treats as Redis being
    down (budgets fail open, reads go to the database). When the time is up, the next call tries
    Redis again.

    Hand-written rather than a circuit-breaker library (pybreaker): the hook has to sit in redis-py's
    connection (where every command, pipeline and script passes), and all it keeps is one deadline.
    """

    def __init__(self, connection_class: type[Any] = redis.Connection, **kwargs: Any) -> None:
        self.skip_until = 0.0
        pool = self

        class Guarded(connection_class):  # type: ignore[valid-type,misc]
            def connect(self, *args: Any, **kwargs: Any) -> Any:
                with pool.watch():
                    return super().connect(*args, **kwargs)

            def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
                with pool.watch():
                    return super().send_packed_command(*args, **kwargs)

            def read_response(self, *args: Any, **kwargs: Any) -> Any:
                with pool.watch():
                    return super().read_response(*args, **kwargs)

        Guarded.__name__ = f"Skipping{connection_class.__name__}"
        super().__init__(connection_class=Guarded, **kwargs)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        left = self.skip_until - time.monotonic()
        if left > 0:
            raise RedisSkipped(f"Redis timed out recently; not called for another {left:.1f} s")
        return super().get_connection(*args, **kwargs)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        try:
            yield
        except redis.exceptions.TimeoutError:
            # Only a timeout: a refused or broken connection fails at once (and a broken pooled one is
            # retried once on a new connection, settings._redis_retry), so there is nothing to skip.
            now = time.monotonic()
            if self.skip_until <= now:
                logger.warning("Redis (cache) timed out; skipping it for %.1f s", settings.REDIS_SKIP_SECONDS)
            self.skip_until = now + settings.REDIS_SKIP_SECONDS
            raise
