"""Concurrent writes on real PostgreSQL, in a forced order: every message write locks the message row
(FOR NO KEY UPDATE) before the thread's, so a delete racing a reply or a reaction neither deadlocks
nor leaves a reaction on a tombstone, and a send that waited for the thread's lock re-checks what
changed meanwhile (the thread deleted, the sender removed). Every membership change (leave, remove,
role change, add) takes the thread's row lock before it reads the roles it checks, so two owners leaving,
demoting or removing each other at once always leave an owner.

Each race holds the thread's row lock from the test, starts the writers one after the other (each
until it waits on a lock, seen in pg_stat_activity), then lets them go in that queue order."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connection, transaction

from accounts.models import User
from accounts.services import user_deactivate
from chatapp.broadcast import thread_group, user_group
from chatapp.errors import Conflict, Forbidden, NotFound
from messaging.models import Message, Reaction
from messaging.services import message_delete, message_send, reaction_add
from tests.conftest import EventCapture, needs
from threads.models import Thread, ThreadEvent, ThreadParticipant, ThreadRole
from threads.services import (
    participant_add,
    participant_change_role,
    participant_remove,
    thread_create,
    thread_delete,
    thread_leave,
)

pytestmark = pytest.mark.django_db(transaction=True)


def lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return int(cursor.fetchone()[0])


def wait_for_waiters(count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while lock_waiters() < count:
        assert time.monotonic() < deadline, f"expected {count} writers waiting on a lock"
        time.sleep(0.02)


class Writer(threading.Thread):
    """Runs one service call on its own connection and keeps its result or exception."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as exc:  # kept for the test to assert on
            self.error = exc
        finally:
            connection.close()


