"""JSON-safe payloads describing users, shared by every event and API response."""

from __future__ import annotations

from typing import Any

from accounts.models import User


def user_brief(user: User) -> dict[str, Any]:
    return {
        "id": user.pk,
        "username": user.username,
        "name": user.name,
        "avatar_url": user.avatar_url,
        "active": user.is_active,
    }
