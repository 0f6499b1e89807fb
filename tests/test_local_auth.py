"""Local users: API tokens (POST/DELETE /api/v1/auth/token, rate-limited per IP), Token and session auth,
with Clerk off and alongside Clerk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.models import User
from accounts.services import user_deactivate
from tests.clerk_fixtures import ClerkEnv, clerk_environment
from tests.conftest import needs

pytestmark = pytest.mark.django_db

URL = "/api/v1/auth/token"
PASSWORD = "pw-for-tests-123"  # tests/factories.py


@pytest.fixture
def clerk(settings: Any) -> Iterator[ClerkEnv]:
    with clerk_environment(settings) as env:
        yield env


@pytest.fixture(autouse=True)
def _clerk_off_by_default(settings: Any) -> None:
    """The embedded default: no Clerk (tests that want it use the ``clerk`` fixture)."""
    settings.CLERK_ISSUER = ""
    settings.CLERK_JWKS_URL = ""


def login(username: str, password: str = PASSWORD, **extra: Any) -> Any:
    return APIClient().post(URL, {"username": username, "password": password}, format="json", **extra)


def me(header: str) -> Any:
    return APIClient().get("/api/v1/me", HTTP_AUTHORIZATION=header)


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code
    assert body["error"]["message"]


@pytest.mark.smoke
def test_token_login_and_token_auth(alice: User) -> None:
    response = login("alice")
    assert response.status_code == 200, response.content
    key = response.json()["token"]
    assert Token.objects.get(user=alice).key == key
    assert me(f"Token {key}").json()["id"] == alice.pk
    assert login("alice").json()["token"] == key  # one token per user until revoked


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("username", "password"), [("alice", "wrong"), ("nobody", PASSWORD), ("alice", ""), ("", PASSWORD)]
)
def test_token_login_refuses_bad_credentials(alice: User, username: str, password: str) -> None:
    response = login(username, password)
    assert response.status_code in (400, 401)
    assert set(response.json()) == {"error"}
    assert not Token.objects.exists()


@pytest.mark.smoke
def test_token_login_wrong_password_is_401(alice: User) -> None:
    assert_error(login("alice", "wrong"), 401, "unauthenticated")


@pytest.mark.smoke
def test_token_login_refuses_deactivated_and_clerk_users(alice: User, make_user: Callable[..., User]) -> None:
    user_deactivate(actor=None, user=alice)
    assert_error(login("alice"), 401, "unauthenticated")
    clerk_user = make_user("clerky", clerk_id="user_clerky")
    clerk_user.set_unusable_password()
    clerk_user.save()
    assert_error(login("clerky"), 401, "unauthenticated")


@pytest.mark.smoke
def test_token_login_refuses_unknown_fields(alice: User) -> None:
    response = APIClient().post(URL, {"username": "alice", "password": PASSWORD, "is_staff": True}, format="json")
    assert_error(response, 400, "invalid")


@pytest.mark.smoke
def test_token_revoke(alice: User) -> None:
    key = login("alice").json()["token"]
    response = APIClient().delete(URL, HTTP_AUTHORIZATION=f"Token {key}")
    assert response.status_code == 204
    assert not Token.objects.filter(user=alice).exists()
    assert_error(me(f"Token {key}"), 401, "unauthenticated")
    assert_error(APIClient().delete(URL), 401, "unauthenticated")
    assert login("alice").json()["token"] != key


@pytest.mark.smoke
def test_token_login_is_rate_limited_per_ip(alice: User, settings: Any) -> None:
    assert settings.AUTH_TOKEN_RATE_PER_IP == "10/m"
    # Same budget over an hour: django-ratelimit's windows are fixed, and a minute boundary falling
    # inside the test would reset the count.
    settings.AUTH_TOKEN_RATE_PER_IP = "10/h"
    settings.AUTH_RATE_PER_ACCOUNT = "100/h"  # the per-account budget has its own tests (test_client_address.py)
    codes = [login("alice", "wrong", REMOTE_ADDR="10.9.9.9").status_code for _ in range(10)]
    assert codes == [401] * 10
    limited = login("alice", REMOTE_ADDR="10.9.9.9")  # the right password no longer helps
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["retry_after"] >= 1
    assert not Token.objects.exists()
    assert login("alice", REMOTE_ADDR="10.9.9.10").status_code == 200  # another address has its own budget


@pytest.mark.smoke
def test_token_login_is_not_blocked_by_a_stale_credential(alice: User, clerk: ClerkEnv) -> None:
    response = login("alice", HTTP_AUTHORIZATION="Bearer stale.jwt.value")
    assert response.status_code == 200, response.content


@pytest.mark.smoke
def test_session_login_authenticates_the_api(alice: User) -> None:
    client = APIClient()
    assert client.login(username="alice", password=PASSWORD)
    assert client.get("/api/v1/me").json()["id"] == alice.pk
    user_deactivate(actor=None, user=alice)
    assert_error(client.get("/api/v1/me"), 401, "unauthenticated")


@pytest.mark.smoke
def test_login_page_still_works(alice: User) -> None:
    client = Client()
    response = client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert APIClient().get("/api/v1/me").status_code == 401
    api = APIClient()
    api.cookies = client.cookies
    assert api.get("/api/v1/me").json()["id"] == alice.pk


@pytest.mark.smoke
def test_sign_out_ends_the_session_and_clears_the_browsers_copies(alice: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.get("/accounts/login/")
    token = client.cookies["csrftoken"].value
    assert client.post("/accounts/login/", {"username": "alice", "password": PASSWORD, "csrfmiddlewaretoken": token})
    token = client.cookies["csrftoken"].value
    assert client.get("/").status_code == 200
    assert client.post("/accounts/logout/").status_code == 403  # a cross-site form cannot sign me out
    response = client.post("/accounts/logout/", {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert response["Clear-Site-Data"] == '"cache", "storage"'  # offline copies and the outbox go too
    assert client.get("/").status_code == 302  # back to the login page


@pytest.mark.smoke
def test_without_clerk_only_local_credentials_work(alice: User) -> None:
    key = login("alice").json()["token"]
    assert me(f"Token {key}").status_code == 200
    assert_error(me("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"), 401, "unauthenticated")
    assert_error(APIClient().get("/api/v1/me"), 401, "unauthenticated")


@pytest.mark.smoke
def test_local_and_clerk_users_coexist(alice: User, clerk: ClerkEnv) -> None:
    key = login("alice").json()["token"]
    assert me(f"Token {key}").json()["id"] == alice.pk
    session = APIClient()
    assert session.login(username="alice", password=PASSWORD)
    assert session.get("/api/v1/me").json()["id"] == alice.pk
    clerk_me = me(f"Bearer {clerk.token()}")
    assert clerk_me.status_code == 200
    assert clerk_me.json()["id"] != alice.pk
    assert User.objects.get(pk=clerk_me.json()["id"]).clerk_id == "user_2abcDEFghiJKLmno"


def test_sessions_are_cached_in_redis(alice: User, settings: Any) -> None:
    needs("redis")
    from django.contrib.sessions.backends.cached_db import KEY_PREFIX
    from django.core.cache import caches

    assert settings.SESSION_ENGINE == "chatapp.sessions"  # Django's cached_db, tolerant of a Redis outage
    client = Client()
    assert client.login(username="alice", password=PASSWORD)
    session_key = client.cookies["sessionid"].value
    cached = caches[settings.SESSION_CACHE_ALIAS].get(KEY_PREFIX + session_key)
    assert cached is not None
    assert str(cached["_auth_user_id"]) == str(alice.pk)


@pytest.mark.smoke
def test_sign_in_forms_share_the_password_budget(alice: User, settings: Any) -> None:
    """The sign-in page and the admin's count password attempts per address like the token API."""
    settings.AUTH_TOKEN_RATE_PER_IP = "3/h"  # hourly: a fixed window boundary inside the test is unlikely
    page, admin_page = Client(), Client()
    for _ in range(2):
        wrong = page.post("/accounts/login/", {"username": "alice", "password": "nope"}, REMOTE_ADDR="10.7.7.7")
        assert wrong.status_code == 200  # the form again, with its error
    assert login("alice", "nope", REMOTE_ADDR="10.7.7.7").status_code == 401  # the third, through the API
    refused = page.post("/accounts/login/", {"username": "alice", "password": PASSWORD}, REMOTE_ADDR="10.7.7.7")
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert b"Too many sign-in attempts" in refused.content
    assert "_auth_user_id" not in page.session  # the right password did not sign in
    admin_refused = admin_page.post(
        "/admin/login/", {"username": "alice", "password": PASSWORD}, REMOTE_ADDR="10.7.7.7"
    )
    assert admin_refused.status_code == 429
    # Another address has its own budget.
    ok = Client().post("/accounts/login/", {"username": "alice", "password": PASSWORD}, REMOTE_ADDR="10.7.7.8")
    assert ok.status_code == 302


