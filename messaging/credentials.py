"""A socket's authority lasts exactly as long as its credentials (docs/auth.md, "Websocket").

A socket learns that what opened it has ended in four ways:

- **notices** on the user's group (``session.revoked``, ``user.deactivated``,
  ``user.password_changed``), handled by the consumer as they arrive;
- **a re-check once the socket receives those notices** (:func:`recheck`, before ``ready``): a
  revocation committed between the handshake's authentication and the group join was announced
  to nobody here, so it is read instead. Every revocation writes before it announces, so it is
  either seen by this read or delivered as a notice;
- **every process beat** (:func:`check_sockets`, registered with
  :data:`messaging.realtime.beats`): one batched check of every socket of the process, for
  notices the channel layer lost (Redis down, a pub/sub drop) and for expired Clerk tokens;
- **a timer at a Clerk token's expiry** (plus ``CLERK_LEEWAY_SECONDS``), moved on by an ``auth``
  frame carrying a fresh token of the same user and session holder (:func:`frame_auth`).

Before closing for any of these the server sends ``{"type": "auth.ended", "data": {"reason"}}``
(daphne does not pass a close reason on), then closes with 4403 for a deactivated user and 4401
otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from django.conf import settings
from rest_framework import serializers

from accounts.clerk import MAX_TOKEN_LENGTH, USER_INACTIVE, ClerkTokenError
from accounts.ws_auth import SocketCredentials, clerk_credentials, credentials_check, scope_credentials
from chatapp.api import TextField
from chatapp.errors import InvalidInput, Unauthenticated
from messaging import realtime

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_DEACTIVATED = 4403
OTHER_USER = "other_user"  # an ``auth`` frame carried a token of someone else
_ending: set[asyncio.Task[None]] = set()


def close_code(reason: str) -> int:
    return CLOSE_DEACTIVATED if reason == USER_INACTIVE else CLOSE_UNAUTHENTICATED


def adopt(consumer: Any) -> None:
    """At connect: keep the credentials the handshake found, and close when a Clerk token expires."""
    consumer.credentials = scope_credentials(consumer.scope)
    _arm_expiry(consumer)


def expiry(consumer: Any) -> dict[str, int | None]:
    """For ``ready``: when the socket's Clerk token expires (``expires_at``, unix seconds, and
    ``expires_in``, seconds from now, for clients whose clock is off); None for other credentials."""
    credentials = consumer.credentials
    if credentials is None or credentials.expires_at is None:
        return {"expires_at": None, "expires_in": None}
    return {
        "expires_at": int(credentials.expires_at),
        "expires_in": max(0, round(credentials.expires_at - time.time())),
    }


async def end(consumer: Any, reason: str) -> None:
    """Close the socket because its credentials ended, saying why first."""
    if consumer.closing:
        return
    logger.info("closing socket %s of user %s: %s", consumer.conn_id, consumer.user_id, reason)
    await consumer.send_frame({"type": "auth.ended", "data": {"reason": reason}})
    await consumer.close(code=close_code(reason), reason=reason)


async def recheck(consumer: Any) -> bool:
    """Check the socket's credentials again (it has just joined its user's notices). True: it stays.

    If the database cannot be read the socket stays; the next process beat checks it again.
    """
    try:
        (reason,) = await realtime.db(credentials_check)([consumer.credentials])
    except Exception:
        realtime.stop_if_cancelled()
        logger.warning("credential re-check failed; the next beat checks again", exc_info=True)
        return True
    if reason is None:
        return True
    await end(consumer, reason)
    return False


async def check_sockets(consumers: list[Any]) -> None:
    """The process beat's check: every socket's credentials in one batch (see ``credentials_check``)."""
    entries = [(c, c.credentials) for c in consumers if c.credentials is not None and not c.closing]
    if not entries:
        return
    reasons = await realtime.db(credentials_check)([credentials for _, credentials in entries])
    for (consumer, credentials), reason in zip(entries, reasons, strict=True):
        # A socket that re-authenticated while this ran is judged on its new credentials next beat.
        if reason is not None and consumer.credentials is credentials:
            await end(consumer, reason)


realtime.beats.hooks.append(check_sockets)


# --- Clerk token expiry and in-band re-authentication -----------------------------------------------


def _arm_expiry(consumer: Any) -> None:
    """Close the socket (4401, ``token_expired``) when its Clerk token expires, past the leeway,
    unless an ``auth`` frame has replaced it by then."""
    timer = getattr(consumer, "expiry_timer", None)
    if timer is not None:
        timer.cancel()
    credentials: SocketCredentials = consumer.credentials
    if credentials.expires_at is None:
        consumer.expiry_timer = None
        return
    loop = asyncio.get_running_loop()
    delay = credentials.expires_at + settings.CLERK_LEEWAY_SECONDS - time.time()
    socket = weakref.ref(consumer)  # a closed socket is not kept alive until its token's expiry

    def expire() -> None:
        current = socket()
        if current is not None and current.credentials is credentials and not current.closing:
            task = loop.create_task(end(current, "token_expired"))
            _ending.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(_ending.discard)

    consumer.expiry_timer = loop.call_later(max(0.0, delay), expire)


class AuthFrame(serializers.Serializer):
    token = TextField(max_length=MAX_TOKEN_LENGTH)


async def frame_auth(consumer: Any, frame: dict[str, Any], request_id: Any) -> None:
    """``{"type": "auth", "token": "<fresh Clerk session token>"}``: the socket's authority now lasts
    as long as that token. Acked with ``expires_at`` (and ``expires_in``, seconds from now, for
    clients whose clock is off); a refused token is an ``unauthenticated`` error frame and the
    socket keeps its current credentials; a token of another user closes the socket (4401), one
    of the user, now deactivated, closes it with 4403.
    """
    serializer = AuthFrame(data=frame)
    if not serializer.is_valid():
        raise InvalidInput("Send a Clerk session token as 'token'.", fields={"token": ["Required."]})
    try:
        user, fresh = await realtime.db(clerk_credentials)(serializer.validated_data["token"])
    except ClerkTokenError as exc:
        if exc.reason == USER_INACTIVE and exc.user is not None:
            await end(consumer, USER_INACTIVE if exc.user.pk == consumer.user_id else OTHER_USER)
            return
        raise Unauthenticated(f"The session token was refused ({exc.reason}).") from None
    if user.pk != consumer.user_id:
        await end(consumer, OTHER_USER)
        return
    consumer.credentials = fresh
    consumer.scope["auth_method"] = fresh.method
    consumer.scope["auth_session_id"] = fresh.session_id  # the session whose revocation closes it now
    _arm_expiry(consumer)
    expiry = int(fresh.expires_at or 0)
    await consumer.ack(request_id, {"expires_at": expiry, "expires_in": max(0, round(expiry - time.time()))})
