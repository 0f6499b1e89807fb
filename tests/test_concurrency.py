"""Concurrent writes on real PostgreSQL, in a forced order: every message write locks the message row
(FOR NO KEY UPDATE) before the thread's, so a delete racing a reply or a reaction neither deadlocks
nor leaves a reaction on a tombstone, and a send that waited for the thread's lock re-checks what
changed meanwhile (the thread deleted, the sender removed).

Each race holds the thread's row lock from the test, starts the writers one after the other (each
until it waits on a lock, seen in pg_stat_activity), then lets them go in that queue order."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connection, transaction

from accounts.models import User
from chatapp.errors import Conflict, NotFound
from messaging.models import Message, Reaction
from messaging.services import message_delete, message_send, reaction_add
from tests.conftest import needs
from threads.models import Thread, ThreadEvent
from threads.services import participant_remove, thread_delete

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
