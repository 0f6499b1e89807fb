"""Bad input over HTTP gets a 4xx in the one JSON error shape and changes nothing, whatever its form:
ids past any stored one, numbers where text belongs, NUL characters (PostgreSQL stores none),
JSON nested past the decoder, too many form fields, out-of-range cursors.

The unstorable-text table: every value PostgreSQL cannot store (NUL, a lone UTF-16 surrogate), JSON
nested past the bound and numbers past the float range, in every place a request carries text (path
parameter, query parameter, JSON field, nested JSON field, form and multipart field), is a 400
``invalid`` naming the field. The same over a live server and the socket: test_bad_input_live.py.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import DataError
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


# --- Unstorable text, everywhere ----------------------------------------------------------------

# What a JSON string can carry that PostgreSQL cannot store. A URL or a form can carry NUL only: a
# percent-encoded surrogate is not UTF-8 and decodes to U+FFFD (test_percent_encoded_surrogates...).
BAD_TEXT = {"nul": "a\x00b", "high_surrogate": "\ud800", "low_surrogate": "x\udc00y"}
DEEP = "__deep__"  # replaced in the JSON text by arrays nested 400 deep (past the bound of 32)
HUGE_FLOAT = "__1e400__"  # replaced by 1e400: a float Python reads as infinity, which jsonb refuses

Payload = Callable[[Any], dict[str, Any]]
JSON_PLACES: list[tuple[str, str, Payload, str]] = [
    # top-level text fields
    ("post", "/api/v1/threads/{thread}/messages", lambda v: {"body": v, "client_msg_id": "c1"}, "body"),
    ("post", "/api/v1/threads/{thread}/messages", lambda v: {"body": "x", "client_msg_id": v}, "client_msg_id"),
    ("post", "/api/v1/threads", lambda v: {"title": v}, "title"),
    ("post", "/api/v1/threads", lambda v: {"title": "t", "kind": v}, "kind"),
    ("patch", "/api/v1/threads/{thread}", lambda v: {"title": v}, "title"),
    ("patch", "/api/v1/threads/{thread}/participants/{bob}", lambda v: {"role": v}, "role"),
    ("patch", "/api/v1/me", lambda v: {"display_name": v}, "display_name"),
    ("patch", "/api/v1/me", lambda v: {"avatar_url": v}, "avatar_url"),
    ("post", "/api/v1/messages/{message}/reactions", lambda v: {"emoji": v}, "emoji"),
    ("post", "/api/v1/threads/{thread}/attachments/uploads", lambda v: {"name": v, "size": 10}, "name"),
    ("post", "/api/v1/threads/{thread}/read", lambda v: {"seq": v}, "seq"),
    # nested fields: in a JSON object (jsonb), as a key, inside lists
    ("patch", "/api/v1/me", lambda v: {"preferences": {"theme": v}}, "preferences"),
    ("patch", "/api/v1/me", lambda v: {"preferences": {"a": {"b": [1, v]}}}, "preferences"),
    ("post", "/api/v1/threads", lambda v: {"title": "t", "participant_ids": [v]}, "participant_ids"),
    ("post", "/api/v1/notifications/read", lambda v: {"ids": [1, v]}, "ids"),
    # a field no serializer declares still never reaches anything
    ("patch", "/api/v1/me", lambda v: {"unknown": {"x": v}}, "unknown"),
]


def _json_text(payload: dict[str, Any]) -> str:
    """The request body as a client would write it: surrogates as \\ud800 escapes (valid JSON)."""
    return json.dumps(payload).replace(f'"{DEEP}"', "[" * 400 + "]" * 400).replace(f'"{HUGE_FLOAT}"', "1e400")


def _state(alice: User) -> tuple[Any, ...]:
    alice.refresh_from_db()
    return (
        alice.display_name,
        alice.avatar_url,
        alice.preferences,
        list(Thread.objects.order_by("pk").values_list("title", flat=True)),
        Message.objects.count(),
        list(ThreadParticipant.objects.order_by("pk").values_list("role", flat=True)),
    )


@pytest.mark.parametrize("value", [*BAD_TEXT, "deep", "huge_float"])
@pytest.mark.parametrize(("method", "path", "payload", "field"), JSON_PLACES)
def test_unstorable_json_values_are_400_naming_the_field_in_every_place(
    api: Api,
    alice: User,
    bob: User,
    thread: Thread,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    payload: Payload,
    field: str,
    value: str,
) -> None:
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="kept", client_msg_id="keep")
    before = _state(alice)
    bad = {"deep": DEEP, "huge_float": HUGE_FLOAT}.get(value) or BAD_TEXT[value]
    url = path.format(thread=thread.pk, message=message.pk, bob=bob.pk)
    with caplog.at_level(logging.WARNING, logger="chatapp.middleware"):
        response = api(alice).generic(method.upper(), url, _json_text(payload(bad)), content_type="application/json")
    assert_error(response, 400, "invalid", field)
    assert "A value cannot be stored." not in str(response.json())  # refused at the edge, not by the backstop
    assert _state(alice) == before


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/search?q=a%00b", "q"),
        ("/api/v1/users?q=%00", "q"),
        ("/api/v1/threads?cursor=a%00", "cursor"),
        ("/api/v1/threads?archived=%00", "archived"),
        ("/api/v1/notifications?unread=1%00", "unread"),
        ("/api/v1/threads/{thread}/messages?before=1%00", "before"),
        ("/api/v1/attachments/1/file?variant=%00&token=x", "variant"),
        ("/api/v1/me?anything=%00", "anything"),  # a parameter no view reads
        ("/api/v1/me?a%00b=1", "a\\x00b"),  # in the name
        ("/api/v1/messages/{message}/reactions/a%00b", "emoji"),  # a text path parameter
        ("/api/v1/threads/%00", "path"),  # a path that names nothing
        ("/api/v1/no%00where", "path"),
    ],
)
def test_nul_in_a_url_is_400_naming_the_parameter(api: Api, alice: User, thread: Thread, path: str, field: str) -> None:
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="kept", client_msg_id="keep")
    url = path.format(thread=thread.pk, message=message.pk)
    for method in ("get", "delete") if "/reactions/" in path else ("get",):
        assert_error(getattr(api(alice), method)(url), 400, "invalid", field)


def test_nul_in_a_url_is_refused_before_authentication_and_outside_the_api(api: Api, admin_client: Any) -> None:
    assert_error(api(None).get("/api/v1/threads?cursor=%00"), 400, "invalid", "cursor")
    page = admin_client.get("/admin/accounts/user/?q=%00")  # the admin's search would query with it
    assert page.status_code == 400
    assert page["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
@pytest.mark.parametrize(
    ("method", "path", "form", "field"),
    [
        ("post", "/api/v1/threads/{thread}/messages", {"body": "a\x00b", "client_msg_id": "f1"}, "body"),
        ("post", "/api/v1/threads/{thread}/messages", {"body": "x", "client_msg_id": "\x00"}, "client_msg_id"),
        ("patch", "/api/v1/me", {"display_name": "a\x00"}, "display_name"),
        ("patch", "/api/v1/me", {"preferences.theme": "da\x00rk"}, "preferences.theme"),
        ("post", "/api/v1/threads", {"title": "t", "kind\x00": "GROUP"}, "kind\\x00"),
    ],
)
def test_nul_in_a_form_field_is_400_naming_the_field(
    api: Api, alice: User, thread: Thread, method: str, path: str, form: dict[str, str], field: str, encoding: str
) -> None:
    from django.test.client import BOUNDARY, MULTIPART_CONTENT, encode_multipart

    before = _state(alice)
    url = path.format(thread=thread.pk)
    if encoding == "multipart":
        body = encode_multipart(BOUNDARY, form).decode()  # UTF-8 text parts only
        content_type = MULTIPART_CONTENT
    else:
        body = "&".join(f"{quote(k)}={quote(v)}" for k, v in form.items())
        content_type = "application/x-www-form-urlencoded"
    response = api(alice).generic(method.upper(), url, body, content_type=content_type)
    assert_error(response, 400, "invalid", field)
    assert _state(alice) == before


def test_percent_encoded_surrogates_are_read_as_replacement_characters(api: Api, alice: User, thread: Thread) -> None:
    """UTF-8 has no surrogates: their bytes in a URL or form are not UTF-8 and decode to U+FFFD,
    which is storable (nothing to refuse, nothing to fail)."""
    body = "body=a%ED%A0%80&client_msg_id=s1"
    response = api(alice).generic(
        "POST", f"/api/v1/threads/{thread.pk}/messages", body, content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 201, response.content
    assert Message.objects.get(client_msg_id="s1").body == "a\ufffd\ufffd\ufffd"
    assert api(alice).get("/api/v1/search?q=%ED%A0%80").status_code == 200
    assert api(alice).get("/api/v1/users?q=%FF").status_code == 200


def test_json_that_is_not_json_is_malformed(api: Api, alice: User) -> None:
    for text in ('{"display_name": NaN}', '{"display_name": Infinity}'):
        response = api(alice).generic("PATCH", "/api/v1/me", text, content_type="application/json")
        assert_error(response, 400, "malformed")
    not_utf8 = b'{"display_name": "\xed\xa0\x80"}'  # a surrogate's bytes: CESU-8, not UTF-8
    response = api(alice).generic("PATCH", "/api/v1/me", not_utf8, content_type="application/json")  # type: ignore[arg-type]
    assert_error(response, 400, "malformed")


# The driver refuses a surrogate on every database; NUL is refused by PostgreSQL (SQLite stores it).
BACKSTOP_CASES: list[tuple[str, type[Exception]]] = [("\ud800", UnicodeEncodeError)]
if settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
    BACKSTOP_CASES.append(("a\x00b", DataError))


@pytest.mark.parametrize(("value", "exception"), BACKSTOP_CASES)
def test_the_backstop_answers_unstorable_input_that_reached_the_database_with_400(
    api: Api,
    alice: User,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: str,
    exception: type,
) -> None:
    """A check missing at the edge (simulated: the view's service queries with the raw value) is
    still a 400 in the one shape, and logged as the missing check it is."""

    def unchecked(**kwargs: Any) -> User:
        User.objects.filter(display_name=value).exists()  # the database (or its driver) refuses it
        raise AssertionError("not refused")

    monkeypatch.setattr("accounts.api.user_update_profile", unchecked)
    with caplog.at_level(logging.WARNING, logger="chatapp.middleware"):
        response = api(alice).patch("/api/v1/me", {"display_name": "fine"}, format="json")
    assert_error(response, 400, "invalid", "non_field_errors")
    [record] = [r for r in caplog.records if "bad input reached the database" in r.getMessage()]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], exception)


@pytest.mark.parametrize("charset", ["utf-7", "unicode_escape", "raw_unicode_escape"])
def test_a_charset_that_decodes_to_surrogates_is_refused(api: Api, alice: User, client: Any, charset: str) -> None:
    """Django decodes the query string and form bodies with the declared charset; these turn plain
    ASCII (``+2AA-``, ``\\ud800``) into lone surrogates, so they are refused before anything decodes."""
    body = "display_name=%2B2AA-%5Cud800"
    response = api(alice).generic(
        "PATCH", "/api/v1/me", body, content_type=f"application/x-www-form-urlencoded; charset={charset}"
    )
    assert_error(response, 400, "malformed")
    response = api(alice).generic(
        "GET", "/api/v1/users?q=%2B2AA-%5Cud800", content_type=f"text/plain; charset={charset}"
    )
    assert_error(response, 400, "malformed")
    # Django's own forms (the sign-in page) too: the username would reach the database.
    page = client.generic(
        "POST",
        "/accounts/login/",
        "username=%2B2AA-%5Cud800&password=x",
        content_type=f"application/x-www-form-urlencoded; charset={charset}",
    )
    assert page.status_code == 400
    for fine in ("utf-8", "UTF8", "us-ascii", "latin-1", "utf-16"):
        response = api(alice).generic("GET", "/api/v1/users?q=al", content_type=f"text/plain; charset={fine}")
        assert response.status_code == 200, (fine, response.content)
