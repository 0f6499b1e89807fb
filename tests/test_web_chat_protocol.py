"""The web chat's side of the socket protocol (docs/realtime.md), in real Chromium against a live daphne.

A message whose JSON-escaped frame is over the server's frame limit goes over REST, once, and a frame
the server refused (1009) is never sent again; a 4429 close (too many sockets) is not answered by a
reconnect loop; a session that ended while the socket was down is noticed instead of retried forever;
a compressed event and the smaller one after it are applied in the order they came; uploads stay with
the thread they were attached in. Each test fails without its fix in static/chat/app.js.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from accounts.models import User
from attachments.models import Attachment
from messaging.models import Message
from messaging.services import message_send, reaction_add
from tests.browser import LiveServer, session_cookie_for
from tests.conftest import needs
from tests.test_web_chat import TIMEOUT, off_loop, open_chat, png_bytes, wait_connected, wait_until
from tests.test_web_chat_more import open_thread
from threads.services import thread_create

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Records every WebSocket the page makes (whether it opened, its close code, the type of each frame
# it received, "binary" for a compressed one), and lets the test hold inflating compressed frames
# until it releases them. The page's own sockets and DecompressionStream, only watched and delayed.
WATCH_SOCKETS = """
(() => {
  const Real = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Real {
    constructor(...args) {
      super(...args);
      const record = { opened: false, code: null, frames: [] };
      window.__sockets.push(record);
      this.addEventListener('open', () => { record.opened = true; });
      this.addEventListener('close', (event) => { record.code = event.code; });
      this.addEventListener('message', (event) => {
        if (typeof event.data !== 'string') { record.frames.push('binary'); return; }
        try { record.frames.push(JSON.parse(event.data).type); } catch (_) { record.frames.push('?'); }
      });
    }
  };
  const RealInflate = window.DecompressionStream;
  let gate = null;
  window.__holdInflate = () => {
    let release;
    const held = new Promise((resolve) => { release = resolve; });
    gate = { held, release };
  };
  window.__releaseInflate = () => {
    if (gate) gate.release();
    gate = null;
  };
  if (RealInflate) {
    window.DecompressionStream = class {
      constructor(format) {
        const inner = new RealInflate(format);
        this.writable = inner.writable;
        this.readable = inner.readable.pipeThrough(new TransformStream({
          async transform(chunk, controller) {
            const held = gate;
            if (held) await held.held;
            controller.enqueue(chunk);
          },
        }));
      }
    };
  }
})();
"""

SOCKETS = "() => window.__sockets.map((s) => ({ opened: s.opened, code: s.code }))"


def open_watched(browser: Any, server: LiveServer, user: User) -> Any:
    """``open_chat`` with the page's sockets watched (``WATCH_SOCKETS``)."""
    return open_chat(browser, server, user, WATCH_SOCKETS)


def sockets(page: Any) -> list[dict[str, Any]]:
    return list(page.evaluate(SOCKETS))


def quote_heavy_body() -> str:
    """Under the 100 KB body limit, but twice that in a JSON frame: every quote is escaped."""
    body = 'She said "' + '"' * 60_000 + '" and left'
    assert len(body.encode()) < 100 * 1024 < len(json.dumps({"type": "message.send", "body": body}).encode())
    return body


def outbox(page: Any, user: User) -> list[Any]:
    return list(json.loads(page.evaluate(f"() => localStorage.getItem('chatapp.outbox.{user.pk}') || '[]'")))


DELIVERED = "#messages .message:not(.pending):not(.queued):not(.failed) .body:has-text('and left')"


