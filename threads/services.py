"""Writes for threads and participants. Each writes in a transaction and broadcasts after commit."""

from __future__ import annotations

from collections.abc import Iterable

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import AuditEntry, User
from chatapp.broadcast import thread_event_record, user_event_on_commit
from chatapp.cache import invalidate_on_commit
from chatapp.errors import Conflict, InvalidInput, NotFound
from threads import events, policy
from threads.models import Thread, ThreadKind, ThreadParticipant, ThreadRole
from threads.selectors import ThreadAccess, thread_get_for_member, thread_owner_count

MAX_INITIAL_PARTICIPANTS = 500
MAX_TITLE_LENGTH = 200


def _active_users(user_ids: Iterable[int], *, field: str = "participant_ids") -> list[User]:
    ids = sorted({int(uid) for uid in user_ids})
    users = list(User.objects.filter(pk__in=ids, is_active=True, deactivated_at__isnull=True))
    missing = set(ids) - {u.pk for u in users}
    if missing:
        raise InvalidInput("Unknown or inactive users.", fields={field: [f"Unknown user {sorted(missing)}"]})
    return users


def direct_key_for(a: int, b: int) -> str:
    low, high = sorted((a, b))
    return f"{low}:{high}"


def _check_title(title: str) -> str:
    title = title.strip()
    if len(title) > MAX_TITLE_LENGTH:
        raise InvalidInput(fields={"title": [f"At most {MAX_TITLE_LENGTH} characters."]})
    return title


def _access_locked(*, actor: User, thread_id: int, action: policy.Action) -> ThreadAccess:
    """The actor's access to a thread, checked again under the thread's row lock, for a change of its
    membership, roles or the thread itself.

    Every such change locks the thread's row first (``SELECT ... FOR NO KEY UPDATE``: the strength of
    the ``UPDATE`` a send's sequence takes, so it queues behind every writer of the thread, while
    inserts that only reference the thread, such as an upload, do not wait). What it then reads (the
    actor's role, the target's, the owners) cannot change until it commits: two owners leaving, demoting
    or removing each other at once are serialised, and the second sees what the first did. The first
    check, before the lock, keeps those who may not act from taking it at all. Must run inside a
    transaction; the lock order is the thread, then participant rows (as a send's read mark).
    """
    thread_get_for_member(thread_id=thread_id, user=actor, action=action)
    list(Thread.objects.select_for_update(no_key=True).filter(pk=thread_id).values_list("pk"))
    return thread_get_for_member(thread_id=thread_id, user=actor, action=action)


def thread_create(
    *, creator: User, title: str = "", participant_ids: Iterable[int] = (), kind: str = ThreadKind.GROUP
) -> tuple[Thread, bool]:
    """Create a thread with its creator as OWNER and the others as MEMBERs.

    A direct thread between two people is unique: asking again returns the existing one
    (``created`` is False). Broadcasts ``thread.created`` to every participant after commit.
    """
    if not policy.is_usable(creator):
        raise NotFound()
    others = [u for u in _active_users(participant_ids) if u.pk != creator.pk]
    if len(others) > MAX_INITIAL_PARTICIPANTS:
        raise InvalidInput(fields={"participant_ids": [f"At most {MAX_INITIAL_PARTICIPANTS} participants."]})
    title = _check_title(title)
    direct_key = None
    if kind == ThreadKind.DIRECT:
        if len(others) != 1:
            raise InvalidInput(fields={"participant_ids": ["A direct thread has exactly one other participant."]})
        direct_key = direct_key_for(creator.pk, others[0].pk)
        existing = Thread.objects.filter(direct_key=direct_key, deleted_at__isnull=True).first()
        if existing is not None:
            return existing, False
    elif kind != ThreadKind.GROUP:
        raise InvalidInput(fields={"kind": ["Must be DIRECT or GROUP."]})
    try:
        with transaction.atomic():
            thread = Thread.objects.create(title=title, kind=kind, direct_key=direct_key, created_by=creator)
            creator_role = ThreadRole.MEMBER if kind == ThreadKind.DIRECT else ThreadRole.OWNER
            rows = [ThreadParticipant(thread=thread, user=creator, role=creator_role)]
            rows += [ThreadParticipant(thread=thread, user=u, role=ThreadRole.MEMBER) for u in others]
            ThreadParticipant.objects.bulk_create(rows)
            participants = list(ThreadParticipant.objects.filter(thread=thread).select_related("user"))
            thread_event_record(
                thread_id=thread.pk,
                type="thread.created",
                data={
                    "thread": events.thread_payload(thread),
                    "participants": [events.participant_payload(p) for p in participants],
                },
            )
            thread.refresh_from_db(fields=["last_sequence"])
            for p in participants:
                user_event_on_commit(
                    user_id=p.user_id,
                    type="thread.created",
                    data={"thread": events.thread_payload(thread), "role": p.role},
                )
    except IntegrityError:
        # Two people opened the same direct thread at once; the other transaction won.
        existing = Thread.objects.filter(direct_key=direct_key, deleted_at__isnull=True).first()
        if direct_key is None or existing is None:
            raise
        return existing, False
    return thread, True


