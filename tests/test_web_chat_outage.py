"""The web chat while the server cannot store messages (its database is down), in real Chromium
against a live daphne.

The server answers a send it cannot store with a retryable error (docs/realtime.md, "When the
server is unavailable"): over REST a 503 with ``Retry-After`` and ``{"error": {"code":
"unavailable", "retry_after": N}}``, on the socket an ``error`` frame with the same object (the
socket stays open). The page shows each unsent message as "Offline, will retry" (not "Sending…"),
sends it again after ``retry_after`` under the same client message id, holds later messages behind
it, and all of them go through, once and in order, when the server is back.

The outage is played at the page's edge, the rest is the real server: the REST answer is fulfilled
by ``page.route``, and the socket's answer is dispatched on the page's own socket in place of the
server's (``UNAVAILABLE``), while every other frame goes through.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from accounts.models import User
from messaging.models import Message
from tests.browser import LiveServer
from tests.conftest import needs
from tests.test_web_chat import eventually, off_loop, open_chat, wait_connected, wait_until
from tests.test_web_chat_more import open_thread, visible_bodies
from tests.test_web_chat_protocol import quote_heavy_body
from threads.services import thread_create

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

RETRY_AFTER = 1  # seconds: the page's wait is at least this, so the retries come quickly
UNAVAILABLE_TEXT = "The service is unavailable; try again shortly."

# While ``window.__unavailable`` is set, a message.send frame is not sent: the socket answers it as
# the server does when its database is down. Each refused send is noted with its time.
UNAVAILABLE = """
(() => {
  const send = WebSocket.prototype.send;
  window.__unavailable = false;
  window.__refused = []; // [client_msg_id, performance.now()]
  WebSocket.prototype.send = function (data) {
    let frame = null;
    try { frame = typeof data === 'string' ? JSON.parse(data) : null; } catch (_) {}
    if (frame && frame.type === 'message.send' && window.__unavailable) {
      window.__refused.push([frame.client_msg_id, performance.now()]);
      const error = { code: 'unavailable', message: 'MESSAGE', retry_after: RETRY_AFTER };
      const answer = JSON.stringify({ type: 'error', id: frame.id, error });
      Promise.resolve().then(() => this.dispatchEvent(new MessageEvent('message', { data: answer })));
      return undefined;
    }
    return send.call(this, data);
  };
})();
""".replace("MESSAGE", UNAVAILABLE_TEXT).replace("RETRY_AFTER", str(RETRY_AFTER))

OFFLINE = "#messages .message.unavailable .status:text-is('Offline, will retry')"


def delivered(text: str) -> str:
    return f"#messages .message:not(.pending):not(.queued):not(.failed):not(.unavailable) .body:has-text('{text}')"


def outbox(page: Any, user: User) -> list[Any]:
    return list(json.loads(page.evaluate(f"() => localStorage.getItem('chatapp.outbox.{user.pk}') || '[]'")))


def test_a_send_the_socket_answers_unavailable_waits_offline_and_goes_through_on_recovery(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Outage", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice, UNAVAILABLE)
    open_thread(page, thread.pk)
    page.evaluate("() => { window.__firstSocket = window.chatapp.socket.ws; }")

    # The database goes down: the send is answered "unavailable", and the message shows so.
    page.evaluate("() => { window.__unavailable = true; }")
    page.fill("#input", "through the outage")
    page.press("#input", "Enter")
    first = page.locator("#messages .message.mine", has_text="through the outage")
    page.wait_for_selector(OFFLINE)
    assert first.locator(".status").inner_text() == "Offline, will retry"
    assert page.locator("#messages .message.pending").count() == 0  # no spinner
    assert page.locator("#messages .message.failed").count() == 0  # nothing for the person to do
    cid = str(first.get_attribute("data-cid"))

    # A message written meanwhile waits behind it, unsent.
    page.fill("#input", "and after it")
    page.press("#input", "Enter")
    second = page.locator("#messages .message.unavailable", has_text="and after it")
    second.wait_for()
    assert second.locator(".status").inner_text() == "Offline, will retry"

    # Sent again after retry_after (never sooner), with the same client message id, and still
    # refused; the later one is not sent before it.
    refused = wait_until(page, "() => window.__refused.length >= 2 && window.__refused", what="a second attempt")
    assert [c for c, _ in refused] == [cid] * len(refused)
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(refused)]
    assert all(gap >= RETRY_AFTER * 1000 for gap in gaps), gaps
    assert not Message.objects.filter(thread=thread).exists()
    assert [item["body"] for item in outbox(page, alice)] == ["through the outage", "and after it"]

    # The database is back: both go through at the next retry, once each and in order.
    page.evaluate("() => { window.__unavailable = false; }")
    page.wait_for_selector(delivered("and after it"))
    page.wait_for_selector(delivered("through the outage"))
    assert visible_bodies(page) == ["through the outage", "and after it"]
    stored = list(Message.objects.filter(thread=thread).order_by("sequence").values_list("body", "client_msg_id"))
    assert [body for body, _ in stored] == ["through the outage", "and after it"]
    assert stored[0][1] == cid
    assert page.locator("#messages .message.unavailable").count() == 0
    assert outbox(page, alice) == []
    assert page.evaluate("() => window.chatapp.socket.ws === window.__firstSocket") is True  # the socket stayed
    assert page.js_errors == []


def test_a_send_the_api_answers_503_waits_offline_and_goes_through_on_recovery(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """A message too large for a socket frame goes over REST: a 503 there is the same outage."""
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Outage", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice)
    open_thread(page, thread.pk)
    wait_connected(page)

    outage = {"on": True}
    refused: list[str] = []

    def answer(route: Any) -> None:
        if route.request.method != "POST" or not outage["on"]:
            route.continue_()
            return
        refused.append(json.loads(route.request.post_data or "{}").get("client_msg_id", ""))
        body = {"error": {"code": "unavailable", "message": UNAVAILABLE_TEXT, "retry_after": RETRY_AFTER}}
        route.fulfill(status=503, headers={"Retry-After": str(RETRY_AFTER)}, json=body)

    page.route(f"**/api/v1/threads/{thread.pk}/messages", answer)
    body = quote_heavy_body()
    page.fill("#input", body)
    page.press("#input", "Enter")
    page.wait_for_selector(OFFLINE)
    message = page.locator("#messages .message.mine", has_text="and left")
    assert message.locator(".status").inner_text() == "Offline, will retry"
    assert page.locator("#messages .message.pending").count() == 0
    cid = str(message.get_attribute("data-cid"))

    # Sent again after retry_after, with the same client message id.
    eventually(page, lambda: len(refused) >= 2, what="a second attempt")
    assert refused[:2] == [cid, cid], refused
    assert not Message.objects.filter(thread=thread).exists()

    outage["on"] = False
    page.wait_for_selector(delivered("and left"))
    assert Message.objects.filter(thread=thread, sender=alice, client_msg_id=cid, body=body).count() == 1
    assert outbox(page, alice) == []
    assert page.js_errors == []
