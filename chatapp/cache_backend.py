"""Django's Redis cache backend with one client, and so one connection pool, per process.

Django keeps a cache object per async context (``caches`` is an asgiref ``Local``), and each
``RedisCache`` object builds its own client with its own connection pool. Under ASGI that meant a
new Redis connection for every HTTP request and one held open for the life of every websocket
(measured: 200 sockets, 206 Redis clients). Here every cache object of the process with the same
servers and options shares one client; redis-py's pools are thread-safe and fork-aware.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.utils.functional import cached_property


class SharedRedisCache(RedisCache):
    _clients: ClassVar[dict[str, RedisCacheClient]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @cached_property
    def _cache(self) -> Any:
        # django-stubs do not declare RedisCache's private attributes.
        servers, options, client_class = self._servers, self._options, self._class  # type: ignore[attr-defined]
        key = repr((servers, sorted(options.items())))
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = client_class(servers, **options)
        return client
