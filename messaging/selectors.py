"""Permission-checked reads for messages, receipts, notifications and search.

Every list runs a constant number of queries whatever its size, and pages by sequence or id
(keyset), never by offset.
"""

from __future__ import annotations

import copy
from typing import Any

from django.db import connection
from django.db.models import Count, Q, QuerySet

from accounts.models import User
from accounts.selectors import user_briefs
from chatapp.cache import cached_many
from chatapp.errors import InvalidInput, NotFound
from messaging import events
from messaging.models import Message, MessageEdit, Notification
from threads.models import ThreadParticipant
from threads.selectors import ThreadAccess, thread_get_for_member

MAX_PAGE = 100
DEFAULT_PAGE = 50


def _load_messages(ids: list[int]) -> dict[int, dict[str, Any]]:
    rows = (
        Message.objects.filter(pk__in=ids)
        .select_related("sender", "reply_to")
        .prefetch_related("reactions", "attachments")
        .annotate(replies_total=Count("replies", filter=Q(replies__deleted_at__isnull=True)))
    )
    return {m.pk: events.message_payload(m, reply_count=m.replies_total) for m in rows}


def message_payloads(*, ids: list[int], viewer: User | None = None) -> dict[int, dict[str, Any]]:
    """Message payloads by id: cached 5 min, senders refreshed from the user cache, ``me`` set per reaction."""
    found = cached_many("message", ids, _load_messages)
    senders = user_briefs(ids={p["sender"]["id"] for p in found.values()})
    out: dict[int, dict[str, Any]] = {}
    for pk, cached in found.items():
        payload = copy.copy(cached)
        payload["sender"] = senders.get(cached["sender"]["id"], cached["sender"])
        if viewer is not None:
            payload["reactions"] = [{**r, "me": viewer.pk in r["user_ids"]} for r in cached["reactions"]]
        out[pk] = payload
    return out


def _ordered(ids: list[int], viewer: User) -> list[dict[str, Any]]:
    payloads = message_payloads(ids=ids, viewer=viewer)
    return [payloads[i] for i in ids if i in payloads]


def _any_beyond(nearest_first: QuerySet[Any]) -> bool:
    """Is there a message past a page's edge? Asked as "the nearest one, in (thread, sequence) order":
    the unique (thread, sequence) index answers it from the edge in a few pages at any depth. Asked
    as EXISTS (no order), PostgreSQL reckons that most of a long thread matches, scans the table
    from its start for the first match and reads every older row on the way: a page 50,000
    messages back cost 1.8x the first (docs/benchmarks.md)."""
    return bool(nearest_first.values_list("sequence")[:1])  # the index has it: no table row read


def message_history(
    *,
    access: ThreadAccess,
    user: User,
    before: int | None = None,
    after: int | None = None,
    around: int | None = None,
    limit: int = DEFAULT_PAGE,
) -> dict[str, Any]:
    """A page of a thread's messages in ascending sequence order.

    ``before``/``after`` are exclusive sequence bounds; ``around`` centres the page on an anchor
    (inclusive). With none of them, the newest page. Deleted messages stay as tombstones.
    """
    if sum(x is not None for x in (before, after, around)) > 1:
        raise InvalidInput("Use only one of before, after, around.", fields={"before": ["Only one anchor."]})
    limit = max(1, min(int(limit), MAX_PAGE))
    seq_ids = Message.objects.filter(thread_id=access.thread.pk).values_list("sequence", "pk")
    if after is not None:
        newer = list(seq_ids.filter(sequence__gt=after).order_by("sequence")[: limit + 1])
        has_newer = len(newer) > limit
        rows = newer[:limit]
        has_older = _any_beyond(seq_ids.filter(sequence__lte=after).order_by("-sequence"))
    elif around is not None:
        half = limit // 2
        older = list(seq_ids.filter(sequence__lt=around).order_by("-sequence")[: half + 1])
        newer = list(seq_ids.filter(sequence__gte=around).order_by("sequence")[: limit - half + 1])
        has_older = len(older) > half
        has_newer = len(newer) > limit - half
        rows = list(reversed(older[:half])) + newer[: limit - half]
    else:
        qs = seq_ids.filter(sequence__lt=before) if before is not None else seq_ids
        older = list(qs.order_by("-sequence")[: limit + 1])
        has_older = len(older) > limit
        rows = list(reversed(older[:limit]))
        has_newer = before is not None and _any_beyond(seq_ids.filter(sequence__gte=before).order_by("sequence"))
    return {
        "messages": _ordered([pk for _, pk in rows], user),
        "has_older": has_older,
        "has_newer": has_newer,
        "oldest_reached": not has_older,
        "newest_reached": not has_newer,
        "last_sequence": access.thread.last_sequence,
    }