@contextmanager
def thread_locked(thread_id: int) -> Iterator[None]:
    """Hold the thread's row lock (as a writer in the thread would) until the block ends."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                Thread.objects.select_for_update().filter(pk=thread_id).values_list("pk").get()
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert locked.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(10)


def race(thread_id: int, *calls: Callable[[], Any]) -> list[Writer]:
    """Start ``calls`` in order, each once the previous waits on a lock; then release them all."""
    writers = [Writer(call) for call in calls]
    with thread_locked(thread_id):
        for n, writer in enumerate(writers, start=1):
            writer.start()
            wait_for_waiters(n)
    for writer in writers:
        writer.join(30)
        assert not writer.is_alive()
    return writers


@pytest.fixture
def parent(alice: User, thread: Thread) -> Message:
    needs("postgres")
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="the parent", client_msg_id="parent")
    return message


def test_a_reply_racing_the_delete_of_its_parent_does_not_deadlock(
    alice: User, bob: User, thread: Thread, parent: Message
) -> None:
    # The reply takes the thread's lock first; the delete has locked the parent and waits for the thread.
    reply, delete = race(
        thread.pk,
        lambda: message_send(sender=bob, thread_id=thread.pk, body="re", client_msg_id="re", reply_to_id=parent.pk),
        lambda: message_delete(actor=alice, message_id=parent.pk),
    )
    assert (reply.error, delete.error) == (None, None)
    stored = Message.objects.get(client_msg_id="re")
    assert stored.reply_to_id == parent.pk
    assert Message.objects.get(pk=parent.pk).is_deleted
    # The reply was logged before the delete, and the delete scrubbed the text it quoted.
    created = ThreadEvent.objects.get(message_id=stored.pk, type="message.created")
    deleted = ThreadEvent.objects.get(message_id=parent.pk, type="message.deleted")
    assert created.sequence < deleted.sequence
    assert created.payload["data"]["message"]["reply_to"]["excerpt"] == ""
    assert "the parent" not in str(ThreadEvent.objects.filter(thread=thread).values_list("payload", flat=True))


def test_a_reaction_racing_a_delete_never_stays_on_the_tombstone(
    alice: User, bob: User, thread: Thread, parent: Message
) -> None:
    # Reaction first: it lands, then the delete takes it away with the body. No deadlock.
    react, delete = race(
        thread.pk,
        lambda: reaction_add(actor=bob, message_id=parent.pk, emoji="👍"),
        lambda: message_delete(actor=alice, message_id=parent.pk),
    )
    assert (react.error, delete.error, react.result) == (None, None, True)
    assert not Reaction.objects.filter(message=parent).exists()
    types = list(ThreadEvent.objects.filter(thread=thread).order_by("sequence").values_list("type", flat=True))
    assert types[-2:] == ["reaction.added", "message.deleted"]


def test_a_reaction_after_a_delete_is_refused(alice: User, bob: User, thread: Thread, parent: Message) -> None:
    # Delete first: the reaction, which read the message before the delete committed, is refused.
    delete, react = race(
        thread.pk,
        lambda: message_delete(actor=alice, message_id=parent.pk),
        lambda: reaction_add(actor=bob, message_id=parent.pk, emoji="👍"),
    )
    assert delete.error is None
    assert isinstance(react.error, Conflict)
    assert not Reaction.objects.filter(message=parent).exists()
    assert ThreadEvent.objects.filter(thread=thread).order_by("sequence").last().type == "message.deleted"  # type: ignore[union-attr]


def test_a_send_that_waited_out_its_senders_removal_is_refused(
    alice: User, bob: User, thread: Thread, parent: Message
) -> None:
    remove, send = race(
        thread.pk,
        lambda: participant_remove(actor=alice, thread_id=thread.pk, user_id=bob.pk),
        lambda: message_send(sender=bob, thread_id=thread.pk, body="too late", client_msg_id="late"),
    )
    assert remove.error is None
    assert isinstance(send.error, NotFound)
    assert not Message.objects.filter(client_msg_id="late").exists()


def test_a_send_that_waited_out_its_senders_deactivation_is_refused(
    alice: User, bob: User, thread: Thread, parent: Message
) -> None:
    # A socket outlives its user's deactivation by the moment its close notice takes: a send frame
    # handled then must not be stored. The send waits on the thread's lock; the deactivation (which
    # takes no thread lock) commits meanwhile; the send's re-check under the lock sees it.
    with thread_locked(thread.pk):
        send = Writer(lambda: message_send(sender=bob, thread_id=thread.pk, body="too late", client_msg_id="late"))
        send.start()
        wait_for_waiters(1)
        user_deactivate(actor=None, user=User.objects.get(pk=bob.pk), anonymise=True)
    send.join(30)
    assert not send.is_alive()
    assert isinstance(send.error, NotFound)
    assert not Message.objects.filter(client_msg_id="late").exists()
    assert ThreadEvent.objects.filter(thread=thread, type="message.created").count() == 1  # the parent's only


def test_a_send_that_waited_out_the_threads_deletion_is_refused(
    alice: User, bob: User, thread: Thread, parent: Message
) -> None:
    delete, send = race(
        thread.pk,
        lambda: thread_delete(actor=alice, thread_id=thread.pk),
        lambda: message_send(sender=bob, thread_id=thread.pk, body="too late", client_msg_id="late"),
    )
    assert delete.error is None
    assert isinstance(send.error, NotFound)
    assert ThreadEvent.objects.filter(thread=thread).order_by("sequence").last().type == "thread.deleted"  # type: ignore[union-attr]


# --- Roles under concurrency -------------------------------------------------------------------------

# What each of two OWNERs does to the thread at the same moment (``me`` acts, ``other`` is the other owner).
OWNER_MOVES: dict[str, Callable[[User, User, int], Any]] = {
    "leave": lambda me, other, t: thread_leave(user=me, thread_id=t),
    "step down": lambda me, other, t: participant_change_role(
        actor=me, thread_id=t, user_id=me.pk, role=ThreadRole.MEMBER
    ),
    "demote the other": lambda me, other, t: participant_change_role(
        actor=me, thread_id=t, user_id=other.pk, role=ThreadRole.MEMBER
    ),
    "remove the other": lambda me, other, t: participant_remove(actor=me, thread_id=t, user_id=other.pk),
}
# The membership events each move records (thread group) and sends to the user who lost their place.
MOVE_EVENTS = {
    "leave": "thread.participant_removed",
    "step down": "thread.role_changed",
    "demote the other": "thread.role_changed",
    "remove the other": "thread.participant_removed",
}


def two_owner_thread(make_user: Callable[..., User]) -> tuple[Thread, User, User, User]:
    needs("postgres")
    first, second, member = make_user(), make_user(), make_user()
    thread, _ = thread_create(creator=first, title="two owners", participant_ids=[second.pk, member.pk])
    participant_change_role(actor=first, thread_id=thread.pk, user_id=second.pk, role=ThreadRole.OWNER)
    return thread, first, second, member


def owners(thread: Thread) -> list[int]:
    owning = ThreadParticipant.objects.filter(thread=thread, role=ThreadRole.OWNER)
    return list(owning.values_list("user_id", flat=True))


def events_until(capture: EventCapture, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The events ``capture`` receives until there are ``count`` (by deadline), then any stragglers."""
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        received += capture.receive_all(timeout=0.2)
    return received + capture.receive_all(timeout=0.5)


