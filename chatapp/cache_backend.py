"""Django's Redis cache backend with one client, and so one connection pool, per process.

Django keeps a cache object per async context (``caches`` is an asgiref ``Local``), and each
``RedisCache`` object builds its own client with its own connection pool. Under ASGI that meant a
new Redis connection for every HTTP request and one held open for the life of every websocket
(measured: 200 sockets, 206 Redis clients). Here every cache object of the process with the same
servers and options shares one client; redis-py's pools are thread-safe and fork-aware.

Django's client also builds a new ``redis.Redis`` object for every cache call (~40 µs: its
response-callback table is rebuilt each time; a rate-limit check makes two calls). redis-py's
client objects are thread-safe, so here each pool gets one, made once.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.utils.functional import cached_property


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
