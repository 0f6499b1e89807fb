"""A socket's authority lasts exactly as long as its credentials (messaging/credentials.py, accounts/ws_auth.py).

Revocations that land while a socket is being opened (forced between the handshake's authentication
and the join of the user's notices), revocations whose notice was lost (the process beat's batched
re-check), Clerk tokens that expire and the ``auth`` frame that renews them, and API tokens for bots.
The consumer runs in this process on the real database, Redis and channel layer, authenticated by
the real middleware; Clerk tokens are signed with real keys served from a loopback JWKS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.auth.models import AnonymousUser
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from accounts.services import (
    clerk_webhook_process,
    user_deactivate,
    user_get_or_create_from_clerk_claims,
    user_token_issue,
    user_token_revoke,
)
from accounts.ws_auth import SocketCredentials, WebsocketAuthMiddleware, credentials_check
from chatapp.broadcast import user_group
from messaging import consumers, realtime
from messaging.consumers import ChatConsumer
from messaging.hub import Hub
from messaging.models import Message
from tests.clerk_fixtures import CLERK_ID, SESSION_ID, ClerkEnv, clerk_environment, clerk_user_payload
from tests.test_realtime_protocol import WAIT, Closed, Socket
from threads.models import Thread
from threads.services import thread_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.smoke]

db = realtime.db


@pytest.fixture
def clerk(settings: Any) -> Iterator[ClerkEnv]:
    with clerk_environment(settings) as env:
        yield env


def authenticated(*, cookies: dict[str, str] | None = None, subprotocols: list[str] | None = None) -> Socket:
    """A socket whose user the real middleware finds from what it offers (cookie, subprotocol)."""
    sock = Socket(AnonymousUser())
    headers = [(b"origin", b"http://127.0.0.1")]
    if cookies:
        headers.append((b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()))
    app = WebsocketAuthMiddleware(ChatConsumer.as_asgi())
    sock.comm = WebsocketCommunicator(app, "/ws/", headers=headers, subprotocols=subprotocols)
    return sock


async def opened(sock: Socket) -> dict[str, Any]:
    """Connect and return the ``ready`` frame."""
    connected, detail = await sock.comm.connect(timeout=WAIT)
    assert connected, detail
    return await sock.next("ready")


async def closed_with(sock: Socket, timeout: float = WAIT) -> int | None:
    with pytest.raises(Closed) as closed:
        await sock.next("never", timeout=timeout)
    return closed.value.code


def session_cookie(user: User) -> tuple[Client, str]:
    browser = Client()
    browser.force_login(user)
    return browser, browser.cookies[django_settings.SESSION_COOKIE_NAME].value


def clerk_member(clerk: ClerkEnv, bob: User) -> tuple[User, Thread]:
    """The Clerk user of ``clerk.token()`` (as a first request would create them), in a thread with bob."""
    user = user_get_or_create_from_clerk_claims(claims=clerk.claims())
    thread, _ = thread_create(creator=user, title="Clerk's", participant_ids=[bob.pk])
    return user, thread


def webhook(event_type: str, data: dict[str, Any]) -> None:
    clerk_webhook_process(svix_id=f"msg_{event_type}_{time.time_ns()}", event={"type": event_type, "data": data})


def change_password(user_id: int) -> None:  # what ``manage.py changepassword`` does
    user = User.objects.get(pk=user_id)
    user.set_password("a-new-Passw0rd!")
    user.save()


@dataclass
class Race:
    """A socket and a revocation of what opened it."""

    sock: Socket
    user: User
    thread: Thread
    revoke: Callable[[], Any]
    code: int
    reason: str


async def race(name: str, clerk: ClerkEnv, alice: User, bob: User, thread: Thread) -> Race:
    if name.startswith("clerk"):
        user, clerk_thread = await db(clerk_member)(clerk, bob)
        sock = authenticated(subprotocols=["chatapp.v1", f"bearer.{clerk.token()}"])
        revoke: Callable[[], Any] = {
            "clerk session revoked": lambda: webhook("session.revoked", {"id": SESSION_ID, "user_id": CLERK_ID}),
            "clerk session ended": lambda: webhook("session.ended", {"id": SESSION_ID, "user_id": CLERK_ID}),
            "clerk user deleted": lambda: webhook("user.deleted", {"id": CLERK_ID, "deleted": True}),
            "clerk user banned": lambda: webhook("user.updated", {**clerk_user_payload(), "banned": True}),
        }[name]
        deactivated = name in ("clerk user deleted", "clerk user banned")
        return Race(
            sock,
            user,
            clerk_thread,
            revoke,
            consumers.CLOSE_DEACTIVATED if deactivated else consumers.CLOSE_UNAUTHENTICATED,
            "user_inactive" if deactivated else "session_revoked",
        )
    if name.startswith("api token"):
        key = await db(user_token_issue)(user=alice)
        sock = authenticated(subprotocols=["chatapp.v1", f"token.{key}"])
        if name == "api token deleted":
            return Race(sock, alice, thread, lambda: user_token_revoke(user=alice), 4401, "token_revoked")
        return Race(sock, alice, thread, lambda: change_password(alice.pk), 4401, "token_revoked")
    browser, cookie = await sync_to_async(session_cookie)(alice)
    sock = authenticated(cookies={django_settings.SESSION_COOKIE_NAME: cookie})
    if name == "deactivated":
        return Race(sock, alice, thread, lambda: user_deactivate(actor=None, user=alice), 4403, "user_inactive")
    if name == "signed out":
        return Race(sock, alice, thread, browser.logout, 4401, "session_revoked")
    return Race(sock, alice, thread, lambda: change_password(alice.pk), 4401, "password_changed")


RACES = [
    "clerk session revoked",
    "clerk session ended",
    "clerk user deleted",
    "clerk user banned",
    "deactivated",
    "password changed",
    "signed out",
    "api token deleted",
    "api token password changed",
]


@pytest.mark.parametrize("name", RACES)
async def test_a_revocation_between_the_handshake_and_the_join_closes_the_socket_before_it_posts(
    name: str, clerk: ClerkEnv, alice: User, bob: User, thread: Thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revocation commits and is announced after the handshake authenticated the socket and
    before the socket joined its user's notices (a barrier in the hub's join): the notice reaches
    nobody here. The re-check after the join must see it: the socket closes (4401/4403) without
    ``ready``, and a message it sends at once is never stored."""
    case = await race(name, clerk, alice, bob, thread)
    real_join = Hub.join
    revoked: list[str] = []

    async def join_after_the_revocation(hub: Hub, group: str, socket: Any) -> None:
        if group == user_group(case.user.pk) and not revoked:
            await db(case.revoke)()
            revoked.append(group)
        await real_join(hub, group, socket)

    monkeypatch.setattr(Hub, "join", join_after_the_revocation)
    connected, detail = await case.sock.comm.connect(timeout=WAIT)
    assert connected, detail  # accepted: the handshake itself was fine
    await case.sock.send(
        {"type": "message.send", "id": "late", "thread_id": case.thread.pk, "body": "too late", "client_msg_id": "l-1"}
    )
    assert await closed_with(case.sock) == case.code
    assert revoked
    assert [f["type"] for f in case.sock.frames] == ["auth.ended"]
    assert case.sock.frames[0]["data"] == {"reason": case.reason}
    assert not await db(Message.objects.filter(client_msg_id="l-1").exists)()
    await case.sock.close()