@transaction.atomic
def thread_rename(*, actor: User, thread_id: int, title: str) -> Thread:
    """Rename (last write wins). Broadcasts ``thread.updated``."""
    access = _access_locked(actor=actor, thread_id=thread_id, action=policy.Action.RENAME)
    thread = access.thread
    thread.title = _check_title(title)
    thread.save(update_fields=["title", "updated_at"])
    invalidate_on_commit("thread", [thread.pk])
    thread_event_record(
        thread_id=thread.pk, type="thread.updated", data={"thread": events.thread_payload(thread), "by": actor.pk}
    )
    return thread


@transaction.atomic
def thread_delete(*, actor: User, thread_id: int) -> None:
    """Soft-delete a thread (OWNER). Broadcasts ``thread.deleted`` to the thread and each member."""
    access = _access_locked(actor=actor, thread_id=thread_id, action=policy.Action.DELETE_THREAD)
    thread = access.thread
    member_ids = list(ThreadParticipant.objects.filter(thread=thread).values_list("user_id", flat=True))
    thread_event_record(thread_id=thread.pk, type="thread.deleted", data={"thread_id": thread.pk, "by": actor.pk})
    thread.deleted_at = timezone.now()
    thread.save(update_fields=["deleted_at", "updated_at"])
    invalidate_on_commit("thread", [thread.pk])
    AuditEntry.record(actor=actor, action="thread.delete", target=thread, thread_id=thread.pk)
    for uid in member_ids:
        user_event_on_commit(user_id=uid, type="thread.deleted", data={"thread_id": thread.pk})


@transaction.atomic
def participant_settings_update(
    *, user: User, thread_id: int, archived: bool | None = None, muted: bool | None = None
) -> ThreadParticipant:
    """Archive/unarchive or mute/unmute a thread for this user only. Notifies the user's other sockets."""
    access = thread_get_for_member(thread_id=thread_id, user=user)
    if access.participant is None:
        raise NotFound("You are not a participant of this thread.")
    participant = access.participant
    fields = []
    if archived is not None and archived != (participant.archived_at is not None):
        participant.archived_at = timezone.now() if archived else None
        fields.append("archived_at")
    if muted is not None and muted != participant.muted:
        participant.muted = muted
        fields.append("muted")
    if fields:
        participant.save(update_fields=fields)
        user_event_on_commit(
            user_id=user.pk,
            type="thread.membership_updated",
            data={"thread_id": thread_id, "archived": participant.archived_at is not None, "muted": participant.muted},
        )
    return participant


@transaction.atomic
def participant_add(
    *, actor: User, thread_id: int, user_id: int, role: str = ThreadRole.MEMBER
) -> tuple[ThreadParticipant, bool]:
    """Add a user (ADMIN+; only OWNERs grant ADMIN/OWNER). Broadcasts ``thread.participant_added``.

    Idempotent: adding a participant again with the same role returns them (``created`` False);
    with another role it is a Conflict (roles change through ``participant_change_role``). A new
    participant has read and been delivered everything before they joined: the thread's history
    is not unread for them, and their marks do not lower the receipts of earlier messages.
    """
    if role not in ThreadRole.values:
        raise InvalidInput(fields={"role": [f"Must be one of {', '.join(ThreadRole.values)}."]})
    access = _access_locked(actor=actor, thread_id=thread_id, action=policy.Action.ADD_MEMBER)
    policy.check_grant(actor_role=access.role, new_role=role)
    (user,) = _active_users([user_id], field="user_id")
    participant, created = ThreadParticipant.objects.get_or_create(
        thread=access.thread, user=user, defaults={"role": role}
    )
    if not created:
        if participant.role != role:
            raise Conflict(
                f"Already a participant, as {participant.role}; change the role instead.",
                reason="already_participant",
            )
        return participant, False
    participant.user = user
    event = thread_event_record(
        thread_id=thread_id,
        type="thread.participant_added",
        data={"participant": events.participant_payload(participant), "by": actor.pk},
    )
    # Caught up to their own arrival (the event above is the thread's newest).
    participant.last_read_sequence = participant.last_delivered_sequence = event["seq"]
    participant.save(update_fields=["last_read_sequence", "last_delivered_sequence"])
    access.thread.refresh_from_db(fields=["last_sequence"])
    user_event_on_commit(
        user_id=user.pk, type="thread.created", data={"thread": events.thread_payload(access.thread), "role": role}
    )
    return participant, True


