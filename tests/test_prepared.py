"""chatapp.prepared: a queryset compiled once answers exactly as the ORM does, on every backend."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.models import Model
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from chatapp.errors import NotFound
from chatapp.prepared import PreparedQuery
from threads.models import Thread, ThreadParticipant
from threads.selectors import thread_get_for_member
from threads.services import thread_delete

pytestmark = [pytest.mark.django_db, pytest.mark.smoke]


def fields(obj: Model) -> dict[str, Any]:
    return {field.attname: getattr(obj, field.attname) for field in type(obj)._meta.concrete_fields}


def membership() -> PreparedQuery[ThreadParticipant]:
    return PreparedQuery(
        lambda thread_id, user_id: ThreadParticipant.objects.select_related("thread").filter(
            thread_id=thread_id, user_id=user_id, thread__deleted_at__isnull=True
        ),
        "thread_id",
        "user_id",
    )


def test_it_returns_what_the_orm_returns_with_the_related_row_loaded(thread: Thread, alice: User, bob: User) -> None:
    prepared = membership()
    for user in (alice, bob):
        expected = ThreadParticipant.objects.select_related("thread").get(thread=thread, user=user)
        got = prepared.first(thread_id=thread.pk, user_id=user.pk)  # the second call reuses the SQL
        assert got is not None
        assert fields(got) == fields(expected)  # datetimes, booleans and enums converted as the ORM does
        assert got.role == expected.role
        assert type(got.joined_at) is type(expected.joined_at)
        assert type(got.muted) is bool
        assert not got._state.adding
        assert got._state.db == "default"
        with CaptureQueriesContext(connection) as queries:
            assert fields(got.thread) == fields(expected.thread)  # select_related: no query
        assert len(queries) == 0
    assert len(prepared._plans) == 1  # compiled once


def test_it_finds_nothing_for_a_stranger_or_a_deleted_thread(thread: Thread, alice: User, carol: User) -> None:
    prepared = membership()
    assert prepared.first(thread_id=thread.pk, user_id=carol.pk) is None
    assert prepared.first(thread_id=thread.pk + 1000, user_id=alice.pk) is None
    thread_delete(actor=alice, thread_id=thread.pk)
    assert prepared.first(thread_id=thread.pk, user_id=alice.pk) is None
    assert prepared.all(thread_id=thread.pk, user_id=alice.pk) == []


def test_a_query_it_cannot_replay_fails_at_once(thread: Thread, alice: User) -> None:
    # The same value twice: the placeholder is not one plain parameter, so it refuses to guess.
    twice = PreparedQuery(lambda pk: ThreadParticipant.objects.filter(thread_id=pk, user_id=pk), "pk")
    with pytest.raises(ValueError, match="'pk' is not one plain parameter"):
        twice.first(pk=thread.pk)


def test_the_membership_check_takes_one_query_and_refuses_malformed_ids(thread: Thread, bob: User) -> None:
    with CaptureQueriesContext(connection) as queries:
        access = thread_get_for_member(thread_id=thread.pk, user=bob)
    assert len(queries) == 1
    assert access.thread.pk == thread.pk
    assert access.participant is not None
    assert access.participant.user is bob
    for bad in ("x", None, 0, -1, 2**63, "9" * 30):
        with pytest.raises(NotFound):
            thread_get_for_member(thread_id=bad, user=bob)  # type: ignore[arg-type]
    assert thread_get_for_member(thread_id=str(thread.pk), user=bob).thread.pk == thread.pk  # type: ignore[arg-type]
