"""Bad input over HTTP gets a 4xx in the one JSON error shape and changes nothing, whatever its form:
ids past any stored one, numbers where text belongs, NUL characters (PostgreSQL stores none),
JSON nested past the decoder, too many form fields, out-of-range cursors."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from accounts.models import User
from messaging.models import Message, Notification
from messaging.services import message_edit, message_send
from threads.models import Thread, ThreadKind, ThreadParticipant
from threads.services import participant_remove, thread_create

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]

HUGE = 10**20
Api = Callable[[User | None], APIClient]


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    error = response.json()["error"]
    assert error["code"] == code, error
    if field is not None:
        assert field in error["fields"], error


@pytest.mark.parametrize(
    ("method", "path", "payload", "field"),
    [
        ("post", "/api/v1/threads", {"title": "x", "participant_ids": [HUGE]}, "participant_ids"),
        ("post", "/api/v1/threads/{thread}/participants", {"user_id": HUGE}, "user_id"),
        (
            "post",
            "/api/v1/threads/{thread}/messages",
            {"body": "x", "client_msg_id": "a", "reply_to": HUGE},
            "reply_to",
        ),
        (
            "post",
            "/api/v1/threads/{thread}/messages",
            {"body": "x", "client_msg_id": "a", "attachment_ids": [HUGE]},
            "attachment_ids",
        ),
        ("post", "/api/v1/threads/{thread}/messages", {"body": 12345, "client_msg_id": "a"}, "body"),
        ("post", "/api/v1/threads/{thread}/messages", {"body": "x", "client_msg_id": 77}, "client_msg_id"),
        ("post", "/api/v1/threads/{thread}/messages", {"body": True, "client_msg_id": "a"}, "body"),
        ("post", "/api/v1/threads/{thread}/read", {"seq": HUGE}, "seq"),
        ("post", "/api/v1/notifications/read", {"ids": [HUGE]}, "ids"),
        ("post", "/api/v1/notifications/read", {"thread_id": HUGE}, "thread_id"),
        ("post", "/api/v1/threads", {"title": "nul\x00title"}, "title"),
        ("patch", "/api/v1/threads/{thread}", {"title": "nul\x00"}, "title"),
        ("patch", "/api/v1/me", {"display_name": "a\x00b"}, "display_name"),
        ("patch", "/api/v1/me", {"preferences": {"theme": "da\x00rk"}}, "preferences"),
        ("patch", "/api/v1/me", {"preferences": {"k\x00": 1}}, "preferences"),
        ("patch", "/api/v1/me", {"preferences": {"big": "x" * 20_000}}, "preferences"),
        ("post", "/api/v1/messages/{message}/reactions", {"emoji": "\x00"}, "emoji"),
        ("post", "/api/v1/threads/{thread}/attachments/uploads", {"name": "a\x00.png", "size": 10}, "name"),
    ],
)
def test_bad_fields_are_400_and_change_nothing(
    api: Api, alice: User, thread: Thread, method: str, path: str, payload: dict[str, Any], field: str
) -> None:
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="kept", client_msg_id="keep")
    alice.refresh_from_db()
    before = (alice.display_name, alice.preferences, Thread.objects.count(), Message.objects.count())
    url = path.format(thread=thread.pk, message=message.pk)
    response = getattr(api(alice), method)(url, payload, format="json")
    assert_error(response, 400, "invalid", field)
    alice.refresh_from_db()
    assert (alice.display_name, alice.preferences, Thread.objects.count(), Message.objects.count()) == before
    assert Thread.objects.get(pk=thread.pk).title == thread.title


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/search?q=x&thread_id=" + str(HUGE), "thread_id"),
        ("/api/v1/search?q=a%00b", "q"),
        ("/api/v1/users?q=%00", "q"),
        ("/api/v1/users?q=" + "x" * 501, "q"),
        ("/api/v1/threads/{thread}/messages?before=" + str(HUGE), "before"),
    ],
)
def test_bad_query_parameters_are_400(api: Api, alice: User, thread: Thread, path: str, field: str) -> None:
    assert_error(api(alice).get(path.format(thread=thread.pk)), 400, "invalid", field)


@pytest.mark.parametrize(
    "raw",
    [
        "0001-01-01T00:00:00+14:00|1",  # before year 1 in UTC
        "9999-12-31T23:59:59-14:00|1",  # after year 9999 in UTC
        "2026-01-01T00:00:00|1",  # no time zone
        f"2026-01-01T00:00:00+00:00|{HUGE}",
        "2026-01-01T00:00:00+00:00|0",
        "garbage",
    ],
)
def test_malformed_thread_cursors_are_400(api: Api, alice: User, thread: Thread, raw: str) -> None:
    cursor = base64.urlsafe_b64encode(raw.encode()).decode()
    assert_error(api(alice).get("/api/v1/threads", {"cursor": cursor}), 400, "invalid", "cursor")


def test_a_real_cursor_still_pages(api: Api, alice: User, bob: User) -> None:
    for n in range(3):
        thread_create(creator=alice, title=f"t{n}", participant_ids=[bob.pk])
    first = api(alice).get("/api/v1/threads", {"limit": 2}).json()
    assert first["next_cursor"]
    rest = api(alice).get("/api/v1/threads", {"limit": 2, "cursor": first["next_cursor"]}).json()
    titles = [t["title"] for t in first["threads"] + rest["threads"]]
    assert sorted(titles) == ["t0", "t1", "t2"]


def test_json_nested_too_deeply_is_malformed(api: Api, alice: User) -> None:
    response = api(alice).generic("PATCH", "/api/v1/me", "[" * 100_000, content_type="application/json")
    assert_error(response, 400, "malformed")


def test_too_many_form_fields_is_a_json_400(api: Api, alice: User, thread: Thread) -> None:
    body = "&".join(f"f{n}=1" for n in range(1_200))
    response = api(alice).generic("POST", "/api/v1/threads", body, content_type="application/x-www-form-urlencoded")
    assert_error(response, 400, "malformed")
    assert Thread.objects.count() == 1


def test_unknown_user_for_a_participant_is_named_by_the_field_sent(api: Api, alice: User, thread: Thread) -> None:
    response = api(alice).post(f"/api/v1/threads/{thread.pk}/participants", {"user_id": 987654}, format="json")
    assert_error(response, 400, "invalid", "user_id")


def test_notifications_of_a_thread_you_left_are_gone(api: Api, alice: User, bob: User, thread: Thread) -> None:
    """A removed member no longer sees the thread's notifications, nor the edited text of their excerpts."""
    mention, _ = message_send(sender=alice, thread_id=thread.pk, body="hi @bob", client_msg_id="m1")
    listing = api(bob).get("/api/v1/notifications").json()
    assert [n["message_id"] for n in listing["notifications"]] == [mention.pk]
    assert listing["unread_count"] == 1

    participant_remove(actor=alice, thread_id=thread.pk, user_id=bob.pk)
    message_edit(actor=alice, message_id=mention.pk, body="secret plan @bob", expected_version=1)
    listing = api(bob).get("/api/v1/notifications").json()
    assert listing["notifications"] == []
    assert listing["unread_count"] == 0
    assert "secret" not in str(listing)
    assert Notification.objects.filter(recipient=bob).count() == 1  # kept, just not shown


def test_a_direct_thread_cannot_be_left(api: Api, alice: User, bob: User) -> None:
    """Leaving would strand it (a direct pair is fixed and cannot be re-created): it is archived instead."""
    direct, _ = thread_create(creator=alice, participant_ids=[bob.pk], kind=ThreadKind.DIRECT)
    assert_error(api(alice).post(f"/api/v1/threads/{direct.pk}/leave"), 403, "forbidden")
    assert ThreadParticipant.objects.filter(thread=direct).count() == 2
    again = api(alice).post("/api/v1/threads", {"kind": "DIRECT", "participant_ids": [bob.pk]}, format="json")
    assert again.status_code == 200
    assert again.json()["id"] == direct.pk
