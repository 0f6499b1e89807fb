"""Permission-checked reads for threads."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db.models import Count, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce

from accounts.models import User
from chatapp.cache import cached_many
from chatapp.errors import InvalidInput, NotFound
from chatapp.prepared import PreparedQuery
from threads import policy
from threads.models import Thread, ThreadKind, ThreadParticipant, ThreadRole


@dataclass(frozen=True)
class ThreadAccess:
    """A thread as seen by one user: their membership (None if access is inherited) and effective role."""

    thread: Thread
    participant: ThreadParticipant | None
    role: ThreadRole


# A participant with their (not deleted) thread: run on every request, frame and send, so its SQL is
# compiled once per database instead of on every call (chatapp/prepared.py).
_membership = PreparedQuery(
    lambda thread_id, user_id: ThreadParticipant.objects.select_related("thread").filter(
        thread_id=thread_id, user_id=user_id, thread__deleted_at__isnull=True
    ),
    "thread_id",
    "user_id",
)
_MAX_ID = 2**63 - 1


def thread_get_for_member(*, thread_id: int, user: User, action: policy.Action = policy.Action.VIEW) -> ThreadAccess:
    """The thread if ``user`` may do ``action`` in it; NotFound if it is invisible to them, Forbidden if not allowed."""
    if not policy.is_usable(user):
        raise NotFound("Thread not found.")
    try:
        thread_id = int(thread_id)  # what the ORM's integer lookup would take (the SQL is prepared)
    except (ValueError, TypeError):
        raise NotFound("Thread not found.") from None
    if not 0 < thread_id <= _MAX_ID:
        raise NotFound("Thread not found.")
    # One query for the usual case (a participant); the thread alone for system roles.
    participant = _membership.first(thread_id=thread_id, user_id=user.pk)
    if participant is not None:
        thread = participant.thread
        participant.user = user
    else:
        try:
            thread = Thread.objects.get(pk=thread_id, deleted_at__isnull=True)
        except Thread.DoesNotExist:
            raise NotFound("Thread not found.") from None
    role = policy.check(user=user, thread=thread, participant=participant, action=action)
    return ThreadAccess(thread=thread, participant=participant, role=role)


def thread_member_ids(*, thread_id: int) -> list[int]:
    return list(ThreadParticipant.objects.filter(thread_id=thread_id).values_list("user_id", flat=True))


def thread_owner_count(*, thread_id: int) -> int:
    return ThreadParticipant.objects.filter(thread_id=thread_id, role=ThreadRole.OWNER).count()


THREAD_PAGE_SIZE = 50


def thread_payloads(*, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Cached (15 min) thread payloads without per-user or fast-changing fields."""
    from threads.events import thread_payload

    def load(missing: list[int]) -> dict[int, dict[str, Any]]:
        return {t.pk: thread_payload(t) for t in Thread.objects.filter(pk__in=missing)}

    return cached_many("thread", ids, load)


def _encode_cursor(activity: datetime, thread_id: int) -> str:
    return base64.urlsafe_b64encode(f"{activity.isoformat()}|{thread_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        stamp, thread_id = raw.rsplit("|", 1)
        when, pk = datetime.fromisoformat(stamp), int(thread_id)
        if when.tzinfo is None or not 0 < pk <= 2**63 - 1:
            raise ValueError(raw)
        # In UTC here, where an out-of-range moment fails, not in the database driver.
        return when.astimezone(UTC), pk
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise InvalidInput(fields={"cursor": ["Malformed cursor."]}) from None


def thread_list_for_user(
    *, user: User, archived: bool = False, cursor: str | None = None, limit: int = THREAD_PAGE_SIZE
) -> dict[str, Any]:
    """My threads, most recent activity first (keyset pagination), with my role, unread count and last message.

    A constant number of queries whatever the page size.
    """
    from accounts.selectors import user_briefs
    from messaging.models import Message
    from messaging.selectors import message_payloads

    unread = (
        Message.objects.filter(
            thread_id=OuterRef("thread_id"), sequence__gt=OuterRef("last_read_sequence"), deleted_at__isnull=True
        )
        .exclude(sender_id=user.pk)
        .order_by()
        .values("thread_id")
        .annotate(n=Count("pk"))
        .values("n")
    )
    last_message = Message.objects.filter(thread_id=OuterRef("thread_id")).order_by("-sequence").values("pk")[:1]
    qs = (
        ThreadParticipant.objects.filter(user=user, thread__deleted_at__isnull=True, archived_at__isnull=not archived)
        .select_related("thread")
        .annotate(
            unread_count=Coalesce(Subquery(unread), 0),
            last_message_id=Subquery(last_message),
            activity=Coalesce("thread__last_message_at", "thread__created_at"),
        )
        .order_by("-activity", "-thread_id")
    )
    if cursor:
        stamp, thread_id = _decode_cursor(cursor)
        qs = qs.filter(Q(activity__lt=stamp) | Q(activity=stamp, thread_id__lt=thread_id))
    rows = list(qs[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    messages = message_payloads(ids=[r.last_message_id for r in rows if r.last_message_id], viewer=user)
    direct_ids = [r.thread_id for r in rows if r.thread.kind == ThreadKind.DIRECT]
    others: dict[int, int] = dict(
        ThreadParticipant.objects.filter(thread_id__in=direct_ids)
        .exclude(user_id=user.pk)
        .values_list("thread_id", "user_id")
    )
    people = user_briefs(ids=others.values())
    items = []
    for row in rows:
        thread = row.thread
        items.append(
            {
                "id": thread.pk,
                "title": thread.title,
                "kind": thread.kind,
                "my_role": row.role,
                "unread_count": row.unread_count,
                "last_sequence": thread.last_sequence,
                "last_read_sequence": row.last_read_sequence,
                "last_message": messages.get(row.last_message_id) if row.last_message_id else None,
                "last_activity_at": row.activity.isoformat(),
                "muted": row.muted,
                "archived": row.archived_at is not None,
                "other_user": people.get(others[thread.pk]) if thread.pk in others else None,
            }
        )
    return {
        "threads": items,
        "next_cursor": _encode_cursor(rows[-1].activity, rows[-1].thread_id) if more and rows else None,
    }


def participant_list(*, thread_id: int) -> list[ThreadParticipant]:
    return list(
        ThreadParticipant.objects.filter(thread_id=thread_id).select_related("user").order_by("joined_at", "pk")
    )
