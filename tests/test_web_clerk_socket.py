"""The web chat signed in with Clerk, in real Chromium against a live daphne: a socket lasts as long
as the Clerk token it holds, so the page sends a fresh one (an ``auth`` frame) before it expires, and
when one does expire it reconnects instead of signing the user out.

Clerk's browser SDK is replaced by a stand-in served at its URL (``context.route``). Its
``session.getToken()`` asks this process for a token (``expose_function``), signed with a real RSA key
and verified by the server against the loopback JWKS of tests/clerk_fixtures.py, and keeps the
``__session`` cookie fresh as Clerk's SDK does. Tokens live 20 s here (Clerk's: about a minute).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from accounts.models import User
from accounts.services import user_get_or_create_from_clerk_claims
from tests.browser import LiveServer
from tests.clerk_fixtures import AZP, ClerkEnv, clerk_environment
from tests.conftest import needs
from tests.test_web_chat import TIMEOUT, off_loop
from threads.services import thread_create

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LIFETIME = 20  # seconds a token lives
LEEWAY = 3  # the server's CLERK_LEEWAY_SECONDS
FRONTEND_API = "https://clerk.chat.example.test"

# Clerk's SDK as far as the pages use it (clerk.js): load(), session.getToken(), signOut().
CLERK_STAND_IN = """
(() => {
  let refreshing = true;
  async function getToken() {
    if (!refreshing) return null;
    const token = await window.__mintClerkToken();
    document.cookie = '__session=' + token + '; path=/';
    return token;
  }
  window.Clerk = {
    user: { id: 'user_2abcDEFghiJKLmno' },
    session: { getToken },
    load: async () => { setInterval(getToken, 5000); },
    signOut: async () => { refreshing = false; },
    mountSignIn: () => {},
  };
  // The test's switch: Clerk hands out no token for the socket (the cookie is still kept fresh).
  window.__withholdSocketTokens = () => { window.chatappFreshToken = async () => null; };
})();
"""

# Every WebSocket the page opens: its close code, its ``ready`` data, and the expiry acknowledged for
# each ``auth`` frame it sent. The page's own sockets, only watched.
WATCH_AUTH = """
(() => {
  const Real = window.WebSocket;
  window.__clerkSockets = [];
  window.WebSocket = class extends Real {
    constructor(...args) {
      super(...args);
      const record = { code: null, ready: null, renewals: [], ended: null };
      window.__clerkSockets.push(record);
      this.__auths = new Set();
      this.addEventListener('close', (event) => { record.code = event.code; });
      this.addEventListener('message', (event) => {
        if (typeof event.data !== 'string') return;
        let frame;
        try { frame = JSON.parse(event.data); } catch (_) { return; }
        if (frame.type === 'ready') record.ready = frame.data;
        if (frame.type === 'auth.ended') record.ended = frame.data.reason;
        if (frame.type === 'ack' && this.__auths.has(frame.id)) record.renewals.push(frame.data.expires_at);
      });
    }
    send(data) {
      try {
        const frame = JSON.parse(data);
        if (frame.type === 'auth') this.__auths.add(frame.id);
      } catch (_) {}
      return super.send(data);
    }
  };
})();
"""

SOCKETS = "() => window.__clerkSockets"


@pytest.fixture
def clerk(settings: Any) -> Iterator[ClerkEnv]:
    with clerk_environment(settings) as env:
        yield env


@pytest.fixture
def clerk_daphne(clerk: ClerkEnv, transactional_db: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    """A live daphne that verifies Clerk tokens against this test's JWKS and serves Clerk's SDK tags."""
    needs("postgres")
    needs("redis")
    for name, value in {
        "CLERK_ISSUER": clerk.issuer,
        "CLERK_JWKS_URL": clerk.server.jwks_url,
        "CLERK_AUTHORIZED_PARTIES": AZP,
        "CLERK_LEEWAY_SECONDS": str(LEEWAY),
        "CLERK_PUBLISHABLE_KEY": "pk_test_Y2hhdGFwcC5leGFtcGxlJA",
        "CLERK_FRONTEND_API_URL": FRONTEND_API,
    }.items():
        monkeypatch.setenv(name, value)
    server = LiveServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


def open_clerk_chat(browser: Any, server: LiveServer, clerk: ClerkEnv) -> Any:
    context = browser.new_context()
    context.expose_function("__mintClerkToken", lambda: clerk.token(exp=int(time.time()) + LIFETIME))
    context.route(
        f"{FRONTEND_API}/**",
        lambda route: route.fulfill(
            status=200,
            content_type="application/javascript",
            headers={"Access-Control-Allow-Origin": "*"},
            body=CLERK_STAND_IN,
        ),
    )
    context.add_init_script(WATCH_AUTH)
    cookie = clerk.token(exp=int(time.time()) + LIFETIME)
    context.add_cookies([{"name": "__session", "value": cookie, "url": server.url}])
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    page.goto(server.url + "/")
    page.wait_for_selector(".thread-item", state="attached")
    return page


def member_of_a_thread(clerk: ClerkEnv, make_user: Callable[..., User]) -> None:
    user = user_get_or_create_from_clerk_claims(claims=clerk.claims())
    off_loop(thread_create, creator=user, title="With Clerk", participant_ids=[make_user("bob").pk])


def test_the_page_renews_its_sockets_token_before_it_expires(
    browser: Any, clerk: ClerkEnv, clerk_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    member_of_a_thread(clerk, make_user)
    page = open_clerk_chat(browser, clerk_daphne, clerk)
    page.wait_for_function("() => window.__clerkSockets[0]?.ready", timeout=TIMEOUT)
    # Two renewals take the socket past the lifetime of the token it opened with (20 s, and 3 s of
    # leeway): the deadline is a bound for a slow machine, not a speed requirement.
    page.wait_for_function("() => window.__clerkSockets[0].renewals.length >= 2", timeout=120_000)
    (only,) = page.evaluate(SOCKETS)  # one socket all along: never closed, never replaced
    assert only["code"] is None, only
    first = only["ready"]["expires_at"]
    assert first < only["renewals"][0] < only["renewals"][1], only
    assert time.time() > first + LEEWAY  # it is alive past its first token's end
    assert page.evaluate("window.chatapp.socket.connected") is True
    assert page.js_errors == []


def test_a_socket_whose_token_ran_out_reconnects_instead_of_signing_out(
    browser: Any, clerk: ClerkEnv, clerk_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """No fresh token came in time (Clerk was slow, the laptop slept): the server closes the socket
    (4401, token_expired) and the page reconnects with the cookie Clerk keeps fresh."""
    member_of_a_thread(clerk, make_user)
    page = open_clerk_chat(browser, clerk_daphne, clerk)
    page.wait_for_function("() => window.__clerkSockets[0]?.ready", timeout=TIMEOUT)
    page.evaluate("() => window.__withholdSocketTokens()")
    page.wait_for_function("() => window.__clerkSockets[0].code !== null", timeout=120_000)
    page.wait_for_function("() => window.__clerkSockets[1]?.ready", timeout=TIMEOUT)
    first = page.evaluate(SOCKETS)[0]
    assert (first["code"], first["ended"]) == (4401, "token_expired"), first
    assert page.evaluate("window.chatapp.socket.stopped") is False
    assert page.locator("#conn-banner:has-text('Sign in again')").count() == 0
    assert page.js_errors == []
