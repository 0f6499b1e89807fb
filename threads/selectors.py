"""Permission-checked reads for threads."""

from __future__ import annotations

from dataclasses import dataclass

from accounts.models import User
from chatapp.errors import NotFound
from threads import policy
from threads.models import Thread, ThreadParticipant, ThreadRole


@dataclass(frozen=True)
class ThreadAccess:
    """A thread as seen by one user: their membership (None if access is inherited) and effective role."""

    thread: Thread
    participant: ThreadParticipant | None
    role: ThreadRole


def thread_get_for_member(*, thread_id: int, user: User, action: policy.Action = policy.Action.VIEW) -> ThreadAccess:
    """The thread if ``user`` may do ``action`` in it; NotFound if it is invisible to them, Forbidden if not allowed."""
    if not policy.is_usable(user):
        raise NotFound("Thread not found.")
    try:
        thread = Thread.objects.get(pk=thread_id, deleted_at__isnull=True)
    except (Thread.DoesNotExist, ValueError, TypeError):
        raise NotFound("Thread not found.") from None
    participant = ThreadParticipant.objects.filter(thread=thread, user=user).select_related("user").first()
    role = policy.check(user=user, thread=thread, participant=participant, action=action)
    return ThreadAccess(thread=thread, participant=participant, role=role)


def thread_member_ids(*, thread_id: int) -> list[int]:
    return list(ThreadParticipant.objects.filter(thread_id=thread_id).values_list("user_id", flat=True))


def thread_owner_count(*, thread_id: int) -> int:
    return ThreadParticipant.objects.filter(thread_id=thread_id, role=ThreadRole.OWNER).count()