async def test_revocations_whose_notice_was_lost_close_their_sockets_at_the_next_process_beat(
    clerk: ClerkEnv,
    alice: User,
    bob: User,
    make_user: Callable[..., User],
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
) -> None:
    """Notices to users are dropped (the channel layer lost them, Redis was down): one batched check
    of every socket of the process, on its beat, closes those whose credentials ended, and only those."""
    from chatapp import broadcast

    # The test runs the beat itself: the process's own beat task sleeps through it.
    settings.CHAT_HEARTBEAT_SECONDS = settings.CHAT_PROCESS_TTL_SECONDS = 3600
    settings.CHAT_IDLE_TIMEOUT_SECONDS = 4 * 3600
    carol = await sync_to_async(make_user)("carol")
    await db(clerk_member)(clerk, bob)
    key = await db(user_token_issue)(user=bob)
    _, alice_cookie = await sync_to_async(session_cookie)(alice)
    _, carol_cookie = await sync_to_async(session_cookie)(carol)
    sockets = {
        "clerk": authenticated(subprotocols=["chatapp.v1", f"bearer.{clerk.token()}"]),
        "token": authenticated(subprotocols=["chatapp.v1", f"token.{key}"]),
        "password": authenticated(cookies={"sessionid": alice_cookie}),
        "kept": authenticated(cookies={"sessionid": carol_cookie}),
    }
    for sock in sockets.values():
        await opened(sock)
    real_send = broadcast.group_send_now
    monkeypatch.setattr(broadcast, "group_send_now", lambda group, message: group.startswith("user.") or None)
    await db(webhook)("session.revoked", {"id": SESSION_ID, "user_id": CLERK_ID})
    await db(user_token_revoke)(user=bob)
    await db(change_password)(alice.pk)
    monkeypatch.setattr(broadcast, "group_send_now", real_send)
    assert not [f for s in sockets.values() for f in await s.drain(0.3)]  # no notice came
    await realtime.beats.tick(sockets=False)
    reasons = {"clerk": "session_revoked", "token": "token_revoked", "password": "password_changed"}
    for name, reason in reasons.items():
        assert (await sockets[name].next("auth.ended"))["data"] == {"reason": reason}
        assert await closed_with(sockets[name]) == consumers.CLOSE_UNAUTHENTICATED
    assert (await sockets["kept"].request("ping"))["type"] == "pong"
    for sock in sockets.values():
        await sock.close()


