"""The role x action matrix, written out here from the design and asserted through the REST API.

Every action of ``threads.policy.POLICY`` is tried by every kind of actor: a participant with each
thread role, a non-participant whose system role is inherited into the thread, and an outsider.
Allowed -> 2xx, visible but not allowed -> 403, invisible -> 404.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import transaction
from rest_framework.test import APIClient

from accounts.models import SystemRole, User
from messaging.services import message_send
from threads import policy
from threads.models import Thread, ThreadParticipant, ThreadRole
from threads.services import thread_create

pytestmark = [pytest.mark.django_db, pytest.mark.smoke]

# (thread role or None, system role) for each kind of actor.
ACTORS: dict[str, tuple[str | None, str]] = {
    "thread-member": (ThreadRole.MEMBER, SystemRole.MEMBER),
    "thread-admin": (ThreadRole.ADMIN, SystemRole.MEMBER),
    "thread-owner": (ThreadRole.OWNER, SystemRole.MEMBER),
    "system-admin": (None, SystemRole.ADMIN),
    "system-owner": (None, SystemRole.OWNER),
    "outsider": (None, SystemRole.MEMBER),
}


@dataclass
class World:
    thread: Thread
    actor: User
    target: User
    newcomer: User
    others_message_id: int


def build(make_user: Callable[..., User], actor_kind: str) -> World:
    thread_role, system_role = ACTORS[actor_kind]
    owner = make_user("owner")
    co_owner = make_user("coowner")
    target = make_user("target")
    actor = make_user("actor", role=system_role)
    newcomer = make_user("newcomer")
    thread, _ = thread_create(creator=owner, title="matrix", participant_ids=[co_owner.pk, target.pk])
    ThreadParticipant.objects.filter(thread=thread, user=co_owner).update(role=ThreadRole.OWNER)
    if thread_role is not None:
        ThreadParticipant.objects.create(thread=thread, user=actor, role=thread_role)
    others, _ = message_send(sender=target, thread_id=thread.pk, body="target's words", client_msg_id="t-1")
    return World(thread=thread, actor=actor, target=target, newcomer=newcomer, others_message_id=others.pk)


def own_message(world: World) -> int:
    """A message of the actor's own (inserted directly: sending is itself a cell of the matrix)."""
    from chatapp.broadcast import sequence_next
    from messaging.models import Message

    with transaction.atomic():
        seq = sequence_next(world.thread.pk)
        return Message.objects.create(
            thread=world.thread, sender=world.actor, body="mine", client_msg_id="own", sequence=seq
        ).pk


def perform(action: policy.Action, client: APIClient, world: World) -> Any:
    t = world.thread.pk
    calls: dict[policy.Action, Callable[[], Any]] = {
        policy.Action.VIEW: lambda: client.get(f"/api/v1/threads/{t}/messages"),
        policy.Action.RENAME: lambda: client.patch(f"/api/v1/threads/{t}", {"title": "new"}, format="json"),
        policy.Action.DELETE_THREAD: lambda: client.delete(f"/api/v1/threads/{t}"),
        policy.Action.LEAVE: lambda: client.post(f"/api/v1/threads/{t}/leave"),
        policy.Action.SEND: lambda: client.post(
            f"/api/v1/threads/{t}/messages", {"body": "hi", "client_msg_id": "m"}, format="json"
        ),
        policy.Action.REACT: lambda: client.post(
            f"/api/v1/messages/{world.others_message_id}/reactions", {"emoji": "👍"}, format="json"
        ),
        policy.Action.EDIT_OWN: lambda: client.patch(
            f"/api/v1/messages/{own_message(world)}", {"body": "edited", "version": 1}, format="json"
        ),
        policy.Action.DELETE_OWN: lambda: client.delete(f"/api/v1/messages/{own_message(world)}"),
        policy.Action.MODERATE: lambda: client.delete(f"/api/v1/messages/{world.others_message_id}"),
        policy.Action.ADD_MEMBER: lambda: client.post(
            f"/api/v1/threads/{t}/participants", {"user_id": world.newcomer.pk}, format="json"
        ),
        policy.Action.REMOVE_MEMBER: lambda: client.delete(f"/api/v1/threads/{t}/participants/{world.target.pk}"),
        policy.Action.CHANGE_ROLE: lambda: client.patch(
            f"/api/v1/threads/{t}/participants/{world.target.pk}", {"role": "ADMIN"}, format="json"
        ),
    }
    assert set(calls) == set(policy.Action), "every action in the policy has an API call in the matrix"
    return calls[action]()