def message_get_for_member(*, message_id: int, user: User) -> Message:
    """The message if its thread is visible to ``user``; NotFound otherwise (also for non-members)."""
    try:
        message = Message.objects.get(pk=message_id)
    except (Message.DoesNotExist, ValueError, TypeError):
        raise NotFound("Message not found.") from None
    try:
        thread_get_for_member(thread_id=message.thread_id, user=user)
    except NotFound:
        raise NotFound("Message not found.") from None
    return message


def message_payload_for(*, message_id: int, user: User) -> dict[str, Any]:
    message = message_get_for_member(message_id=message_id, user=user)
    return message_payloads(ids=[message.pk], viewer=user)[message.pk]


def message_edit_history(*, message_id: int, user: User) -> dict[str, Any]:
    """Every earlier version of a message, oldest first, then the current one."""
    message = message_get_for_member(message_id=message_id, user=user)
    edits = list(MessageEdit.objects.filter(message=message).select_related("editor").order_by("version"))
    return {
        "message_id": message.pk,
        "current_version": message.version,
        "deleted": message.is_deleted,
        "versions": [
            {
                "version": e.version,
                "body": "" if message.is_deleted else e.previous_body,
                "replaced_at": e.edited_at.isoformat(),
                "editor_id": e.editor_id,
            }
            for e in edits
        ],
        "current": {
            "version": message.version,
            "body": message.body,
            "edited_at": message.edited_at.isoformat() if message.edited_at else None,
        },
    }


def message_replies(
    *, message_id: int, user: User, after: int | None = None, limit: int = DEFAULT_PAGE
) -> dict[str, Any]:
    parent = message_get_for_member(message_id=message_id, user=user)
    limit = max(1, min(int(limit), MAX_PAGE))
    # Deleted replies are left out, as from ``reply_count``: the list and the count agree.
    qs = Message.objects.filter(reply_to=parent, deleted_at__isnull=True).order_by("sequence")
    if after is not None:
        qs = qs.filter(sequence__gt=after)
    ids = list(qs.values_list("pk", flat=True)[: limit + 1])
    return {
        "parent": message_payloads(ids=[parent.pk], viewer=user)[parent.pk],
        "replies": _ordered(ids[:limit], user),
        "has_more": len(ids) > limit,
    }


def message_receipts(*, message_id: int, user: User) -> dict[str, Any]:
    """Who has the message delivered and read (from per-thread marks). Senders see theirs; everyone sees counts."""
    message = message_get_for_member(message_id=message_id, user=user)
    others = list(
        ThreadParticipant.objects.filter(thread_id=message.thread_id, joined_at__lte=message.created_at)
        .exclude(user_id=message.sender_id)
        .values_list("user_id", "last_delivered_sequence", "last_read_sequence")
    )
    read = [uid for uid, _, r in others if r >= message.sequence]
    delivered = [uid for uid, d, r in others if max(d, r) >= message.sequence]
    status = "read" if others and len(read) == len(others) else "delivered" if delivered else "sent"
    body: dict[str, Any] = {
        "message_id": message.pk,
        "seq": message.sequence,
        "status": status,
        "recipients": len(others),
        "delivered_count": len(delivered),
        "read_count": len(read),
    }
    if message.sender_id == user.pk:
        briefs = user_briefs(ids=[uid for uid, _, _ in others])
        body["read_by"] = [briefs[uid] for uid in read if uid in briefs]
        body["delivered_to"] = [briefs[uid] for uid in delivered if uid in briefs]
    return body