def test_the_credential_check_costs_the_same_for_one_socket_and_for_many(make_user: Callable[..., User]) -> None:
    from accounts.services import local_session_id

    users = [make_user(f"many{n}") for n in range(20)]
    tokens = [SocketCredentials(user_id=u.pk, method="token", secret=user_token_issue(user=u)) for u in users]
    sessions = []
    for user in users:
        _, key = session_cookie(user)
        sessions.append(
            SocketCredentials(
                user_id=user.pk,
                method="session",
                session_id=local_session_id(key),
                secret=key,
                auth_hash=user.get_session_auth_hash(),
            )
        )
    clerk = [SocketCredentials(user_id=u.pk, method="clerk", session_id=f"sess_{u.pk}") for u in users]
    counts = []
    for batch in ([tokens[0]], tokens + clerk, [sessions[0], tokens[0]], sessions + tokens + clerk):
        with CaptureQueriesContext(connection) as queries:
            assert credentials_check(batch) == [None] * len(batch)
        counts.append(len(queries))
    assert counts == [1, 1, 2, 2]  # the users (with their tokens), and the sessions if any


async def test_a_clerk_socket_closes_4401_once_its_token_expires(clerk: ClerkEnv, bob: User) -> None:
    clerk.settings.CLERK_LEEWAY_SECONDS = 1
    await db(clerk_member)(clerk, bob)
    expires = int(time.time()) + 8  # room for a slow handshake: the token must still verify then
    sock = authenticated(subprotocols=["chatapp.v1", f"bearer.{clerk.token(exp=expires)}"])
    ready = await opened(sock)
    assert ready["data"]["expires_at"] == expires
    assert (await sock.next("auth.ended", timeout=30))["data"] == {"reason": "token_expired"}
    assert await closed_with(sock) == consumers.CLOSE_UNAUTHENTICATED
    assert time.time() > expires + 1  # not before the leeway was over
    await sock.close()


