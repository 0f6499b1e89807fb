"""Reads for users (cached briefs for payloads, the people picker)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db.models import Q

from accounts.events import user_brief
from accounts.models import User
from chatapp.cache import cached_many


def user_briefs(*, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Cached (30 min) public profiles by id; invalidated by every user write."""

    def load(missing: list[int]) -> dict[int, dict[str, Any]]:
        return {u.pk: user_brief(u) for u in User.objects.filter(pk__in=missing)}

    return cached_many("user", ids, load)


def user_search(*, query: str, limit: int = 20, exclude_id: int | None = None) -> list[User]:
    """Active people whose username or display name starts with ``query`` (for pickers and @-mentions)."""
    qs = User.objects.filter(is_active=True, deactivated_at__isnull=True)
    query = query.strip().lstrip("@")
    if query:
        qs = qs.filter(Q(username__istartswith=query) | Q(display_name__istartswith=query))
    if exclude_id is not None:
        qs = qs.exclude(pk=exclude_id)
    return list(qs.order_by("username")[:limit])
