"""Pages with Clerk configured: the login page offers Clerk's sign-in (and staff local login), and the
chat page accepts the __session cookie Clerk's SDK sets, verified like the API does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from accounts.models import User
from tests.clerk_fixtures import CLERK_ID, ClerkEnv, clerk_environment

pytestmark = [pytest.mark.django_db, pytest.mark.smoke]


@pytest.fixture
def clerk(settings: Any) -> Iterator[ClerkEnv]:
    with clerk_environment(settings) as env:
        settings.CLERK_PUBLISHABLE_KEY = "pk_test_Y2hhdGFwcC5leGFtcGxlJA"
        settings.CLERK_FRONTEND_API_URL = "https://chatapp.clerk.accounts.dev"
        yield env


def test_login_page_loads_clerk_sign_in_without_inline_scripts(client: Any, clerk: ClerkEnv) -> None:
    page = client.get("/accounts/login/").content.decode()
    assert 'id="clerk-sign-in"' in page
    assert "https://chatapp.clerk.accounts.dev/npm/@clerk/clerk-js@5/dist/clerk.browser.js" in page
    assert 'data-clerk-publishable-key="pk_test_Y2hhdGFwcC5leGFtcGxlJA"' in page
    assert 'name="username"' in page  # staff keep local login
    assert "<script>" not in page


def test_chat_page_accepts_the_clerk_session_cookie(client: Any, clerk: ClerkEnv) -> None:
    client.cookies["__session"] = clerk.token()
    response = client.get("/")
    assert response.status_code == 200
    user = User.objects.get(clerk_id=CLERK_ID)
    assert response.context["request"].user == user
    assert b'id="clerk-signout"' in response.content


@pytest.mark.parametrize("variant", ["expired", "forged", "garbage"])
def test_chat_page_refuses_bad_clerk_cookies(client: Any, clerk: ClerkEnv, variant: str) -> None:
    import time

    token = {
        "expired": lambda: clerk.token(exp=int(time.time()) - 3600),
        "forged": clerk.token_hs256_with_public_pem,
        "garbage": lambda: "not.a.jwt",
    }[variant]()
    client.cookies["__session"] = token
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_without_clerk_the_login_page_is_local_only(client: Any) -> None:
    page = client.get("/accounts/login/").content.decode()
    assert "clerk" not in page.lower()
    assert 'name="username"' in page