async def test_an_auth_frame_with_a_fresh_token_keeps_the_socket_open_past_the_first_token(
    clerk: ClerkEnv, bob: User
) -> None:
    clerk.settings.CLERK_LEEWAY_SECONDS = 1
    _, thread = await db(clerk_member)(clerk, bob)
    first = int(time.time()) + 8  # room for a slow handshake and auth frame
    sock = authenticated(subprotocols=["chatapp.v1", f"bearer.{clerk.token(exp=first)}"])
    await opened(sock)
    fresh = int(time.time()) + 300
    ack = await sock.request("auth", token=clerk.token(exp=fresh, sid="sess_renewed"))
    assert ack["type"] == "ack", ack
    assert ack["data"]["expires_at"] == fresh
    assert 0 < ack["data"]["expires_in"] <= 300
    while time.time() <= first + 2:  # the first token is past its expiry and the leeway
        await asyncio.sleep(0.2)
    await realtime.beats.tick(sockets=False)  # and the beat's check agrees
    sent = await sock.request("message.send", thread_id=thread.pk, body="still here", client_msg_id="s-1")
    assert sent["type"] == "ack", sent
    # The socket now belongs to the renewed session: that session's revocation closes it.
    await db(webhook)("session.revoked", {"id": "sess_renewed", "user_id": CLERK_ID})
    assert await closed_with(sock) == consumers.CLOSE_UNAUTHENTICATED
    await sock.close()


async def test_auth_frames_that_do_not_renew(clerk: ClerkEnv, bob: User) -> None:
    await db(clerk_member)(clerk, bob)
    sock = authenticated(subprotocols=["chatapp.v1", f"bearer.{clerk.token()}"])
    await opened(sock)
    refused: dict[str, dict[str, Any]] = {
        "no token": {},
        "not a string": {"token": 42},
        "expired": {"token": clerk.token(exp=int(time.time()) - 60)},
        "forged": {"token": clerk.token_hs256_with_public_pem()},
        "a JWT template": {"token": clerk.token(headers={"cat": "cl_B7d4PD222AAA"})},
        "pending": {"token": clerk.token(sts="pending")},
    }
    for name, fields in refused.items():
        reply = await sock.request("auth", **fields)
        assert reply["type"] == "error", name
        expected = "invalid" if name in ("no token", "not a string") else "unauthenticated"
        assert reply["error"]["code"] == expected, (name, reply)
    assert (await sock.request("ping"))["type"] == "pong"  # the socket keeps its credentials
    await sock.send({"type": "auth", "id": "other", "token": clerk.token(sub="user_someone_else")})
    assert (await sock.next("auth.ended"))["data"] == {"reason": "other_user"}
    assert await closed_with(sock) == consumers.CLOSE_UNAUTHENTICATED
    await sock.close()


async def test_an_auth_frame_on_a_cookie_socket_of_another_user_closes_it(clerk: ClerkEnv, alice: User) -> None:
    _, cookie = await sync_to_async(session_cookie)(alice)
    sock = authenticated(cookies={"sessionid": cookie})
    assert (await opened(sock))["data"]["expires_at"] is None  # a session does not expire with a token
    await sock.send({"type": "auth", "id": "a", "token": clerk.token()})
    assert await closed_with(sock) == consumers.CLOSE_UNAUTHENTICATED
    await sock.close()


async def test_a_bot_uses_the_socket_with_an_api_token_until_the_token_is_deleted(alice: User, thread: Thread) -> None:
    key = await db(user_token_issue)(user=alice)
    sock = authenticated(subprotocols=["chatapp.v1", f"token.{key}"])
    ready = await opened(sock)
    assert ready["data"]["user_id"] == alice.pk
    await sock.subscribe(thread.pk)
    sent = await sock.request("message.send", thread_id=thread.pk, body="beep", client_msg_id="bot-1")
    assert sent["type"] == "ack", sent
    await db(user_token_revoke)(user=alice)
    assert (await sock.next("session.revoked"))["data"]["session_id"].startswith("token_")
    assert await closed_with(sock) == consumers.CLOSE_UNAUTHENTICATED
    await sock.close()
