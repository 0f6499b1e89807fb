"""JSON-safe payloads for messages (pure functions over already-fetched rows)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from accounts.events import user_brief
from messaging.models import Message, Reaction

DELETED_BODY = ""


def reactions_summary(reactions: Iterable[Reaction]) -> list[dict[str, Any]]:
    """Counts per emoji (first-used order) with who reacted, so each client can tell 'mine'."""
    by_emoji: dict[str, list[int]] = {}
    for reaction in sorted(reactions, key=lambda r: (r.created_at, r.pk)):
        by_emoji.setdefault(reaction.emoji, []).append(reaction.user_id)
    return [{"emoji": emoji, "count": len(users), "user_ids": users} for emoji, users in by_emoji.items()]


def reply_brief(parent: Message | None) -> dict[str, Any] | None:
    if parent is None:
        return None
    return {
        "id": parent.pk,
        "seq": parent.sequence,
        "sender_id": parent.sender_id,
        "excerpt": "" if parent.is_deleted else parent.body[:140],
        "deleted": parent.is_deleted,
    }


def message_payload(
    message: Message,
    *,
    reactions: Iterable[Reaction] | None = None,
    attachments: list[dict[str, Any]] | None = None,
    reply_count: int | None = None,
) -> dict[str, Any]:
    """The one shape of a message in events and API responses.

    ``reactions``/``attachments`` default to the prefetched relations of ``message``.
    A deleted message keeps its place (a tombstone) but carries no body or files.
    """
    deleted = message.is_deleted
    if reactions is None:
        reactions = [] if deleted else list(message.reactions.all())
    if attachments is None:
        from attachments.events import attachments_payload

        attachments = [] if deleted else attachments_payload(message)
    return {
        "id": message.pk,
        "thread_id": message.thread_id,
        "seq": message.sequence,
        "sender": user_brief(message.sender),
        "body": DELETED_BODY if deleted else message.body,
        "html": DELETED_BODY if deleted else message.body_html,
        "reply_to": reply_brief(message.reply_to) if message.reply_to_id else None,
        "client_msg_id": message.client_msg_id,
        "version": message.version,
        "created_at": message.created_at.isoformat(),
        "edited_at": message.edited_at.isoformat() if message.edited_at else None,
        "deleted": deleted,
        "deleted_at": message.deleted_at.isoformat() if message.deleted_at else None,
        "reactions": [] if deleted else reactions_summary(reactions),
        "attachments": [] if deleted else attachments,
        "reply_count": reply_count,
    }
