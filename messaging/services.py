"""Writes for messages, reactions, receipts and notifications.

Each function is the only code path for its change: the REST views and the socket consumer
both call it. Each writes in a transaction and broadcasts after commit (chatapp.broadcast).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import merge3
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import prefetch_related_objects
from django.utils import timezone

from accounts.models import AuditEntry, User
from chatapp.broadcast import (
    broadcast_on_commit,
    sequence_next,
    thread_event_record,
    thread_group,
    user_event_on_commit,
)
from chatapp.cache import invalidate, invalidate_on_commit
from chatapp.errors import Conflict, InvalidInput, NotFound, RateLimited, TooLarge
from messaging import events
from messaging.models import Message, MessageEdit, Notification, NotificationKind, Reaction
from messaging.ratelimits import send_budget_consume
from messaging.rendering import mentioned_usernames, render_body
from threads import policy
from threads.models import Thread, ThreadEvent, ThreadKind, ThreadParticipant
from threads.selectors import thread_get_for_member

CLIENT_MSG_ID_MAX_LENGTH = 64
CLIENT_MSG_ID_RE = re.compile(rf"^[A-Za-z0-9_.:-]{{1,{CLIENT_MSG_ID_MAX_LENGTH}}}$")
MAX_EMOJI_LENGTH = 32


def _check_body(body: str, *, allow_empty: bool = False) -> str:
    if not isinstance(body, str):
        raise InvalidInput(fields={"body": ["Must be text."]})
    if len(body.encode()) > settings.CHAT_MAX_MESSAGE_BYTES:
        raise TooLarge(f"A message body is limited to {settings.CHAT_MAX_MESSAGE_BYTES // 1024} KB.")
    if "\x00" in body:
        raise InvalidInput(fields={"body": ["Must not contain NUL characters."]})
    if not allow_empty and not body.strip():
        raise InvalidInput(fields={"body": ["Must not be empty."]})
    return body


def message_get_with_relations(*, message_id: int) -> Message:
    return (
        Message.objects.select_related("sender", "reply_to")
        .prefetch_related("reactions", "attachments")
        .get(pk=message_id)
    )


def _message_for_action(*, actor: User, message_id: int, action: policy.Action) -> tuple[Message, policy.ThreadRole]:
    try:
        message = Message.objects.select_related("thread").get(pk=message_id)
    except (Message.DoesNotExist, ValueError, TypeError):
        raise NotFound("Message not found.") from None
    try:
        access = thread_get_for_member(thread_id=message.thread_id, user=actor, action=action)
    except NotFound:
        raise NotFound("Message not found.") from None
    return message, access.role


def _lock_message(message_id: int, *, actor: User, action: policy.Action) -> tuple[Message, policy.ThreadRole]:
    """Lock a message for a change, in the order every message write uses: the message row first
    (FOR NO KEY UPDATE, which a reply's foreign-key check does not wait for), then its thread's (where
    sequences are taken). Read under both, the message is current and no write in the thread
    (a reply quoting it, a reaction) commits between this change and its event. The actor's role is
    read again under them too (membership changes take the thread's lock): a removal or demotion that
    committed while this write waited is seen, and the write refused."""
    message = Message.objects.select_for_update(no_key=True).get(pk=message_id)
    Thread.objects.select_for_update().filter(pk=message.thread_id).values_list("pk").get()
    try:
        access = thread_get_for_member(thread_id=message.thread_id, user=actor, action=action)
    except NotFound:
        raise NotFound("Message not found.") from None
    return message, access.role


def _existing_send(*, sender: User, client_msg_id: str, thread_id: int) -> Message | None:
    existing = Message.objects.filter(sender=sender, client_msg_id=client_msg_id).first()
    if existing is not None and existing.thread_id != thread_id:
        raise Conflict("This client_msg_id was already used for another thread.", reason="client_msg_id_reused")
    return existing


def _relations_known(message: Message, *, sender: User, attachments: bool) -> None:
    """A new message's relations without queries: its sender, no reactions, its attachments.

    Stored the way ``prefetch_related`` stores results (a queryset with its result cache filled),
    so that the event here and the caller's reply (the REST response builds the payload again)
    read them without a query, nor a query compiled to find out it is empty.
    """
    from attachments.models import Attachment

    message.sender = sender
    known: dict[str, Any] = {"reactions": _evaluated(Reaction.objects.none())}
    if not attachments:
        known["attachments"] = _evaluated(Attachment.objects.none())
    message._prefetched_objects_cache = known  # type: ignore[attr-defined]
    if attachments:
        prefetch_related_objects([message], "attachments")


def _evaluated(queryset: Any) -> Any:
    queryset._result_cache = []
    queryset._prefetch_done = True
    return queryset


def message_send(
    *,
    sender: User,
    thread_id: int,
    body: str,
    client_msg_id: str,
    reply_to_id: int | None = None,
    attachment_ids: Sequence[int] = (),
) -> tuple[Message, bool]:
    """Store a message and broadcast ``message.created`` after commit.

    Idempotent per (sender, client_msg_id): a retry returns the original message and
    ``created`` False, never a second row, and does not spend the send budget (nor is it refused by
    it). The budget is spent before the thread's lock is taken. Raises NotFound (not a member),
    InvalidInput, TooLarge, RateLimited.
    """
    if not isinstance(client_msg_id, str) or not CLIENT_MSG_ID_RE.match(client_msg_id):
        raise InvalidInput(
            fields={
                "client_msg_id": [f"1-{CLIENT_MSG_ID_MAX_LENGTH} characters of letters, digits, '_', '.', ':' or '-'."]
            }
        )
    access = thread_get_for_member(thread_id=thread_id, user=sender, action=policy.Action.SEND)
    body = _check_body(body, allow_empty=bool(attachment_ids))
    # Everything that does not need the sequence happens before the thread's lock is taken: writers
    # in one thread queue on it, so the time it is held bounds how fast a busy thread can go.
    reply_to = None
    if reply_to_id is not None:
        reply_to = Message.objects.filter(pk=reply_to_id, thread_id=thread_id).select_related("sender").first()
        if reply_to is None:
            raise InvalidInput(fields={"reply_to": ["No such message in this thread."]})
    message = Message(
        thread_id=thread_id,
        sender=sender,
        body=body,
        body_html=render_body(body),
        reply_to=reply_to,
        client_msg_id=client_msg_id,
    )
    notify = _notification_kinds(message=message, thread=access.thread)
    # The cache and the budget are Redis calls: made before the lock, under which nothing slow runs.
    # A reply changes its parent's reply_count: its cached payload goes now and again after commit
    # (a read in between may have cached the old count), as invalidate_on_commit does.
    parent = [reply_to.pk] if reply_to is not None else []
    if parent:
        invalidate("message", parent)
    try:
        spent = send_budget_consume(user=sender)
    except RateLimited:
        # A retry of a stored message is answered whatever the budget says (it is not a new send).
        existing = _existing_send(sender=sender, client_msg_id=client_msg_id, thread_id=thread_id)
        if existing is None:
            raise
        return existing, False
    try:
        with transaction.atomic():
            # Taking the sequence locks the thread row until commit. A retry (the same
            # client_msg_id, stored before or committed meanwhile) fails the insert on the unique
            # (sender, client_msg_id); the rollback gives the number back and the retry is answered
            # with the original (below), without a lookup on every first send.
            message.sequence = sequence_next(thread_id, last_message_at=timezone.now())
            message.save(force_insert=True)
            if attachment_ids:
                from attachments.services import attachments_attach

                attachments_attach(uploader=sender, message=message, attachment_ids=list(attachment_ids))
            marked = _own_message_read(thread_id=thread_id, user_id=sender.pk, seq=message.sequence)
            if access.participant is not None and not marked:
                # The sender's membership, read again under the thread's lock (a statement taken after
                # it, so it sees a removal committed while this send waited): removed meanwhile.
                raise NotFound("Thread not found.")
            _relations_known(message, sender=sender, attachments=bool(attachment_ids))
            if parent:
                transaction.on_commit(lambda: invalidate("message", parent))  # (above)
            thread_event_record(
                thread_id=thread_id,
                type="message.created",
                data={"message": events.message_payload(message)},
                message_id=message.pk,
                sequence=message.sequence,
            )
            if notify:
                _notifications_create(message=message, kinds=notify)
    except IntegrityError:
        # A retry: this client_msg_id is stored already (by an earlier send, or a concurrent one).
        spent.give_back()  # a retry never spends the budget
        existing = _existing_send(sender=sender, client_msg_id=client_msg_id, thread_id=thread_id)
        if existing is None:
            raise
        return existing, False
    return message, True


def _own_message_read(*, thread_id: int, user_id: int, seq: int) -> bool:
    """The sender has read (and received) their own message: raise both marks to ``seq``.
    False when the sender has no participant row (not, or no longer, a member) or is no longer an
    active account: a deactivation (or a Clerk ban or deletion) committed while this send waited
    for the thread's lock refuses the send, however briefly the sender's socket outlived it.

    One plain statement (portable SQL, identifiers from the model's metadata): it runs under the
    thread's lock, where the ORM's expression compiling cost more than the write itself.
    """
    connection = transaction.get_connection()
    meta, quote, users = ThreadParticipant._meta, connection.ops.quote_name, User
    column = {field.name: quote(field.column) for field in meta.concrete_fields}
    read, delivered = column["last_read_sequence"], column["last_delivered_sequence"]
    thread, user = column["thread"], column["user"]
    sql = (
        f"UPDATE {quote(meta.db_table)} SET {read} = CASE WHEN {read} < %s THEN %s ELSE {read} END, "  # noqa: S608
        f"{delivered} = CASE WHEN {delivered} < %s THEN %s ELSE {delivered} END WHERE {thread} = %s AND {user} = %s"
        f" AND EXISTS (SELECT 1 FROM {quote(users._meta.db_table)} WHERE {quote(users._meta.pk.column)} = %s"
        f" AND {quote(users._meta.get_field('is_active').column)} = %s)"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [seq, seq, seq, seq, thread_id, user_id, user_id, True])
        return bool(cursor.rowcount)


def _notification_kinds(*, message: Message, thread: Thread) -> dict[int, str]:
    """Who hears of a new message: mentions, replies to someone, direct messages (by user id)."""
    kinds: dict[int, str] = {}
    parent, names = message.reply_to, mentioned_usernames(message.body)
    replied = parent is not None and parent.sender_id != message.sender_id
    if thread.kind != ThreadKind.DIRECT and not replied and not names:
        return kinds  # the usual message: no query built (building one costs more than running it)
    participants = ThreadParticipant.objects.filter(thread_id=thread.pk).exclude(user_id=message.sender_id)
    if thread.kind == ThreadKind.DIRECT:
        for uid in participants.filter(muted=False).values_list("user_id", flat=True):
            kinds[uid] = NotificationKind.DIRECT
    if replied and parent is not None and participants.filter(user_id=parent.sender_id).exists():
        kinds[parent.sender_id] = NotificationKind.REPLY
    if names:
        for uid in participants.filter(user__username__in=names).values_list("user_id", flat=True):
            kinds[uid] = NotificationKind.MENTION
    return kinds


def _notifications_create(*, message: Message, kinds: dict[int, str]) -> None:
    """Store the notifications and send each to its recipient (after commit)."""
    rows = Notification.objects.bulk_create(
        [
            Notification(
                recipient_id=uid, kind=kind, thread_id=message.thread_id, message=message, actor_id=message.sender_id
            )
            for uid, kind in kinds.items()
        ]
    )
    for row in rows:
        user_event_on_commit(
            user_id=row.recipient_id, type="notification", data=notification_payload(row, message=message)
        )


def notification_payload(notification: Notification, *, message: Message | None = None) -> dict[str, Any]:
    message = message or notification.message
    return {
        "id": notification.pk,
        "kind": notification.kind,
        "thread_id": notification.thread_id,
        "message_id": notification.message_id,
        "seq": message.sequence,
        "actor_id": notification.actor_id,
        "excerpt": "" if message.is_deleted else message.body[:140],
        "created_at": notification.created_at.isoformat() if notification.created_at else None,
        "read_at": notification.read_at.isoformat() if notification.read_at else None,
    }


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s+|[^\s]+", text)


def three_way_merge(*, base: str, current: str, mine: str) -> str | None:
    """Merge two edits of ``base`` word by word (merge3); None when they touch the same words."""
    merger = merge3.Merge3(_tokens(base), _tokens(current), _tokens(mine))
    out: list[str] = []
    for region in merger.merge_regions():
        kind = region[0]
        if kind == "conflict":
            return None
        if kind in ("unchanged", "same", "a"):
            out.extend(merger.a[region[1] : region[2]] if kind != "unchanged" else merger.base[region[1] : region[2]])
        elif kind == "b":
            out.extend(merger.b[region[1] : region[2]])
    return "".join(out)


def message_edit(*, actor: User, message_id: int, body: str, expected_version: int) -> tuple[Message, bool]:
    """Edit the author's own message, keeping history. Broadcasts ``message.updated``.

    ``expected_version`` is the version the client edited. If another edit landed since,
    the two are merged three-way (``merged`` True) when they do not overlap; otherwise
    Conflict (409) carries the current message so the client can resolve it.
    """
    body = _check_body(body)
    with transaction.atomic():
        message, role = _message_for_action(actor=actor, message_id=message_id, action=policy.Action.EDIT_OWN)
        policy.check_message_author(
            user=actor, author_id=message.sender_id, role=role, own=policy.Action.EDIT_OWN, other=None
        )
        message, _ = _lock_message(message.pk, actor=actor, action=policy.Action.EDIT_OWN)
        if message.is_deleted:
            raise Conflict("The message was deleted.", reason="deleted")
        merged = False
        if expected_version != message.version:
            if not 1 <= expected_version < message.version:
                raise InvalidInput(fields={"version": [f"Unknown version {expected_version}."]})
            base = (
                MessageEdit.objects.filter(message=message, version=expected_version)
                .values_list("previous_body", flat=True)
                .first()
            )
            result = None if base is None else three_way_merge(base=base, current=message.body, mine=body)
            if result is None:
                current = events.message_payload(message_get_with_relations(message_id=message.pk))
                raise Conflict(
                    "The message was edited meanwhile and the edits overlap.", reason="edit_conflict", current=current
                )
            body, merged = _check_body(result), True
        if body == message.body:
            return message_get_with_relations(message_id=message.pk), merged
        MessageEdit.objects.create(message=message, version=message.version, previous_body=message.body, editor=actor)
        message.body = body
        message.body_html = render_body(body)
        message.version += 1
        message.edited_at = timezone.now()
        message.save(update_fields=["body", "body_html", "version", "edited_at"])
        _invalidate_message(message)
        message = message_get_with_relations(message_id=message.pk)
        thread_event_record(
            thread_id=message.thread_id,
            type="message.updated",
            data={"message": events.message_payload(message), "merged": merged},
            message_id=message.pk,
        )
    return message, merged


def _check_may_delete(*, actor: User, message: Message, role: policy.ThreadRole) -> None:
    policy.check_message_author(
        user=actor, author_id=message.sender_id, role=role, own=policy.Action.DELETE_OWN, other=policy.Action.MODERATE
    )


def message_delete(*, actor: User, message_id: int) -> Message:
    """Soft-delete: a tombstone stays, the body, reactions and files are gone. Broadcasts ``message.deleted``.

    Authors delete their own; thread ADMIN/OWNER (and system ADMIN/OWNER) moderate anyone's.
    Earlier events of the message are scrubbed so a resume never replays the old body.
    """
    with transaction.atomic():
        message, role = _message_for_action(actor=actor, message_id=message_id, action=policy.Action.DELETE_OWN)
        _check_may_delete(actor=actor, message=message, role=role)
        message, role = _lock_message(message.pk, actor=actor, action=policy.Action.DELETE_OWN)
        _check_may_delete(actor=actor, message=message, role=role)  # a moderator demoted meanwhile
        if message.is_deleted:
            return message_get_with_relations(message_id=message.pk)
        removed_body = message.body
        message.deleted_at = timezone.now()
        message.deleted_by = actor
        message.body = ""
        message.body_html = ""
        message.save(update_fields=["deleted_at", "deleted_by", "body", "body_html"])
        _invalidate_message(message)
        Reaction.objects.filter(message=message).delete()
        from attachments.services import attachments_revoke_for_message

        attachments_revoke_for_message(message=message)
        message = message_get_with_relations(message_id=message.pk)
        tombstone = events.message_payload(message)
        _scrub_events(message_id=message.pk, tombstone=tombstone)
        thread_event_record(
            thread_id=message.thread_id,
            type="message.deleted",
            data={"message": tombstone, "by": actor.pk},
            message_id=message.pk,
        )
        if actor.pk != message.sender_id:
            # Staff can restore a moderated message, so its text is kept in the (staff-only) audit log.
            AuditEntry.record(
                actor=actor,
                action="message.moderate_delete",
                target=message,
                thread_id=message.thread_id,
                body=removed_body,
            )
    return message


def _scrub_events(*, message_id: int, tombstone: dict[str, Any]) -> None:
    """Take a deleted message's text out of the replayable log: its own events, and the excerpt that
    the events of its replies quote."""
    for event in ThreadEvent.objects.filter(message_id=message_id):
        data = dict(event.payload.get("data", {}))
        if "message" in data:
            data["message"] = tombstone
            event.payload = {**event.payload, "data": data}
            event.save(update_fields=["payload"])
    replies = Message.objects.filter(reply_to_id=message_id).values("pk")
    for event in ThreadEvent.objects.filter(message_id__in=replies):
        data = dict(event.payload.get("data", {}))
        quoted = (data.get("message") or {}).get("reply_to")
        if quoted and quoted.get("id") == message_id:
            data["message"] = {**data["message"], "reply_to": {**quoted, "excerpt": "", "deleted": True}}
            event.payload = {**event.payload, "data": data}
            event.save(update_fields=["payload"])
    MessageEdit.objects.filter(message_id=message_id).update(previous_body="")


@transaction.atomic
def message_restore(*, actor: User, message_id: int) -> Message:
    """Undo a moderator's delete (MODERATE), with the text kept in the audit log. Broadcasts ``message.updated``.

    A message its author deleted is gone for good: Conflict.
    """
    message, _ = _message_for_action(actor=actor, message_id=message_id, action=policy.Action.MODERATE)
    message, _ = _lock_message(message.pk, actor=actor, action=policy.Action.MODERATE)
    if not message.is_deleted:
        return message
    entry = (
        AuditEntry.objects.filter(action="message.moderate_delete", target_type="Message", target_id=str(message.pk))
        .order_by("-created_at", "-id")
        .first()
    )
    if entry is None or message.deleted_by_id == message.sender_id:
        raise Conflict("Only a message removed by a moderator can be restored.", reason="not_restorable")
    body = str(entry.data.get("body", ""))
    message.deleted_at = None
    message.deleted_by = None
    message.body = body
    message.body_html = render_body(body)
    # The tombstone was a version of its own: the history keeps every number (its text is gone, as
    # the earlier versions' were scrubbed by the delete).
    MessageEdit.objects.create(message=message, version=message.version, previous_body="", editor=actor)
    message.version += 1
    message.save(update_fields=["deleted_at", "deleted_by", "body", "body_html", "version"])
    _invalidate_message(message)
    message = message_get_with_relations(message_id=message.pk)
    thread_event_record(
        thread_id=message.thread_id,
        type="message.updated",
        data={"message": events.message_payload(message), "merged": False},
        message_id=message.pk,
    )
    AuditEntry.record(actor=actor, action="message.restore", target=message, thread_id=message.thread_id)
    return message


def _check_emoji(emoji: str) -> str:
    emoji = (emoji or "").strip()
    if not emoji or len(emoji) > MAX_EMOJI_LENGTH or any(ch.isspace() for ch in emoji) or "<" in emoji:
        raise InvalidInput(fields={"emoji": ["One emoji (or :short_name:), at most 32 characters."]})
    return emoji


def _invalidate_message(message: Message) -> None:
    """A message's cached payload, those of its replies (they quote it) and its parent's (its
    ``reply_count`` counts live replies: a delete or restore changes it)."""
    reply_ids = list(Message.objects.filter(reply_to_id=message.pk).values_list("pk", flat=True))
    parent = [message.reply_to_id] if message.reply_to_id else []
    invalidate_on_commit("message", [message.pk, *reply_ids, *parent])


def _reaction_event(*, message: Message, type: str, actor: User, emoji: str) -> None:
    invalidate_on_commit("message", [message.pk])
    reactions = list(Reaction.objects.filter(message=message))
    thread_event_record(
        thread_id=message.thread_id,
        type=type,
        data={
            "message_id": message.pk,
            "emoji": emoji,
            "user_id": actor.pk,
            "reactions": events.reactions_summary(reactions),
        },
        message_id=message.pk,
    )


def _message_for_reaction(*, actor: User, message_id: int) -> Message:
    """The message, locked: its state (deleted?) is read under the lock, so a reaction never lands on
    a message deleted meanwhile."""
    message, _ = _message_for_action(actor=actor, message_id=message_id, action=policy.Action.REACT)
    return _lock_message(message.pk, actor=actor, action=policy.Action.REACT)[0]


def reaction_add(*, actor: User, message_id: int, emoji: str) -> bool:
    """Add my reaction (idempotent: False if it was there). Broadcasts ``reaction.added``."""
    emoji = _check_emoji(emoji)
    with transaction.atomic():
        message = _message_for_reaction(actor=actor, message_id=message_id)
        if message.is_deleted:
            raise Conflict("The message was deleted.", reason="deleted")
        _, created = Reaction.objects.get_or_create(message=message, user=actor, emoji=emoji)
        if created:
            _reaction_event(message=message, type="reaction.added", actor=actor, emoji=emoji)
    return created


def reaction_remove(*, actor: User, message_id: int, emoji: str) -> bool:
    """Remove my reaction (idempotent). Broadcasts ``reaction.removed``."""
    emoji = _check_emoji(emoji)
    with transaction.atomic():
        message = _message_for_reaction(actor=actor, message_id=message_id)
        deleted, _ = Reaction.objects.filter(message=message, user=actor, emoji=emoji).delete()
        if deleted:
            _reaction_event(message=message, type="reaction.removed", actor=actor, emoji=emoji)
    return bool(deleted)


def receipt_mark(
    *, user: User, thread_id: int, read_up_to: int | None = None, delivered_up_to: int | None = None
) -> ThreadParticipant:
    """Move my read/delivered marks forward (never back). Broadcasts ``receipt`` when a mark moved.

    Marks are per thread ("up to" a sequence), so a busy thread costs one row per reader.
    """
    access = thread_get_for_member(thread_id=thread_id, user=user)
    if access.participant is None:
        raise NotFound("You are not a participant of this thread.")
    last = access.thread.last_sequence
    read = min(int(read_up_to), last) if read_up_to is not None else None
    delivered = min(int(delivered_up_to), last) if delivered_up_to is not None else None
    if read is not None:
        delivered = max(delivered or 0, read)
    with transaction.atomic():
        participant = ThreadParticipant.objects.select_for_update().get(pk=access.participant.pk)
        changed: list[str] = []
        if read is not None and read > participant.last_read_sequence:
            participant.last_read_sequence = read
            changed.append("last_read_sequence")
        if delivered is not None and delivered > participant.last_delivered_sequence:
            participant.last_delivered_sequence = delivered
            changed.append("last_delivered_sequence")
        if changed:
            participant.save(update_fields=changed)
            broadcast_on_commit(
                group=thread_group(thread_id),
                event={
                    "type": "receipt",
                    "thread_id": thread_id,
                    "data": {
                        "user_id": user.pk,
                        "read": participant.last_read_sequence,
                        "delivered": participant.last_delivered_sequence,
                    },
                },
            )
    return participant


@transaction.atomic
def notifications_mark_read(*, user: User, ids: Sequence[int] | None = None, thread_id: int | None = None) -> int:
    """Mark my notifications read (some, those of a thread, or all). Returns how many changed."""
    from messaging.selectors import visible_notifications

    qs = visible_notifications(user).filter(read_at__isnull=True)
    if ids is not None:
        qs = qs.filter(pk__in=list(ids))
    if thread_id is not None:
        qs = qs.filter(thread_id=thread_id)
    changed = list(qs.values_list("pk", flat=True))
    if changed:
        Notification.objects.filter(pk__in=changed).update(read_at=timezone.now())
        user_event_on_commit(user_id=user.pk, type="notification.read", data={"ids": changed})
    return len(changed)
