"""Threads and participants over REST: success, validation, non-member 404, roles, and the events they send."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from accounts.models import SystemRole, User
from chatapp.broadcast import thread_group, user_group
from tests.conftest import EventCapture
from threads.models import Thread, ThreadParticipant, ThreadRole

pytestmark = [pytest.mark.django_db, pytest.mark.smoke]

Api = Callable[[User | None], APIClient]


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]), body
    return str(body["error"]["code"])


def test_thread_create_group_broadcasts_to_each_participant(
    api: Api, alice: User, bob: User, events: Callable[..., EventCapture], django_capture_on_commit_callbacks: Any
) -> None:
    capture = events(user_group(alice.pk), user_group(bob.pk))
    with django_capture_on_commit_callbacks(execute=True):
        response = api(alice).post("/api/v1/threads", {"title": "Launch", "participant_ids": [bob.pk]}, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["title"] == "Launch"
    assert body["my_role"] == "OWNER"
    assert {p["user"]["id"]: p["role"] for p in body["participants"]} == {alice.pk: "OWNER", bob.pk: "MEMBER"}
    received = capture.receive_all()
    assert sorted(e["type"] for e in received) == ["thread.created", "thread.created"]
    assert {e["data"]["thread"]["id"] for e in received} == {body["id"]}


def test_thread_create_direct_is_unique_per_pair(
    api: Api, alice: User, bob: User, events: Callable[..., EventCapture], django_capture_on_commit_callbacks: Any
) -> None:
    capture = events(user_group(alice.pk), user_group(bob.pk))
    with django_capture_on_commit_callbacks(execute=True):
        first = api(alice).post("/api/v1/threads", {"kind": "DIRECT", "participant_ids": [bob.pk]}, format="json")
    assert first.status_code == 201
    created = capture.receive_all()
    assert [e["type"] for e in created] == ["thread.created", "thread.created"]
    assert {e["data"]["thread"]["id"] for e in created} == {first.json()["id"]}
    with django_capture_on_commit_callbacks(execute=True):
        again = api(bob).post("/api/v1/threads", {"kind": "DIRECT", "participant_ids": [alice.pk]}, format="json")
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert Thread.objects.filter(kind="DIRECT").count() == 1
    assert capture.receive_all() == []  # asking again announces nothing


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"title": "x", "participant_ids": [999999]}, "participant_ids"),
        ({"kind": "DIRECT", "participant_ids": []}, "participant_ids"),
        ({"kind": "CHANNEL"}, "kind"),
        ({"title": "x", "last_sequence": 5}, "last_sequence"),
        ({"title": "x", "created_by": 1}, "created_by"),
        ({"title": "x" * 201}, "title"),
    ],
)
def test_thread_create_validation(api: Api, alice: User, payload: dict[str, Any], field: str) -> None:
    response = api(alice).post("/api/v1/threads", payload, format="json")
    assert response.status_code == 400
    assert error_code(response) == "invalid"
    assert field in response.json()["error"]["fields"]
    assert not Thread.objects.exists()


def test_thread_title_limit_is_the_services(alice: User, thread: Thread) -> None:
    from chatapp.errors import InvalidInput
    from threads.services import thread_create, thread_rename

    with pytest.raises(InvalidInput) as refused:
        thread_create(creator=alice, title="x" * 201)
    assert refused.value.fields == {"title": ["At most 200 characters."]}
    with pytest.raises(InvalidInput):
        thread_rename(actor=alice, thread_id=thread.pk, title="y" * 201)
    assert thread_rename(actor=alice, thread_id=thread.pk, title=" " + "z" * 200 + " ").title == "z" * 200


def test_thread_list_unread_last_message_and_archived_apart(
    api: Api,
    alice: User,
    bob: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    from messaging.services import message_send

    for i in range(3):
        message_send(sender=alice, thread_id=thread.pk, body=f"hi {i}", client_msg_id=f"m{i}")
    other = api(bob).post("/api/v1/threads", {"title": "Other", "participant_ids": [alice.pk]}, format="json").json()
    listing = api(bob).get("/api/v1/threads").json()["threads"]
    by_id = {t["id"]: t for t in listing}
    assert by_id[thread.pk]["unread_count"] == 3
    assert by_id[thread.pk]["last_message"]["body"] == "hi 2"
    assert by_id[thread.pk]["my_role"] == "MEMBER"
    assert by_id[other["id"]]["my_role"] == "OWNER"
    capture = events(user_group(bob.pk))
    with django_capture_on_commit_callbacks(execute=True):
        archive = api(bob).patch(f"/api/v1/threads/{thread.pk}/membership", {"archived": True}, format="json")
    assert archive.status_code == 200
    (settings_event,) = capture.receive_all()  # bob's other tabs move it too
    assert settings_event["type"] == "thread.membership_updated"
    assert settings_event["data"]["thread_id"] == thread.pk
    active = [t["id"] for t in api(bob).get("/api/v1/threads").json()["threads"]]
    archived = [t["id"] for t in api(bob).get("/api/v1/threads?archived=1").json()["threads"]]
    assert active == [other["id"]]
    assert archived == [thread.pk]
    # Reading clears the unread count.
    api(bob).post(f"/api/v1/threads/{thread.pk}/read", {"seq": 10_000}, format="json")
    assert api(bob).get("/api/v1/threads?archived=1").json()["threads"][0]["unread_count"] == 0


def test_thread_list_pages_by_cursor(api: Api, alice: User, bob: User) -> None:
    from threads.services import thread_create

    ids = {thread_create(creator=alice, title=f"t{i}", participant_ids=[bob.pk])[0].pk for i in range(7)}
    seen: list[int] = []
    url = "/api/v1/threads?limit=3"
    while url:
        page = api(bob).get(url).json()
        seen += [t["id"] for t in page["threads"]]
        url = f"/api/v1/threads?limit=3&cursor={page['next_cursor']}" if page["next_cursor"] else ""
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen))


def test_thread_get_rename_delete_by_role(
    api: Api,
    alice: User,
    bob: User,
    carol: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    assert api(bob).get(f"/api/v1/threads/{thread.pk}").status_code == 200
    assert error_code(api(carol).get(f"/api/v1/threads/{thread.pk}")) == "not_found"
    assert api(carol).get(f"/api/v1/threads/{thread.pk}").status_code == 404
    assert api(bob).patch(f"/api/v1/threads/{thread.pk}", {"title": "No"}, format="json").status_code == 403
    capture = events(thread_group(thread.pk))
    with django_capture_on_commit_callbacks(execute=True):
        renamed = api(alice).patch(f"/api/v1/threads/{thread.pk}", {"title": "Renamed"}, format="json")
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "Renamed"
    (event,) = capture.receive_all()
    assert event["type"] == "thread.updated"
    assert event["data"]["thread"]["title"] == "Renamed"
    assert api(bob).delete(f"/api/v1/threads/{thread.pk}").status_code == 403
    with django_capture_on_commit_callbacks(execute=True):
        assert api(alice).delete(f"/api/v1/threads/{thread.pk}").status_code == 204
    assert capture.receive_all()[0]["type"] == "thread.deleted"
    assert api(alice).get(f"/api/v1/threads/{thread.pk}").status_code == 404


def test_participants_add_role_remove_leave(
    api: Api,
    alice: User,
    bob: User,
    carol: User,
    make_user: Callable[..., User],
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    url = f"/api/v1/threads/{thread.pk}/participants"
    # A MEMBER cannot add.
    assert api(bob).post(url, {"user_id": carol.pk}, format="json").status_code == 403
    capture = events(thread_group(thread.pk), user_group(carol.pk))
    with django_capture_on_commit_callbacks(execute=True):
        added = api(alice).post(url, {"user_id": carol.pk}, format="json")
    assert added.status_code == 201
    types = sorted(e["type"] for e in capture.receive_all())
    assert types == ["thread.created", "thread.participant_added"]
    assert len(api(carol).get(url).json()["participants"]) == 3
    # Promote bob to ADMIN: an ADMIN can add and remove members but not touch the OWNER.
    with django_capture_on_commit_callbacks(execute=True):
        assert api(alice).patch(f"{url}/{bob.pk}", {"role": "ADMIN"}, format="json").status_code == 200
    assert capture.receive_all()[0]["type"] == "thread.role_changed"
    dave = make_user("dave")
    assert api(bob).post(url, {"user_id": dave.pk}, format="json").status_code == 201
    assert api(bob).post(url, {"user_id": make_user("erin").pk, "role": "OWNER"}, format="json").status_code == 403
    assert api(bob).delete(f"{url}/{alice.pk}").status_code == 403
    assert api(bob).patch(f"{url}/{alice.pk}", {"role": "MEMBER"}, format="json").status_code == 403
    with django_capture_on_commit_callbacks(execute=True):
        assert api(bob).delete(f"{url}/{carol.pk}").status_code == 204
    received = capture.receive_all()
    assert {e["type"] for e in received} == {"thread.participant_removed", "thread.removed"}
    # Removed: the thread is gone for carol at once.
    assert api(carol).get(f"/api/v1/threads/{thread.pk}").status_code == 404
    # The last OWNER can neither leave nor be demoted.
    left = api(alice).post(f"/api/v1/threads/{thread.pk}/leave")
    assert left.status_code == 409
    assert left.json()["error"]["reason"] == "last_owner"
    assert api(alice).patch(f"{url}/{alice.pk}", {"role": "ADMIN"}, format="json").status_code == 409
    # After promoting bob to OWNER, alice may leave.
    capture.receive_all()
    with django_capture_on_commit_callbacks(execute=True):
        assert api(alice).patch(f"{url}/{bob.pk}", {"role": "OWNER"}, format="json").status_code == 200
    (promoted,) = capture.receive_all()
    assert promoted["type"] == "thread.role_changed"
    assert (promoted["data"]["user_id"], promoted["data"]["role"], promoted["data"]["previous"]) == (
        bob.pk,
        "OWNER",
        "ADMIN",
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert api(alice).post(f"/api/v1/threads/{thread.pk}/leave").status_code == 204
    (left_event,) = capture.receive_all()
    assert left_event["type"] == "thread.participant_removed"
    assert left_event["data"]["user_id"] == alice.pk
    assert left_event["seq"] > promoted["seq"]
    assert not ThreadParticipant.objects.filter(thread=thread, user=alice).exists()


def test_system_roles_are_inherited_into_every_thread(api: Api, make_user: Callable[..., User], thread: Thread) -> None:
    system_owner = make_user("root", role=SystemRole.OWNER)
    system_admin = make_user("mod", role=SystemRole.ADMIN)
    member = make_user("nobody")
    assert api(system_owner).get(f"/api/v1/threads/{thread.pk}").json()["my_role"] == ThreadRole.OWNER
    assert api(system_admin).get(f"/api/v1/threads/{thread.pk}").json()["my_role"] == ThreadRole.ADMIN
    assert api(member).get(f"/api/v1/threads/{thread.pk}").status_code == 404


def test_deactivated_user_is_refused(api: Api, bob: User, thread: Thread) -> None:
    from accounts.services import user_deactivate

    user_deactivate(actor=None, user=bob)
    bob.refresh_from_db()
    response = api(bob).get(f"/api/v1/threads/{thread.pk}")
    assert response.status_code in (401, 403, 404)
    assert "error" in response.json()


def test_anonymous_gets_401_in_the_error_shape() -> None:
    response = APIClient().get("/api/v1/threads")
    assert response.status_code == 401
    assert error_code(response) == "unauthenticated"
    assert response.headers["WWW-Authenticate"]


def test_unknown_api_route_is_json_404(api: Api, alice: User) -> None:
    response = api(alice).get("/api/v1/nope")
    assert response.status_code == 404
    assert error_code(response) == "not_found"
