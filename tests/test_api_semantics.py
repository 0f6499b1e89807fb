"""What a client program reads back after a sequence of calls: counts that agree with lists, marks
that keep meaning what they say, idempotent retries answered as such."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from rest_framework.test import APIClient

from accounts.models import User
from messaging.services import message_delete, message_edit, message_send
from threads.models import Thread
from threads.services import thread_create, thread_leave

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]

Api = Callable[[User | None], APIClient]


def test_reply_count_and_the_replies_list_follow_replies_and_deletes(
    api: Api, alice: User, bob: User, thread: Thread
) -> None:
    parent, _ = message_send(sender=alice, thread_id=thread.pk, body="parent", client_msg_id="p")
    assert api(alice).get(f"/api/v1/messages/{parent.pk}").json()["reply_count"] == 0  # cached now
    first, _ = message_send(sender=bob, thread_id=thread.pk, body="one", client_msg_id="r1", reply_to_id=parent.pk)
    second, _ = message_send(sender=bob, thread_id=thread.pk, body="two", client_msg_id="r2", reply_to_id=parent.pk)
    assert api(alice).get(f"/api/v1/messages/{parent.pk}").json()["reply_count"] == 2
    message_delete(actor=bob, message_id=second.pk)
    assert api(alice).get(f"/api/v1/messages/{parent.pk}").json()["reply_count"] == 1
    replies = api(alice).get(f"/api/v1/messages/{parent.pk}/replies").json()["replies"]
    assert [r["id"] for r in replies] == [first.pk]  # the list and the count agree


def test_adding_a_participant_again_is_a_retry_or_a_conflict(
    api: Api, alice: User, carol: User, thread: Thread
) -> None:
    url = f"/api/v1/threads/{thread.pk}/participants"
    assert api(alice).post(url, {"user_id": carol.pk}, format="json").status_code == 201
    again = api(alice).post(url, {"user_id": carol.pk}, format="json")
    assert again.status_code == 200
    assert again.json()["role"] == "MEMBER"
    other_role = api(alice).post(url, {"user_id": carol.pk, "role": "ADMIN"}, format="json")
    assert other_role.status_code == 409
    assert other_role.json()["error"]["reason"] == "already_participant"
    roles = {p["user"]["id"]: p["role"] for p in api(alice).get(url).json()["participants"]}
    assert roles[carol.pk] == "MEMBER"


def test_a_new_member_finds_no_unread_history_and_old_receipts_keep_their_status(
    api: Api, alice: User, bob: User, carol: User, thread: Thread
) -> None:
    old, _ = message_send(sender=alice, thread_id=thread.pk, body="before carol", client_msg_id="old")
    api(bob).post(f"/api/v1/threads/{thread.pk}/read", {"seq": old.sequence}, format="json")
    assert api(alice).get(f"/api/v1/messages/{old.pk}/receipts").json()["status"] == "read"
    api(alice).post(f"/api/v1/threads/{thread.pk}/participants", {"user_id": carol.pk}, format="json")
    assert api(alice).get(f"/api/v1/messages/{old.pk}/receipts").json()["status"] == "read"
    listing = {t["id"]: t for t in api(carol).get("/api/v1/threads").json()["threads"]}
    assert listing[thread.pk]["unread_count"] == 0
    new, _ = message_send(sender=alice, thread_id=thread.pk, body="after carol", client_msg_id="new")
    listing = {t["id"]: t for t in api(carol).get("/api/v1/threads").json()["threads"]}
    assert listing[thread.pk]["unread_count"] == 1  # what came after she joined is unread
    receipts = api(alice).get(f"/api/v1/messages/{new.pk}/receipts").json()
    assert receipts["recipients"] == 2


def test_marking_all_notifications_read_counts_only_those_shown(api: Api, alice: User, bob: User) -> None:
    kept, _ = thread_create(creator=alice, title="kept", participant_ids=[bob.pk])
    left, _ = thread_create(creator=alice, title="left", participant_ids=[bob.pk])
    message_send(sender=alice, thread_id=kept.pk, body="hi @bob", client_msg_id="n1")
    message_send(sender=alice, thread_id=left.pk, body="hi @bob", client_msg_id="n2")
    thread_leave(user=bob, thread_id=left.pk)
    assert api(bob).get("/api/v1/notifications").json()["unread_count"] == 1
    assert api(bob).post("/api/v1/notifications/read", {}, format="json").json()["marked"] == 1


def test_edit_history_timestamps_have_one_format(api: Api, alice: User, thread: Thread) -> None:
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="first", client_msg_id="e")
    message_edit(actor=alice, message_id=message.pk, body="second", expected_version=1)
    history = api(alice).get(f"/api/v1/messages/{message.pk}/edits").json()
    current = api(alice).get(f"/api/v1/messages/{message.pk}").json()
    assert history["current"]["edited_at"] == current["edited_at"]
    assert history["current"]["edited_at"].endswith("+00:00")
    assert history["versions"][0]["replaced_at"].endswith("+00:00")


def test_the_error_schema_declares_what_conflicts_carry(api: Api, alice: User) -> None:
    schema = api(alice).get("/api/schema/", HTTP_ACCEPT="application/json").json()
    detail = schema["components"]["schemas"]["ErrorDetail"]["properties"]
    assert {"code", "message", "fields", "retry_after", "reason", "current"} <= set(detail)


def test_a_restored_message_keeps_a_contiguous_history(
    api: Api, alice: User, bob: User, thread: Thread, make_user: Callable[..., User]
) -> None:
    from accounts.models import SystemRole
    from messaging.services import message_restore

    moderator = make_user("mod", role=SystemRole.ADMIN)
    message, _ = message_send(sender=bob, thread_id=thread.pk, body="first", client_msg_id="h")
    message_edit(actor=bob, message_id=message.pk, body="second", expected_version=1)
    message_delete(actor=moderator, message_id=message.pk)
    restored = message_restore(actor=moderator, message_id=message.pk)
    history = api(alice).get(f"/api/v1/messages/{message.pk}/edits").json()
    assert [v["version"] for v in history["versions"]] == list(range(1, restored.version))
    assert history["current"] == {
        "version": restored.version,
        "body": "second",
        "edited_at": history["current"]["edited_at"],
    }