# Each pair changes two different participant rows, so nothing but the thread's lock orders them
# (two moves on one row, as leaving while being removed, already queue on that row's lock).
@pytest.mark.parametrize(
    ("first_move", "second_move"),
    [
        ("leave", "leave"),
        ("step down", "step down"),
        ("demote the other", "demote the other"),
        ("remove the other", "remove the other"),
        ("leave", "step down"),
        ("remove the other", "demote the other"),
        ("demote the other", "remove the other"),
    ],
)
def test_two_owners_giving_up_ownership_at_once_leave_one_owner(
    make_user: Callable[..., User], events: Callable[..., EventCapture], first_move: str, second_move: str
) -> None:
    # Both owners pass their checks as seen before the lock (two owners); without the lock each then
    # waits for the thread's sequence and both land: a thread with no owner. Under the lock the second
    # reads what the first did: it is the last owner now (409), no longer an owner (403) or gone (404).
    thread, a, b, member = two_owner_thread(make_user)
    capture = events(thread_group(thread.pk), user_group(a.pk), user_group(b.pk))
    before = Thread.objects.get(pk=thread.pk).last_sequence
    first, second = race(
        thread.pk,
        lambda: OWNER_MOVES[first_move](a, b, thread.pk),
        lambda: OWNER_MOVES[second_move](b, a, thread.pk),
    )
    assert first.error is None, first.error
    assert isinstance(second.error, Conflict | Forbidden | NotFound), second.error
    assert len(owners(thread)) == 1
    assert ThreadParticipant.objects.filter(thread=thread, user=member, role=ThreadRole.MEMBER).exists()
    # One change, recorded and broadcast once; the refused one left no trace.
    logged = list(ThreadEvent.objects.filter(thread=thread, sequence__gt=before).values_list("type", flat=True))
    assert logged == [MOVE_EVENTS[first_move]]
    received = events_until(capture, 2 if MOVE_EVENTS[first_move] == "thread.participant_removed" else 1)
    in_thread = [e for e in received if e.get("thread_id") == thread.pk and "seq" in e]
    assert [e["type"] for e in in_thread] == [MOVE_EVENTS[first_move]]
    assert in_thread[0]["seq"] == before + 1
    removed = [e for e in received if e["type"] == "thread.removed"]
    if first_move == "leave":
        assert (in_thread[0]["data"]["user_id"], in_thread[0]["data"]["reason"]) == (a.pk, "left")
        assert [e["data"]["thread_id"] for e in removed] == [thread.pk]
    elif first_move == "remove the other":
        assert (in_thread[0]["data"]["user_id"], in_thread[0]["data"]["by"]) == (b.pk, a.pk)
        assert [e["data"]["thread_id"] for e in removed] == [thread.pk]
    else:
        demoted = a if first_move == "step down" else b
        assert (in_thread[0]["data"]["user_id"], in_thread[0]["data"]["role"]) == (demoted.pk, "MEMBER")
        assert removed == []


