"""The web chat's bell, user notices, sign-out hygiene, resends, keyboard access and memory, in real
Chromium against a live daphne on PostgreSQL and Redis.

The bell lists the recent notifications and opening one marks only that one read; notices for the
user from elsewhere (read notifications, an archived or muted thread, a new name) show at once; a
session that ends (4401) leaves nothing of the conversations in this browser; a send whose ack never
came is sent again while connected; the attach button is reachable from the keyboard; a thread that
is not open keeps only its newest messages. Each test fails against the page before these fixes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from accounts.models import User
from accounts.services import user_password_changed, user_update_profile
from messaging.models import Message, Notification
from messaging.services import message_send, notifications_mark_read
from tests.browser import FileChoosers, LiveServer
from tests.conftest import needs
from tests.test_web_chat import TIMEOUT, eventually, off_loop, open_chat, png_bytes, wait_connected, wait_until
from tests.test_web_chat_more import HeldRequests, open_thread
from threads.services import participant_settings_update, thread_create

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def badge(page: Any) -> str:
    return str(page.evaluate("(n => (n.hidden ? '' : n.textContent))(document.getElementById('notif-count'))"))


def wait_badge(page: Any, count: int) -> None:
    try:
        if count:
            page.wait_for_selector(f"#notif-count:not([hidden]):text-is('{count}')")
        else:
            page.wait_for_selector("#notif-count[hidden]", state="attached")
    except Exception as exc:
        raise AssertionError(f"the bell shows {badge(page)!r}, not {count}") from exc


def unread_notes(user: User) -> set[int]:
    return set(Notification.objects.filter(recipient=user, read_at__isnull=True).values_list("message_id", flat=True))


# Counts the notification.read notices the page has handled (``window.__readNotices``).
COUNT_READ_NOTICES = """
() => {
  const socket = window.chatapp.socket;
  const handle = socket.handlers['notification.read'];
  window.__readNotices = 0;
  socket.on('notification.read', (frame) => {
    handle(frame);
    window.__readNotices += 1;
  });
}
"""

# A read notice has been handled, and the unread count it makes the page read again has come back.
READ_NOTICE_APPLIED = "() => window.__readNotices > 0 && window.chatapp.state.notes.counted !== null"


def test_the_bell_lists_notifications_and_opening_one_marks_only_that_one(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    first, _ = off_loop(thread_create, creator=alice, title="First", participant_ids=[bob.pk])
    second, _ = off_loop(thread_create, creator=alice, title="Second", participant_ids=[bob.pk])
    look, _ = off_loop(message_send, sender=alice, thread_id=first.pk, body="@bob look here", client_msg_id="b1")
    also, _ = off_loop(message_send, sender=alice, thread_id=second.pk, body="@bob and here", client_msg_id="b2")
    page = open_chat(browser, live_daphne, bob)
    wait_connected(page)
    wait_badge(page, 2)

    page.click("#notif-btn")
    assert page.get_attribute("#notif-btn", "aria-expanded") == "true"
    page.wait_for_selector("#notif-list .notif-item.unread >> nth=1")
    assert [t.strip() for t in page.locator("#notif-list .notif-excerpt").all_inner_texts()] == [
        "@bob and here",
        "@bob look here",
    ]
    # The older one: its thread opens at that message, and only it is marked read.
    page.evaluate(COUNT_READ_NOTICES)
    page.locator("#notif-list .notif-item", has_text="look here").locator("button").click()
    page.wait_for_selector(f'.thread-item.active[data-thread-id="{first.pk}"]')
    page.wait_for_selector(f'#messages .message[data-id="{look.pk}"] .body:has-text("look here")')
    assert page.locator("#notif-panel").is_hidden()
    wait_badge(page, 1)
    eventually(page, lambda: unread_notes(bob) == {also.pk}, what="only the opened notification to be read")
    # The read notice comes back on the socket, and the count the page reads again then is the same.
    wait_until(page, READ_NOTICE_APPLIED, what="the read notice and the count after it")
    assert badge(page) == "1"

    # Opened again: the one still unread shows so; "Mark all read" reads the rest.
    page.click("#notif-btn")
    page.wait_for_selector("#notif-list .notif-item.unread:has-text('and here')")
    assert page.locator("#notif-list .notif-item.unread").count() == 1
    page.click("#notif-read-all")
    wait_badge(page, 0)
    eventually(page, lambda: unread_notes(bob) == set(), what="every notification to be read")
    page.wait_for_selector("#notif-list .notif-item >> nth=1")
    assert page.locator("#notif-list .notif-item.unread").count() == 0
    # Escape closes the list and gives the focus back to the bell.
    page.locator("#notif-list .notif-open").first.focus()
    page.keyboard.press("Escape")
    assert page.locator("#notif-panel").is_hidden()
    assert page.evaluate("document.activeElement.id") == "notif-btn"
    assert page.js_errors == []


def test_notices_from_elsewhere_update_the_bell_the_tabs_and_names(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """Another tab reads a notification, another device archives and mutes threads, the name changes:
    the page shows each as it happens (``notification.read``, ``thread.membership_updated``,
    ``user.updated``)."""
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    group, _ = off_loop(thread_create, creator=alice, title="Group", participant_ids=[bob.pk])
    other, _ = off_loop(thread_create, creator=alice, title="Other", participant_ids=[bob.pk])
    off_loop(message_send, sender=alice, thread_id=group.pk, body="@bob one", client_msg_id="r1")
    two, _ = off_loop(message_send, sender=alice, thread_id=group.pk, body="@bob two", client_msg_id="r2")
    off_loop(message_send, sender=bob, thread_id=group.pk, body="hi from bob", client_msg_id="r3")
    page = open_chat(browser, live_daphne, bob)
    open_thread(page, group.pk)
    wait_badge(page, 2)
    page.click("#notif-btn")
    page.wait_for_selector("#notif-list .notif-item.unread >> nth=1")

    # Another tab of mine opens one of them from its own bell.
    tab = page.context.new_page()
    tab.set_default_timeout(TIMEOUT)
    tab.goto(live_daphne.url + "/")
    wait_connected(tab)
    wait_badge(tab, 2)
    tab.click("#notif-btn")
    tab.locator("#notif-list .notif-item", has_text="@bob one").locator("button").click()
    wait_badge(page, 1)
    page.wait_for_selector("#notif-list .notif-item:not(.unread):has-text('@bob one')")
    assert page.locator("#notif-list .notif-item.unread").count() == 1
    tab.close()
    # Another device reads the other.
    read_elsewhere = list(Notification.objects.filter(message=two).values_list("pk", flat=True))
    off_loop(notifications_mark_read, user=bob, ids=read_elsewhere)
    wait_badge(page, 0)
    page.wait_for_selector("#notif-list .notif-item:not(.unread):has-text('@bob two')")
    page.keyboard.press("Escape")

    # Archived elsewhere: it leaves the Active tab, and is in the Archived one.
    other_item = f'#thread-list .thread-item[data-thread-id="{other.pk}"]'
    off_loop(participant_settings_update, user=bob, thread_id=other.pk, archived=True)
    page.wait_for_selector(other_item, state="detached")
    page.click("#tab-archived")
    page.wait_for_selector(other_item)
    # Brought back elsewhere: it leaves the Archived tab, and the Active one lists it again.
    off_loop(participant_settings_update, user=bob, thread_id=other.pk, archived=False)
    page.wait_for_selector(other_item, state="detached")
    page.click("#tab-active")
    page.wait_for_selector(other_item)
    # Muted elsewhere (the open thread): the list and the header say so.
    group_item = f'#thread-list .thread-item[data-thread-id="{group.pk}"]'
    off_loop(participant_settings_update, user=bob, thread_id=group.pk, muted=True)
    page.wait_for_selector(f"{group_item} .muted-icon[aria-label='Muted']")
    page.wait_for_selector("#mute-btn:text-is('Unmute')")
    off_loop(participant_settings_update, user=bob, thread_id=group.pk, muted=False)
    page.wait_for_selector(f"{group_item} .muted-icon", state="detached")
    page.wait_for_selector("#mute-btn:text-is('Mute')")

    # My name changes (in my profile, elsewhere): the top bar and my messages show the new one.
    assert page.locator("#messages .message.mine .sender").first.inner_text() == bob.name
    off_loop(user_update_profile, user=User.objects.get(pk=bob.pk), display_name="Robert Renamed")
    page.wait_for_selector("#me-name:text-is('Robert Renamed')")
    page.wait_for_selector("#messages .message.mine .sender:text-is('Robert Renamed')")
    page.click("#members-btn")
    page.wait_for_selector("#members-list .member-name:text-is('Robert Renamed (you)')")
    assert page.js_errors == []


# Drops the page's message.send frames while window.__dropSends is set (recorded in __dropped), and
# the first one regardless when window.__dropFirstSend is set; everything else goes out unchanged.
DROP_SENDS = """
(() => {
  const send = WebSocket.prototype.send;
  window.__dropped = [];
  window.__sent = [];
  WebSocket.prototype.send = function (data) {
    let frame = null;
    try { frame = typeof data === 'string' ? JSON.parse(data) : null; } catch (_) {}
    if (frame && frame.type === 'message.send'
        && (window.__dropSends || (window.__dropFirstSend && window.__dropped.length === 0))) {
      window.__dropped.push(frame.client_msg_id);
      return undefined;
    }
    if (frame && frame.type === 'message.send') window.__sent.push(frame.client_msg_id);
    return send.call(this, data);
  };
})();
"""


def outbox_text(page: Any, user: User) -> Any:
    return page.evaluate(f"() => localStorage.getItem('chatapp.outbox.{user.pk}')")


def test_a_session_ended_elsewhere_leaves_nothing_in_this_browser(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    """A 4401 close (here: the password changed) forgets the outbox, the offline copies and what is on
    screen, as a local sign-out does with Clear-Site-Data."""
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Secrets", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice, DROP_SENDS)
    open_thread(page, thread.pk)
    data_kept = "async () => await caches.has('chatapp-data-v1')"
    wait_until(page, data_kept, what="the offline copy of the conversations")

    # A message that has not gone yet waits in the outbox.
    page.evaluate("() => { window.__dropSends = true; }")
    page.fill("#input", "the unsent secret")
    page.press("#input", "Enter")
    wait_until(page, "() => window.__dropped.length > 0", what="the send to be dropped")
    wait_until(
        page,
        f"() => (localStorage.getItem('chatapp.outbox.{alice.pk}') || '').includes('the unsent secret')",
        what="the message in the outbox",
    )

    User.objects.filter(pk=alice.pk).update(password="md5$x$changed")
    off_loop(user_password_changed, user=alice)
    page.wait_for_selector("#conn-banner:not([hidden]):has-text('Sign in again')")
    wait_until(
        page,
        f"() => localStorage.getItem('chatapp.outbox.{alice.pk}') === null",
        what=f"the outbox to be forgotten (it holds {outbox_text(page, alice)!r})",
    )
    wait_until(page, f"async () => !(await ({data_kept})())", what="the offline copies to be deleted")
    assert page.evaluate("() => Object.keys(localStorage).filter((k) => k.startsWith('chatapp.'))") == []
    assert page.locator("#thread-list .thread-item").count() == 0
    assert page.locator("#messages .message").count() == 0
    assert page.locator("#thread-view").is_hidden()
    page.wait_for_timeout(500)  # nothing writes it back afterwards
    assert outbox_text(page, alice) is None
    assert not Message.objects.filter(thread=thread).exists()
    assert page.js_errors == []


# Notes whether a message of mine ever showed "Waiting for connection…".
WATCH_QUEUED = """
() => {
  window.__sawQueued = false;
  new MutationObserver(() => {
    if (document.querySelector('#messages .message.queued')) window.__sawQueued = true;
  }).observe(document.getElementById('messages'), { subtree: true, childList: true, attributes: true });
  window.__firstSocket = window.chatapp.socket.ws;
}
"""


def test_a_send_whose_ack_never_came_is_sent_again_while_connected(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    needs("redis")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Lossy", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice, DROP_SENDS, clock=True)
    open_thread(page, thread.pk)
    page.evaluate(WATCH_QUEUED)
    page.evaluate("() => { window.__dropFirstSend = true; }")

    page.fill("#input", "lost on the way")
    page.press("#input", "Enter")
    wait_until(page, "() => window.__dropped.length === 1", what="the first send to be dropped")
    pending = page.locator("#messages .message.pending", has_text="lost on the way")
    assert pending.locator(".status").inner_text() == "Sending…"
    # No ack within 15 s: sent again on the same socket, with the same client message id. The page's
    # clock is moved on (the ack's 15 s, then the resend's pause) instead of waiting them out.
    page.clock.fast_forward(15_000)
    deadline = time.monotonic() + TIMEOUT / 1000
    while not page.evaluate("() => window.__sent.length"):
        assert time.monotonic() < deadline, "the message was not sent again"
        page.clock.fast_forward(250)
        page.wait_for_timeout(50)
    page.wait_for_selector(
        "#messages .message:not(.pending):not(.queued):not(.failed) .body:has-text('lost on the way')"
    )
    cid = page.evaluate("() => window.__dropped[0]")
    assert Message.objects.filter(thread=thread, sender=alice, client_msg_id=cid).count() == 1
    assert Message.objects.filter(thread=thread).count() == 1
    assert page.evaluate("() => window.chatapp.socket.ws === window.__firstSocket") is True  # no reconnect
    assert page.evaluate("() => window.__sawQueued") is False
    assert json.loads(outbox_text(page, alice) or "[]") == []
    assert page.locator("#messages .message", has_text="lost on the way").count() == 1
    assert page.js_errors == []


# Buttons with no accessible name: no aria-label(ledby) and no letters or digits in their text.
UNNAMED_BUTTONS = """
() => [...document.querySelectorAll('button')]
  .filter((b) => !(b.getAttribute('aria-label') || '').trim() && !b.getAttribute('aria-labelledby'))
  .filter((b) => !/[\\p{L}\\p{N}]/u.test(b.textContent))
  .map((b) => b.outerHTML.slice(0, 120))
