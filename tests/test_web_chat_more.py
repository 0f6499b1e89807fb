"""More of the web chat in real Chromium against a live daphne on PostgreSQL, Redis and S3.

Attachments by drag and drop and by paste, browser notifications while the tab is hidden, the
service worker's offline shell and outbox, paging back through history, the Archived tab, live
unread badges, managing members, signing in and out, and a refused send with its retry button.
Events are real DOM events dispatched in the page; nothing on the server side is mocked.
Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import base64
import io
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from accounts.models import User
from attachments.models import Attachment, ScanStatus
from messaging.models import Message
from messaging.services import message_send
from tests.browser import LiveServer
from tests.budgets import clear_send_budgets
from tests.conftest import needs
from tests.test_web_chat import TIMEOUT, eventually, off_loop, open_chat, shot, wait_connected, wait_until
from threads.models import ThreadKind, ThreadParticipant
from threads.services import participant_change_role, thread_create

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


class HeldRequests:
    """Requests matching ``pattern`` are answered by the server at once (as it stands then) but
    handed to the page only on ``release()``; later ones go straight through.

    Once the service worker controls the page, the page's request and the worker's own fetch are
    both routed: every held one is released, or the page would wait on the one never answered.
    """

    def __init__(self, page: Any, pattern: str) -> None:
        self.page, self.pattern = page, pattern
        self.held: list[tuple[Any, Any]] = []
        self.released = False
        page.context.route(pattern, self._hold)

    def _hold(self, route: Any) -> None:
        if self.released:
            route.continue_()
        else:
            self.held.append((route, route.fetch()))

    def wait(self, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT / 1000
        while not self.held and time.monotonic() < deadline:
            self.page.wait_for_timeout(50)
        assert self.held, f"the page did not request {what}"

    def release(self) -> None:
        self.released = True
        for route, response in self.held:
            route.fulfill(response=response)
        self.page.context.unroute(self.pattern)


# The pathnames the service worker has kept (the shell and the data).
KEPT_PATHS = """async () => {
  const paths = [];
  for (const name of await caches.keys()) {
    for (const request of await (await caches.open(name)).keys()) paths.push(new URL(request.url).pathname);
  }
  return paths;
}"""


def wait_kept_offline(page: Any, *paths: str) -> None:
    script = (
        f"async (wanted) => {{ const kept = await ({KEPT_PATHS})(); return wanted.every((p) => kept.includes(p)); }}"
    )
    wait_until(page, script, list(paths), what=f"{', '.join(paths)} kept offline")


def open_thread(page: Any, thread_id: int) -> None:
    page.click(f'.thread-item[data-thread-id="{thread_id}"]')
    page.wait_for_selector("#thread-view:not([hidden])")
    wait_connected(page)


def noise_png(width: int, height: int, seed: int) -> bytes:
    """A PNG that does not compress much, so that an upload takes long enough to report progress."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def visible_bodies(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#messages .message:not(.pending):not(.queued) .body").all_inner_texts()]


# Builds a File in the page from base64 and records every value the upload progress bars show.
MAKE_FILE = """
window.__makeFile = (b64, name, type) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new File([bytes], name, { type });
};
window.__progress = [];
new MutationObserver(() => {
  for (const bar of document.querySelectorAll('#uploads progress')) window.__progress.push(Number(bar.value));
}).observe(document.getElementById('uploads'), { subtree: true, childList: true, attributes: true });
"""

DROP = """
([b64, name]) => {
  const dt = new DataTransfer();
  dt.items.add(window.__makeFile(b64, name, 'image/png'));
  const target = document.getElementById('history');
  const over = new DragEvent('dragover', { bubbles: true, cancelable: true, dataTransfer: dt });
  target.dispatchEvent(over);
  const zoneShown = !document.getElementById('drop-zone').hidden;
  const drop = new DragEvent('drop', { bubbles: true, cancelable: true, dataTransfer: dt });
  target.dispatchEvent(drop);
  return { zoneShown, overPrevented: over.defaultPrevented, dropPrevented: drop.defaultPrevented,
           zoneAfter: !document.getElementById('drop-zone').hidden };
}
"""

DRAG_TEXT = """
() => {
  const dt = new DataTransfer();
  dt.setData('text/plain', 'just words');
  const over = new DragEvent('dragover', { bubbles: true, cancelable: true, dataTransfer: dt });
  document.getElementById('history').dispatchEvent(over);
  return { zoneShown: !document.getElementById('drop-zone').hidden, prevented: over.defaultPrevented };
}
"""

