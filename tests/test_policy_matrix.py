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


# Who may give each thread role and whom each may act on, by hand from the design: only an OWNER makes
# (or unmakes) ADMINs and OWNERs, by any path; an ADMIN adds and removes MEMBERs.
GRANT_NEEDS = {"MEMBER": "ADMIN", "ADMIN": "OWNER", "OWNER": "OWNER"}
MANAGE_NEEDS = {"MEMBER": "ADMIN", "ADMIN": "OWNER", "OWNER": "OWNER"}


def expected_for(actor_kind: str, least: str, allowed: int) -> int:
    role = EFFECTIVE_ROLE[actor_kind]
    if role is None:
        return 404
    return allowed if ROLE_ORDER.index(role) >= ROLE_ORDER.index(least) else 403


def role_of(world: World, user: User) -> str | None:
    return ThreadParticipant.objects.filter(thread=world.thread, user=user).values_list("role", flat=True).first()


@pytest.mark.parametrize("actor_kind", list(ACTORS))
@pytest.mark.parametrize("role", ["MEMBER", "ADMIN", "OWNER"])
def test_only_an_owner_grants_admin_or_owner_by_adding(
    role: str, actor_kind: str, make_user: Callable[..., User]
) -> None:
    world = build(make_user, actor_kind)
    client = APIClient()
    client.force_authenticate(world.actor)
    url = f"/api/v1/threads/{world.thread.pk}/participants"
    response = client.post(url, {"user_id": world.newcomer.pk, "role": role}, format="json")
    expected = expected_for(actor_kind, GRANT_NEEDS[role], 201)
    assert response.status_code == expected, (role, actor_kind, response.content)
    assert role_of(world, world.newcomer) == (role if expected == 201 else None)


@pytest.mark.parametrize("actor_kind", ["thread-admin", "system-admin", "thread-owner", "system-owner"])
@pytest.mark.parametrize("role", ["ADMIN", "OWNER"])
def test_only_an_owner_grants_admin_or_owner_by_removing_and_adding_again(
    role: str, actor_kind: str, make_user: Callable[..., User]
) -> None:
    world = build(make_user, actor_kind)
    client = APIClient()
    client.force_authenticate(world.actor)
    url = f"/api/v1/threads/{world.thread.pk}/participants"
    assert client.delete(f"{url}/{world.target.pk}").status_code == 204  # a MEMBER: ADMIN+ may remove them
    response = client.post(url, {"user_id": world.target.pk, "role": role}, format="json")
    expected = expected_for(actor_kind, GRANT_NEEDS[role], 201)
    assert response.status_code == expected, (role, actor_kind, response.content)
    assert role_of(world, world.target) == (role if expected == 201 else None)


@pytest.mark.parametrize("actor_kind", list(ACTORS))
@pytest.mark.parametrize("target_role", ["MEMBER", "ADMIN", "OWNER"])
def test_an_admin_removes_members_only(target_role: str, actor_kind: str, make_user: Callable[..., User]) -> None:
    # Removing an ADMIN and adding them back as a MEMBER would be a demotion, which only an OWNER makes.
    world = build(make_user, actor_kind)
    ThreadParticipant.objects.filter(thread=world.thread, user=world.target).update(role=target_role)
    client = APIClient()
    client.force_authenticate(world.actor)
    response = client.delete(f"/api/v1/threads/{world.thread.pk}/participants/{world.target.pk}")
    expected = expected_for(actor_kind, MANAGE_NEEDS[target_role], 204)
    assert response.status_code == expected, (target_role, actor_kind, response.content)
    assert role_of(world, world.target) == (None if expected == 204 else target_role)


def test_the_admin_site_follows_the_same_rules(make_user: Callable[..., User]) -> None:
    from tests.test_admin import run_action, staff_client

    world = build(make_user, "thread-member")
    ThreadParticipant.objects.filter(thread=world.thread, user=world.target).update(role=ThreadRole.ADMIN)
    target = ThreadParticipant.objects.get(thread=world.thread, user=world.target)
    moderator = staff_client(make_user("mod", role=SystemRole.ADMIN))
    shown = run_action(moderator, "/admin/threads/threadparticipant/", "remove_participants", [target.pk])
    assert shown[0].endswith("Only an owner can remove or change an admin.")
    assert role_of(world, world.target) == ThreadRole.ADMIN
    boss = staff_client(make_user("boss", role=SystemRole.OWNER))
    assert run_action(boss, "/admin/threads/threadparticipant/", "remove_participants", [target.pk]) == [
        "Removed 1 participant(s)."
    ]
    assert role_of(world, world.target) is None


def test_only_an_active_system_owner_changes_system_roles(make_user: Callable[..., User]) -> None:
    # A system role reaches every thread: a system ADMIN who made ADMINs would grant ADMIN everywhere.
    from accounts.services import user_deactivate, user_set_system_role
    from chatapp.errors import Forbidden

    someone = make_user("someone")
    with pytest.raises(Forbidden):
        user_set_system_role(actor=make_user("mod", role=SystemRole.ADMIN), user=someone, role=SystemRole.ADMIN)
    former = make_user("former", role=SystemRole.OWNER)
    user_deactivate(actor=None, user=former)
    with pytest.raises(Forbidden):
        user_set_system_role(actor=former, user=someone, role=SystemRole.ADMIN)
    boss = make_user("boss", role=SystemRole.OWNER)
    assert user_set_system_role(actor=boss, user=someone, role=SystemRole.ADMIN).system_role == SystemRole.ADMIN
