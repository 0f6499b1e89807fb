"""JSON-safe payloads for thread events (pure functions)."""

from __future__ import annotations

from typing import Any

from accounts.events import user_brief
from threads.models import Thread, ThreadParticipant


def thread_payload(thread: Thread) -> dict[str, Any]:
    return {
        "id": thread.pk,
        "title": thread.title,
        "kind": thread.kind,
        "created_by": thread.created_by_id,
        "created_at": thread.created_at.isoformat(),
        "last_sequence": thread.last_sequence,
    }


def participant_payload(participant: ThreadParticipant) -> dict[str, Any]:
    return {
        "user": user_brief(participant.user),
        "role": participant.role,
        "joined_at": participant.joined_at.isoformat(),
        "last_read_sequence": participant.last_read_sequence,
        "last_delivered_sequence": participant.last_delivered_sequence,
    }
