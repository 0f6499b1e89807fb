"""The permission policy: one table, asked by every REST view, socket frame and the admin.

A user's *effective* role in a thread is the higher of their thread role and the role their
system role grants everywhere (system OWNER acts as thread OWNER, system ADMIN as thread
ADMIN). No effective role means the thread is invisible: callers raise 404, not 403.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from accounts.models import SystemRole
from chatapp.errors import Conflict, Forbidden, NotFound
from threads.models import ThreadKind, ThreadRole

if TYPE_CHECKING:
    from accounts.models import User
    from threads.models import Thread, ThreadParticipant


class Action(StrEnum):
    VIEW = "thread.view"  # read history and participants, subscribe, receipts, download files
    RENAME = "thread.rename"
    DELETE_THREAD = "thread.delete"
    LEAVE = "thread.leave"
    SEND = "message.send"  # includes uploading attachments for the thread
    REACT = "message.react"
    EDIT_OWN = "message.edit_own"
    DELETE_OWN = "message.delete_own"
    MODERATE = "message.moderate"  # delete anyone's message
    ADD_MEMBER = "participant.add"
    REMOVE_MEMBER = "participant.remove"
    CHANGE_ROLE = "participant.change_role"


RANK: dict[str, int] = {ThreadRole.MEMBER: 1, ThreadRole.ADMIN: 2, ThreadRole.OWNER: 3}

# The policy table: the least effective thread role that may perform each action.
POLICY: dict[Action, ThreadRole] = {
    Action.VIEW: ThreadRole.MEMBER,
    Action.LEAVE: ThreadRole.MEMBER,
    Action.SEND: ThreadRole.MEMBER,
    Action.REACT: ThreadRole.MEMBER,
    Action.EDIT_OWN: ThreadRole.MEMBER,
    Action.DELETE_OWN: ThreadRole.MEMBER,
    Action.RENAME: ThreadRole.ADMIN,
    Action.MODERATE: ThreadRole.ADMIN,
    Action.ADD_MEMBER: ThreadRole.ADMIN,
    Action.REMOVE_MEMBER: ThreadRole.ADMIN,
    Action.CHANGE_ROLE: ThreadRole.OWNER,
    Action.DELETE_THREAD: ThreadRole.OWNER,
}

# What each system role grants in every thread, member or not.
SYSTEM_INHERITANCE: dict[str, ThreadRole | None] = {
    SystemRole.OWNER: ThreadRole.OWNER,
    SystemRole.ADMIN: ThreadRole.ADMIN,
    SystemRole.MEMBER: None,
}

# Membership of a direct thread is fixed: two people, no roles to manage.
# Leaving one is archiving it (a direct thread cannot be re-created without its pair).
DIRECT_FORBIDDEN = {Action.ADD_MEMBER, Action.REMOVE_MEMBER, Action.CHANGE_ROLE, Action.RENAME, Action.LEAVE}


def is_usable(user: User | None) -> bool:
    """Deactivated, deleted and anonymous users are refused everywhere."""
    return bool(user is not None and user.is_authenticated and user.is_active and user.deactivated_at is None)


def is_staff_role(system_role: str) -> bool:
    return system_role in (SystemRole.OWNER, SystemRole.ADMIN)


def effective_role(user: User, participant: ThreadParticipant | None) -> ThreadRole | None:
    if not is_usable(user):
        return None
    roles = [SYSTEM_INHERITANCE.get(user.system_role)]
    if participant is not None:
        roles.append(ThreadRole(participant.role))
    present = [role for role in roles if role is not None]
    return max(present, key=lambda role: RANK[role]) if present else None


def allows(role: str | None, action: Action) -> bool:
    return role is not None and RANK[role] >= RANK[POLICY[action]]


def check(*, user: User, thread: Thread, participant: ThreadParticipant | None, action: Action) -> ThreadRole:
    """Raise NotFound if the thread is invisible to ``user``, Forbidden if the role is too low."""
    role = effective_role(user, participant)
    if role is None or thread.deleted_at is not None:
        raise NotFound("Thread not found.")
    if thread.kind == ThreadKind.DIRECT and action in DIRECT_FORBIDDEN:
        raise Forbidden("Direct conversations have a fixed pair of participants.")
    if not allows(role, action):
        raise Forbidden(f"Your role ({role}) cannot {action.value.replace('.', ' ')}.")
    return role


def check_message_author(*, user: User, author_id: int, role: ThreadRole, own: Action, other: Action | None) -> None:
    """Own messages need ``own``; someone else's need ``other`` (None: never, e.g. editing)."""
    if author_id == user.pk:
        if not allows(role, own):
            raise Forbidden()
        return
    if other is None or not allows(role, other):
        raise Forbidden("Only the author can do that." if other is None else "Only moderators can do that.")