def test_a_message_too_large_for_a_socket_frame_is_sent_once_over_rest(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Quotes", participant_ids=[bob.pk])
    page = open_watched(browser, live_daphne, alice)
    open_thread(page, thread.pk)
    body = quote_heavy_body()

    page.fill("#input", body)
    page.press("#input", "Enter")
    page.wait_for_selector(DELIVERED)
    assert Message.objects.filter(thread=thread, sender=alice, body=body).count() == 1
    assert outbox(page, alice) == []
    # The socket was never closed for it (1009) and never reconnected to send it again.
    page.wait_for_timeout(1000)
    assert sockets(page) == [{"opened": True, "code": None}]
    assert page.evaluate("window.chatapp.socket.connected") is True
    assert page.locator("#messages .message .body:has-text('and left')").count() == 1
    assert Message.objects.filter(thread=thread, sender=alice).count() == 1
    assert page.js_errors == []


def test_a_frame_the_server_closed_the_socket_on_is_not_sent_again(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """Should the page misjudge the limit, the server's 1009 close marks that message failed (it is
    not queued and resent on every reconnect); Retry sends it over REST, once."""
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Refused", participant_ids=[bob.pk])
    page = open_watched(browser, live_daphne, alice)
    open_thread(page, thread.pk)
    page.evaluate("() => { window.chatapp.socket.maxFrameBytes = 1 << 30; }")  # as if "ready" said so
    body = quote_heavy_body()

    page.fill("#input", body)
    page.press("#input", "Enter")
    failed = page.locator("#messages .message.failed", has_text="and left")
    failed.wait_for()
    assert failed.locator(".status.error").inner_text() == "Not sent."
    wait_until(page, f"() => ({SOCKETS})()[0].code === 1009", what="the server to close the socket with 1009")
    wait_connected(page)  # the page reconnects, with the message left out
    page.wait_for_timeout(1500)
    opened = sockets(page)
    assert [s["code"] for s in opened] == [1009, None], opened
    assert page.locator("#messages .message.failed", has_text="and left").count() == 1
    assert not Message.objects.filter(thread=thread).exists()

    cid = str(failed.get_attribute("data-cid"))
    failed.locator("button.retry").click()
    page.wait_for_selector(DELIVERED)
    assert page.locator("#messages .message.failed").count() == 0
    assert Message.objects.filter(thread=thread, sender=alice, client_msg_id=cid, body=body).count() == 1
    assert outbox(page, alice) == []
    assert [s["code"] for s in sockets(page)] == [1009, None]


# Fills alice's connection limit from another page (same origin, her session): opens sockets until
# the server refuses one with 4429, and keeps the others open.
FILL_CONNECTIONS = """
async () => {
  window.__held = [];
  for (let i = 0; i < 50; i++) {
    const ws = new WebSocket('ws://' + location.host + '/ws/');
    const outcome = await new Promise((resolve) => {
      ws.onmessage = (e) => {
        try { if (JSON.parse(e.data).type === 'ready') resolve('ready'); } catch (_) {}
      };
      ws.onclose = (e) => resolve(e.code);
    });
    if (outcome !== 'ready') return { held: window.__held.length, refused: outcome };
    window.__held.push(ws);
  }
  return { held: window.__held.length, refused: null };
}
"""

RELEASE_CONNECTIONS = """
() => Promise.all(window.__held.map((ws) => new Promise((resolve) => {
  ws.onclose = resolve;
  ws.close();
})))
"""

# Clicks the banner's "Reconnect now" until the socket is open (the server counts a closed socket out
# of the limit a moment after its close handshake, so the first try may be refused again).
RECONNECT = """
() => {
  const socket = window.chatapp.socket;
  if (socket.connected) return true;
  const button = document.querySelector('#conn-banner .reconnect-now');
  if (button && !(socket.ws && socket.ws.readyState === WebSocket.CONNECTING)) button.click();
  return false;
}
"""


def test_too_many_connections_waits_instead_of_reconnecting_in_a_loop(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    off_loop(thread_create, creator=alice, title="Tabs", participant_ids=[bob.pk])
    holder_context = browser.new_context()
    holder_context.add_cookies([session_cookie_for(alice, live_daphne)])
    holder = holder_context.new_page()
    holder.set_default_timeout(TIMEOUT)
    holder.goto(live_daphne.url + "/healthz")
    filled = holder.evaluate(FILL_CONNECTIONS)
    assert filled["refused"] == 4429, filled
    assert filled["held"] >= 1, filled

    page = open_watched(browser, live_daphne, alice)
    wait_until(page, f"() => ({SOCKETS})()[0]?.code === 4429", what="the page's socket to be refused with 4429")
    # The server accepted the socket then closed it: that is no reason to try again at once.
    page.wait_for_timeout(4000)
    assert sockets(page) == [{"opened": True, "code": 4429}]
    page.wait_for_selector("#conn-banner:not([hidden]):has-text('Too many')")

    # Another tab closes: "Reconnect now" connects without waiting out the backoff.
    holder.evaluate(RELEASE_CONNECTIONS)
    wait_until(page, RECONNECT, what="the page to reconnect once a slot is free")
    wait_connected(page)
    assert len(sockets(page)) < 10
    page.wait_for_selector("#conn-banner[hidden]", state="attached")
    assert page.js_errors == []
    holder_context.close()


def test_a_session_that_ended_while_disconnected_stops_the_retries(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """A handshake refused before accept (no valid session) reaches the browser as 1006, like a network
    failure: after a few in a row the page asks the API, and shows the signed-out banner."""
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    off_loop(thread_create, creator=alice, title="Expired", participant_ids=[bob.pk])
    page = open_watched(browser, live_daphne, alice)
    wait_connected(page)
    # The password changes behind the server's back (no broadcast): the session no longer authenticates.
    User.objects.filter(pk=alice.pk).update(password="md5$x$changed")
    page.evaluate("() => window.chatapp.socket.ws.close()")
    page.wait_for_selector("#conn-banner:not([hidden]):has-text('Sign in again')")
    assert (
        page.locator("#conn-banner a:text-is('Sign in')")
        .get_attribute("href", timeout=TIMEOUT)
        .startswith("/accounts/login/")
    )
    assert page.evaluate("window.chatapp.socket.stopped") is True
    made = len(sockets(page))
    assert made <= 8, sockets(page)
    page.wait_for_timeout(2000)
    assert len(sockets(page)) == made  # no more retries


def test_a_compressed_event_is_applied_before_the_smaller_one_after_it(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Order", participant_ids=[bob.pk])
    page = open_watched(browser, live_daphne, bob)
    open_thread(page, thread.pk)

    def frames() -> list[str]:
        return list(page.evaluate("() => window.__sockets.at(-1).frames"))

    # Inflating is held: the big message's frame arrives compressed and waits; the reaction to it
    # arrives (a small text frame) while it waits.
    page.evaluate("() => window.__holdInflate()")
    binary_before = frames().count("binary")
    body = "big " + " ".join(f"word{i}" for i in range(4000)) + " end"
    message, _ = off_loop(message_send, sender=alice, thread_id=thread.pk, body=body, client_msg_id="big-1")
    wait_until(
        page,
        f"() => window.__sockets.at(-1).frames.filter((t) => t === 'binary').length > {binary_before}",
        what="the compressed message.created frame",
    )
    off_loop(reaction_add, actor=alice, message_id=message.pk, emoji="🎉")
    wait_until(
        page,
        "() => window.__sockets.at(-1).frames.includes('reaction.added')",
        what="the reaction.added frame",
    )
    page.evaluate("() => window.__releaseInflate()")

    shown = f'#messages .message[data-id="{message.pk}"]'
    page.wait_for_selector(f"{shown} .body:has-text('word3999 end')")
    page.wait_for_selector(f"{shown} .reaction:has-text('🎉 1')")
    assert page.js_errors == []


def test_uploads_stay_with_the_thread_they_were_attached_in(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    alice, bob = make_user("alice"), make_user("bob")
    first, _ = off_loop(thread_create, creator=alice, title="First", participant_ids=[bob.pk])
    second, _ = off_loop(thread_create, creator=alice, title="Second", participant_ids=[bob.pk])
    page = open_watched(browser, live_daphne, alice)
    open_thread(page, first.pk)
    page.set_input_files("#file-input", files=[{"name": "chart.png", "mimeType": "image/png", "buffer": png_bytes()}])
    page.wait_for_selector("#uploads .upload.done:has-text('chart.png')")

    # In the other thread the composer has no attachment, and a message there goes without it.
    open_thread(page, second.pk)
    assert page.locator("#uploads .upload").count() == 0
    page.fill("#input", "no files here")
    page.press("#input", "Enter")
    page.wait_for_selector("#messages .message:not(.pending):not(.queued):not(.failed) .body:has-text('no files here')")
    sent = Message.objects.get(thread=second, body="no files here")
    assert not Attachment.objects.filter(message=sent).exists()

    # Back in the first thread, the upload is still there and goes with the message written there.
    open_thread(page, first.pk)
    page.wait_for_selector("#uploads .upload.done:has-text('chart.png')")
    page.fill("#input", "the chart")
    page.press("#input", "Enter")
    page.wait_for_selector("#messages .message:not(.pending) .attachments img")
    with_file = Message.objects.get(thread=first, body="the chart")
    assert [a.original_name for a in Attachment.objects.filter(message=with_file)] == ["chart.png"]
    assert page.locator("#uploads .upload").count() == 0
    assert page.locator("#messages .message.failed").count() == 0
    assert page.js_errors == []