PASTE = """
([b64, name]) => {
  const dt = new DataTransfer();
  dt.items.add(window.__makeFile(b64, name, 'image/png'));
  const paste = new ClipboardEvent('paste', { bubbles: true, cancelable: true, clipboardData: dt });
  document.getElementById('input').dispatchEvent(paste);
  return paste.defaultPrevented;
}
"""


def test_attachments_by_drop_and_paste_reach_the_other_person_live(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("s3")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Files", participant_ids=[bob.pk])
    page_a = open_chat(browser, live_daphne, alice)
    page_b = open_chat(browser, live_daphne, bob)
    for page in (page_a, page_b):
        open_thread(page, thread.pk)
    page_a.evaluate(MAKE_FILE)

    # Dragging text over the pane is not a file drop: no drop zone, and the browser keeps its default.
    assert page_a.evaluate(DRAG_TEXT) == {"zoneShown": False, "prevented": False}

    # Uploads are slowed to ~256 KB/s (Chromium's own throttling) so that progress is really reported.
    cdp = page_a.context.new_cdp_session(page_a)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 256 * 1024},
    )
    dropped = noise_png(420, 300, seed=1)
    result = page_a.evaluate(DROP, [base64.b64encode(dropped).decode(), "dropped.png"])
    assert result == {"zoneShown": True, "overPrevented": True, "dropPrevented": True, "zoneAfter": False}
    page_a.wait_for_selector("#uploads .upload:has-text('dropped.png') progress")
    page_a.wait_for_selector("#uploads .upload.done:has-text('dropped.png')", timeout=TIMEOUT)
    seen = page_a.evaluate("window.__progress")
    assert seen[-1] == 100
    assert any(0 < value < 100 for value in seen), seen  # it moved, not only 0 then 100
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    page_a.fill("#input", "the dropped chart")
    page_a.press("#input", "Enter")

    # B sees it live: the thumbnail (loaded from S3 through the API's signed redirect) and a download link.
    message_b = page_b.locator("#messages .message", has_text="the dropped chart")
    image = message_b.locator(".attachments img").element_handle(timeout=TIMEOUT)
    page_b.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image)
    link = message_b.locator(".attachments a.download-link")
    assert link.get_attribute("download") == "dropped.png"
    response = page_b.request.get(live_daphne.url + str(link.get_attribute("href")))
    assert response.status == 200
    assert Image.open(io.BytesIO(response.body())).size == (420, 300)

    # Paste into the input: the same path, a second image.
    pasted = noise_png(200, 120, seed=2)
    assert page_a.evaluate(PASTE, [base64.b64encode(pasted).decode(), "pasted.png"]) is True
    page_a.wait_for_selector("#uploads .upload.done:has-text('pasted.png')")
    page_a.fill("#input", "and a pasted one")
    page_a.press("#input", "Enter")
    message_b = page_b.locator("#messages .message", has_text="and a pasted one")
    image = message_b.locator(".attachments img").element_handle(timeout=TIMEOUT)
    page_b.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image)
    assert message_b.locator(".attachments a.download-link").get_attribute("download") == "pasted.png"

    for body, name in (("the dropped chart", "dropped.png"), ("and a pasted one", "pasted.png")):
        message = Message.objects.get(thread=thread, body=body)
        files = list(Attachment.objects.filter(message=message))
        assert [(a.original_name, a.scan_status) for a in files] == [(name, ScanStatus.CLEAN)]
    assert page_a.locator("#uploads .upload").count() == 0  # the composer is clear again
    shot(page_b, "more-attachments-drop-paste")
    assert page_a.js_errors == []
    assert page_b.js_errors == []


# Makes document.hidden controllable (as when another tab is in front) and records every
# notification the page shows, while still constructing the browser's real Notification.
NOTIFY_INIT = """
(() => {
  let hidden = false;
  Object.defineProperty(Document.prototype, 'hidden', { configurable: true, get: () => hidden });
  Object.defineProperty(Document.prototype, 'visibilityState', {
    configurable: true, get: () => (hidden ? 'hidden' : 'visible'),
  });
  window.__setHidden = (value) => {
    hidden = value;
    document.dispatchEvent(new Event('visibilitychange'));
  };
  window.__notes = [];
  const Real = window.Notification;
  if (!Real) return;
  window.Notification = class extends Real {
    constructor(title, options) {
      super(title, options);
      window.__notes.push({ title, body: (options || {}).body || '' });
    }
  };
})();
"""


