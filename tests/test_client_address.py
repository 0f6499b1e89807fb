"""The client's address and scheme come from the TCP peer and exactly the proxies the operator trusts
(chatapp/proxy.py), for HTTP and websockets, and never from what the client writes; password
attempts are limited per address and per account, with known devices exempt from the latter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import SystemRole, User
from chatapp.proxy import TrustedProxyMiddleware, client_address, forwarded_entries
from tests.test_ops_deploy import BASE_DIR, production_env

pytestmark = pytest.mark.django_db

TOKEN_URL = "/api/v1/auth/token"
PASSWORD = "pw-for-tests-123"  # tests/factories.py


def token_login(username: str, password: str = PASSWORD, client: APIClient | None = None, **extra: Any) -> Any:
    return (client or APIClient()).post(TOKEN_URL, {"username": username, "password": password}, format="json", **extra)


def page_login(client: Client, username: str, password: str = PASSWORD, **extra: Any) -> Any:
    return client.post("/accounts/login/", {"username": username, "password": password}, **extra)


def admin_login(client: Client, username: str, password: str = PASSWORD, **extra: Any) -> Any:
    return client.post("/admin/login/", {"username": username, "password": password}, **extra)


def address(peer: str | None, header: str, hops: int) -> str | None:
    return client_address(peer=peer, forwarded_for=forwarded_entries([header]), trusted_hops=hops)


@pytest.mark.smoke
def test_client_address_comes_from_the_trusted_end_of_x_forwarded_for_only() -> None:
    header = "6.6.6.6, 10.0.0.7"  # the client wrote 6.6.6.6; our proxy appended 10.0.0.7
    assert address("10.0.0.1", header, 0) == "10.0.0.1"  # nothing trusted: the TCP peer
    assert address("10.0.0.1", header, 1) == "10.0.0.7"
    assert address("10.0.0.1", header, 2) == "6.6.6.6"
    # A chain shorter than the trusted one did not pass every proxy: nothing in it is believed.
    assert address("10.0.0.1", header, 3) == "10.0.0.1"
    assert address("10.0.0.1", "", 1) == "10.0.0.1"
    # A malformed entry where the proxy's should be: the peer, never something to the left of it.
    assert address("10.0.0.1", "6.6.6.6, garbage", 1) == "10.0.0.1"
    # Proxies that write ports, brackets or IPv4-mapped IPv6 name the same client.
    assert address("10.0.0.1", "[2001:db8::1]:443", 1) == "2001:db8::1"
    assert address("10.0.0.1", "203.0.113.5:5123", 1) == "203.0.113.5"
    assert address("::ffff:203.0.113.5", "", 0) == "203.0.113.5"
    assert forwarded_entries(["a, b", "c"]) == ["a", "b", "c"]  # repeated headers concatenate


async def scope_seen(scope: dict[str, Any]) -> dict[str, Any]:
    """The scope the application behind TrustedProxyMiddleware receives."""
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    await TrustedProxyMiddleware(app)(scope, None, None)
    return seen


@pytest.mark.smoke
@pytest.mark.parametrize(("kind", "secure"), [("http", "https"), ("websocket", "wss")])
async def test_the_middleware_sets_client_and_scheme_only_from_trusted_proxies(
    settings: Any, kind: str, secure: str
) -> None:
    plain = "http" if kind == "http" else "ws"
    headers = [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"203.0.113.5"), (b"x-forwarded-proto", b"https")]
    scope = {"type": kind, "scheme": plain, "client": ("127.0.0.1", 50123), "headers": headers}
    settings.TRUSTED_PROXY_COUNT = 0
    seen = await scope_seen(dict(scope))
    assert (seen["client"], seen["scheme"]) == (("127.0.0.1", 50123), plain)
    settings.TRUSTED_PROXY_COUNT = 1
    seen = await scope_seen(dict(scope))
    assert (seen["client"], seen["scheme"]) == (("203.0.113.5", 0), secure)
    settings.TRUSTED_PROXY_COUNT = 2
    assert (await scope_seen(dict(scope)))["client"] == ("6.6.6.6", 0)
    # Only http/https is a scheme; anything else leaves the connection's own.
    odd = {**scope, "headers": [(b"x-forwarded-proto", b"javascript")]}
    assert (await scope_seen(odd))["scheme"] == plain


async def asgi_post(app: Any, path: str, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> int:
    """POST JSON through the ASGI ``app`` from the TCP peer 198.51.100.7; the response status."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("198.51.100.7", 40000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            *headers,
        ],
    }
    communicator = ApplicationCommunicator(app, scope)
    await communicator.send_input({"type": "http.request", "body": raw, "more_body": False})
    start = await communicator.receive_output(30)
    while (await communicator.receive_output(30)).get("more_body"):
        pass
    return int(start["status"])


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_a_client_written_x_forwarded_for_does_not_buy_a_fresh_password_budget(
    make_user: Callable[..., User], settings: Any
) -> None:
    """Through the real ASGI application (chatapp.asgi) with the default settings: every attempt is
    counted against the TCP peer, whatever X-Forwarded-For claims."""
    from chatapp.asgi import application

    make_user("alice")
    # Daily: django-ratelimit's windows are fixed, and a boundary inside the test would reset the count.
    settings.AUTH_TOKEN_RATE_PER_IP = "3/d"
    assert settings.TRUSTED_PROXY_COUNT == 0

    async def attempts() -> list[int]:
        body = {"username": "alice", "password": "wrong"}
        return [
            await asgi_post(application, TOKEN_URL, body, [(b"x-forwarded-for", f"10.0.0.{n}".encode())])
            for n in range(5)
        ]

    assert asyncio.run(attempts()) == [401, 401, 401, 429, 429]