@pytest.mark.smoke
def test_websocket_origins_default_to_our_exact_hosts_over_https(settings: Any) -> None:
    from chatapp.ws_origin import allowed_origins

    settings.WEBSOCKET_ALLOWED_ORIGINS = []
    settings.ALLOWED_HOSTS = ["chat.example.com", ".example.com", "*"]
    settings.DEBUG, settings.TESTING = False, False
    assert allowed_origins() == ["https://chat.example.com"]
    settings.DEBUG = True
    assert allowed_origins() == ["chat.example.com"]  # development: any scheme
    settings.WEBSOCKET_ALLOWED_ORIGINS = ["https://app.example.com"]
    assert allowed_origins() == ["https://app.example.com"]


@pytest.mark.smoke
def test_clerk_without_authorized_parties_does_not_start_in_production() -> None:
    import os
    import subprocess
    import sys

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "CHATAPP_TESTING", "DJANGO_DEBUG"))},
        "DJANGO_SETTINGS_MODULE": "chatapp.settings",
        "DJANGO_SECRET_KEY": "x" * 50,
        "DJANGO_ALLOWED_HOSTS": "chat.example.com",
        "CHATAPP_TESTING": "0",
        "CLERK_ISSUER": "https://example.clerk.accounts.dev",
    }
    code = "import django; django.setup()"
    refused = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "CLERK_AUTHORIZED_PARTIES is required" in refused.stderr
    env["CLERK_AUTHORIZED_PARTIES"] = "https://chat.example.com"
    started = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