def test_notifications_for_mentions_and_direct_messages_only_while_hidden(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    group, _ = off_loop(thread_create, creator=alice, title="Launch", participant_ids=[bob.pk])
    direct, _ = off_loop(thread_create, creator=alice, participant_ids=[bob.pk], kind=ThreadKind.DIRECT)
    page = open_chat(browser, live_daphne, bob)
    page.context.grant_permissions(["notifications"], origin=live_daphne.url)
    page.context.add_init_script(NOTIFY_INIT)
    page.reload()
    page.wait_for_selector(".thread-item")
    wait_connected(page)
    assert page.evaluate("Notification.permission") == "granted"

    def wait_for_notification_badge(count: int) -> None:
        page.wait_for_selector(f"#notif-count:not([hidden]):text-is('{count}')")

    # Visible tab: the mention counts in the bell, but no system notification.
    off_loop(message_send, sender=alice, thread_id=group.pk, body="@bob are you here?", client_msg_id="n1")
    wait_for_notification_badge(1)
    assert page.evaluate("window.__notes") == []

    # Hidden tab: a mention and a direct message each show one notification.
    page.evaluate("window.__setHidden(true)")
    assert page.evaluate("document.hidden") is True
    off_loop(message_send, sender=alice, thread_id=group.pk, body="@bob the build is green", client_msg_id="n2")
    page.wait_for_function("() => window.__notes.length === 1")
    off_loop(message_send, sender=alice, thread_id=direct.pk, body="got a minute?", client_msg_id="n3")
    page.wait_for_function("() => window.__notes.length === 2")
    # A message that is neither a mention nor direct shows none (wait until it has arrived).
    off_loop(message_send, sender=alice, thread_id=group.pk, body="lunch at noon", client_msg_id="n4")
    page.wait_for_selector(f'.thread-item[data-thread-id="{group.pk}"] .thread-preview:has-text("lunch at noon")')
    notes = page.evaluate("window.__notes")
    assert notes == [
        {"title": "You were mentioned", "body": "Launch: @bob the build is green"},
        {"title": "New direct message", "body": f"{alice.name}: got a minute?"},
    ]

    # Back in front: no more notifications.
    page.evaluate("window.__setHidden(false)")
    off_loop(message_send, sender=alice, thread_id=direct.pk, body="never mind", client_msg_id="n5")
    wait_for_notification_badge(4)
    assert len(page.evaluate("window.__notes")) == 2
    shot(page, "more-notifications")
    assert page.js_errors == []


def test_the_bell_counts_each_notification_once_across_loads_and_reconnects(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """The bell's count comes from the server at every (re)connect and from live frames between:
    one that arrives while the count is being fetched is counted once, whether or not the fetched
    count has it, and one sent while the socket was down is counted after it reconnects."""
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    group, _ = off_loop(thread_create, creator=alice, title="Bell", participant_ids=[bob.pk])

    def mention(n: int) -> None:
        off_loop(message_send, sender=alice, thread_id=group.pk, body=f"@bob ping {n}", client_msg_id=f"bell-{n}")

    def badge() -> str:
        return str(page.evaluate("(n => (n.hidden ? '' : n.textContent))(document.getElementById('notif-count'))"))

    def wait_badge(count: int) -> None:
        try:
            page.wait_for_selector(f"#notif-count:not([hidden]):text-is('{count}')")
        except Exception as exc:
            raise AssertionError(f"the bell shows {badge()!r}, not {count}") from exc

    mention(0)  # unread before the page loads
    page = open_chat(browser, live_daphne, bob)
    wait_connected(page)
    wait_badge(1)

    # Reload with the count request held: the server's answer is taken before the next mention
    # exists, and reaches the page only after that mention's live frame has.
    count = HeldRequests(page, "**/api/v1/notifications?unread=1&limit=1")
    page.reload()
    count.wait("the count")
    mention(1)
    wait_badge(1)  # the live frame, while the count is on its way
    count.release()  # its answer counts only mention 0
    wait_badge(2)
    mention(2)
    wait_badge(3)

    # Down while a mention is sent: it is not replayed on the socket, the count on reconnect has it.
    page.context.set_offline(True)
    page.evaluate("window.chatapp.socket.ws.close()")
    page.wait_for_function("() => !window.chatapp.socket.connected")
    mention(3)
    page.context.set_offline(False)
    wait_connected(page)
    wait_badge(4)
    page.wait_for_timeout(500)
    assert badge() == "4"  # and never counted twice
    assert page.js_errors == []


def test_offline_shell_and_outbox_send_each_message_once(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Field trip", participant_ids=[bob.pk])
    off_loop(message_send, sender=bob, thread_id=thread.pk, body="meet at nine", client_msg_id="o1")
    page_a = open_chat(browser, live_daphne, alice)
    page_b = open_chat(browser, live_daphne, bob)
    for page in (page_a, page_b):
        open_thread(page, thread.pk)
    page_a.wait_for_function("() => navigator.serviceWorker.controller !== null")
    # The worker keeps the shell and, read again through it, the list and the open thread.
    wait_kept_offline(
        page_a, "/", "/api/v1/threads", f"/api/v1/threads/{thread.pk}", f"/api/v1/threads/{thread.pk}/messages"
    )

    page_a.context.set_offline(True)
    page_a.reload()
    # The shell renders from the cache: the open thread (from the address), its last page, the banner.
    page_a.wait_for_selector("#conn-banner:not([hidden]):has-text('offline')")
    page_a.wait_for_selector(f'.thread-item[data-thread-id="{thread.pk}"]')
    page_a.wait_for_selector("#thread-view:not([hidden]) #messages .message .body:has-text('meet at nine')")
    assert page_a.evaluate("window.chatapp.socket.connected") is False
    for text in ("written offline one", "written offline two"):
        page_a.fill("#input", text)
        page_a.press("#input", "Enter")
    queued = page_a.locator("#messages .message.queued")
    queued.nth(1).wait_for()
    assert queued.count() == 2
    assert queued.locator(".status").all_inner_texts() == ["Waiting for connection…"] * 2
    client_ids = [str(queued.nth(i).get_attribute("data-cid")) for i in range(2)]
    # Still pending after another offline reload: the outbox is kept by the browser, not the page.
    page_a.reload()
    page_a.locator("#messages .message.queued").nth(1).wait_for()
    assert Message.objects.filter(client_msg_id__in=client_ids).count() == 0
    shot(page_a, "more-offline")

    page_a.context.set_offline(False)
    wait_connected(page_a)
    for page in (page_a, page_b):
        page.wait_for_selector("#messages .message:not(.queued):not(.pending) .body:has-text('written offline two')")
    assert page_a.locator("#messages .message.queued, #messages .message.pending").count() == 0
    page_a.wait_for_selector("#conn-banner[hidden]", state="attached")
    for cid in client_ids:
        assert Message.objects.filter(sender=alice, client_msg_id=cid).count() == 1
    for page in (page_a, page_b):
        bodies = visible_bodies(page)
        assert bodies.count("written offline one") == 1, bodies
        assert bodies.count("written offline two") == 1, bodies
    shot(page_b, "more-offline-delivered")
    assert page_a.js_errors == []
    assert page_b.js_errors == []


def test_offline_with_only_the_messages_kept_still_shows_them(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """The worker keeps a thread's details and its last page separately; offline with only the
    page, the thread shows its messages (and loads in full when the connection is back)."""
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Half kept", participant_ids=[bob.pk])
    off_loop(message_send, sender=bob, thread_id=thread.pk, body="bring the map", client_msg_id="h1")
    page = open_chat(browser, live_daphne, alice)
    open_thread(page, thread.pk)
    page.wait_for_function("() => navigator.serviceWorker.controller !== null")
    details, messages = f"/api/v1/threads/{thread.pk}", f"/api/v1/threads/{thread.pk}/messages"
    wait_kept_offline(page, details, messages)
    # Forget the details: only the last page is left.
    page.evaluate(
        """async (path) => {
          const data = await caches.open('chatapp-data-v1');
          for (const key of await data.keys()) if (new URL(key.url).pathname === path) await data.delete(key);
        }""",
        details,
    )
    kept = page.evaluate(KEPT_PATHS)
    assert messages in kept
    assert details not in kept
    page.context.set_offline(True)
    page.reload()
    page.wait_for_selector("#thread-view:not([hidden]) #messages .message .body:has-text('bring the map')")
    assert page.inner_text("#thread-sub") == "Offline"
    assert page.inner_text("#thread-title") == "Half kept"  # from the kept thread list
    assert page.locator("#members-btn").is_hidden()

    page.context.set_offline(False)
    wait_connected(page)
    page.wait_for_selector("#thread-sub:has-text('2 members')")
    page.wait_for_selector("#members-btn:not([hidden])")
    assert visible_bodies(page) == ["bring the map"]
    assert page.js_errors == []


def seed_history(*, senders: list[User], thread_id: int, count: int) -> None:
    # Round robin over the senders keeps each within the per-user send budget.
    for i in range(1, count + 1):
        message_send(
            sender=senders[i % len(senders)], thread_id=thread_id, body=f"history {i:03d}", client_msg_id=f"h{i}"
        )


# Scrolls the history to its top and says where its first message is now, before anything loads
# (the scroll event that asks for older messages fires after this returns).
SCROLL_TO_TOP = """
() => {
  const history = document.getElementById('history');
  history.scrollTop = 0;
  const first = document.querySelector('#messages .message');
  const offset = first.getBoundingClientRect().top - history.getBoundingClientRect().top;
  return { seq: Number(first.dataset.seq), offset };
}
"""


def test_scrolling_up_pages_back_in_order_and_keeps_the_position(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    thread, _ = off_loop(thread_create, creator=alice, title="Long", participant_ids=[bob.pk, carol.pk])
    off_loop(seed_history, senders=[alice, bob, carol], thread_id=thread.pk, count=120)
    in_db = list(Message.objects.filter(thread=thread).order_by("sequence").values_list("sequence", "body"))
    assert len(in_db) == 120

    page = open_chat(browser, live_daphne, alice)
    open_thread(page, thread.pk)
    page.wait_for_selector("#messages .message")

    def shown() -> list[tuple[int, str]]:
        rows = page.eval_on_selector_all(
            "#messages .message",
            "(nodes) => nodes.map((n) => [Number(n.dataset.seq), n.querySelector('.body').innerText.trim()])",
        )
        return [(int(seq), body) for seq, body in rows]

    first_page = shown()
    assert first_page == in_db[-len(first_page) :]  # the newest page, in order
    assert len(first_page) < 120
    assert page.evaluate("document.getElementById('history').scrollTop") > 0  # opened at the bottom

    pages = 0
    while not page.locator("#history-top:has-text('start of the conversation')").count():
        count = page.locator("#messages .message").count()
        before = page.evaluate(SCROLL_TO_TOP)
        page.wait_for_function(f"() => document.querySelectorAll('#messages .message').length > {count}")
        pages += 1
        # The message that was at the top is still where it was: the view did not jump.
        after = page.eval_on_selector(
            f'#messages .message[data-seq="{before["seq"]}"]',
            "(n) => n.getBoundingClientRect().top - document.getElementById('history').getBoundingClientRect().top",
        )
        assert abs(after - before["offset"]) < 40, (before, after)
        rows = shown()
        assert rows == in_db[-len(rows) :]  # older pages joined in sequence order, nothing doubled
        assert pages <= 5
    assert shown() == in_db
    assert pages >= 2
    shot(page, "more-history-paging")
    assert page.js_errors == []


def test_archive_and_unarchive_move_a_thread_between_tabs(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    alice, bob = make_user("alice"), make_user("bob")
    keep, _ = off_loop(thread_create, creator=alice, title="Keep me", participant_ids=[bob.pk])
    old, _ = off_loop(thread_create, creator=alice, title="Old project", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice)
    item = f'.thread-item[data-thread-id="{old.pk}"]'
    open_thread(page, old.pk)
    assert page.inner_text("#archive-btn") == "Archive"

    page.click("#archive-btn")
    page.wait_for_selector(item, state="detached")
    page.wait_for_selector("#archive-btn:text-is('Unarchive')")
    assert page.locator(f'.thread-item[data-thread-id="{keep.pk}"]').count() == 1
    assert ThreadParticipant.objects.get(thread=old, user=alice).archived_at is not None
    assert ThreadParticipant.objects.get(thread=old, user=bob).archived_at is None  # mine only

    page.click("#tab-archived")
    page.wait_for_selector(item)
    assert page.locator("#tab-archived").get_attribute("aria-selected") == "true"
    assert page.locator(".thread-item").count() == 1
    shot(page, "more-archived-tab")

    page.click(item)
    page.click("#archive-btn:text-is('Unarchive')")
    page.wait_for_selector(item, state="detached")
    assert ThreadParticipant.objects.get(thread=old, user=alice).archived_at is None
    page.click("#tab-active")
    page.wait_for_selector(item)
    assert page.locator(f'.thread-item[data-thread-id="{keep.pk}"]').count() == 1
    assert page.js_errors == []


def test_messages_elsewhere_raise_that_threads_unread_badge_live(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    here, _ = off_loop(thread_create, creator=alice, title="Here", participant_ids=[bob.pk])
    there, _ = off_loop(thread_create, creator=alice, title="There", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, bob)
    open_thread(page, here.pk)
    badge = page.locator(f'.thread-item[data-thread-id="{there.pk}"] .unread-badge')
    assert badge.count() == 0

    off_loop(message_send, sender=alice, thread_id=there.pk, body="over here", client_msg_id="u1")
    page.wait_for_selector(f'.thread-item[data-thread-id="{there.pk}"] .unread-badge:text-is("1")')
    off_loop(message_send, sender=alice, thread_id=there.pk, body="still over here", client_msg_id="u2")
    page.wait_for_selector(f'.thread-item[data-thread-id="{there.pk}"] .unread-badge:text-is("2")')
    assert "still over here" in page.inner_text(f'.thread-item[data-thread-id="{there.pk}"] .thread-preview')
    # The open thread takes its messages as read: no badge there.
    off_loop(message_send, sender=alice, thread_id=here.pk, body="and here", client_msg_id="u3")
    page.wait_for_selector("#messages .message .body:has-text('and here')")
    assert page.locator(f'.thread-item[data-thread-id="{here.pk}"] .unread-badge').count() == 0
    shot(page, "more-unread-badge")

    # Opening the thread reads it: the badge goes and the server knows.
    last = Message.objects.filter(thread=there).order_by("-sequence").values_list("sequence", flat=True)[0]
    open_thread(page, there.pk)
    badge.wait_for(state="detached")
    # The read receipt goes out batched (by the page, then by the server): poll the database for it.
    participant = ThreadParticipant.objects.get(thread=there, user=bob)

    def read_up_to_last() -> bool:
        participant.refresh_from_db()
        return participant.last_read_sequence >= last

    eventually(page, read_up_to_last, what="the read mark in the database")
    assert participant.last_read_sequence == last
    page.reload()
    page.wait_for_selector(f'.thread-item[data-thread-id="{there.pk}"]')
    assert badge.count() == 0
    assert page.js_errors == []


def test_admins_remove_members_can_leave_and_roles_change_live(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob, carol, dave = make_user("alice"), make_user("bob"), make_user("carol"), make_user("dave")
    thread, _ = off_loop(thread_create, creator=alice, title="Crew", participant_ids=[bob.pk, carol.pk, dave.pk])
    off_loop(participant_change_role, actor=alice, thread_id=thread.pk, user_id=carol.pk, role="ADMIN")
    pages = {user.username: open_chat(browser, live_daphne, user) for user in (alice, bob, carol, dave)}
    for page in pages.values():
        open_thread(page, thread.pk)
    owner, admin = pages["alice"], pages["carol"]
    owner.wait_for_selector("#thread-sub:has-text('4 members')")

    # An admin may remove members but not the owner, and cannot change roles.
    admin.click("#members-btn")
    admin.wait_for_selector("#members-dialog[open]")
    rows = admin.locator("#members-list li")
    assert admin.locator("#members-list select").count() == 0
    assert rows.filter(has_text=alice.name).locator("button:text-is('Remove')").count() == 0
    assert rows.filter(has_text=dave.name).locator("button:text-is('Remove')").count() == 1
    assert admin.locator("#members-add").is_visible()
    rows.filter(has_text=bob.name).locator("button:text-is('Remove')").click()
    rows.filter(has_text=bob.name).wait_for(state="detached")
    assert not ThreadParticipant.objects.filter(thread=thread, user=bob).exists()
    # Bob's page drops the thread live; the owner's header counts one fewer.
    removed = pages["bob"]
    removed.wait_for_selector(f'.thread-item[data-thread-id="{thread.pk}"]', state="detached")
    removed.wait_for_selector("#thread-view", state="hidden")
    removed.wait_for_selector(".toast:has-text('removed')")
    owner.wait_for_selector("#thread-sub:has-text('3 members')")

    # A member leaves by themselves.
    leaver = pages["dave"]
    leaver.click("#members-btn")
    leaver.click("#mb-leave")
    leaver.wait_for_selector(f'.thread-item[data-thread-id="{thread.pk}"]', state="detached")
    assert not ThreadParticipant.objects.filter(thread=thread, user=dave).exists()
    owner.wait_for_selector("#thread-sub:has-text('2 members')")

    # The owner demotes the admin: the admin's open dialog loses its powers at once.
    owner.click("#members-btn")
    owner.select_option(f"#members-list select[aria-label='Role of {carol.name}']", "MEMBER")
    admin.wait_for_selector("#members-list button:text-is('Remove')", state="detached")
    admin.wait_for_selector("#members-add", state="hidden")
    assert ThreadParticipant.objects.get(thread=thread, user=carol).role == "MEMBER"
    shot(admin, "more-members-demoted")
    shot(owner, "more-members-owner")
    for page in pages.values():
        assert page.js_errors == []


def test_sign_in_and_sign_out(browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]) -> None:
    needs("postgres")
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    alice = make_user("alice")
    password = "correct horse battery staple"
    # Hashed the way the server checks it: tests hash with MD5 for speed, the live server does not.
    hasher = PBKDF2PasswordHasher()
    alice.password = hasher.encode(password, hasher.salt(), iterations=1000)
    alice.save(update_fields=["password"])
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(live_daphne.url + "/")
    assert page.url.startswith(live_daphne.url + "/accounts/login/")

    page.fill("#id_username", "alice")
    page.fill("#id_password", "wrong password")
    page.click("button[type=submit]")
    page.wait_for_selector(".error[role=alert]:has-text('didn')")
    page.fill("#id_username", "alice")
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_selector(f"#me-name:text-is('{alice.name}')")
    assert page.url.rstrip("/") == live_daphne.url
    page.wait_for_function("() => window.chatapp && window.chatapp.socket.connected")
    offline_copies = "async () => [await caches.has('chatapp-data-v1'), (await caches.match('/')) !== undefined]"
    wait_until(page, f"async () => (await ({offline_copies})()).every(Boolean)", what="the offline copies")
    shot(page, "more-signed-in")

    page.click("form.signout button")
    page.wait_for_url(live_daphne.url + "/accounts/login/**")
    # The session is gone on the server, and this browser's offline copies of my page and data with it
    # (the login page's own stylesheet may be cached again: it is nobody's data).
    assert page.evaluate(offline_copies) == [False, False]
    page.goto(live_daphne.url + "/")
    assert page.url.startswith(live_daphne.url + "/accounts/login/")
    assert page.request.get(live_daphne.url + "/api/v1/threads").status in (401, 403)
    shot(page, "more-signed-out")
    context.close()


def test_a_refused_send_shows_failed_and_retry_sends_it_once(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    from django.conf import settings

    from chatapp.errors import RateLimited
    from messaging.ratelimits import send_budget_consume

    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Busy", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice)
    open_thread(page, thread.pk)

    # Spend alice's whole send budget (the server shares it through Redis).
    with pytest.raises(RateLimited):
        for _ in range(settings.CHAT_SENDS_PER_MINUTE + 1):
            send_budget_consume(user=alice)

    page.fill("#input", "one too many")
    page.press("#input", "Enter")
    failed = page.locator("#messages .message.failed", has_text="one too many")
    failed.wait_for()
    assert failed.locator(".status.error").inner_text() == "Not sent."
    page.wait_for_selector(".toast.error:has-text('messages per minute')")
    cid = str(failed.get_attribute("data-cid"))
    assert not Message.objects.filter(client_msg_id=cid).exists()
    shot(page, "more-send-failed")

    # Once the budget is back, Retry sends it, once, under the same client message id.
    clear_send_budgets()
    failed.locator("button.retry").click()
    page.wait_for_selector("#messages .message:not(.failed):not(.pending) .body:has-text('one too many')")
    assert page.locator("#messages .message.failed").count() == 0
    assert Message.objects.filter(thread=thread, sender=alice, client_msg_id=cid).count() == 1
    assert visible_bodies(page).count("one too many") == 1
    assert page.js_errors == []


def test_history_renders_days_groups_markdown_tombstones_edit_history_and_presence(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """The history as people read it: day separators, sender grouping, the API's rendering of
    markdown and links, a live tombstone, the edit history on request; and presence dots."""
    import datetime

    from django.utils import timezone

    from messaging.services import message_edit

    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, participant_ids=[bob.pk], kind=ThreadKind.DIRECT)
    old, _ = off_loop(message_send, sender=bob, thread_id=thread.pk, body="from yesterday", client_msg_id="d1")
    Message.objects.filter(pk=old.pk).update(created_at=timezone.now() - datetime.timedelta(days=1))
    first, _ = off_loop(
        message_send,
        sender=alice,
        thread_id=thread.pk,
        body="See **docs** at https://example.com/a?b=1",
        client_msg_id="d2",
    )
    second, _ = off_loop(message_send, sender=alice, thread_id=thread.pk, body="and a second line", client_msg_id="d3")
    off_loop(message_edit, actor=alice, message_id=second.pk, body="and a 2nd line", expected_version=1)

    page_b = open_chat(browser, live_daphne, bob)
    page_b.click(f'.thread-item[data-thread-id="{thread.pk}"]')
    page_b.wait_for_selector("#messages .message .body")
    wait_connected(page_b)

    # One separator per day, before the first message of that day.
    separators = page_b.locator("#messages .day-separator")
    assert separators.count() == 2
    order = page_b.eval_on_selector_all(
        "#messages > li", "items => items.map((li) => li.classList.contains('day-separator') ? 'day' : li.dataset.id)"
    )
    assert order == ["day", str(old.pk), "day", str(first.pk), str(second.pk)]
    # Alice's two messages in a row: the second is grouped under the first (no repeated name).
    assert "grouped" not in str(page_b.get_attribute(f'.message[data-id="{first.pk}"]', "class"))
    assert "grouped" in str(page_b.get_attribute(f'.message[data-id="{second.pk}"]', "class"))
    # Markdown and links exactly as the API renders them.
    api_html = page_b.evaluate(
        f"async () => (await (await fetch('/api/v1/threads/{thread.pk}/messages')).json())"
        f".messages.find((m) => m.id === {first.pk}).html"
    )
    assert "<strong>docs</strong>" in api_html
    assert 'href="https://example.com/a?b=1"' in api_html
    assert page_b.inner_html(f'.message[data-id="{first.pk}"] .body') == api_html

    # The edit history on request.
    page_b.click(f'.message[data-id="{second.pk}"] .edited')
    page_b.wait_for_selector("#history-dialog[open]")
    history = page_b.inner_text("#edit-history")
    assert "and a second line" in history
    assert "and a 2nd line" in history
    page_b.click("#hi-close")

    # Presence: bob sees alice's dot go online when she opens the chat, offline when she leaves.
    dot = f'.thread-item[data-thread-id="{thread.pk}"] .presence-dot'
    assert "online" not in str(page_b.get_attribute(dot, "class"))
    page_a = open_chat(browser, live_daphne, alice)
    page_b.wait_for_selector(f"{dot}.online")
    page_a.click(f'.thread-item[data-thread-id="{thread.pk}"]')
    page_a.wait_for_selector(f'.message[data-id="{first.pk}"]')
    wait_connected(page_a)

    # Alice deletes her message: bob's copy becomes a tombstone, live.
    page_a.once("dialog", lambda dialog: dialog.accept())
    page_a.hover(f'.message[data-id="{first.pk}"]')
    page_a.click(f'.message[data-id="{first.pk}"] button[aria-label="Delete"]')
    page_b.wait_for_selector(f'.message.deleted[data-id="{first.pk}"]')
    assert page_b.inner_text(f'.message[data-id="{first.pk}"] .body') == "This message was deleted."
    assert "docs" not in page_b.inner_text("#messages")
    shot(page_b, "more-history")

    page_a.context.close()
    page_b.wait_for_selector(f"{dot}:not(.online)", timeout=TIMEOUT)
    assert not page_b.js_errors


def test_a_message_arriving_while_the_history_loads_is_kept(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """The page is subscribed to every thread before it opens one: a message can arrive live while
    the history page is on its way, and the (older) page must not wipe it out."""
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Race", participant_ids=[bob.pk])
    off_loop(message_send, sender=alice, thread_id=thread.pk, body="earlier", client_msg_id="race-0")
    page = open_chat(browser, live_daphne, bob)
    wait_connected(page)

    # Hold the history response: read it from the server now (before the new message), hand it
    # to the page only after the new message has arrived on the socket.
    history = HeldRequests(page, f"**/api/v1/threads/{thread.pk}/messages*")
    page.click(f'.thread-item[data-thread-id="{thread.pk}"]')
    history.wait("the history")
    off_loop(message_send, sender=alice, thread_id=thread.pk, body="arrived during the load", client_msg_id="race-1")
    page.wait_for_selector("#messages .message .body:has-text('arrived during the load')")
    history.release()
    page.wait_for_selector("#messages .message .body:has-text('earlier')")
    page.wait_for_timeout(300)
    assert visible_bodies(page) == ["earlier", "arrived during the load"]
    assert page.js_errors == []


def test_what_needs_the_members_waits_for_them(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """While a thread's members are loading, "@bo" offers nobody and the Members button is not
    there (it used to do nothing, or show the previous thread's members); once they have loaded,
    the completion offers them and the button opens them."""
    needs("postgres")
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    first, _ = off_loop(thread_create, creator=alice, title="First", participant_ids=[carol.pk])
    thread, _ = off_loop(thread_create, creator=alice, title="Quick", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice)
    open_thread(page, first.pk)
    page.wait_for_selector("#members-btn:not([hidden])")
    detail = HeldRequests(page, f"**/api/v1/threads/{thread.pk}")
    page.click(f'.thread-item[data-thread-id="{thread.pk}"]')
    detail.wait("the thread's members")
    # Bob comes online meanwhile: the presence update must not bring back the first thread's header.
    other = open_chat(browser, live_daphne, bob)
    wait_connected(other)
    page.wait_for_function(f"() => window.chatapp.state.presence.get({bob.pk}) === true")
    assert page.locator("#members-btn").is_hidden()
    assert page.inner_text("#thread-title") == "Quick"  # from the list, while its details load
    page.click("#input")
    page.keyboard.type("hi @bo")
    page.wait_for_timeout(300)
    assert page.locator("#mention-list").is_hidden()  # nobody to offer yet
    detail.release()
    page.wait_for_selector("#mention-list:not([hidden]) li:has-text('@bob')")
    page.keyboard.press("Enter")
    assert page.input_value("#input") == "hi @bob "
    page.click("#members-btn")
    page.wait_for_selector("#members-dialog[open] #members-list li:has-text('Bob')")
    assert page.locator("#members-list li").count() == 2  # alice and bob, not the first thread's carol
    assert page.js_errors == []