@pytest.mark.smoke
def test_ipv6_clients_share_their_64s_budget(alice: User, settings: Any) -> None:
    settings.AUTH_TOKEN_RATE_PER_IP = "2/d"
    settings.AUTH_RATE_PER_ACCOUNT = "100/d"
    codes = [token_login("alice", "wrong", REMOTE_ADDR=f"2001:db8:1:2::{n:x}").status_code for n in range(1, 4)]
    assert codes == [401, 401, 429]
    assert token_login("alice", REMOTE_ADDR="2001:db8:1:3::1").status_code == 200  # the next /64 is another client


@pytest.mark.smoke
def test_metrics_loopback_means_the_client_behind_the_trusted_proxies(client: Client, settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    settings.TRUSTED_PROXY_COUNT = 1
    # A scraper on this machine through the local proxy: one entry, the proxy's view of it.
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="127.0.0.1").status_code == 200
    # Anything a client prepended means someone beyond the trusted proxy wrote it.
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="127.0.0.1, 127.0.0.1").status_code == 403
    settings.TRUSTED_PROXY_COUNT = 0  # an undeclared local proxy makes everyone loopback: refused
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 403
    assert client.get("/metrics", HTTP_X_REAL_IP="203.0.113.9").status_code == 403


PROTO_SCRIPT = """
import asyncio, django, sys
django.setup()
from asgiref.testing import ApplicationCommunicator
from chatapp.asgi import application

async def main():
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/api/v1/me", "raw_path": b"/api/v1/me", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"chat.example.com"), (b"x-forwarded-proto", b"https")]}
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await communicator.receive_output(30)
    print(start["status"])

asyncio.run(main())
"""


