"""Clerk session tokens: the verifier's corpus, the JWKS cache and its refetch limiter, HTTP and the socket.

Tokens are signed with real RSA keys; the JWKS is served over HTTP on 127.0.0.1 and counts its
requests; PyJWT is not mocked.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from rest_framework.test import APIClient

from accounts.clerk import (
    SESSION_PENDING,
    SESSION_REVOKED,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    USER_INACTIVE,
    ClerkTokenError,
    jwks_store,
    revoked_session_key,
    verify_session_token,
)
from accounts.models import User
from accounts.services import user_deactivate
from accounts.ws_auth import SUBPROTOCOL, WebsocketAuthMiddleware, accepted_subprotocol
from tests.clerk_fixtures import AZP, ClerkEnv, clerk_environment, public_jwk, rsa_key
from tests.conftest import needs

pytestmark = pytest.mark.django_db


@pytest.fixture
def clerk(settings: Any) -> Iterator[ClerkEnv]:
    with clerk_environment(settings) as env:
        yield env


def reason_of(token: str) -> str:
    with pytest.raises(ClerkTokenError) as caught:
        verify_session_token(token)
    return caught.value.reason


def assert_unauthenticated(response: Any) -> None:
    assert response.status_code == 401, response.content
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == "unauthenticated"
    assert body["error"]["message"]


# --- The corpus ----------------------------------------------------------------------------------

REQUIRED = ("exp", "nbf", "iat", "sub", "sid", "iss")

# name -> (token maker, expected reason); every one of them is also a 401 over HTTP and a refused socket.
BAD_TOKENS: dict[str, tuple[Callable[[ClerkEnv], str], str]] = {
    "alg_none": (lambda c: c.token_alg_none(), TOKEN_INVALID),
    "hs256_with_public_pem": (lambda c: c.token_hs256_with_public_pem(), TOKEN_INVALID),
    "rs512_not_rs256": (lambda c: c.token(algorithm="RS512"), TOKEN_INVALID),
    "expired": (lambda c: c.token(exp=int(time.time()) - 60), TOKEN_EXPIRED),
    "nbf_in_future": (lambda c: c.token(nbf=int(time.time()) + 120), TOKEN_INVALID),
    "iat_in_future": (lambda c: c.token(iat=int(time.time()) + 120), TOKEN_INVALID),
    "wrong_iss": (lambda c: c.token(iss="https://evil.clerk.accounts.dev"), TOKEN_INVALID),
    "azp_not_allowed": (lambda c: c.token(azp="https://evil.example"), TOKEN_INVALID),
    "azp_missing": (lambda c: c.token(without=("azp",)), TOKEN_INVALID),
    **{f"missing_{claim}": (functools.partial(ClerkEnv.token, without=(claim,)), TOKEN_INVALID) for claim in REQUIRED},
    "sub_not_a_string": (lambda c: c.token(sub=12345), TOKEN_INVALID),
    "unknown_kid": (lambda c: c.token(kid="not-served"), TOKEN_INVALID),
    "signed_by_another_key": (lambda c: c.token(key=rsa_key("attacker")), TOKEN_INVALID),
    "payload_swapped_after_signing": (lambda c: c.token_tampered(sub="user_victim"), TOKEN_INVALID),
    "not_a_jwt": (lambda c: "not.a.jwt", TOKEN_INVALID),
    "garbage": (lambda c: "x" * 40, TOKEN_INVALID),
    # Signed by the instance's key but not session tokens: Clerk's SDKs treat these as signed out.
    "jwt_template_category": (lambda c: c.token(headers={"cat": "cl_B7d4PD222AAA"}), TOKEN_INVALID),
    "machine_token_category": (lambda c: c.token(headers={"cat": "cl_B7d4PD333AAA"}), TOKEN_INVALID),
    "unknown_category": (lambda c: c.token(headers={"cat": "cl_future"}), TOKEN_INVALID),
    "pending_session": (lambda c: c.token(sts="pending"), SESSION_PENDING),
}


@pytest.mark.smoke
def test_verify_accepts_a_clerk_token(clerk: ClerkEnv) -> None:
    claims = verify_session_token(clerk.token())
    assert claims["sub"] == "user_2abcDEFghiJKLmno"
    assert claims["sid"] == "sess_2abcDEFghiJKLmno"
    assert claims["azp"] == AZP


@pytest.mark.smoke
@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_verify_refuses_bad_token(clerk: ClerkEnv, name: str) -> None:
    make, reason = BAD_TOKENS[name]
    assert reason_of(make(clerk)) == reason


@pytest.mark.smoke
def test_verify_accepts_session_token_categories_and_active_sessions(clerk: ClerkEnv) -> None:
    # Session tokens carry Clerk's session category, or its "no category" stamp on instances that
    # opted out; an active session says so in ``sts`` (v2 tokens) or not at all (v1).
    for cat in ("cl_B7d4PD111AAA", "cl_I7d4PD111III"):
        assert verify_session_token(clerk.token(headers={"cat": cat}))
    assert verify_session_token(clerk.token(sts="active"))


def test_an_unreadable_revocation_store_fails_open_and_is_counted(clerk: ClerkEnv, settings: Any) -> None:
    """The documented choice (docs/auth.md): a token is not refused because Redis cannot be read;
    the failure is logged and counted."""
    import socket

    from chatapp import metrics

    needs("redis")
    token = clerk.token()
    assert verify_session_token(token)  # the keys are now in this process's copy
    cache.set(revoked_session_key("sess_2abcDEFghiJKLmno"), 1, 60)
    assert reason_of(token) == SESSION_REVOKED
    before = metrics.revocation_check_errors._value.get()
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))  # bound, never listening: every connection to it is refused
        location = f"redis://127.0.0.1:{reserved.getsockname()[1]}/0"
        settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": location}}
        assert verify_session_token(token)["sid"] == "sess_2abcDEFghiJKLmno"
    assert metrics.revocation_check_errors._value.get() == before + 1


@pytest.mark.smoke
def test_verify_allows_small_clock_leeway_only(clerk: ClerkEnv) -> None:
    # Margins of many seconds either side: the check must not depend on how fast the machine is.
    clerk.settings.CLERK_LEEWAY_SECONDS = 30
    now = int(time.time())
    assert verify_session_token(clerk.token(exp=now - 10, nbf=now + 10, iat=now + 10))
    assert reason_of(clerk.token(exp=now - 120)) == TOKEN_EXPIRED
    clerk.settings.CLERK_LEEWAY_SECONDS = 300
    assert verify_session_token(clerk.token(exp=now - 120))


@pytest.mark.smoke
def test_verify_reads_settings_at_call_time(clerk: ClerkEnv) -> None:
    token = clerk.token()
    assert verify_session_token(token)
    clerk.settings.CLERK_AUTHORIZED_PARTIES = ["https://app.example"]
    assert reason_of(token) == TOKEN_INVALID
    clerk.settings.CLERK_AUTHORIZED_PARTIES = []  # no list configured: azp is not checked
    assert verify_session_token(clerk.token(azp="https://anything.example"))
    clerk.settings.CLERK_ISSUER = "https://other.clerk.accounts.dev"
    assert reason_of(token) == TOKEN_INVALID
    clerk.settings.CLERK_ISSUER = ""  # Clerk off: nothing verifies
    assert reason_of(token) == TOKEN_INVALID


@pytest.mark.smoke
def test_jwks_url_is_derived_from_the_issuer(clerk: ClerkEnv) -> None:
    clerk.settings.CLERK_JWKS_URL = ""
    assert verify_session_token(clerk.token())
    assert clerk.server.requests == 1


@pytest.mark.smoke
def test_revoked_session_is_refused(clerk: ClerkEnv) -> None:
    cache.set(revoked_session_key("sess_gone"), 1, 60)
    assert reason_of(clerk.token(sid="sess_gone")) == SESSION_REVOKED
    assert verify_session_token(clerk.token(sid="sess_other"))


# --- JWKS caching, rotation and the refetch limiter --------------------------------------------


@pytest.mark.smoke
def test_jwks_fetched_once_and_shared_through_the_cache(clerk: ClerkEnv) -> None:
    for _ in range(5):
        verify_session_token(clerk.token())
    assert clerk.server.requests == 1
    jwks_store.forget()  # another process: empty process copy, same shared cache
    verify_session_token(clerk.token())
    assert clerk.server.requests == 1


def test_jwks_shared_through_redis(clerk: ClerkEnv, settings: Any) -> None:
    needs("redis")
    assert settings.CACHES["default"]["BACKEND"].endswith("RedisCache")
    verify_session_token(clerk.token())
    jwks_store.forget()
    verify_session_token(clerk.token())
    assert clerk.server.requests == 1


@pytest.mark.smoke
def test_unknown_kid_refetches_at_most_once_per_minute(clerk: ClerkEnv) -> None:
    verify_session_token(clerk.token())
    assert clerk.server.requests == 1
    for n in range(5):
        assert reason_of(clerk.token(kid=f"forged-{n}")) == TOKEN_INVALID
    assert clerk.server.requests == 2  # one refetch for the first unknown kid, then the limiter
    jwks_store.forget()  # another process: the limiter is the shared cache flag, not only this process
    assert reason_of(clerk.token(kid="forged-x")) == TOKEN_INVALID
    assert clerk.server.requests == 2


@pytest.mark.smoke
def test_rotated_key_is_picked_up_after_one_refetch(clerk: ClerkEnv) -> None:
    assert verify_session_token(clerk.token())
    new_key = rsa_key("k2")
    clerk.server.serve(public_jwk(new_key, "k2"), public_jwk(clerk.key, clerk.kid))
    assert verify_session_token(clerk.token(key=new_key, kid="k2"))
    assert clerk.server.requests == 2
    # Both keys are known now: no more fetches, and a forged kid cannot trigger one within the minute.
    assert verify_session_token(clerk.token())
    assert verify_session_token(clerk.token(key=new_key, kid="k2"))
    assert reason_of(clerk.token(kid="k3")) == TOKEN_INVALID
    assert clerk.server.requests == 2


@pytest.mark.smoke
def test_jwks_outage_keeps_cached_keys_working(clerk: ClerkEnv) -> None:
    assert verify_session_token(clerk.token())
    clerk.server.stop()
    assert verify_session_token(clerk.token())
    jwks_store.forget()
    assert verify_session_token(clerk.token())  # from the shared cache
    assert reason_of(clerk.token(kid="k-new")) == TOKEN_INVALID  # the refetch fails quietly: a 401, not a 500
    assert verify_session_token(clerk.token())


@pytest.mark.smoke
def test_jwks_unreachable_with_nothing_cached_is_401(clerk: ClerkEnv) -> None:
    clerk.server.status = 500
    response = APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {clerk.token()}")
    assert_unauthenticated(response)
    assert clerk.server.requests == 1
    assert not User.objects.exists()


# --- HTTP ------------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_bearer_token_authenticates_and_creates_the_user_from_claims(clerk: ClerkEnv) -> None:
    token = clerk.token(username="ada", email="ada@example.test", first_name="Ada", last_name="Lovelace")
    response = APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    user = User.objects.get(clerk_id="user_2abcDEFghiJKLmno")
    assert response.json()["id"] == user.pk
    assert (user.username, user.email, user.first_name, user.is_active) == ("ada", "ada@example.test", "Ada", True)
    assert not user.has_usable_password()
    again = APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {clerk.token()}")
    assert again.json()["id"] == user.pk
    assert User.objects.count() == 1


@pytest.mark.smoke
def test_bare_claims_create_a_placeholder_user(clerk: ClerkEnv, make_user: Callable[..., User]) -> None:
    response = APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {clerk.token(sub='user_bare')}")
    assert response.status_code == 200
    user = User.objects.get(clerk_id="user_bare")
    assert user.username == "user_bare"
    assert user.email == ""


@pytest.mark.smoke
def test_session_cookie_authenticates(clerk: ClerkEnv) -> None:
    client = APIClient()
    client.cookies["__session"] = clerk.token()
    response = client.get("/api/v1/me")
    assert response.status_code == 200, response.content
    assert response.json()["username"] == "user_2abcDEFghiJKLmno"


@pytest.mark.smoke
def test_session_cookie_needs_csrf_for_unsafe_methods(clerk: ClerkEnv) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.cookies["__session"] = clerk.token()
    refused = client.patch("/api/v1/me", {"display_name": "Ada"}, format="json")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    csrf = "a" * 32
    client.cookies["csrftoken"] = csrf
    ok = client.patch("/api/v1/me", {"display_name": "Ada"}, format="json", HTTP_X_CSRFTOKEN=csrf)
    assert ok.status_code == 200, ok.content
    # A Bearer header is not sent by the browser on its own: no CSRF token needed.
    bearer = APIClient(enforce_csrf_checks=True).patch(
        "/api/v1/me", {"display_name": "Ada L."}, format="json", HTTP_AUTHORIZATION=f"Bearer {clerk.token()}"
    )
    assert bearer.status_code == 200


@pytest.mark.smoke
@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_bad_bearer_token_is_401(clerk: ClerkEnv, name: str) -> None:
    make, _ = BAD_TOKENS[name]
    assert_unauthenticated(APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {make(clerk)}"))
    assert not User.objects.exists()


@pytest.mark.smoke
@pytest.mark.parametrize("name", ["expired", "hs256_with_public_pem", "alg_none", "wrong_iss", "garbage"])
def test_bad_session_cookie_is_401(clerk: ClerkEnv, name: str) -> None:
    make, _ = BAD_TOKENS[name]
    client = APIClient()
    client.cookies["__session"] = make(clerk)
    assert_unauthenticated(client.get("/api/v1/me"))


@pytest.mark.smoke
def test_deactivated_user_is_refused_with_a_valid_token(clerk: ClerkEnv) -> None:
    token = clerk.token()
    assert APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200
    user_deactivate(actor=None, user=User.objects.get(clerk_id="user_2abcDEFghiJKLmno"))
    assert_unauthenticated(APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {token}"))
    assert reason_of_user(token) == USER_INACTIVE


def reason_of_user(token: str) -> str:
    from accounts.clerk import user_for_session_token

    with pytest.raises(ClerkTokenError) as caught:
        user_for_session_token(token)
    return caught.value.reason


@pytest.mark.smoke
def test_clerk_token_is_ignored_when_clerk_is_off(clerk: ClerkEnv, make_user: Callable[..., User]) -> None:
    token = clerk.token()
    clerk.settings.CLERK_ISSUER = ""
    clerk.settings.CLERK_JWKS_URL = ""
    assert_unauthenticated(APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {token}"))
    assert clerk.server.requests == 0
    local = make_user("local")
    client = APIClient()
    client.force_login(local)
    client.cookies["__session"] = token  # a leftover Clerk cookie does not get in the way
    assert client.get("/api/v1/me").json()["id"] == local.pk


# --- The socket ------------------------------------------------------------------------------------


class ScopeRecorder:
    """An ASGI app standing in for the consumer: records the scope, follows the documented contract."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        assert (await receive())["type"] == "websocket.connect"
        if scope["user"].is_authenticated:
            await send({"type": "websocket.accept", "subprotocol": accepted_subprotocol(scope)})
        else:
            await send({"type": "websocket.close", "code": 4401})

    @property
    def scope(self) -> dict[str, Any]:
        return self.scopes[-1]