def test_an_add_that_waited_out_its_actors_demotion_is_refused(
    make_user: Callable[..., User], events: Callable[..., EventCapture]
) -> None:
    # b, an owner, adds someone as ADMIN while a demotes b: checked before the lock, the add would land
    # after the demotion, a MEMBER granting ADMIN. Under the lock it reads b's new role and is refused.
    thread, a, b, _ = two_owner_thread(make_user)
    newcomer = make_user()
    capture = events(thread_group(thread.pk), user_group(newcomer.pk))
    demote, add = race(
        thread.pk,
        lambda: participant_change_role(actor=a, thread_id=thread.pk, user_id=b.pk, role=ThreadRole.MEMBER),
        lambda: participant_add(actor=b, thread_id=thread.pk, user_id=newcomer.pk, role=ThreadRole.ADMIN),
    )
    assert demote.error is None
    assert isinstance(add.error, Forbidden)
    assert not ThreadParticipant.objects.filter(thread=thread, user=newcomer).exists()
    received = events_until(capture, 1)
    assert [(e["type"], e["data"]["user_id"]) for e in received] == [("thread.role_changed", b.pk)]


def test_a_moderation_that_waited_out_the_moderators_demotion_is_refused(
    make_user: Callable[..., User], events: Callable[..., EventCapture]
) -> None:
    # b, an ADMIN, deletes a member's message while the owner demotes b: the delete, which checked b's
    # role before the thread's lock, reads it again under it and is refused (a MEMBER does not moderate).
    thread, a, b, member = two_owner_thread(make_user)
    participant_change_role(actor=a, thread_id=thread.pk, user_id=b.pk, role=ThreadRole.ADMIN)
    words, _ = message_send(sender=member, thread_id=thread.pk, body="words", client_msg_id="words")
    capture = events(thread_group(thread.pk))
    demote, delete = race(
        thread.pk,
        lambda: participant_change_role(actor=a, thread_id=thread.pk, user_id=b.pk, role=ThreadRole.MEMBER),
        lambda: message_delete(actor=b, message_id=words.pk),
    )
    assert demote.error is None
    assert isinstance(delete.error, Forbidden)
    assert not Message.objects.get(pk=words.pk).is_deleted
    received = events_until(capture, 1)
    assert [(e["type"], e["data"]["user_id"]) for e in received] == [("thread.role_changed", b.pk)]


def test_a_reaction_that_waited_out_its_authors_removal_is_refused(
    alice: User, bob: User, thread: Thread, parent: Message
) -> None:
    remove, react = race(
        thread.pk,
        lambda: participant_remove(actor=alice, thread_id=thread.pk, user_id=bob.pk),
        lambda: reaction_add(actor=bob, message_id=parent.pk, emoji="👍"),
    )
    assert remove.error is None
    assert isinstance(react.error, NotFound)
    assert not Reaction.objects.filter(message=parent).exists()
    assert ThreadEvent.objects.filter(thread=thread).order_by("sequence").last().type == "thread.participant_removed"  # type: ignore[union-attr]


def test_two_owners_leaving_at_once_over_rest_always_leave_one_owner(make_user: Callable[..., User]) -> None:
    # The way it was found: both owners' clients press "Leave" at the same moment, each request on its
    # own connection, started together by a barrier, again and again. One leaves; the other is told 409
    # (last owner) in the one error shape.
    for attempt in range(20):
        thread, a, b, _ = two_owner_thread(make_user)
        barrier = threading.Barrier(2)
        writers = [Writer(functools.partial(leave_at_once, user, thread.pk, barrier)) for user in (a, b)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(30)
        assert [w.error for w in writers] == [None, None]
        statuses = sorted(w.result.status_code for w in writers)
        assert statuses == [204, 409], (attempt, statuses)
        refused = next(w.result for w in writers if w.result.status_code == 409)
        assert refused.json()["error"]["reason"] == "last_owner"
        assert len(owners(thread)) == 1, attempt


def leave_at_once(user: User, thread_id: int, barrier: threading.Barrier) -> Any:
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(user)
    barrier.wait(10)
    return client.post(f"/api/v1/threads/{thread_id}/leave")