"""


def test_the_attach_button_works_from_the_keyboard_and_icon_buttons_have_names(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User], tmp_path: Path
) -> None:
    needs("postgres")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Keys", participant_ids=[bob.pk])
    off_loop(message_send, sender=alice, thread_id=thread.pk, body="mine to act on", client_msg_id="k1")
    page = open_chat(browser, live_daphne, alice)
    choosers = FileChoosers(page)
    open_thread(page, thread.pk)
    page.wait_for_selector("#messages .message .body:has-text('mine to act on')")
    page.wait_for_selector("#members-btn:not([hidden])")  # the thread has finished opening

    # From the message box, Shift+Tab reaches the attach button; Enter opens the file chooser.
    page.focus("#input")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "attach-btn"
    assert page.get_attribute("#attach-btn", "aria-label") == "Attach files"
    page.keyboard.press("Enter")
    chooser = choosers.next()
    assert chooser["mode"] == "selectMultiple"
    assert choosers.input_id(chooser) == "file-input"
    picked = tmp_path / "keyboard.png"
    picked.write_bytes(png_bytes())
    choosers.choose(chooser, [picked])
    page.wait_for_selector("#uploads .upload.done:has-text('keyboard.png')")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "input"

    assert page.evaluate(UNNAMED_BUTTONS) == []
    page.click("#notif-btn")
    page.wait_for_selector("#notif-empty:not([hidden])")
    assert page.evaluate(UNNAMED_BUTTONS) == []
    assert page.js_errors == []


def test_a_thread_that_loads_late_never_takes_the_keyboard_back(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    alice, bob = make_user("alice"), make_user("bob")
    thread, _ = off_loop(thread_create, creator=alice, title="Slow", participant_ids=[bob.pk])
    off_loop(message_send, sender=alice, thread_id=thread.pk, body="late page", client_msg_id="s1")
    page = open_chat(browser, live_daphne, alice)
    choosers = FileChoosers(page)
    wait_connected(page)

    # The thread's history is on its way while the person tabs from the message box to the attach
    # button: when it arrives, the keyboard stays there, and Enter opens the chooser.
    history = HeldRequests(page, f"**/api/v1/threads/{thread.pk}/messages*")
    page.click(f'.thread-item[data-thread-id="{thread.pk}"]')
    history.wait("the thread's history")
    page.focus("#input")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "attach-btn"
    history.release()
    page.wait_for_selector("#messages .message .body:has-text('late page')")
    page.wait_for_selector("#members-btn:not([hidden])")  # opened: the step that focuses has run
    assert page.evaluate("document.activeElement.id") == "attach-btn"
    page.keyboard.press("Enter")
    assert choosers.input_id(choosers.next()) == "file-input"

    # A re-read the page makes on its own (a resync from the server) leaves the keyboard alone.
    page.focus("#search-input")
    page.evaluate(
        "([id, seq]) => window.chatapp.socket.handlers['resync']({ type: 'resync', thread_id: id, seq })",
        [thread.pk, 1],
    )
    page.wait_for_selector("#members-btn:not([hidden])")
    page.wait_for_selector("#messages .message .body:has-text('late page')")
    assert page.evaluate("document.activeElement.id") == "search-input"
    assert page.js_errors == []


# Feeds the page's socket handler ``count`` message.created events of mine for a thread (as if they
# had arrived), seqs 1..count.
FEED = """
([threadId, count, me]) => {
  const handler = window.chatapp.socket.handlers['message.created'];
  for (let seq = 1; seq <= count; seq++) {
    const message = {
      id: 1000000 + threadId * 1000 + seq, thread_id: threadId, seq, body: 'm' + seq, html: '<p>m' + seq + '</p>',
      sender: { id: me, username: 'me', name: 'Me', avatar_url: '', active: true }, reply_to: null,
      client_msg_id: null, version: 1, created_at: new Date().toISOString(), edited_at: null, deleted: false,
      deleted_at: null, reactions: [], attachments: [], reply_count: null,
    };
    handler({ type: 'message.created', thread_id: threadId, seq, data: { message } });
  }
}
"""

KEPT = "(id) => [...(window.chatapp.state.messages.get(id) || new Map()).keys()].sort((a, b) => a - b)"


def test_threads_not_open_keep_only_their_newest_messages(
    browser: Any, live_daphne: LiveServer, make_user: Callable[..., User]
) -> None:
    needs("postgres")
    alice, bob = make_user("alice"), make_user("bob")
    shown, _ = off_loop(thread_create, creator=alice, title="Shown", participant_ids=[bob.pk])
    behind, _ = off_loop(thread_create, creator=alice, title="Behind", participant_ids=[bob.pk])
    page = open_chat(browser, live_daphne, alice)
    open_thread(page, shown.pk)

    page.evaluate(FEED, [behind.pk, 250, alice.pk])
    assert page.evaluate(KEPT, behind.pk) == list(range(51, 251))
    page.evaluate(FEED, [shown.pk, 250, alice.pk])
    assert len(page.evaluate(KEPT, shown.pk)) == 250  # the open thread keeps all it has
    page.wait_for_selector("#messages .message .body p:text-is('m250')")

    # Once another thread is open, the first one keeps its newest 200 too.
    page.click(f'.thread-item[data-thread-id="{behind.pk}"]')
    page.wait_for_selector("#thread-view:not([hidden])")
    wait_until(page, f"() => window.chatapp.state.current === {behind.pk}", what="the other thread to open")
    assert page.evaluate(KEPT, shown.pk) == list(range(51, 251))
    assert page.js_errors == []