def visible_notifications(user: User) -> QuerySet[Notification]:
    """My notifications from threads I am still in: after I leave or am removed, or the thread is
    deleted, its notifications (and their excerpts, read from the message as it is now) are gone."""
    return Notification.objects.filter(recipient=user, thread__participants__user=user, thread__deleted_at__isnull=True)


def notification_list(
    *, user: User, unread_only: bool = False, before_id: int | None = None, limit: int = DEFAULT_PAGE
) -> dict[str, Any]:
    from messaging.services import notification_payload

    limit = max(1, min(int(limit), MAX_PAGE))
    visible = visible_notifications(user)
    qs = visible.select_related("message").order_by("-id")
    if unread_only:
        qs = qs.filter(read_at__isnull=True)
    if before_id is not None:
        qs = qs.filter(pk__lt=before_id)
    rows = list(qs[: limit + 1])
    items = [notification_payload(n) for n in rows[:limit]]
    return {
        "notifications": items,
        "unread_count": visible.filter(read_at__isnull=True).count(),
        "next_before": rows[limit - 1].pk if len(rows) > limit else None,
    }


def message_search(*, user: User, query: str, thread_id: int | None = None, limit: int = 20) -> dict[str, Any]:
    """Messages in my threads matching ``query``: PostgreSQL full-text search with ranking and
    highlights, or a word-by-word match on SQLite. Never returns another thread's messages."""
    query = (query or "").strip()
    if not query:
        raise InvalidInput(fields={"q": ["Must not be empty."]})
    if len(query) > 200:
        raise InvalidInput(fields={"q": ["At most 200 characters."]})
    limit = max(1, min(int(limit), MAX_PAGE))
    mine = ThreadParticipant.objects.filter(user=user, thread__deleted_at__isnull=True).values("thread_id")
    qs = Message.objects.filter(thread_id__in=mine, deleted_at__isnull=True)
    if thread_id is not None:
        qs = qs.filter(thread_id=thread_id)
    highlights: dict[int, str] = {}
    ranks: dict[int, float] = {}
    if connection.vendor == "postgresql":
        from django.contrib.postgres.search import SearchHeadline, SearchQuery, SearchRank, SearchVector

        vector = SearchVector("body", config="english")
        search = SearchQuery(query, config="english", search_type="websearch")
        rows = list(
            qs.annotate(search=vector)
            .filter(search=search)
            .annotate(
                rank=SearchRank(vector, search),
                headline=SearchHeadline(
                    "body", search, config="english", start_sel="<mark>", stop_sel="</mark>", max_words=30, min_words=10
                ),
            )
            .order_by("-rank", "-id")
            .values_list("pk", "rank", "headline")[:limit]
        )
        ids = [pk for pk, _, _ in rows]
        ranks = {pk: float(rank) for pk, rank, _ in rows}
        highlights = {pk: headline for pk, _, headline in rows}
    else:
        for word in query.split()[:10]:
            qs = qs.filter(body__icontains=word)
        ids = list(qs.order_by("-id").values_list("pk", flat=True)[:limit])
    payloads = message_payloads(ids=ids, viewer=user)
    import html

    results = []
    for pk in ids:
        if pk not in payloads:
            continue
        # The headline is built from raw text: escape it, then restore only our <mark> tags.
        highlight = highlights.get(pk)
        if highlight is not None:
            highlight = html.escape(highlight).replace("&lt;mark&gt;", "<mark>").replace("&lt;/mark&gt;", "</mark>")
        results.append({"message": payloads[pk], "rank": ranks.get(pk), "highlight": highlight})
    return {"query": query, "results": results}