# The design, by hand (not read from threads.policy, which is what is under test): the least
# effective role each action needs, and each actor's effective role in the thread (the higher of
# their thread role and what their system role grants everywhere).
LEAST_ROLE: dict[policy.Action, str] = {
    policy.Action.VIEW: "MEMBER",
    policy.Action.LEAVE: "MEMBER",
    policy.Action.SEND: "MEMBER",
    policy.Action.REACT: "MEMBER",
    policy.Action.EDIT_OWN: "MEMBER",
    policy.Action.DELETE_OWN: "MEMBER",
    policy.Action.RENAME: "ADMIN",
    policy.Action.MODERATE: "ADMIN",
    policy.Action.ADD_MEMBER: "ADMIN",
    policy.Action.REMOVE_MEMBER: "ADMIN",
    policy.Action.CHANGE_ROLE: "OWNER",
    policy.Action.DELETE_THREAD: "OWNER",
}
EFFECTIVE_ROLE: dict[str, str | None] = {
    "thread-member": "MEMBER",
    "thread-admin": "ADMIN",
    "thread-owner": "OWNER",
    "system-admin": "ADMIN",
    "system-owner": "OWNER",
    "outsider": None,
}
ROLE_ORDER = ["MEMBER", "ADMIN", "OWNER"]


def expected_status(action: policy.Action, actor_kind: str) -> int:
    role = EFFECTIVE_ROLE[actor_kind]
    if role is None:
        return 404
    if action == policy.Action.LEAVE and ACTORS[actor_kind][0] is None:
        return 404  # only participants can leave
    return 200 if ROLE_ORDER.index(role) >= ROLE_ORDER.index(LEAST_ROLE[action]) else 403


@pytest.mark.parametrize("actor_kind", list(ACTORS))
@pytest.mark.parametrize("action", list(policy.Action))
def test_policy_matrix_through_the_api(action: policy.Action, actor_kind: str, make_user: Callable[..., User]) -> None:
    world = build(make_user, actor_kind)
    client = APIClient()
    client.force_authenticate(world.actor)
    response = perform(action, client, world)
    expected = expected_status(action, actor_kind)
    if expected == 200:
        assert 200 <= response.status_code < 300, (action, actor_kind, response.status_code, response.content)
    else:
        assert response.status_code == expected, (action, actor_kind, response.status_code, response.content)
        assert response.json()["error"]["code"] == {403: "forbidden", 404: "not_found"}[expected]


def test_policy_table_is_the_design() -> None:
    assert set(LEAST_ROLE) == set(policy.Action)
    assert {action: str(role) for action, role in policy.POLICY.items()} == LEAST_ROLE
    inherited = {system: policy.SYSTEM_INHERITANCE[system] for system in SystemRole.values}
    assert inherited == {"OWNER": "OWNER", "ADMIN": "ADMIN", "MEMBER": None}


def test_admin_is_refused_to_non_staff(client: Any, make_user: Callable[..., User]) -> None:
    member = make_user("plain")
    client.force_login(member)
    assert client.get("/admin/").status_code == 302  # to the admin login
    staff = make_user("mod", role=SystemRole.ADMIN)
    client.force_login(staff)
    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/messaging/message/").status_code == 200
    from accounts.services import user_deactivate

    user_deactivate(actor=None, user=staff)
    client.force_login(User.objects.get(pk=staff.pk))
    assert client.get("/admin/").status_code == 302