def _participant_for_update(thread_id: int, user_id: int) -> ThreadParticipant:
    participant = (
        ThreadParticipant.objects.select_for_update()
        .select_related("user")
        .filter(thread_id=thread_id, user_id=user_id)
        .first()
    )
    if participant is None:
        raise NotFound("That user is not a participant.")
    return participant


def _remove(*, actor: User, participant: ThreadParticipant, reason: str) -> None:
    thread_id = participant.thread_id
    participant.delete()
    thread_event_record(
        thread_id=thread_id,
        type="thread.participant_removed",
        data={"user_id": participant.user_id, "by": actor.pk, "reason": reason},
    )
    # Every socket of the removed user drops the thread's group when this arrives.
    user_event_on_commit(
        user_id=participant.user_id, type="thread.removed", data={"thread_id": thread_id, "reason": reason}
    )


@transaction.atomic
def participant_remove(*, actor: User, thread_id: int, user_id: int) -> None:
    """Remove someone (ADMIN+; an ADMIN removes MEMBERs only; never the last OWNER).

    Broadcasts ``thread.participant_removed`` to the thread and ``thread.removed`` to the user.
    """
    if user_id == actor.pk:
        thread_leave(user=actor, thread_id=thread_id)
        return
    access = _access_locked(actor=actor, thread_id=thread_id, action=policy.Action.REMOVE_MEMBER)
    target = _participant_for_update(thread_id, user_id)
    policy.check_manage_target(actor_role=access.role, target_role=target.role)
    policy.check_not_last_owner(owners=thread_owner_count(thread_id=thread_id), target_role=target.role)
    _remove(actor=actor, participant=target, reason="removed")
    AuditEntry.record(actor=actor, action="participant.remove", target=target.user, thread_id=thread_id)


@transaction.atomic
def thread_leave(*, user: User, thread_id: int) -> None:
    """Leave a thread; the last OWNER must hand over first (409). Broadcasts as ``participant_remove``."""
    access = _access_locked(actor=user, thread_id=thread_id, action=policy.Action.LEAVE)
    if access.participant is None:
        raise NotFound("You are not a participant of this thread.")
    target = _participant_for_update(thread_id, user.pk)
    policy.check_not_last_owner(owners=thread_owner_count(thread_id=thread_id), target_role=target.role)
    _remove(actor=user, participant=target, reason="left")


@transaction.atomic
def participant_change_role(*, actor: User, thread_id: int, user_id: int, role: str) -> ThreadParticipant:
    """Change a thread role (OWNER). The last OWNER cannot be demoted. Broadcasts ``thread.role_changed``."""
    if role not in ThreadRole.values:
        raise InvalidInput(fields={"role": [f"Must be one of {', '.join(ThreadRole.values)}."]})
    access = _access_locked(actor=actor, thread_id=thread_id, action=policy.Action.CHANGE_ROLE)
    target = _participant_for_update(thread_id, user_id)
    policy.check_manage_target(actor_role=access.role, target_role=target.role, new_role=role)
    policy.check_not_last_owner(owners=thread_owner_count(thread_id=thread_id), target_role=target.role, new_role=role)
    if target.role == role:
        return target
    previous = target.role
    target.role = role
    target.save(update_fields=["role"])
    thread_event_record(
        thread_id=thread_id,
        type="thread.role_changed",
        data={"user_id": user_id, "role": role, "previous": previous, "by": actor.pk},
    )
    AuditEntry.record(
        actor=actor,
        action="participant.role_change",
        target=target.user,
        thread_id=thread_id,
        role=role,
        previous=previous,
    )
    return target