# Who may give each thread role (adding someone with it, or changing a role to it), and who may act on
# (remove, change the role of) a participant who holds it: the least effective role. Only an OWNER
# makes or unmakes ADMINs and OWNERs, by any path: an ADMIN who removed an ADMIN could re-add them as a
# MEMBER, a demotion under another name. System roles count through the effective role (a system
# OWNER acts as an OWNER in every thread, a system ADMIN as an ADMIN).
GRANT: dict[ThreadRole, ThreadRole] = {
    ThreadRole.MEMBER: ThreadRole.ADMIN,
    ThreadRole.ADMIN: ThreadRole.OWNER,
    ThreadRole.OWNER: ThreadRole.OWNER,
}
MANAGE: dict[ThreadRole, ThreadRole] = {
    ThreadRole.MEMBER: ThreadRole.ADMIN,
    ThreadRole.ADMIN: ThreadRole.OWNER,
    ThreadRole.OWNER: ThreadRole.OWNER,
}


def check_grant(*, actor_role: ThreadRole, new_role: str) -> None:
    """May ``actor_role`` give ``new_role`` (adding a participant with it, or changing a role to it)?"""
    if RANK[actor_role] < RANK[GRANT[ThreadRole(new_role)]]:
        raise Forbidden("Only an owner can make someone an admin or an owner.")


def check_manage_target(*, actor_role: ThreadRole, target_role: str, new_role: str | None = None) -> None:
    """Rules for removing a participant or changing a role: an ADMIN acts on MEMBERs only, and only an
    OWNER grants ADMIN or OWNER. Callers read ``target_role`` under the thread's lock."""
    if RANK[actor_role] < RANK[MANAGE[ThreadRole(target_role)]]:
        if target_role == ThreadRole.OWNER:
            raise Forbidden("Only an owner can remove or change another owner.")
        raise Forbidden("Only an owner can remove or change an admin.")
    if new_role is not None:
        check_grant(actor_role=actor_role, new_role=new_role)


def check_not_last_owner(*, owners: int, target_role: str, new_role: str | None = None) -> None:
    """The last OWNER cannot leave, be removed or be demoted (409). ``owners`` is counted under the
    thread's row lock, which every membership change takes first: two owners leaving at once are
    serialised, and the second sees the first gone."""
    leaving_owner = target_role == ThreadRole.OWNER and (new_role is None or new_role != ThreadRole.OWNER)
    if leaving_owner and owners <= 1:
        raise Conflict(
            "The thread's last owner cannot leave or be demoted; promote someone first.", reason="last_owner"
        )


def check_set_system_role(*, actor: User | None) -> None:
    """Only a system OWNER changes system roles (``actor`` None: the system itself, a script or Clerk's
    metadata): a system role reaches every thread, so a system ADMIN making ADMINs would grant ADMIN
    in every thread."""
    if actor is not None and not (is_usable(actor) and actor.system_role == SystemRole.OWNER):
        raise Forbidden("Only a system owner can change system roles.")


def can_use_admin(user: User | None) -> bool:
    """Django admin access: active system OWNER/ADMIN (they are staff)."""
    return bool(user is not None and is_usable(user) and is_staff_role(user.system_role))


def check_manage_user(*, actor: User, target: User) -> None:
    """Deactivating or reactivating an account: staff only, never their own, and an ADMIN not an OWNER."""
    if not can_use_admin(actor):
        raise Forbidden("Only system owners and admins manage accounts.")
    if actor.pk == target.pk:
        raise Forbidden("You cannot deactivate or reactivate your own account.")
    if target.system_role == SystemRole.OWNER and actor.system_role != SystemRole.OWNER:
        raise Forbidden("Only a system owner can manage another owner's account.")
