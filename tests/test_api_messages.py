"""Messages over REST: sends, idempotency, history pages, edits and conflicts, deletes, reactions,
receipts, notifications, search, caching and the shared error shape."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import User
from chatapp.broadcast import thread_group, user_group
from messaging import events
from messaging.models import Message, MessageEdit, Notification, Reaction
from messaging.services import message_send
from tests.conftest import EventCapture, needs
from tests.test_api_threads import error_code
from threads.models import Thread, ThreadEvent

pytestmark = pytest.mark.django_db

Api = Callable[[User | None], APIClient]


def send(client: APIClient, thread: Thread, body: str, cid: str, **extra: Any) -> Any:
    return client.post(
        f"/api/v1/threads/{thread.pk}/messages", {"body": body, "client_msg_id": cid, **extra}, format="json"
    )


@pytest.mark.smoke
def test_message_send_stores_renders_and_broadcasts(
    api: Api,
    alice: User,
    bob: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=True):
        response = send(api(bob), thread, "hello **team** <script>alert(1)</script>", "c-1")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["html"] == "<p>hello <strong>team</strong> &lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert body["sender"]["id"] == bob.pk
    (event,) = capture.receive_all()
    assert event["type"] == "message.created"
    assert event["seq"] == body["seq"]
    assert event["data"]["message"]["id"] == body["id"]


@pytest.mark.smoke
def test_message_send_moves_the_thread_up_and_a_retry_spends_no_sequence(
    api: Api, alice: User, bob: User, thread: Thread
) -> None:
    from threads.services import thread_create

    quiet, _ = thread_create(creator=alice, title="Quiet", participant_ids=[bob.pk])
    first = send(api(bob), thread, "one", "seq-1").json()
    thread.refresh_from_db()
    stored = Message.objects.get(pk=first["id"])
    assert thread.last_message_at is not None
    assert abs((thread.last_message_at - stored.created_at).total_seconds()) < 1  # set with the sequence
    assert thread.last_sequence == first["seq"]
    send(api(bob), quiet, "quiet one", "seq-2")
    assert [t["id"] for t in api(bob).get("/api/v1/threads").json()["threads"]][:2] == [quiet.pk, thread.pk]
    assert send(api(bob), thread, "one", "seq-1").status_code == 200  # a retry spends no number
    second = send(api(bob), thread, "two", "seq-3").json()
    assert second["seq"] == first["seq"] + 1
    assert [t["id"] for t in api(bob).get("/api/v1/threads").json()["threads"]][:2] == [thread.pk, quiet.pk]


def test_a_send_is_a_fixed_handful_of_queries(bob: User, thread: Thread, django_assert_num_queries: Any) -> None:
    """The hot path of the product (docs/benchmarks.md): membership, sequence, insert, read mark,
    event log, and the savepoint pair of the test's own transaction. A retry is caught by the
    unique constraint (rolled back) and answered with one lookup of the original."""
    message_send(sender=bob, thread_id=thread.pk, body="warm up", client_msg_id="q-0")
    with django_assert_num_queries(7):
        message, created = message_send(sender=bob, thread_id=thread.pk, body="counted", client_msg_id="q-1")
    assert created
    with django_assert_num_queries(0):  # the REST reply builds the payload again: relations known
        payload = events.message_payload(message)
    assert (payload["reactions"], payload["attachments"], payload["sender"]["id"]) == ([], [], bob.pk)
    with django_assert_num_queries(7):
        again, created = message_send(sender=bob, thread_id=thread.pk, body="counted", client_msg_id="q-1")
    assert (again.pk, created) == (message.pk, False)


@pytest.mark.smoke
def test_message_send_is_idempotent_on_retries(api: Api, bob: User, thread: Thread) -> None:
    answers = [send(api(bob), thread, "once", "retry-1") for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 200, 200]
    assert len({a.json()["id"] for a in answers}) == 1
    assert answers[0].json() == answers[2].json()
    assert Message.objects.filter(client_msg_id="retry-1").count() == 1


@pytest.mark.django_db(transaction=True)
def test_message_send_concurrent_duplicates_give_one_row(alice: User, bob: User) -> None:
    needs("postgres")
    from threads.services import thread_create

    thread, _ = thread_create(creator=alice, title="dup", participant_ids=[bob.pk])
    barrier = threading.Barrier(2)
    answers: list[Any] = []

    def worker() -> None:
        client = APIClient()
        client.force_authenticate(bob)
        barrier.wait()
        answers.append(send(client, thread, "twice", "same-id"))
        connection.close()

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(a.status_code for a in answers) == [200, 201]
    assert answers[0].json()["id"] == answers[1].json()["id"]
    assert Message.objects.filter(client_msg_id="same-id").count() == 1


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"body": "", "client_msg_id": "a"}, "body"),
        ({"body": "x"}, "client_msg_id"),
        ({"body": "x", "client_msg_id": "bad id with spaces"}, "client_msg_id"),
        ({"body": "x", "client_msg_id": "a", "sender": 1}, "sender"),
        ({"body": "x", "client_msg_id": "a", "sequence": 1}, "sequence"),
        ({"body": "x", "client_msg_id": "a", "created_at": "2020-01-01"}, "created_at"),
        ({"body": "x", "client_msg_id": "a", "reply_to": 999999}, "reply_to"),
    ],
)
def test_message_send_validation_loses_nothing(
    api: Api, bob: User, thread: Thread, payload: dict[str, Any], field: str
) -> None:
    response = api(bob).post(f"/api/v1/threads/{thread.pk}/messages", payload, format="json")
    assert response.status_code == 400
    assert error_code(response) == "invalid"
    assert field in response.json()["error"]["fields"]
    assert not Message.objects.exists()


@pytest.mark.smoke
def test_message_body_cap_100kb(api: Api, bob: User, thread: Thread) -> None:
    assert send(api(bob), thread, "a" * (100 * 1024), "max").status_code == 201
    too_big = send(api(bob), thread, "a" * (100 * 1024 + 1), "over")
    assert too_big.status_code == 413
    assert error_code(too_big) == "too_large"
    huge = send(api(bob), thread, "a" * (400 * 1024), "way-over")
    assert huge.status_code == 413


@pytest.mark.smoke
def test_non_member_gets_404_for_everything(api: Api, alice: User, carol: User, thread: Thread) -> None:
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="secret", client_msg_id="s")
    client = api(carol)
    for method, url, data in [
        ("get", f"/api/v1/threads/{thread.pk}/messages", None),
        ("post", f"/api/v1/threads/{thread.pk}/messages", {"body": "x", "client_msg_id": "x"}),
        ("get", f"/api/v1/messages/{message.pk}", None),
        ("patch", f"/api/v1/messages/{message.pk}", {"body": "x", "version": 1}),
        ("delete", f"/api/v1/messages/{message.pk}", None),
        ("get", f"/api/v1/messages/{message.pk}/edits", None),
        ("get", f"/api/v1/messages/{message.pk}/replies", None),
        ("get", f"/api/v1/messages/{message.pk}/receipts", None),
        ("post", f"/api/v1/messages/{message.pk}/reactions", {"emoji": "👍"}),
        ("delete", f"/api/v1/messages/{message.pk}/reactions/👍", None),
        ("post", f"/api/v1/threads/{thread.pk}/read", {"seq": 1}),
        ("get", f"/api/v1/threads/{thread.pk}/participants", None),
    ]:
        response = getattr(client, method)(url, data, format="json")
        assert response.status_code == 404, (method, url, response.status_code)
        assert error_code(response) == "not_found"
    assert client.get("/api/v1/search?q=secret").json()["results"] == []
    assert api(alice).get("/api/v1/search?q=secret").json()["results"]  # the words are there to find


def _bulk_thread(alice: User, bob: User, n: int) -> Thread:
    from threads.services import thread_create

    thread, _ = thread_create(creator=alice, title="big", participant_ids=[bob.pk])
    start = thread.last_sequence
    now = timezone.now()
    Message.objects.bulk_create(
        [
            Message(
                thread=thread,
                sender=alice if i % 2 else bob,
                body=f"m{i}",
                body_html=f"<p>m{i}</p>",
                client_msg_id=f"b{i}",
                sequence=start + 1 + i,
                created_at=now,
            )
            for i in range(n)
        ]
    )
    Thread.objects.filter(pk=thread.pk).update(last_sequence=start + n)
    thread.refresh_from_db()
    return thread


def test_history_pages_cover_1000_messages_once_in_order_both_ways(api: Api, alice: User, bob: User) -> None:
    thread = _bulk_thread(alice, bob, 1000)
    client = api(bob)
    url = f"/api/v1/threads/{thread.pk}/messages"
    # Backwards from the newest page.
    page = client.get(f"{url}?limit=100").json()
    assert page["newest_reached"] is True
    backwards = [m["seq"] for m in page["messages"]]
    while not page["oldest_reached"]:
        page = client.get(f"{url}?limit=100&before={page['messages'][0]['seq']}").json()
        backwards = [m["seq"] for m in page["messages"]] + backwards
    # Forwards from the start.
    forwards: list[int] = []
    cursor = 0
    while True:
        page = client.get(f"{url}?limit=77&after={cursor}").json()
        forwards += [m["seq"] for m in page["messages"]]
        if page["newest_reached"]:
            break
        cursor = page["messages"][-1]["seq"]
    expected = sorted(Message.objects.filter(thread=thread).values_list("sequence", flat=True))
    assert len(expected) == 1000
    assert backwards == expected
    assert forwards == expected
    around = client.get(f"{url}?limit=10&around={expected[500]}").json()
    assert [m["seq"] for m in around["messages"]] == expected[495:505]
    assert around["has_older"]
    assert around["has_newer"]
    assert client.get(f"{url}?limit=101").json()["messages"].__len__() == 100
    bad = client.get(f"{url}?before=abc")
    assert bad.status_code == 400
    assert "before" in bad.json()["error"]["fields"]


def test_history_queries_are_constant_whatever_the_page_size(api: Api, alice: User, bob: User) -> None:
    thread = _bulk_thread(alice, bob, 120)
    for m in Message.objects.filter(thread=thread)[:30]:
        Reaction.objects.create(message=m, user=alice, emoji="👍")
    client = api(bob)
    url = f"/api/v1/threads/{thread.pk}/messages"
    from django.core.cache import cache
    from django.test.utils import CaptureQueriesContext

    counts = []
    for limit in (5, 100):
        cache.clear()

        with CaptureQueriesContext(connection) as ctx:
            assert len(client.get(f"{url}?limit={limit}").json()["messages"]) == limit
        counts.append(len(ctx.captured_queries))
    assert counts[0] == counts[1]
    # Keyset pages cost the same at any depth (no OFFSET): the newest page's boundary, a middle one, the oldest.
    deep = []
    for before in (110, 60, 10):
        cache.clear()
        with CaptureQueriesContext(connection) as ctx:
            client.get(f"{url}?limit=5&before={before}")
        deep.append(len(ctx.captured_queries))
        assert "OFFSET" not in " ".join(q["sql"] for q in ctx.captured_queries).upper()
    assert len(set(deep)) == 1


def test_thread_and_notification_lists_are_constant_in_queries(
    api: Api, alice: User, bob: User, make_user: Callable[..., User]
) -> None:
    from django.core.cache import cache
    from django.test.utils import CaptureQueriesContext

    from threads.services import thread_create

    def count(url: str) -> int:
        cache.clear()
        with CaptureQueriesContext(connection) as ctx:
            assert api(bob).get(url).status_code == 200
        return len(ctx.captured_queries)

    for i in range(2):
        t, _ = thread_create(creator=alice, title=f"t{i}", participant_ids=[bob.pk])
        message_send(sender=alice, thread_id=t.pk, body=f"@bob hi {i}", client_msg_id=f"n{i}")
    thread_create(creator=make_user("d_small"), kind="DIRECT", participant_ids=[bob.pk])
    small_threads, small_notes = count("/api/v1/threads"), count("/api/v1/notifications")
    for i in range(12):
        t, _ = thread_create(creator=make_user(f"x{i}"), title=f"more{i}", participant_ids=[bob.pk])
        message_send(
            sender=alice if False else User.objects.get(username=f"x{i}"),
            thread_id=t.pk,
            body="@bob yo",
            client_msg_id=f"y{i}",
        )
        thread_create(creator=make_user(f"d{i}"), kind="DIRECT", participant_ids=[bob.pk])
    assert count("/api/v1/threads") == small_threads
    assert count("/api/v1/notifications") == small_notes
    assert len(api(bob).get("/api/v1/threads").json()["threads"]) == 27


@pytest.mark.smoke
def test_edit_keeps_history_merges_and_conflicts(
    api: Api,
    alice: User,
    bob: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    created = send(api(bob), thread, "the quick brown fox jumps", "e1").json()
    url = f"/api/v1/messages/{created['id']}"
    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=True):
        first = api(bob).patch(url, {"body": "the slow brown fox jumps", "version": 1}, format="json")
    assert first.status_code == 200
    assert first.json() == {"message": first.json()["message"], "merged": False}
    assert first.json()["message"]["version"] == 2
    (event,) = capture.receive_all()
    assert event["type"] == "message.updated"
    assert event["data"]["message"]["body"] == "the slow brown fox jumps"
    # A stale edit (made against version 1) touching other words merges.
    with django_capture_on_commit_callbacks(execute=True):
        merged = api(bob).patch(url, {"body": "the quick brown fox leaps", "version": 1}, format="json")
    assert merged.status_code == 200, merged.json()
    assert merged.json()["merged"] is True
    assert merged.json()["message"]["body"] == "the slow brown fox leaps"
    assert capture.receive_all()[0]["data"]["merged"] is True
    # A stale edit of the same word conflicts with the current message attached.
    conflict = api(bob).patch(url, {"body": "the fast brown fox jumps", "version": 1}, format="json")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["reason"] == "edit_conflict"
    assert conflict.json()["error"]["current"]["body"] == "the slow brown fox leaps"
    assert conflict.json()["error"]["current"]["version"] == 3
    history = api(alice).get(f"{url}/edits").json()
    assert [v["body"] for v in history["versions"]] == ["the quick brown fox jumps", "the slow brown fox jumps"]
    assert history["current"]["body"] == "the slow brown fox leaps"
    # Only the author edits, whatever their role.
    assert api(alice).patch(url, {"body": "owner edit", "version": 3}, format="json").status_code == 403
    assert MessageEdit.objects.filter(message_id=created["id"]).count() == 2


@pytest.mark.smoke
def test_delete_leaves_tombstone_and_scrubs_the_log(
    api: Api,
    alice: User,
    bob: User,
    carol: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    created = send(api(bob), thread, "oops secret", "d1").json()
    api(alice).post(f"/api/v1/messages/{created['id']}/reactions", {"emoji": "👍"}, format="json")
    api(bob).patch(f"/api/v1/messages/{created['id']}", {"body": "oops secret 2", "version": 1}, format="json")
    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=True):
        response = api(bob).delete(f"/api/v1/messages/{created['id']}")
    assert response.status_code == 200
    assert response.json()["deleted"] is True
    assert response.json()["body"] == ""
    (event,) = capture.receive_all()
    assert event["type"] == "message.deleted"
    history = api(alice).get(f"/api/v1/threads/{thread.pk}/messages").json()["messages"]
    tomb = next(m for m in history if m["id"] == created["id"])
    assert tomb["deleted"]
    assert tomb["body"] == ""
    assert tomb["reactions"] == []
    assert "secret" not in str(list(ThreadEvent.objects.filter(thread=thread).values_list("payload", flat=True)))
    assert "secret" not in str(api(alice).get(f"/api/v1/messages/{created['id']}/edits").json())
    # A member cannot delete someone else's message; the thread OWNER moderates.
    other = send(api(alice), thread, "alice's", "d2").json()
    assert api(bob).delete(f"/api/v1/messages/{other['id']}").status_code == 403
    mine = send(api(bob), thread, "bob's", "d3").json()
    assert api(alice).delete(f"/api/v1/messages/{mine['id']}").status_code == 200
    from accounts.models import AuditEntry

    assert AuditEntry.objects.filter(action="message.moderate_delete", target_id=str(mine["id"])).exists()


@pytest.mark.smoke
def test_reactions_aggregate_with_me_and_broadcast(
    api: Api,
    alice: User,
    bob: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    created = send(api(bob), thread, "react", "r1").json()
    url = f"/api/v1/messages/{created['id']}/reactions"
    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=True):
        assert api(alice).post(url, {"emoji": "🎉"}, format="json").status_code == 201
        assert api(alice).post(url, {"emoji": "🎉"}, format="json").status_code == 200
        bob_view = api(bob).post(url, {"emoji": "🎉"}, format="json").json()
    assert bob_view["reactions"] == [{"emoji": "🎉", "count": 2, "user_ids": [alice.pk, bob.pk], "me": True}]
    events_seen = capture.receive_all()
    assert [e["type"] for e in events_seen] == ["reaction.added", "reaction.added"]
    assert events_seen[-1]["data"]["reactions"][0]["count"] == 2
    with django_capture_on_commit_callbacks(execute=True):
        after = api(alice).delete(f"{url}/🎉").json()
    assert after["reactions"] == [{"emoji": "🎉", "count": 1, "user_ids": [bob.pk], "me": False}]
    assert capture.receive_all()[0]["type"] == "reaction.removed"
    assert api(alice).post(url, {"emoji": "<b>"}, format="json").status_code == 400


@pytest.mark.smoke
def test_replies_and_reply_notifications(api: Api, alice: User, bob: User, thread: Thread) -> None:
    parent = send(api(alice), thread, "question?", "p1").json()
    reply = send(api(bob), thread, "answer", "p2", reply_to=parent["id"]).json()
    assert reply["reply_to"]["id"] == parent["id"]
    listing = api(alice).get(f"/api/v1/messages/{parent['id']}/replies").json()
    assert [r["id"] for r in listing["replies"]] == [reply["id"]]
    notes = api(alice).get("/api/v1/notifications").json()
    assert [n["kind"] for n in notes["notifications"]] == ["REPLY"]
    assert notes["unread_count"] == 1


@pytest.mark.smoke
def test_mentions_and_direct_messages_create_notifications(
    api: Api,
    alice: User,
    bob: User,
    carol: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    capture = events(user_group(bob.pk))
    with django_capture_on_commit_callbacks(execute=True):
        send(api(alice), thread, "hey @bob and @carol", "mention")
    (event,) = capture.receive_all()
    assert event["type"] == "notification"
    assert event["data"]["kind"] == "MENTION"
    # carol is not in the thread: no notification for her.
    assert not Notification.objects.filter(recipient=carol).exists()
    direct = api(alice).post("/api/v1/threads", {"kind": "DIRECT", "participant_ids": [carol.pk]}, format="json").json()
    api(alice).post(f"/api/v1/threads/{direct['id']}/messages", {"body": "psst", "client_msg_id": "dm"}, format="json")
    assert [n["kind"] for n in api(carol).get("/api/v1/notifications").json()["notifications"]] == ["DIRECT"]
    marked = api(bob).post("/api/v1/notifications/read", {}, format="json").json()
    assert marked == {"marked": 1}
    assert api(bob).get("/api/v1/notifications?unread=1").json()["notifications"] == []


@pytest.mark.smoke
def test_receipts_read_and_delivered_marks(
    api: Api,
    alice: User,
    bob: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    created = send(api(alice), thread, "did you see this?", "rc").json()
    receipts = f"/api/v1/messages/{created['id']}/receipts"
    assert api(alice).get(receipts).json()["status"] == "sent"
    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=True):
        api(bob).post(f"/api/v1/threads/{thread.pk}/delivered", {"seq": created["seq"]}, format="json")
    assert api(alice).get(receipts).json()["status"] == "delivered"
    with django_capture_on_commit_callbacks(execute=True):
        marked = api(bob).post(f"/api/v1/threads/{thread.pk}/read", {"seq": created["seq"]}, format="json").json()
        # Marks never move back, and an unchanged mark broadcasts nothing.
        api(bob).post(f"/api/v1/threads/{thread.pk}/read", {"seq": 0}, format="json")
    assert marked["last_read_sequence"] == created["seq"]
    seen = api(alice).get(receipts).json()
    assert seen["status"] == "read"
    assert [u["id"] for u in seen["read_by"]] == [bob.pk]
    assert "read_by" not in api(bob).get(receipts).json()  # names are for the sender
    assert [e["type"] for e in capture.receive_all()] == ["receipt", "receipt"]


def test_search_finds_words_ranked_with_highlights_only_in_my_threads(
    api: Api, alice: User, bob: User, carol: User, thread: Thread
) -> None:
    send(api(alice), thread, "The deployment pipeline is green", "s1")
    send(api(alice), thread, "lunch <b>plans</b> for deployment day", "s2")
    send(api(bob), thread, "nothing to see", "s3")
    from threads.services import thread_create

    private, _ = thread_create(creator=carol, title="carol only")
    message_send(sender=carol, thread_id=private.pk, body="deployment secrets", client_msg_id="s4")
    results = api(bob).get("/api/v1/search?q=deployment").json()["results"]
    bodies = [r["message"]["body"] for r in results]
    assert sorted(bodies) == sorted(["The deployment pipeline is green", "lunch <b>plans</b> for deployment day"])
    if connection.vendor == "postgresql":
        assert all("<mark>" in r["highlight"] for r in results)
        assert all("<b>" not in r["highlight"] for r in results)
        assert results[0]["rank"] >= results[-1]["rank"]
        # Stemming: "deployments" finds "deployment".
        assert len(api(bob).get("/api/v1/search?q=deployments").json()["results"]) == 2
    assert api(bob).get("/api/v1/search?q=").status_code == 400
    assert api(carol).get("/api/v1/search?q=pipeline").json()["results"] == []


@pytest.mark.smoke
def test_no_stale_read_after_write(api: Api, alice: User, bob: User, thread: Thread) -> None:
    created = send(api(bob), thread, "first text", "cache").json()
    url = f"/api/v1/threads/{thread.pk}/messages"
    assert api(alice).get(url).json()["messages"][-1]["body"] == "first text"  # now cached
    api(bob).patch(f"/api/v1/messages/{created['id']}", {"body": "second text", "version": 1}, format="json")
    assert api(alice).get(url).json()["messages"][-1]["body"] == "second text"
    api(bob).patch("/api/v1/me", {"display_name": "Robert"}, format="json")
    assert api(alice).get(url).json()["messages"][-1]["sender"]["name"] == "Robert"
    api(alice).patch(f"/api/v1/threads/{thread.pk}", {"title": "Fresh"}, format="json")
    assert api(bob).get(f"/api/v1/threads/{thread.pk}").json()["title"] == "Fresh"


@pytest.mark.smoke
def test_send_rate_limit_is_429_with_retry_after(api: Api, bob: User, thread: Thread, settings: Any) -> None:
    settings.CHAT_SENDS_PER_MINUTE = 3
    sends = [("m0", "rl0"), ("m0", "rl0"), ("m0", "rl0"), ("m1", "rl1"), ("m2", "rl2"), ("m3", "rl3")]
    codes = [send(api(bob), thread, body, cid).status_code for body, cid in sends]
    assert codes == [201, 200, 200, 201, 201, 429]  # retries spend nothing from the budget
    limited = send(api(bob), thread, "again", "rl-x")
    assert error_code(limited) == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["retry_after"] >= 1
    # A retry of a stored message is not a new send.
    assert send(api(bob), thread, "m0", "rl0").status_code == 200
    assert Message.objects.count() == 3


@pytest.mark.smoke
def test_general_api_limit_per_user(api: Api, bob: User, settings: Any) -> None:
    # Per hour, not per minute: django-ratelimit's windows are fixed, and a boundary falling inside
    # the test would reset the count.
    settings.API_RATE_PER_USER = "5/h"
    codes = [api(bob).get("/api/v1/threads").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]


@pytest.mark.smoke
def test_me_cannot_change_role_or_staff(api: Api, bob: User) -> None:
    assert api(bob).get("/api/v1/me").json()["system_role"] == "MEMBER"
    for field, value in (("system_role", "OWNER"), ("is_staff", True), ("is_superuser", True)):
        response = api(bob).patch("/api/v1/me", {field: value}, format="json")
        assert response.status_code == 400
        assert field in response.json()["error"]["fields"]
    ok = api(bob).patch("/api/v1/me", {"display_name": "Bobby", "preferences": {"theme": "dark"}}, format="json")
    assert ok.json()["display_name"] == "Bobby"
    assert ok.json()["preferences"] == {"theme": "dark"}
    bob.refresh_from_db()
    assert bob.system_role == "MEMBER"
    assert not bob.is_staff


@pytest.mark.smoke
def test_profile_rules_are_the_services(
    api: Api, bob: User, events: Callable[..., EventCapture], django_capture_on_commit_callbacks: Any
) -> None:
    """The length and URL rules hold for every caller: the REST view and a direct service call alike."""
    from accounts.services import user_update_profile
    from chatapp.errors import InvalidInput

    for field, value in (("display_name", "x" * 151), ("avatar_url", "ftp://example.test/a.png"), ("avatar_url", "me")):
        response = api(bob).patch("/api/v1/me", {field: value}, format="json")
        assert response.status_code == 400, (field, value)
        assert field in response.json()["error"]["fields"]
        with pytest.raises(InvalidInput) as refused:
            change: dict[str, Any] = {field: value}
            user_update_profile(user=bob, **change)
        assert refused.value.fields is not None
        assert field in refused.value.fields
    capture = events(user_group(bob.pk))
    with django_capture_on_commit_callbacks(execute=True):
        ok = api(bob).patch(
            "/api/v1/me", {"avatar_url": " https://example.test/a.png ", "display_name": " Bo "}, format="json"
        )
    assert (ok.json()["avatar_url"], ok.json()["display_name"]) == ("https://example.test/a.png", "Bo")
    bob.refresh_from_db()
    assert bob.display_name == "Bo"
    (updated,) = capture.receive_all()  # refused changes above sent nothing
    assert updated == {"type": "user.updated", "data": {"id": bob.pk, "name": "Bo"}}