async def connect(
    path: str = "/ws/",
    *,
    cookies: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[ScopeRecorder, bool, Any]:
    recorder = ScopeRecorder()
    headers = [(b"origin", b"http://127.0.0.1"), *(headers or [])]
    if cookies:
        headers.append((b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()))
    communicator = WebsocketCommunicator(
        WebsocketAuthMiddleware(recorder), path, headers=headers, subprotocols=subprotocols
    )
    connected, detail = await communicator.connect(timeout=10)
    await communicator.disconnect()
    return recorder, connected, detail


async def clerk_user_id() -> int:
    return (await User.objects.aget(clerk_id="user_2abcDEFghiJKLmno")).pk


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
async def test_socket_token_from_subprotocol(clerk: ClerkEnv) -> None:
    recorder, connected, subprotocol = await connect(subprotocols=[SUBPROTOCOL, f"bearer.{clerk.token()}"])
    assert connected
    assert subprotocol == SUBPROTOCOL  # never the bearer entry that carries the token
    assert recorder.scope["user"].pk == await clerk_user_id()
    assert recorder.scope["auth_method"] == "clerk"
    assert recorder.scope["auth_session_id"] == "sess_2abcDEFghiJKLmno"
    assert "auth_error" not in recorder.scope


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
async def test_socket_token_from_session_cookie(clerk: ClerkEnv) -> None:
    recorder, connected, subprotocol = await connect(cookies={"__session": clerk.token()})
    assert connected
    assert subprotocol is None
    assert recorder.scope["user"].pk == await clerk_user_id()
    assert recorder.scope["auth_method"] == "clerk"


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
async def test_socket_never_reads_the_query_string(clerk: ClerkEnv) -> None:
    token = clerk.token()
    recorder, connected, code = await connect(f"/ws/?token={token}&__session={token}&bearer={token}")
    assert (connected, code) == (False, 4401)
    assert not recorder.scope["user"].is_authenticated
    assert "auth_error" not in recorder.scope
    assert clerk.server.requests == 0
    assert not await User.objects.aexists()


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", ["expired", "hs256_with_public_pem", "alg_none", "unknown_kid", "azp_not_allowed"])
async def test_socket_bad_token_is_flagged_and_refused_before_accept(clerk: ClerkEnv, name: str) -> None:
    make, reason = BAD_TOKENS[name]
    token = make(clerk)
    for kwargs in ({"subprotocols": [SUBPROTOCOL, f"bearer.{token}"]}, {"cookies": {"__session": token}}):
        recorder, connected, code = await connect(**kwargs)  # type: ignore[arg-type]
        assert (connected, code) == (False, 4401)
        assert not recorder.scope["user"].is_authenticated
        assert recorder.scope["auth_error"] == reason


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
async def test_socket_deactivated_user_is_flagged(clerk: ClerkEnv) -> None:
    from channels.db import database_sync_to_async

    await connect(cookies={"__session": clerk.token()})
    user = await User.objects.aget(clerk_id="user_2abcDEFghiJKLmno")
    await database_sync_to_async(user_deactivate)(actor=None, user=user)
    recorder, connected, code = await connect(subprotocols=[SUBPROTOCOL, f"bearer.{clerk.token()}"])
    assert (connected, code) == (False, 4401)
    assert recorder.scope["auth_error"] == USER_INACTIVE
    assert not recorder.scope["user"].is_authenticated


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
async def test_socket_keeps_django_session_login(clerk: ClerkEnv) -> None:
    from asgiref.sync import sync_to_async
    from django.test import Client

    from tests.factories import UserFactory

    local: User = await sync_to_async(UserFactory)(username="local")  # type: ignore[assignment]
    client = Client()
    await sync_to_async(client.force_login)(local)
    session_cookie = client.cookies["sessionid"].value
    recorder, connected, _ = await connect(cookies={"sessionid": session_cookie})
    assert connected
    assert recorder.scope["user"].pk == local.pk
    assert recorder.scope["auth_method"] == "session"
    # Clerk off: the bearer entry is ignored and the session still decides.
    clerk.settings.CLERK_ISSUER = ""
    recorder, connected, _ = await connect(
        cookies={"sessionid": session_cookie}, subprotocols=[SUBPROTOCOL, f"bearer.{clerk.token()}"]
    )
    assert connected
    assert recorder.scope["user"].pk == local.pk


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
async def test_socket_takes_an_api_token_from_the_subprotocol_or_the_header() -> None:
    """Bots and programs: the REST API's token opens the socket too (and is never echoed back)."""
    from channels.db import database_sync_to_async

    from accounts.services import api_token_session_id, user_token_issue
    from tests.factories import UserFactory

    bot: User = await database_sync_to_async(UserFactory)(username="bot")  # type: ignore[assignment]
    key = await database_sync_to_async(user_token_issue)(user=bot)
    recorder, connected, subprotocol = await connect(subprotocols=[SUBPROTOCOL, f"token.{key}"])
    assert (connected, subprotocol) == (True, SUBPROTOCOL)
    assert recorder.scope["user"].pk == bot.pk
    assert recorder.scope["auth_method"] == "token"
    assert recorder.scope["auth_session_id"] == api_token_session_id(key)
    assert key not in recorder.scope["auth_session_id"]
    recorder, connected, _ = await connect(headers=[(b"authorization", f"Token {key}".encode())])
    assert connected
    assert recorder.scope["user"].pk == bot.pk


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
async def test_socket_refuses_a_bad_api_token_even_beside_a_valid_cookie() -> None:
    from asgiref.sync import sync_to_async
    from django.test import Client

    from tests.factories import UserFactory

    local: User = await sync_to_async(UserFactory)(username="local")  # type: ignore[assignment]
    client = Client()
    await sync_to_async(client.force_login)(local)
    cookie = client.cookies["sessionid"].value
    for kwargs in (
        {"subprotocols": [SUBPROTOCOL, "token." + "0" * 40]},
        {"headers": [(b"authorization", b"Token " + b"0" * 40)]},
        {"subprotocols": [SUBPROTOCOL, "token." + "x" * 500]},
    ):
        recorder, connected, code = await connect(cookies={"sessionid": cookie}, **kwargs)  # type: ignore[arg-type]
        assert (connected, code) == (False, 4401)
        assert recorder.scope["auth_error"] == TOKEN_INVALID
