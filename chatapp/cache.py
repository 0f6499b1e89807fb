"""Cache-aside for hot reads (the design's TTLs), invalidated after every write commits.

Readers call :func:`cached_many` with a loader for the misses; services call
:func:`invalidate_on_commit` for what they changed. Cached values are JSON-safe payloads,
never permission decisions: access is always checked against the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from django.core.cache import cache
from django.db import transaction

logger = logging.getLogger(__name__)

TTL_SECONDS = {"thread": 15 * 60, "user": 30 * 60, "message": 5 * 60}


def _key(namespace: str, pk: int) -> str:
    return f"{namespace}:v1:{pk}"


def cached_many(
    namespace: str, ids: Iterable[int], loader: Callable[[list[int]], dict[int, dict[str, Any]]]
) -> dict[int, dict[str, Any]]:
    """Payloads for ``ids`` from the cache, loading the misses in one call to ``loader``."""
    ids = list(dict.fromkeys(ids))
    if not ids:
        return {}
    keys = {_key(namespace, pk): pk for pk in ids}
    try:
        found = cache.get_many(list(keys))
    except Exception:  # a cache outage degrades to database reads
        logger.warning("cache read failed for %s", namespace, exc_info=True)
        found = {}
    result = {keys[k]: v for k, v in found.items()}
    missing = [pk for pk in ids if pk not in result]
    if missing:
        loaded = loader(missing)
        result.update(loaded)
        try:
            cache.set_many({_key(namespace, pk): v for pk, v in loaded.items()}, TTL_SECONDS[namespace])
        except Exception:
            logger.warning("cache write failed for %s", namespace, exc_info=True)
    return result


def invalidate(namespace: str, ids: Iterable[int]) -> None:
    keys = [_key(namespace, pk) for pk in ids]
    if not keys:
        return
    try:
        cache.delete_many(keys)
    except Exception:
        logger.warning("cache invalidation failed for %s %s", namespace, keys, exc_info=True)


def invalidate_on_commit(namespace: str, ids: Iterable[int]) -> None:
    """Drop cached payloads now and again after commit (a read in between may have re-cached the old row)."""
    ids = list(ids)
    invalidate(namespace, ids)
    transaction.on_commit(lambda: invalidate(namespace, ids))
