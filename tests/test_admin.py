"""Moderation through the Django admin: every action goes through the services, their policy and their
broadcasts, exactly as the REST API and the socket do; nothing in the admin writes a row by itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from accounts.models import AuditEntry, SystemRole, User
from accounts.services import CLERK_DELETED_MARK
from chatapp.broadcast import thread_group, user_group
from messaging.models import Message
from messaging.services import message_send
from tests.conftest import EventCapture
from threads.models import Thread, ThreadParticipant

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]


def staff_client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def run_action(client: Client, path: str, action: str, ids: list[int]) -> list[str]:
    """POST an admin changelist action; returns the messages shown on the page it redirects to."""
    response = client.post(path, {"action": action, "_selected_action": [str(pk) for pk in ids]}, follow=True)
    assert response.status_code == 200
    return [str(message) for message in response.context["messages"]]


def test_soft_delete_and_restore_broadcast_to_the_thread(
    make_user: Callable[..., User],
    alice: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    moderator = make_user("mod", role=SystemRole.ADMIN)  # not a member: the system role reaches every thread
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="rude words", client_msg_id="adm-1")
    capture = events(thread_group(thread.pk))
    client = staff_client(moderator)

    with django_capture_on_commit_callbacks(execute=True):
        shown = run_action(client, "/admin/messaging/message/", "soft_delete", [message.pk])
    assert shown == ["Deleted 1 message(s)."]
    message.refresh_from_db()
    assert message.deleted_at is not None
    (deleted,) = capture.receive_all()
    assert deleted["type"] == "message.deleted"
    assert deleted["data"]["message"]["id"] == message.pk
    assert deleted["data"]["message"]["deleted"] is True
    assert "rude words" not in str(deleted)

    with django_capture_on_commit_callbacks(execute=True):
        shown = run_action(client, "/admin/messaging/message/", "restore", [message.pk])
    assert shown == ["Restored 1 message(s)."]
    (restored,) = capture.receive_all()
    assert restored["type"] == "message.updated"
    assert restored["data"]["message"]["body"] == "rude words"
    assert restored["seq"] > deleted["seq"]


def test_removing_a_participant_broadcasts_and_keeps_the_last_owner_rule(
    make_user: Callable[..., User],
    alice: User,
    bob: User,
    thread: Thread,
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    client = staff_client(make_user("mod", role=SystemRole.ADMIN))
    capture = events(thread_group(thread.pk), user_group(bob.pk))
    membership = ThreadParticipant.objects.get(thread=thread, user=bob)
    owner = ThreadParticipant.objects.get(thread=thread, user=alice)

    with django_capture_on_commit_callbacks(execute=True):
        shown = run_action(client, "/admin/threads/threadparticipant/", "remove_participants", [membership.pk])
    assert shown == ["Removed 1 participant(s)."]
    assert not ThreadParticipant.objects.filter(pk=membership.pk).exists()
    received = {event["type"]: event for event in capture.receive_all()}
    assert set(received) == {"thread.participant_removed", "thread.removed"}  # the thread, and bob's sockets
    assert received["thread.participant_removed"]["data"]["user_id"] == bob.pk
    assert received["thread.removed"]["data"]["thread_id"] == thread.pk

    # The thread policy holds in the admin too: a system ADMIN cannot remove a thread OWNER, and even a
    # system OWNER cannot remove a thread's last owner (the services say why).
    shown = run_action(client, "/admin/threads/threadparticipant/", "remove_participants", [owner.pk])
    assert shown[0].endswith("Only an owner can remove or change another owner.")
    assert shown[-1] == "Removed 0 participant(s)."
    boss = staff_client(make_user("boss", role=SystemRole.OWNER))
    shown = run_action(boss, "/admin/threads/threadparticipant/", "remove_participants", [owner.pk])
    assert "last owner" in shown[0]
    assert shown[-1] == "Removed 0 participant(s)."
    assert ThreadParticipant.objects.filter(pk=owner.pk).exists()


def test_deactivation_closes_sockets_and_follows_the_policy(
    make_user: Callable[..., User],
    events: Callable[..., EventCapture],
    django_capture_on_commit_callbacks: Any,
) -> None:
    owner = make_user("boss", role=SystemRole.OWNER)
    admin_user = make_user("mod", role=SystemRole.ADMIN)
    member = make_user("member")
    capture = events(user_group(member.pk), user_group(owner.pk))
    client = staff_client(admin_user)
    path = "/admin/accounts/user/"

    with django_capture_on_commit_callbacks(execute=True):
        shown = run_action(client, path, "deactivate_users", [member.pk, owner.pk, admin_user.pk])
    assert "boss: Only a system owner can manage another owner's account." in shown
    assert "mod: You cannot deactivate or reactivate your own account." in shown
    assert shown[-1] == "Deactivated 1 user(s)."
    states = dict(User.objects.filter(pk__in=[member.pk, owner.pk, admin_user.pk]).values_list("username", "is_active"))
    assert states == {"member": False, "boss": True, "mod": True}
    (event,) = capture.receive_all()  # the member's sockets are told to close; the owner hears nothing
    assert event["type"] == "user.deactivated"
    assert event["data"] == {"id": member.pk}
    assert AuditEntry.objects.filter(action="user.deactivate", actor=admin_user, target_id=str(member.pk)).exists()

    shown = run_action(client, path, "reactivate_users", [member.pk])
    assert shown == ["Reactivated 1 user(s)."]
    member.refresh_from_db()
    assert member.is_active
    assert member.deactivated_at is None


def test_a_user_deleted_in_clerk_is_not_reactivated(make_user: Callable[..., User]) -> None:
    from accounts.services import user_sync_from_clerk

    gone = make_user("gone")
    gone.clerk_id = "user_gone"
    gone.save(update_fields=["clerk_id"])
    user_sync_from_clerk(data={"id": "user_gone", "deleted": True}, event_type="user.deleted")
    gone.refresh_from_db()
    assert gone.clerk_updated_at == CLERK_DELETED_MARK
    assert not gone.is_active

    shown = run_action(
        staff_client(make_user("boss", role=SystemRole.OWNER)), "/admin/accounts/user/", "reactivate_users", [gone.pk]
    )
    assert f"deleted-{gone.pk}: This account was deleted in Clerk and cannot be reactivated." in shown
    gone.refresh_from_db()
    assert not gone.is_active


def test_accounts_are_shown_not_edited(make_user: Callable[..., User], alice: User) -> None:
    """A profile is its user's (or Clerk's): the change form saves nothing, the password page is refused."""
    client = staff_client(make_user("boss", role=SystemRole.OWNER))
    page = client.get(f"/admin/accounts/user/{alice.pk}/change/")
    assert page.status_code == 200
    assert b'name="display_name"' not in page.content  # shown read-only, no input

    response = client.post(
        f"/admin/accounts/user/{alice.pk}/change/", {"username": "alice", "display_name": "Hacked", "email": "x@y.z"}
    )
    assert response.status_code == 403
    assert client.get(f"/admin/accounts/user/{alice.pk}/password/").status_code == 403
    response = client.post(
        f"/admin/accounts/user/{alice.pk}/password/", {"password1": "n3w-Passw0rd!", "password2": "n3w-Passw0rd!"}
    )
    assert response.status_code == 403
    alice.refresh_from_db()
    assert alice.display_name == "Alice"
    assert alice.check_password("pw-for-tests-123")


def test_message_bodies_are_not_edited_in_the_admin(
    make_user: Callable[..., User], alice: User, thread: Thread
) -> None:
    message, _ = message_send(sender=alice, thread_id=thread.pk, body="original", client_msg_id="adm-2")
    client = staff_client(make_user("boss", role=SystemRole.OWNER))
    assert client.get(f"/admin/messaging/message/{message.pk}/change/").status_code == 200
    response = client.post(f"/admin/messaging/message/{message.pk}/change/", {"body": "rewritten"})
    assert response.status_code == 403
    assert Message.objects.get(pk=message.pk).body == "original"