@pytest.mark.smoke
@pytest.mark.parametrize(("hops", "status"), [("0", 301), ("1", 401)])
def test_x_forwarded_proto_counts_only_from_a_trusted_proxy(tmp_path: Path, hops: str, status: int) -> None:
    """Production settings over plain HTTP: a client's own ``X-Forwarded-Proto: https`` still gets the
    HTTPS redirect; the same header from a trusted proxy marks the request secure."""
    env = production_env(tmp_path, CHATAPP_TRUSTED_PROXY_COUNT=hops)
    result = subprocess.run(
        [sys.executable, "-c", PROTO_SCRIPT], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == status, result.stdout + result.stderr


# --- Per-account password budget and known devices ------------------------------------------------


@pytest.fixture
def account_budget(settings: Any) -> None:
    """A per-account budget of 3 (daily: no window boundary inside a test), per-address ones to spare."""
    settings.AUTH_RATE_PER_ACCOUNT = "3/d"
    settings.AUTH_TOKEN_RATE_PER_IP = "100/d"


def distributed_guess(username: str, attempts: int, first_host: int = 1) -> list[int]:
    """Wrong passwords for ``username``, each from another address."""
    return [
        token_login(username, "wrong", REMOTE_ADDR=f"198.51.100.{first_host + n}").status_code for n in range(attempts)
    ]


@pytest.mark.smoke
def test_a_guess_spread_over_many_addresses_is_refused_everywhere(
    alice: User, make_user: Callable[..., User], account_budget: None
) -> None:
    make_user("bob")
    assert distributed_guess("alice", 3) == [401, 401, 401]
    refused = token_login("alice", REMOTE_ADDR="203.0.113.1")  # a fresh address, the right password
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.json()["error"]["message"] == "Too many sign-in attempts for this account."
    page = page_login(Client(), "alice", REMOTE_ADDR="203.0.113.2")
    assert page.status_code == 429
    assert int(page["Retry-After"]) >= 1
    assert b"Too many sign-in attempts for this account." in page.content
    admin = admin_login(Client(), "alice", REMOTE_ADDR="203.0.113.3")
    assert admin.status_code == 429
    assert int(admin["Retry-After"]) >= 1
    # Another spelling of the same account shares its budget; another account has its own.
    assert token_login("ALICE", REMOTE_ADDR="203.0.113.4").status_code == 429
    assert token_login("bob", REMOTE_ADDR="203.0.113.5").status_code == 200


@pytest.mark.smoke
def test_the_owner_signs_in_from_a_known_browser_during_a_distributed_guess(
    make_user: Callable[..., User], account_budget: None
) -> None:
    make_user("alice", role=SystemRole.ADMIN, is_staff=True)  # she may use the admin too
    make_user("bob")
    browser = Client()
    assert page_login(browser, "alice", REMOTE_ADDR="192.0.2.10").status_code == 302
    assert "chatapp_device" in browser.cookies
    browser.post("/accounts/logout/")  # signs out; the browser keeps its other cookies
    assert distributed_guess("alice", 3) == [401, 401, 429]  # her own sign-in was the first of 3
    # The owner's browser still signs in, by the page and the admin's form...
    assert page_login(browser, "alice", REMOTE_ADDR="192.0.2.10").status_code == 302
    browser.post("/accounts/logout/")  # signs out; the browser keeps its other cookies
    assert admin_login(browser, "alice", REMOTE_ADDR="192.0.2.10").status_code == 302
    # ... but its cookie is for alice only, and a forged one exempts nobody.
    assert distributed_guess("bob", 3, first_host=50) == [401, 401, 401]
    assert page_login(browser, "bob", REMOTE_ADDR="192.0.2.10").status_code == 429
    forged = Client()
    forged.cookies["chatapp_device"] = browser.cookies["chatapp_device"].value[:-2] + "xx"
    assert page_login(forged, "alice", REMOTE_ADDR="192.0.2.11").status_code == 429


@pytest.mark.smoke
def test_a_known_device_has_a_budget_of_its_own(alice: User, account_budget: None) -> None:
    program = APIClient()
    assert token_login("alice", client=program, REMOTE_ADDR="192.0.2.20").status_code == 200
    assert "chatapp_device" in program.cookies  # a program that keeps cookies is a known device too
    assert distributed_guess("alice", 3) == [401, 401, 429]  # the account's budget is spent
    # The device's own budget of 3 (a stolen cookie buys no more than that).
    codes = [token_login("alice", "wrong", client=program, REMOTE_ADDR="192.0.2.20").status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]


@pytest.mark.smoke
def test_a_known_browser_still_spends_its_address_budget(alice: User, settings: Any) -> None:
    settings.AUTH_TOKEN_RATE_PER_IP = "2/d"
    browser = Client()
    assert page_login(browser, "alice", REMOTE_ADDR="192.0.2.30").status_code == 302
    browser.post("/accounts/logout/")  # signs out; the browser keeps its other cookies
    assert page_login(browser, "alice", "wrong", REMOTE_ADDR="192.0.2.30").status_code == 200
    refused = page_login(browser, "alice", REMOTE_ADDR="192.0.2.30")
    assert refused.status_code == 429
    assert b"Too many sign-in attempts from your address." in refused.content
