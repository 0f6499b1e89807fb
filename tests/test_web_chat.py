"""The web chat in real Chromium against a live daphne on PostgreSQL and Redis.

Two people in two browser contexts hold a conversation: live messages, typing, a reaction, an
edit, a reply, an image upload with its preview; the server restarts mid-conversation and both
pages come back with every message exactly once; HTML in a message stays text; a non-member
cannot open the thread. Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from accounts.models import User
from messaging.models import Message
from messaging.services import message_send
from tests.browser import ARTIFACTS, LiveServer, session_cookie_for
from tests.conftest import needs
from threads.models import Thread
from threads.services import thread_create

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Generous: CI machines are shared, and a page that opens four contexts and sockets while other
# suites run can take several seconds for what takes 200 ms here. A real failure still fails.
TIMEOUT = 30_000


def off_loop(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run a service in a worker thread: Playwright's sync API keeps an event loop in this one,
    and the service's after-commit broadcast must not run inside it."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    def call() -> Any:
        try:
            return fn(**kwargs)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result(timeout=30)


# Notes on each WebSocket the page opens which threads the server has acknowledged a subscribe for
# (``ws.__subscribed``): the page's own frames, read as they go out and come back, changing nothing.
WATCH_SUBSCRIPTIONS = """
(() => {
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    try {
      const frame = typeof data === 'string' ? JSON.parse(data) : null;
      if (frame && frame.type === 'subscribe' && frame.id !== undefined) {
        if (!this.__subscribing) {
          this.__subscribing = new Map(); // request id -> thread id
          this.__subscribed = new Set();
          this.addEventListener('message', (event) => {
            if (typeof event.data !== 'string') return;
            let answer;
            try { answer = JSON.parse(event.data); } catch (_) { return; }
            if (answer.type === 'ack' && this.__subscribing.has(answer.id)) {
              this.__subscribed.add(this.__subscribing.get(answer.id));
            }
          });
        }
        this.__subscribing.set(frame.id, frame.thread_id);
      }
    } catch (_) {}
    return send.call(this, data);
  };
  window.__watchingSubscriptions = true;
})();
"""

# Whether the page's socket is open and the server has acknowledged its subscription to every
# thread in the list and to the open one (the page subscribes to them all once it is connected).
SUBSCRIBED = """
() => {
  const app = window.chatapp;
  if (!window.__watchingSubscriptions) return { ready: false, why: 'page not opened with open_chat()' };
  if (!app || !app.socket.connected || !app.socket.ws) return { ready: false, why: 'socket not open' };
  const wanted = [...app.state.threads.keys()];
  if (app.state.current && !wanted.includes(app.state.current)) wanted.push(app.state.current);
  const done = app.socket.ws.__subscribed || new Set();
  const missing = wanted.filter((id) => !done.has(id));
  return missing.length ? { ready: false, why: 'not subscribed yet', missing } : { ready: true };
}
"""


def open_chat(
    browser: Any,
    server: LiveServer,
    user: User,
    *init_scripts: str,
    viewport: dict[str, int] | None = None,
    clock: bool = False,
) -> Any:
    """The chat page signed in as ``user``; ``init_scripts`` run before the page's own. With ``clock``
    the page's timers run on Playwright's clock (time flows as usual until the test moves it on)."""
    context = browser.new_context(viewport=viewport or {"width": 1200, "height": 800})
    if clock:
        context.clock.install()
    context.add_init_script(WATCH_SUBSCRIPTIONS)
    for script in init_scripts:
        context.add_init_script(script)
    context.add_cookies([session_cookie_for(user, server)])
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    page.goto(server.url + "/")
    page.wait_for_selector(".thread-item", state="attached")
    return page


def eventually(page: Any, check: Callable[[], bool], *, what: str, timeout: float = TIMEOUT / 1000) -> None:
    """Until ``check()`` (a database read, say) holds, polling without holding up the page."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(100)


