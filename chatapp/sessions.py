"""Django's ``cached_db`` sessions, kept working while the cache's Redis does not answer.

Django's store already reads a session from the database when the cache read fails, and logs a
failed cache write after a save; but after that database read it refills the cache unguarded, so
while Redis is down (or skipped after a timeout, chatapp/cache_backend.py) every request signed in
with a session cookie would fail. Here that refill (and the "is this key taken" check) tolerate a
cache error. A failed delete still raises: a signed-out session must not stay valid in the cache.
"""

from __future__ import annotations

import logging
from typing import Any

from django.contrib.sessions.backends import cached_db

logger = logging.getLogger(__name__)


class _RefillTolerant:
    """The session cache, whose writes and membership checks may fail without failing the request."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def __contains__(self, key: str) -> bool:
        try:
            return key in self._cache
        except Exception:
            return False  # the database is asked next

    def set(self, *args: Any, **kwargs: Any) -> None:
        try:
            self._cache.set(*args, **kwargs)
        except Exception:
            logger.warning("session cache write failed; the session is read from the database", exc_info=True)

    async def aset(self, *args: Any, **kwargs: Any) -> None:
        try:
            await self._cache.aset(*args, **kwargs)
        except Exception:
            logger.warning("session cache write failed; the session is read from the database", exc_info=True)


class SessionStore(cached_db.SessionStore):
    def __init__(self, session_key: str | None = None) -> None:
        super().__init__(session_key)
        # Set by cached_db's __init__ (its type is not declared in django-stubs).
        self._cache: Any = _RefillTolerant(getattr(self, "_cache"))  # noqa: B009