def wait_until(page: Any, script: str, arg: Any = None, *, what: str) -> Any:
    """Evaluate ``script`` until it returns something truthy, and return that.

    For async scripts (the Cache API): ``page.wait_for_function`` does not await a returned promise,
    and a promise is truthy, so it would return at once; ``page.evaluate`` awaits it.
    """
    deadline = time.monotonic() + TIMEOUT / 1000
    while True:
        value = page.evaluate(script, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        page.wait_for_timeout(100)


def wait_connected(page: Any) -> None:
    """Until the page's socket is open and subscribed (acknowledged by the server) to every thread
    it lists and the open one: from then on typing goes out and live events come in."""
    deadline = time.monotonic() + TIMEOUT / 1000
    while True:
        state = page.evaluate(SUBSCRIBED)
        if state["ready"]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the page's socket did not connect and subscribe in time: {state}")
        page.wait_for_timeout(100)


def message_bodies(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#messages .message:not(.pending) .body").all_inner_texts()]


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (640, 400), (59, 91, 219)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_two_people_chat_live(browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Launch", participant_ids=[bob.pk])
    off_loop(message_send, sender=alice, thread_id=thread.pk, body="Welcome, @bob", client_msg_id="w1")

    page_a = open_chat(browser, live_daphne, alice)
    page_b = open_chat(browser, live_daphne, bob)
    for page in (page_a, page_b):
        page.click(f'.thread-item[data-thread-id="{thread.pk}"]')
        page.wait_for_selector("#messages .message")
        wait_connected(page)

    # A types: B sees the indicator. A sends: B sees the message live, rendered by the server.
    page_a.fill("#input", "Ship it **today**")
    page_a.type("#input", "!")
    page_b.wait_for_function("() => document.getElementById('typing').textContent.includes('typing')")
    page_a.press("#input", "Enter")
    page_b.wait_for_selector("#messages .message .body strong:text('today')")
    # B has the thread open: A's message turns "seen" (read receipts, batched by the server).
    page_a.wait_for_selector(".message.mine .status.receipt.seen")

    # Shift+Enter breaks the line instead of sending.
    page_b.fill("#input", "line one")
    page_b.press("#input", "Shift+Enter")
    page_b.type("#input", "line two")
    assert page_b.input_value("#input") == "line one\nline two"
    page_b.press("#input", "Enter")
    page_a.wait_for_selector("#messages .message .body:has-text('line two')")

    # A reaction from B appears on A's page.
    target = page_b.locator("#messages .message", has_text="Ship it").last
    target.hover()
    target.locator("button[aria-label='React']").click()
    page_b.click("#emoji-picker button[aria-label='React with 🎉']")
    page_a.wait_for_selector("#messages .message .reaction:has-text('🎉 1')")

    # A edits the message: B sees the new text and the edited mark.
    mine = page_a.locator("#messages .message.mine", has_text="Ship it").last
    mine.hover()
    mine.locator("button[aria-label='Edit']").click()
    page_a.fill(".edit-box", "Ship it tomorrow")
    page_a.press(".edit-box", "Enter")
    page_b.wait_for_selector("#messages .message .body:has-text('Ship it tomorrow')")
    page_b.wait_for_selector("#messages .message .edited")

    # B replies: A sees the quote.
    reply_to = page_b.locator("#messages .message", has_text="Ship it tomorrow").last
    reply_to.hover()
    reply_to.locator("button[aria-label='Reply']").click()
    page_b.fill("#input", "Agreed")
    page_b.press("#input", "Enter")
    page_a.wait_for_selector("#messages .message .quote:has-text('Ship it tomorrow')")

    # B uploads an image and sends it: A sees the thumbnail preview.
    page_b.set_input_files("#file-input", files=[{"name": "chart.png", "mimeType": "image/png", "buffer": png_bytes()}])
    page_b.wait_for_selector(".upload.done")
    page_b.fill("#input", "the chart")
    page_b.press("#input", "Enter")
    image = page_a.wait_for_selector("#messages .attachments img")
    page_a.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image)

    shot(page_a, "alice-conversation")
    shot(page_b, "bob-conversation")
    assert Message.objects.filter(thread=thread).count() == 5
    assert page_a.js_errors == []
    assert page_b.js_errors == []


def test_restart_mid_conversation_loses_and_doubles_nothing(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Restart", participant_ids=[bob.pk])
    page_a = open_chat(browser, live_daphne, alice)
    page_b = open_chat(browser, live_daphne, bob)
    for page in (page_a, page_b):
        page.click(f'.thread-item[data-thread-id="{thread.pk}"]')
        wait_connected(page)
    for i in range(3):
        page_a.fill("#input", f"before {i}")
        page_a.press("#input", "Enter")
    page_b.wait_for_selector("#messages .message .body:has-text('before 2')")

    live_daphne.stop()
    page_a.wait_for_selector("#conn-banner:not([hidden])")
    # Written while the server is down: queued in the page's outbox.
    page_a.fill("#input", "during the outage")
    page_a.press("#input", "Enter")
    page_a.wait_for_selector(".message.queued")
    # Someone else's messages land in the database meanwhile.
    for i in range(3):
        off_loop(message_send, sender=bob, thread_id=thread.pk, body=f"missed {i}", client_msg_id=f"missed-{i}")
    live_daphne.start()

    for page in (page_a, page_b):
        wait_connected(page)
        page.wait_for_selector("#messages .message .body:has-text('missed 2')")
        page.wait_for_selector("#messages .message:not(.queued):not(.pending) .body:has-text('during the outage')")
    expected = ["before 0", "before 1", "before 2", "during the outage", "missed 0", "missed 1", "missed 2"]
    for page in (page_a, page_b):
        bodies = message_bodies(page)
        assert sorted(bodies) == sorted(expected), bodies
        assert len(bodies) == len(set(bodies))
    assert page_a.locator("#conn-banner").is_hidden()
    assert Message.objects.filter(thread=thread, body="during the outage").count() == 1
    shot(page_a, "after-restart")


def test_html_shows_as_text_and_non_members_see_nothing(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    alice, bob, mallory = make_user("alice"), make_user("bob"), make_user("mallory")
    thread, _ = off_loop(thread_create, creator=alice, title="Private", participant_ids=[bob.pk])
    other, _ = off_loop(thread_create, creator=mallory, title="Mallory's")
    payload = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> [x](javascript:alert(1))'
    off_loop(message_send, sender=alice, thread_id=thread.pk, body=payload, client_msg_id="xss")

    page = open_chat(browser, live_daphne, bob)
    page.click(f'.thread-item[data-thread-id="{thread.pk}"]')
    body = page.wait_for_selector("#messages .message .body")
    assert "<script>" in body.inner_text()
    assert page.locator("#messages .message .body script, #messages .message .body img").count() == 0
    # Had the markup been injected, its <img src=x> would fail to load and its onerror would run only
    # then: wait until an image of that address has failed here, and until every image in the
    # messages has finished (loaded or failed), before checking that no handler ran.
    page.evaluate(
        """() => new Promise((resolve) => {
          const probe = new Image();
          probe.onload = probe.onerror = () => resolve(true);
          probe.src = 'x';
        })"""
    )
    wait_until(
        page,
        "() => [...document.querySelectorAll('#messages img')].every((img) => img.complete)",
        what="the images in the messages to finish loading",
    )
    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    assert page.locator("#messages a[href^='javascript']").count() == 0

    outsider = open_chat(browser, live_daphne, mallory)
    assert outsider.locator(f'.thread-item[data-thread-id="{thread.pk}"]').count() == 0
    response = outsider.request.get(f"{live_daphne.url}/api/v1/threads/{thread.pk}/messages")
    assert response.status == 404
    # Only the fragment differs from the page's address, so going there alone would not load the page
    # again: reload it, so that it tries to open the thread from the address. It is refused and
    # dropped (the address loses its fragment), nothing of it shown.
    outsider.goto(f"{live_daphne.url}/#thread-{thread.pk}")
    outsider.reload()
    outsider.wait_for_selector(".thread-item")
    wait_until(
        outsider,
        "() => window.chatapp && location.hash === '' && document.getElementById('thread-view').hidden",
        what="the page to refuse the thread named in its address",
    )
    assert "Private" not in outsider.inner_text("#thread-title")
    assert payload not in outsider.content()
    assert Thread.objects.filter(pk=other.pk).exists()
    shot(page, "html-as-text")


def test_phone_width_and_keyboard(browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]) -> None:
    needs("postgres")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Mobile", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice, viewport={"width": 390, "height": 800})
    assert page.locator("#sidebar").is_hidden()
    page.click("#show-threads")
    page.locator(f'.thread-item[data-thread-id="{thread.pk}"]').focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#thread-view:not([hidden])")
    wait_connected(page)
    page.fill("#input", "from a phone")
    page.keyboard.press("Enter")
    page.wait_for_selector("#messages .message:not(.pending) .body:has-text('from a phone')")
    assert re.search(r"from a phone", page.inner_text("#messages"))
    shot(page, "phone")


def test_mentions_members_and_new_conversation(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    thread, _ = off_loop(thread_create, creator=alice, title="Team", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice)
    page.click(f'.thread-item[data-thread-id="{thread.pk}"]')
    wait_connected(page)

    # @ completion offers the thread's members; Enter picks one.
    page.click("#input")
    page.keyboard.type("hi @bo")
    page.wait_for_selector("#mention-list:not([hidden]) li:has-text('@bob')")
    page.keyboard.press("Enter")
    assert page.input_value("#input") == "hi @bob "
    page.keyboard.press("Enter")
    page.wait_for_selector("#messages .message:not(.pending) .body:has-text('hi @bob')")

    # The owner adds carol and makes her an admin through the members dialog.
    page.click("#members-btn")
    page.fill("#mb-people", "car")
    page.click("#mb-results button:has-text('Carol')")
    page.wait_for_selector("#members-list li:has-text('Carol')")
    # (The select shows ADMIN as soon as it is chosen: wait for the server's answer, not for it.)
    with page.expect_response(lambda r: r.request.method == "PATCH" and "/participants/" in r.url) as changed:
        page.select_option("#members-list select[aria-label='Role of Carol']", "ADMIN")
    assert changed.value.status == 200
    page.click("#mb-close")
    from threads.models import ThreadParticipant

    assert ThreadParticipant.objects.get(thread=thread, user=carol).role == "ADMIN"

    # A new direct conversation from the dialog.
    page.click("#new-thread-btn")
    page.fill("#nt-people", "car")
    page.click("#nt-results button:has-text('Carol')")
    page.click("#nt-create")
    page.wait_for_selector("#thread-title:text('Carol')")
    assert Thread.objects.filter(
        kind="DIRECT", direct_key=f"{min(alice.pk, carol.pk)}:{max(alice.pk, carol.pk)}"
    ).exists()
    shot(page, "members-and-direct")
    assert page.js_errors == []


def test_edit_conflict_shows_both_texts_and_lets_me_choose(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    from messaging.services import message_edit

    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Edits", participant_ids=[bob.pk])
    message, _ = off_loop(message_send, sender=alice, thread_id=thread.pk, body="the quick fox", client_msg_id="e")
    page = open_chat(browser, live_daphne, alice)
    page.click(f'.thread-item[data-thread-id="{thread.pk}"]')
    wait_connected(page)
    mine = page.locator("#messages .message.mine", has_text="the quick fox")
    mine.hover()
    mine.locator("button[aria-label='Edit']").click()
    page.fill(".edit-box", "the fast fox")
    # Meanwhile another of alice's devices changes the same word; the live update must not drop my draft.
    off_loop(message_edit, actor=alice, message_id=message.pk, body="the slow fox", expected_version=1)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.message')].some((m) => m.textContent.includes('edited'))"
    )
    assert page.input_value(".edit-box") == "the fast fox"
    page.press(".edit-box", "Enter")
    page.wait_for_selector("#conflict-dialog[open]")
    assert page.input_value("#cf-current") == "the slow fox"
    assert page.input_value("#cf-mine") == "the fast fox"
    page.fill("#cf-mine", "the fast and slow fox")
    page.click("#cf-save")
    page.wait_for_selector("#messages .message .body:has-text('the fast and slow fox')")
    message.refresh_from_db()
    assert message.body == "the fast and slow fox"
    assert message.version == 3
    shot(page, "edit-conflict")
