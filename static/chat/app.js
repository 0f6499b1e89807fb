/* chatapp web client: thread list, history, composer and the live socket.
 *
 * Everything the server sends is treated as data: text goes in with textContent, and the only
 * HTML inserted is a message's "html", which the server renders through its one sanitiser.
 * No inline scripts (the CSP forbids them): the page's config arrives as a JSON data block.
 */
(() => {
  "use strict";

  const config = JSON.parse(document.getElementById("chat-config").textContent);
  const me = config.user;
  const $ = (id) => document.getElementById(id);
  const GROUP_WINDOW_MS = 5 * 60 * 1000;
  const TYPING_THROTTLE_MS = 2000;
  const QUICK_EMOJI = ["👍", "❤️", "😂", "🎉", "😮", "😢", "👀", "✅"];
  const BACKGROUND_KEEP = 200; // messages kept per thread that is not open (the open one keeps what it loaded)
  const RESEND_MAX_MS = 30000; // a send left unanswered while connected is sent again, at most this far apart
  const UNAVAILABLE_DEFAULT_S = 5; // the wait after "unavailable" when the server names none
  const NOTE_PAGE = 20; // notifications the bell's list shows

  // ---------------------------------------------------------------- state
  const state = {
    threads: new Map(), // id -> thread summary from the list endpoint (+ live updates)
    archived: false,
    nextCursor: null,
    current: null, // open thread id
    detail: null, // open thread's detail (participants, my role)
    messages: new Map(), // thread id -> Map(seq -> message)
    oldestReached: new Map(),
    lastSeq: new Map(), // thread id -> highest event sequence applied (for resume)
    pending: new Map(), // client_msg_id -> {threadId, body, replyTo, attachmentIds, status}
    presence: new Map(), // user id -> bool
    typing: new Map(), // thread id -> Map(user id -> {name, until})
    replyTo: null,
    uploads: new Map(), // thread id -> [{file, id, progress, error, done}]: each thread's composer has its own
    loadingOlder: false,
    threadsLoaded: false, // false until the thread list has loaded once (it fails offline without a cached copy)
    openedOffline: null, // id of the thread opened without its detail (offline, nothing cached): loads on reconnect
    editing: null, // {id, version, draft} while a message is being edited
    // The bell's count: the server's unread count plus live notifications it had not counted. The
    // count is fetched at every (re)connect, on "ready" (notifications missed offline are not replayed);
    // a live one that arrives while that request is in flight may or may not be in it, so the
    // newest id the server counted decides (ids grow with time).
    notes: { counted: null, early: [] }, // counted: newest id in the server's count (null: fetching)
    noteItems: null, // the bell's list (newest first) once read from the server; null until then
    signedOut: false, // the session ended here: nothing more is kept in this browser
  };

  // ---------------------------------------------------------------- utilities
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  function cookie(name) {
    const match = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
    return match ? decodeURIComponent(match[1]) : "";
  }

  function newClientId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
  }

  function toast(text, kind = "info") {
    const node = el("div", { class: "toast " + kind, role: kind === "error" ? "alert" : "status", text });
    $("toasts").append(node);
    setTimeout(() => node.remove(), 5000);
  }

  function fmtTime(iso) {
    return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function fmtDay(iso) {
    const d = new Date(iso);
    const today = new Date();
    const yesterday = new Date(Date.now() - 86400000);
    if (d.toDateString() === today.toDateString()) return "Today";
    if (d.toDateString() === yesterday.toDateString()) return "Yesterday";
    return d.toLocaleDateString([], { weekday: "long", year: "numeric", month: "long", day: "numeric" });
  }

  function fmtSize(bytes) {
    if (bytes < 1024) return bytes + " B";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KB";
    return (bytes / 1024 / 1024).toFixed(1) + " MB";
  }

  class ApiError extends Error {
    constructor(status, body, retryAfter = null) {
      super((body && body.error && body.error.message) || "Request failed (" + status + ")");
      this.status = status;
      this.body = body;
      this.retryAfter = retryAfter; // the Retry-After header, in seconds, if any
    }
  }

  async function api(method, path, body) {
    const options = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    if (method !== "GET") options.headers["X-CSRFToken"] = cookie("csrftoken");
    const response = await fetch(config.api + path, options);
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) throw new ApiError(response.status, data, Number(response.headers.get("Retry-After")) || null);
    return data;
  }

  // ---------------------------------------------------------------- socket
  const DEFAULT_MAX_FRAME_BYTES = 100 * 1024; // until "ready" says (docs/realtime.md)
  const STABLE_MS = 10000; // connected this long after "ready": the backoff starts again from the bottom
  const TOO_MANY_WAIT_MS = 30000; // after 4429 (too many sockets of mine): another tab has to close first
  const HANDSHAKE_FAILURES_BEFORE_AUTH_CHECK = 3;

  function utf8Length(text) {
    return new TextEncoder().encode(text).length;
  }

  function socketError(message, code) {
    const error = new Error(message);
    error.code = code;
    return error;
  }

  class Socket {
    constructor() {
      this.ws = null;
      this.attempt = 0; // consecutive reconnects without a stable connection: the backoff's exponent
      this.handshakeFailures = 0; // consecutive sockets that closed without ever opening
      this.requests = new Map(); // request id -> {resolve, reject, size}
      this.nextId = 1;
      this.heartbeat = null;
      this.retryTimer = null;
      this.stableTimer = null;
      this.authTimer = null; // renews a Clerk socket's token in-band before it expires
      this.expiresAt = null; // when the token the socket holds expires (server's unix seconds)
      this.authEnded = null; // why the server is closing it ("auth.ended"), if it said
      this.connected = false;
      this.stopped = false; // signed out or deactivated: no more reconnecting
      this.maxFrameBytes = DEFAULT_MAX_FRAME_BYTES;
      this.inbox = Promise.resolve(); // incoming frames, handled one after the other in arrival order
      this.handlers = {};
    }

    on(type, handler) {
      this.handlers[type] = handler;
    }

    emit(type, ...args) {
      const handler = this.handlers[type];
      return handler ? handler(...args) : undefined;
    }

    connect() {
      // One socket at a time: the "online" event and a pending backoff retry may both ask.
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      if (this.stopped) return;
      if (this.ws && (this.ws.readyState === WebSocket.CONNECTING || this.ws.readyState === WebSocket.OPEN)) return;
      if (navigator.onLine === false) {
        // No network at all: wait for the browser's "online" event (bind() reconnects then).
        this.emit("offline");
        return;
      }
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(scheme + "//" + location.host + config.ws_path, ["chatapp.v1"]);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      this.authEnded = null;
      let opened = false;
      ws.addEventListener("open", () => {
        if (this.ws !== ws) return;
        opened = true;
        this.connected = true;
        this.handshakeFailures = 0;
        // The backoff is not reset here: a socket can be accepted and closed at once (4429), or fall
        // behind soon after (1013). It is reset once the connection has been ready and stable a while.
        this.maxFrameBytes = DEFAULT_MAX_FRAME_BYTES;
        this.send({ type: "hello", compress: "DecompressionStream" in window ? "deflate-raw" : "none" }, false);
        clearInterval(this.heartbeat);
        this.heartbeat = setInterval(() => this.send({ type: "ping" }, false).catch(() => {}), config.heartbeat_seconds * 1000);
        this.emit("open");
      });
      ws.addEventListener("message", (event) => {
        if (this.ws !== ws) return;
        // Read at once, not in the inbox's turn: the close that follows it must know why.
        if (typeof event.data === "string" && event.data.startsWith('{"type":"auth.ended"')) {
          try {
            this.authEnded = JSON.parse(event.data).data.reason;
          } catch (_) {
            this.authEnded = null;
          }
        }
        // Strictly in arrival order: a compressed frame takes a moment to inflate, and a smaller
        // event after it (a reaction to that very message) must not overtake it.
        this.inbox = this.inbox
          .then(() => this.receive(event.data))
          .catch((error) => setTimeout(() => { throw error; })); // reported, and the next frames still run
      });
      ws.addEventListener("close", (event) => {
        if (this.ws !== ws) return;
        this.connected = false;
        clearInterval(this.heartbeat);
        clearTimeout(this.stableTimer);
        this.stableTimer = null;
        clearTimeout(this.authTimer);
        this.authTimer = null;
        this.failRequests(event.code);
        // Only the token the socket held expired (it could not be renewed in time): the session may
        // well go on (Clerk keeps the cookie fresh), so reconnect; a refused handshake says otherwise.
        const expired = event.code === 4401 && this.authEnded === "token_expired";
        this.emit("close", event, expired);
        if ((event.code === 4401 || event.code === 4403) && !expired) {
          this.stop(); // signed out or deactivated: don't retry
          return;
        }
        if (!opened) this.handshakeFailures += 1;
        if (this.handshakeFailures >= HANDSHAKE_FAILURES_BEFORE_AUTH_CHECK && this.handlers.authcheck) {
          // The browser shows a refused handshake (e.g. an expired session: 4401 before accept) as
          // 1006, like a network failure: ask the API whether we are still signed in before retrying.
          Promise.resolve(this.emit("authcheck")).then(
            (signedOut) => (signedOut ? this.stop(4401) : this.scheduleRetry(event.code)),
            () => this.scheduleRetry(event.code),
          );
        } else {
          this.scheduleRetry(event.code);
        }
      });
    }

    scheduleRetry(code) {
      if (this.stopped || this.retryTimer) return;
      let delay;
      if (code === 1012 && this.attempt === 0) {
        delay = Math.random() * 250; // the server is restarting: another process takes us at once
      } else {
        delay = Math.min(30000, 500 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      }
      if (code === 4429) delay = Math.max(delay, TOO_MANY_WAIT_MS * (1 + Math.random() / 2));
      this.attempt += 1;
      this.emit("retry", delay, code);
      this.retryTimer = setTimeout(() => this.connect(), delay);
    }

    // Reconnect now (the banner's button), whatever the backoff was waiting for.
    reconnectNow() {
      if (this.stopped) return;
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.connect();
    }

    stop(code = null) {
      this.stopped = true;
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      if (code !== null) this.emit("signedout", code);
    }

    failRequests(code) {
      // A 1009 close answers the frame that was too large: the biggest one still waiting for its reply.
      let culprit = null;
      if (code === 1009) {
        for (const [id, request] of this.requests) if (!culprit || request.size > this.requests.get(culprit).size) culprit = id;
      }
      for (const [id, { reject }] of this.requests) {
        reject(id === culprit ? socketError("This message is too large to send.", "frame_too_large") : new Error("connection closed"));
      }
      this.requests.clear();
    }

    onReady(frame) {
      const data = frame.data || {};
      if (data.max_frame_bytes) this.maxFrameBytes = data.max_frame_bytes;
      this.expiresAt = data.expires_at || null;
      this.scheduleAuth(data.expires_in);
      clearTimeout(this.stableTimer);
      const ws = this.ws;
      this.stableTimer = setTimeout(() => {
        if (this.ws === ws && this.connected) this.attempt = 0;
      }, STABLE_MS);
    }

    // A socket opened with a Clerk token lasts as long as that token (about a minute): before it
    // expires, send a fresh one in an "auth" frame (docs/realtime.md). clerk.js provides the token.
    scheduleAuth(expiresIn) {
      clearTimeout(this.authTimer);
      this.authTimer = null;
      if (typeof expiresIn !== "number") return;
      // When a third of its life is left (at most 15 s): room for a slow answer from Clerk, and the
      // server allows its clock leeway on top.
      const delay = Math.max(1, expiresIn - Math.min(15, expiresIn / 3)) * 1000;
      const ws = this.ws;
      this.authTimer = setTimeout(() => this.renewAuth(ws, false), delay);
    }

    async renewAuth(ws, force) {
      const current = () => this.ws === ws && this.connected;
      if (!current()) return;
      let token = null;
      try {
        token = window.chatappFreshToken ? await window.chatappFreshToken(force) : null;
      } catch (_) {
        token = null;
      }
      if (!current()) return;
      const retry = (forceNext) => {
        this.authTimer = setTimeout(() => this.renewAuth(ws, forceNext), 2000);
      };
      if (!token) return retry(force); // Clerk not ready, or offline: if it never comes, the server closes at expiry
      try {
        const ack = await this.send({ type: "auth", token });
        const data = (ack && ack.data) || {};
        if (!force && this.expiresAt && data.expires_at <= this.expiresAt) return retry(true); // Clerk's cached token: ask for a new one
        this.expiresAt = data.expires_at;
        if (current()) this.scheduleAuth(data.expires_in);
      } catch (_) {
        if (current()) retry(true); // refused (e.g. that token expired meanwhile): a fresh one
      }
    }

    async receive(data) {
      let text = data;
      if (data instanceof ArrayBuffer) {
        const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
        text = await new Response(stream).text();
      }
      let frame;
      try {
        frame = JSON.parse(text);
      } catch (_) {
        return;
      }
      if ((frame.type === "ack" || frame.type === "error") && frame.id && this.requests.has(frame.id)) {
        const { resolve, reject } = this.requests.get(frame.id);
        this.requests.delete(frame.id);
        if (frame.type === "ack") resolve(frame);
        else reject(frame.error || frame);
        return;
      }
      if (frame.type === "ready") this.onReady(frame);
      const handler = this.handlers[frame.type] || this.handlers["*"];
      if (handler) handler(frame); // not awaited: a handler's own requests do not hold up the next frame
    }

    // Whether a frame fits in what the server takes (its size once encoded: JSON escaping can make
    // a frame far larger than the text it carries); a frame over it closes the socket with 1009.
    fits(frame) {
      return utf8Length(JSON.stringify({ ...frame, id: "r" + this.nextId })) <= this.maxFrameBytes;
    }

    send(frame, expectAck = true) {
      if (!this.connected) return Promise.reject(new Error("offline"));
      if (!expectAck) {
        const text = JSON.stringify(frame);
        if (utf8Length(text) > this.maxFrameBytes) return Promise.reject(socketError("The frame is too large.", "frame_too_large"));
        this.ws.send(text);
        return Promise.resolve(null);
      }
      const id = "r" + this.nextId++;
      frame.id = id;
      const text = JSON.stringify(frame);
      const size = utf8Length(text);
      if (size > this.maxFrameBytes) return Promise.reject(socketError("This message is too large to send.", "frame_too_large"));
      return new Promise((resolve, reject) => {
        this.requests.set(id, { resolve, reject, size });
        this.ws.send(text);
        setTimeout(() => {
          if (this.requests.has(id)) {
            this.requests.delete(id);
            reject(new Error("timeout"));
          }
        }, 15000);
      });
    }
  }

  const socket = new Socket();

  // ---------------------------------------------------------------- outbox (survives reloads and offline)
  const OUTBOX_KEY = "chatapp.outbox." + me.id;

  function outboxLoad() {
    try {
      return JSON.parse(localStorage.getItem(OUTBOX_KEY) || "[]");
    } catch (_) {
      return [];
    }
  }

  function outboxSave() {
    if (state.signedOut) return; // signed out: the outbox was forgotten, and stays so
    const items = [...state.pending.values()].filter((p) => p.status !== "sent");
    localStorage.setItem(OUTBOX_KEY, JSON.stringify(items));
  }

  async function flushOutbox() {
    for (const item of [...state.pending.values()]) {
      if (item.status === "queued" || item.status === "unavailable") await deliver(item);
    }
  }

  // Everything of this user's this browser keeps: the outbox (and any other "chatapp." key) in
  // localStorage, the service worker's copies of the page and of the conversations in Cache Storage.
  // Signing out here gets the same from the server's Clear-Site-Data; a session that ended elsewhere
  // (4401) or a Clerk sign-out does not, so the page removes them itself.
  async function forgetStoredData() {
    try {
      for (let i = localStorage.length - 1; i >= 0; i--) {
        const key = localStorage.key(i);
        if (key && key.startsWith("chatapp.")) localStorage.removeItem(key);
      }
    } catch (_) {
      // Storage may be unavailable (private mode).
    }
    try {
      if ("caches" in window) await Promise.all((await caches.keys()).filter((k) => k.startsWith("chatapp-")).map((k) => caches.delete(k)));
    } catch (_) {
      // Same.
    }
  }

  // ---------------------------------------------------------------- thread list
  function threadName(thread) {
    if (thread.kind === "DIRECT" && thread.other_user) return thread.other_user.name;
    return thread.title || "Untitled conversation";
  }

  function threadListPath(append = false) {
    const params = new URLSearchParams({ limit: "50" });
    if (state.archived) params.set("archived", "1");
    if (append && state.nextCursor) params.set("cursor", state.nextCursor);
    return "/threads?" + params;
  }

  async function loadThreads(append = false) {
    const page = await api("GET", threadListPath(append));
    if (state.signedOut) return;
    if (!append) state.threads.clear();
    for (const thread of page.threads) {
      state.threads.set(thread.id, thread);
      if (!state.lastSeq.has(thread.id)) state.lastSeq.set(thread.id, thread.last_sequence);
      if (thread.other_user && state.presence.get(thread.other_user.id) === undefined) {
        state.presence.set(thread.other_user.id, false);
      }
    }
    state.nextCursor = page.next_cursor;
    state.threadsLoaded = true;
    $("threads-more").hidden = !page.next_cursor;
    renderThreadList();
    if (socket.connected) subscribeAll();
  }

  // A message for a thread the list does not have (further down than the pages loaded, or not in
  // this tab: the Archived one lists none of the active threads the socket still follows). The list
  // is read again once for it, not once per message: a thread still missing after that is left out
  // until the list changes (a tab switch, a new thread).
  const unlisted = new Set();
  const listWanted = new Set();
  let listReload = null;

  function threadNotListed(threadId) {
    if (state.threads.has(threadId) || unlisted.has(threadId)) return;
    listWanted.add(threadId);
    if (listReload) return;
    listReload = setTimeout(async () => {
      const wanted = [...listWanted];
      listWanted.clear();
      try {
        await loadThreads();
        for (const id of wanted) if (!state.threads.has(id)) unlisted.add(id);
      } catch (_) {
        // Offline: the next message asks again.
      } finally {
        listReload = null;
      }
      const more = [...listWanted];
      listWanted.clear();
      for (const id of more) threadNotListed(id);
    }, 1000);
  }

  function renderThreadList() {
    const list = $("thread-list");
    list.replaceChildren();
    const threads = [...state.threads.values()]
      .filter((t) => t.archived === state.archived)
      .sort((a, b) => (b.last_activity_at || "").localeCompare(a.last_activity_at || "") || b.id - a.id);
    for (const thread of threads) {
      const last = thread.last_message;
      const preview = last ? (last.deleted ? "Message deleted" : (last.sender.id === me.id ? "You: " : last.sender.name + ": ") + (last.body || "📎 attachment")) : "No messages yet";
      const online = thread.other_user ? state.presence.get(thread.other_user.id) : null;
      const item = el(
        "li",
        {
          class: "thread-item" + (thread.id === state.current ? " active" : "") + (thread.unread_count ? " unread" : ""),
          role: "option",
          tabindex: "0",
          "aria-selected": thread.id === state.current ? "true" : "false",
          dataset: { threadId: String(thread.id) },
          onclick: () => openThread(thread.id),
          onkeydown: (e) => {
            if (e.key === "Enter" || e.key === " ") {
              e.preventDefault();
              openThread(thread.id);
            }
          },
        },
        el("span", { class: "presence-dot" + (online ? " online" : ""), hidden: online === null, title: online ? "Online" : "Offline", "aria-label": online ? "online" : "offline" }),
        el("span", { class: "thread-main" },
          el("span", { class: "thread-name", text: threadName(thread) }),
          el("span", { class: "thread-preview", text: preview.slice(0, 80) })),
        thread.muted ? el("span", { class: "muted-icon", role: "img", title: "Muted", "aria-label": "Muted" }, "🔕") : null,
        thread.unread_count ? el("span", { class: "badge unread-badge", text: String(thread.unread_count), "aria-label": thread.unread_count + " unread" }) : null,
      );
      list.append(item);
    }
  }

  // ---------------------------------------------------------------- history
  function threadMessages(threadId) {
    if (!state.messages.has(threadId)) state.messages.set(threadId, new Map());
    return state.messages.get(threadId);
  }

  // A thread that is not open keeps only its newest messages, so that a long session in busy threads
  // does not grow without bound; the rest is read again if it is opened and scrolled back.
  function trimThread(threadId) {
    if (threadId === state.current) return;
    const store = state.messages.get(threadId);
    if (!store || store.size <= BACKGROUND_KEEP) return;
    const seqs = [...store.keys()].sort((a, b) => a - b);
    for (const seq of seqs.slice(0, seqs.length - BACKGROUND_KEEP)) store.delete(seq);
    state.oldestReached.delete(threadId);
  }

  // ``focus``: the message box takes the keyboard once the thread has loaded. Re-reads the page does
  // on its own (a resync, the socket back after opening offline) pass false: they never move it.
  async function openThread(threadId, aroundSeq = null, { focus = true } = {}) {
    if (state.signedOut) return;
    const focusedBefore = document.activeElement;
    const previous = state.current;
    state.current = threadId;
    if (previous && previous !== threadId) trimThread(previous);
    if (location.hash !== "#thread-" + threadId) history.replaceState(null, "", "#thread-" + threadId);
    state.replyTo = null;
    $("reply-preview").hidden = true;
    renderUploads();
    // Until this thread's details have loaded, nothing may use the previous thread's (its members,
    // my role there, its header): the Members button comes back in renderHeader.
    if (state.detail && state.detail.id !== threadId) state.detail = null;
    $("members-btn").hidden = true;
    const summary = state.threads.get(threadId);
    $("thread-title").textContent = summary ? threadName(summary) : "Conversation";
    $("thread-sub").textContent = "";
    $("empty-state").hidden = true;
    $("thread-view").hidden = false;
    document.body.classList.remove("show-sidebar");
    renderThreadList();
    // Each half stands alone offline: the service worker may have kept one without the other.
    const [detailResult, pageResult] = await Promise.allSettled(threadPaths(threadId, aroundSeq).map((path) => api("GET", path)));
    if (state.current !== threadId) return;
    const refused = [detailResult, pageResult].find((r) => r.status === "rejected" && r.reason instanceof ApiError);
    if (refused) {
      const error = refused.reason;
      dropThread(threadId, error.status === 404 ? "That conversation does not exist or you are not in it." : error.message);
      return;
    }
    const page = pageResult.status === "fulfilled" ? pageResult.value : null;
    if (page) {
      const store = threadMessages(threadId);
      // The socket is subscribed to every thread: messages may have arrived while this page was on
      // its way. Those newer than the page (it was read before they were stored) are kept.
      const arrived = aroundSeq ? [] : [...store.values()].filter((m) => m.seq > page.last_sequence);
      store.clear();
      for (const message of page.messages) store.set(message.seq, message);
      for (const message of arrived) if (!store.has(message.seq)) store.set(message.seq, message);
      state.oldestReached.set(threadId, page.oldest_reached);
      if (!state.lastSeq.has(threadId) || state.lastSeq.get(threadId) < page.last_sequence) {
        state.lastSeq.set(threadId, page.last_sequence);
      }
    }
    if (detailResult.status === "rejected" || !page) {
      // No network and no offline copy of all of it: keep the thread open to read what there is and
      // to write in (the outbox sends later); it loads in full when the socket is back.
      state.detail = null;
      state.openedOffline = threadId;
      $("thread-sub").textContent = "Offline";
      renderMessages({ stick: true });
      return;
    }
    const detail = detailResult.value;
    state.openedOffline = null;
    state.detail = detail;
    for (const p of detail.participants) state.presence.set(p.user.id, state.presence.get(p.user.id) || false);
    renderHeader();
    if (mentionQuery !== null) checkMention(); // typed "@…" before the members had loaded
    renderMessages({ stick: !aroundSeq });
    if (aroundSeq) {
      const target = document.querySelector('[data-seq="' + aroundSeq + '"]');
      if (target) {
        target.scrollIntoView({ block: "center" });
        target.classList.add("highlight");
      }
    }
    subscribe(threadId);
    markRead(threadId);
    // Only if the person has not put the keyboard elsewhere while the thread loaded (tabbed to the
    // attach button, clicked the search box): a late step never takes it from under them.
    const moved = document.activeElement !== focusedBefore && document.activeElement !== document.body;
    if (focus && !moved) $("input").focus();
    fillHistory();
  }

  // A first page shorter than the pane has no scrollbar, so no scroll event would ever ask for older ones.
  function fillHistory() {
    const history = $("history");
    if (state.current && !state.oldestReached.get(state.current) && history.scrollHeight <= history.clientHeight) loadOlder();
  }

  function threadPaths(threadId, aroundSeq = null) {
    return ["/threads/" + threadId, "/threads/" + threadId + "/messages?limit=50" + (aroundSeq ? "&around=" + aroundSeq : "")];
  }

  // The open thread's details, once loaded (null while they load, offline, or with no thread open).
  function currentDetail() {
    return state.detail && state.detail.id === state.current ? state.detail : null;
  }

  function renderHeader() {
    const detail = currentDetail();
    if (!detail) return;
    const summary = state.threads.get(detail.id);
    const other = detail.kind === "DIRECT" ? detail.participants.find((p) => p.user.id !== me.id) : null;
    $("thread-title").textContent = other ? other.user.name : detail.title || "Untitled conversation";
    const online = detail.participants.filter((p) => state.presence.get(p.user.id)).length;
    $("thread-sub").textContent = detail.participants.length + " members · " + online + " online";
    $("archive-btn").textContent = (summary ? summary.archived : detail.archived) ? "Unarchive" : "Archive";
    $("mute-btn").textContent = (summary && typeof summary.muted === "boolean" ? summary.muted : detail.muted) ? "Unmute" : "Mute";
    $("members-btn").hidden = false;
  }

  async function loadOlder() {
    const threadId = state.current;
    if (!threadId || state.loadingOlder || state.oldestReached.get(threadId)) return;
    const store = threadMessages(threadId);
    const oldest = Math.min(...store.keys());
    if (!Number.isFinite(oldest)) return;
    state.loadingOlder = true;
    const history = $("history");
    const before = history.scrollHeight - history.scrollTop;
    try {
      const page = await api("GET", "/threads/" + threadId + "/messages?limit=50&before=" + oldest);
      if (state.current !== threadId) return;
      for (const message of page.messages) store.set(message.seq, message);
      state.oldestReached.set(threadId, page.oldest_reached || page.messages.length === 0);
      renderMessages({ stick: false });
      history.scrollTop = history.scrollHeight - before;
    } finally {
      state.loadingOlder = false;
    }
    fillHistory();
  }

  function seenBy(message) {
    if (!state.detail) return { delivered: [], read: [] };
    const others = state.detail.participants.filter((p) => p.user.id !== me.id);
    return {
      read: others.filter((p) => p.last_read_sequence >= message.seq),
      delivered: others.filter((p) => Math.max(p.last_delivered_sequence, p.last_read_sequence) >= message.seq),
      total: others.length,
    };
  }

  function renderMessage(message, grouped) {
    const mine = message.sender.id === me.id;
    const li = el("li", {
      class: "message" + (mine ? " mine" : "") + (grouped ? " grouped" : "") + (message.deleted ? " deleted" : "") + (message.pending ? " " + message.pending : ""),
      dataset: { seq: message.seq ? String(message.seq) : "", id: message.id ? String(message.id) : "", cid: message.client_msg_id },
      tabindex: "-1",
    });
    if (!grouped) {
      li.append(
        el("div", { class: "meta" },
          el("span", { class: "sender", text: message.sender.name }),
          el("time", { datetime: message.created_at, text: fmtTime(message.created_at) })),
      );
    }
    if (message.reply_to) {
      const quote = el("button", {
        type: "button",
        class: "quote",
        text: message.reply_to.deleted ? "Reply to a deleted message" : "↪ " + message.reply_to.excerpt,
        onclick: () => jumpTo(message.reply_to.seq),
      });
      li.append(quote);
    }
    const body = el("div", { class: "body" });
    if (message.deleted) body.textContent = "This message was deleted.";
    else if (message.pending) body.append(el("p", { text: message.body }));
    else body.innerHTML = message.html; // sanitised by the server's one renderer
    li.append(body);
    if (!message.deleted && message.attachments && message.attachments.length) {
      const files = el("div", { class: "attachments" });
      for (const a of message.attachments) {
        if (a.kind === "IMAGE" && a.thumbnail_url) {
          files.append(el("figure", { class: "image-attachment" },
            el("a", { href: a.url, target: "_blank", rel: "noopener", class: "image-link", title: "Open " + a.name },
              el("img", { src: a.thumbnail_url, alt: a.name, loading: "lazy", width: a.width ? Math.min(a.width, 320) : null })),
            el("figcaption", {},
              el("a", { href: a.url, class: "download-link", download: a.name, text: "⬇ " + a.name + " (" + fmtSize(a.size) + ")" }))));
        } else {
          files.append(el("a", { href: a.url, class: "file-link", download: a.name, text: "📄 " + a.name + " (" + fmtSize(a.size) + ")" }));
        }
      }
      li.append(files);
    }
    const footer = el("div", { class: "footer" });
    if (message.edited_at && !message.deleted) {
      footer.append(el("button", { type: "button", class: "edited link-btn", text: "(edited)", title: "Show edit history", onclick: () => showEditHistory(message) }));
    }
    if (!message.deleted && message.reactions) {
      for (const reaction of message.reactions) {
        const mineReacted = reaction.user_ids.includes(me.id);
        footer.append(el("button", {
          type: "button",
          class: "reaction" + (mineReacted ? " mine" : ""),
          "aria-pressed": mineReacted ? "true" : "false",
          "aria-label": reaction.emoji + " " + reaction.count,
          onclick: () => toggleReaction(message, reaction.emoji, mineReacted),
        }, reaction.emoji + " " + reaction.count));
      }
    }
    if (message.reply_count) {
      footer.append(el("button", { type: "button", class: "link-btn replies-link", text: message.reply_count + (message.reply_count === 1 ? " reply" : " replies"), onclick: () => showReplies(message) }));
    }
    if (mine && !message.deleted) {
      if (message.pending === "pending") footer.append(el("span", { class: "status", text: "Sending…" }));
      else if (message.pending === "queued") footer.append(el("span", { class: "status", text: "Waiting for connection…" }));
      else if (message.pending === "unavailable") footer.append(el("span", { class: "status offline", text: "Offline, will retry" }));
      else if (message.pending === "failed") {
        footer.append(el("span", { class: "status error", text: "Not sent." }),
          el("button", { type: "button", class: "link-btn retry", text: "Retry", onclick: () => retry(message.client_msg_id) }));
      } else {
        const seen = seenBy(message);
        const label = seen.total && seen.read.length === seen.total ? "Seen" : seen.delivered.length ? "Delivered" : "Sent";
        footer.append(el("span", {
          class: "status receipt " + label.toLowerCase(),
          title: seen.read.length ? "Seen by " + seen.read.map((p) => p.user.name).join(", ") : label,
          text: label === "Sent" ? "✓" : "✓✓",
          "aria-label": label + (seen.read.length ? " by " + seen.read.map((p) => p.user.name).join(", ") : ""),
        }));
      }
    }
    li.append(footer);
    if (!message.deleted && !message.pending) li.append(messageActions(message, mine));
    return li;
  }

  function messageActions(message, mine) {
    const actions = el("div", { class: "actions", role: "toolbar", "aria-label": "Message actions" });
    actions.append(
      el("button", { type: "button", class: "icon-btn", title: "React", "aria-label": "React", onclick: (e) => openEmojiPicker(e.currentTarget, message) }, "☺"),
      el("button", { type: "button", class: "icon-btn", title: "Reply", "aria-label": "Reply", onclick: () => startReply(message) }, "↩"),
    );
    if (mine) actions.append(el("button", { type: "button", class: "icon-btn", title: "Edit", "aria-label": "Edit", onclick: () => startEdit(message) }, "✎"));
    const canModerate = state.detail && (state.detail.my_role === "ADMIN" || state.detail.my_role === "OWNER");
    if (mine || canModerate) {
      actions.append(el("button", { type: "button", class: "icon-btn", title: "Delete", "aria-label": "Delete", onclick: () => deleteMessage(message) }, "🗑"));
    }
    return actions;
  }

  function renderMessages({ stick }) {
    const threadId = state.current;
    const history = $("history");
    const atBottom = history.scrollHeight - history.scrollTop - history.clientHeight < 80;
    const list = $("messages");
    list.replaceChildren();
    const stored = [...threadMessages(threadId).values()].sort((a, b) => a.seq - b.seq);
    const pending = [...state.pending.values()]
      .filter((p) => p.threadId === threadId && p.status !== "sent")
      .map((p) => ({
        client_msg_id: p.clientMsgId,
        body: p.body,
        sender: { id: me.id, name: me.name },
        created_at: p.createdAt,
        pending: ["failed", "queued", "unavailable"].includes(p.status) ? p.status : "pending",
        reactions: [],
        attachments: [],
        reply_to: null,
      }));
    $("history-top").textContent = state.oldestReached.get(threadId) ? "This is the start of the conversation." : "";
    let previous = null;
    for (const message of [...stored, ...pending]) {
      const day = fmtDay(message.created_at);
      if (!previous || fmtDay(previous.created_at) !== day) {
        list.append(el("li", { class: "day-separator", role: "separator", text: day }));
        previous = null;
      }
      const grouped = previous && previous.sender.id === message.sender.id && !message.reply_to &&
        new Date(message.created_at) - new Date(previous.created_at) < GROUP_WINDOW_MS;
      list.append(renderMessage(message, grouped));
      previous = message;
    }
    if (state.editing) {
      const editing = [...threadMessages(threadId).values()].find((m) => m.id === state.editing.id);
      if (editing && !editing.deleted) startEdit(editing, state.editing.draft, state.editing.version);
      else state.editing = null;
    }
    if (stick || atBottom) history.scrollTop = history.scrollHeight;
  }

  function jumpTo(seq) {
    const node = document.querySelector('[data-seq="' + seq + '"]');
    if (node) {
      node.scrollIntoView({ block: "center" });
      node.classList.add("highlight");
      setTimeout(() => node.classList.remove("highlight"), 2000);
    } else {
      openThread(state.current, seq);
    }
  }

  // ---------------------------------------------------------------- sending
  function startReply(message) {
    state.replyTo = message;
    $("reply-text").textContent = "Replying to " + message.sender.name + ": " + (message.body || "").slice(0, 80);
    $("reply-preview").hidden = false;
    $("input").focus();
  }

  async function send() {
    const input = $("input");
    const body = input.value;
    const uploads = threadUploads(state.current);
    const ready = uploads.filter((u) => u.done && u.id);
    if (!state.current || (!body.trim() && !ready.length)) return;
    if (uploads.some((u) => !u.done && !u.error)) {
      toast("Wait for the uploads to finish.");
      return;
    }
    if (new Blob([body]).size > config.max_message_bytes) {
      toast("A message is limited to " + Math.round(config.max_message_bytes / 1024) + " KB.", "error");
      return;
    }
    const item = {
      clientMsgId: newClientId(),
      threadId: state.current,
      body,
      replyTo: state.replyTo ? state.replyTo.id : null,
      attachmentIds: ready.map((u) => u.id),
      createdAt: new Date().toISOString(),
      status: "pending",
    };
    state.pending.set(item.clientMsgId, item);
    outboxSave();
    input.value = "";
    autoGrow();
    state.uploads.delete(item.threadId);
    renderUploads();
    state.replyTo = null;
    $("reply-preview").hidden = true;
    stopTyping();
    renderMessages({ stick: true });
    await deliver(item);
  }

  function sendFrame(item) {
    return {
      type: "message.send",
      thread_id: item.threadId,
      body: item.body,
      client_msg_id: item.clientMsgId,
      reply_to: item.replyTo,
      attachment_ids: item.attachmentIds,
    };
  }

  const sending = new Set(); // client_msg_ids on their way now (one attempt at a time per message)
  const resends = new Map(); // client_msg_id -> {timer, attempt}: unanswered sends waiting to go again

  function cancelResends() {
    for (const { timer } of resends.values()) clearTimeout(timer);
    resends.clear();
  }

  // Connected, but no answer in time (the frame or its ack was lost on the way): it is sent again,
  // under the same client message id (the server stores it once), after a growing pause.
  function scheduleResend(item) {
    const previous = resends.get(item.clientMsgId);
    if (previous) clearTimeout(previous.timer);
    const attempt = previous ? previous.attempt + 1 : 0;
    const delay = Math.min(RESEND_MAX_MS, 1000 * 2 ** attempt) * (0.5 + Math.random() / 2);
    const timer = setTimeout(() => {
      const entry = resends.get(item.clientMsgId);
      if (entry && entry.timer === timer) entry.timer = null;
      const current = state.pending.get(item.clientMsgId);
      if (current && current.status === "pending") deliver(current);
    }, delay);
    resends.set(item.clientMsgId, { timer, attempt });
  }

  // How long the server asked us to wait, in seconds, if ``error`` says it cannot take the message
  // for now (docs/realtime.md, "When the server is unavailable"): an "unavailable" error frame or
  // REST body (its database is down), or a 502/503/504 from a proxy in front of it. Else null.
  function unavailableFor(error) {
    if (!error) return null;
    const detail = error instanceof ApiError ? error.body && error.body.error : error;
    const unavailable = (detail && detail.code === "unavailable") || (error instanceof ApiError && [502, 503, 504].includes(error.status));
    if (!unavailable) return null;
    return Number(detail && detail.retry_after) || (error instanceof ApiError && error.retryAfter) || UNAVAILABLE_DEFAULT_S;
  }

  // The server cannot store messages for now: every unsent message waits, shown "Offline, will retry",
  // and they all go again in the order they were written once the server's retry_after has passed
  // (with a little jitter, so that every tab does not come back in the same instant). The same
  // client_msg_id each time: the server stores a message once.
  let unavailableTimer = null;

  function holdOutbox(seconds) {
    clearTimeout(unavailableTimer);
    unavailableTimer = setTimeout(() => {
      unavailableTimer = null;
      flushOutbox();
    }, seconds * 1000 * (1 + Math.random() / 4));
  }

  async function deliver(item) {
    if (state.signedOut || sending.has(item.clientMsgId)) return;
    const waiting = resends.get(item.clientMsgId);
    if (waiting) clearTimeout(waiting.timer);
    if (!socket.connected) {
      item.status = "queued";
      outboxSave();
      if (item.threadId === state.current) renderMessages({ stick: false });
      return;
    }
    if (unavailableTimer) {
      // Behind the ones already waiting for the server: not sent before them.
      item.status = "unavailable";
      outboxSave();
      if (item.threadId === state.current) renderMessages({ stick: false });
      return;
    }
    item.status = "pending";
    sending.add(item.clientMsgId);
    const frame = sendFrame(item);
    try {
      let stored = null;
      if (item.viaRest || !socket.fits(frame)) {
        // Too large for a socket frame once JSON-escaped (quotes, backslashes, control characters):
        // the API takes it, under the same client message id (a retry returns the original).
        stored = await api("POST", "/threads/" + item.threadId + "/messages", {
          body: item.body,
          client_msg_id: item.clientMsgId,
          reply_to: item.replyTo,
          attachment_ids: item.attachmentIds,
        });
      } else {
        const ack = await socket.send(frame);
        item.seq = ack && (ack.seq || (ack.data && ack.data.seq));
      }
      item.status = "sent";
      state.pending.delete(item.clientMsgId);
      resends.delete(item.clientMsgId);
      if (stored && stored.id) applyMessage(stored);
    } catch (error) {
      const message = error && error.message;
      const retryAfter = unavailableFor(error);
      if (retryAfter !== null) {
        item.status = "unavailable";
        holdOutbox(retryAfter);
      } else if (error && error.code === "frame_too_large") {
        // The server closed the socket on it (1009): never sent that way again. Retry goes through the API.
        item.status = "failed";
        item.viaRest = true;
        toast("This message is too large to send over the live connection. Use Retry to send it another way.", "error");
      } else if (message === "timeout" && socket.connected && !state.signedOut) {
        // Still connected: still on its way (not waiting for a connection), and sent again shortly.
        item.status = "pending";
        if (state.pending.get(item.clientMsgId) === item) scheduleResend(item);
      } else if (message === "offline" || message === "connection closed" || message === "timeout" || (error instanceof TypeError)) {
        item.status = "queued"; // sent again on reconnect; the client_msg_id makes it once
      } else {
        item.status = "failed";
        toast(message || "The message could not be sent.", "error");
      }
    } finally {
      sending.delete(item.clientMsgId);
    }
    if (!state.pending.has(item.clientMsgId)) resends.delete(item.clientMsgId);
    outboxSave();
    if (item.threadId === state.current) renderMessages({ stick: false });
  }

  function retry(clientMsgId) {
    const item = state.pending.get(clientMsgId);
    if (item) deliver(item);
  }

  // ---------------------------------------------------------------- editing, deleting, reactions
  function startEdit(message, draft = null, version = null) {
    const node = document.querySelector('[data-id="' + message.id + '"]');
    if (!node) return;
    // Kept across live re-renders, with the version the edit started from (a stale one merges or conflicts).
    state.editing = { id: message.id, version: version || message.version, draft: draft === null ? message.body : draft };
    const body = node.querySelector(".body");
    const area = el("textarea", { class: "edit-box", rows: "3", "aria-label": "Edit message" });
    area.value = state.editing.draft;
    const save = el("button", { type: "button", class: "primary", text: "Save" });
    const cancel = el("button", { type: "button", text: "Cancel" });
    const form = el("div", { class: "edit-form" }, area, el("div", { class: "edit-actions" }, cancel, save));
    body.replaceWith(form);
    area.focus();
    const stop = () => {
      state.editing = null;
      renderMessages({ stick: false });
    };
    area.addEventListener("input", () => {
      if (state.editing) state.editing.draft = area.value;
    });
    cancel.addEventListener("click", stop);
    const submit = () => {
      const startedAt = state.editing ? state.editing.version : message.version;
      state.editing = null;
      saveEdit(message, area.value, startedAt);
    };
    save.addEventListener("click", submit);
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        submit();
      } else if (e.key === "Escape") stop();
    });
  }

  async function saveEdit(message, text, version) {
    try {
      const result = await api("PATCH", "/messages/" + message.id, { body: text, version });
      applyMessage(result.message);
      if (result.merged) toast("Your edit was merged with a newer one.");
    } catch (error) {
      if (error.status === 409 && error.body.error.current) {
        showConflict(error.body.error.current, text);
      } else {
        toast(error.message, "error");
        renderMessages({ stick: false });
      }
    }
  }

  function showConflict(current, mine) {
    const dialog = $("conflict-dialog");
    $("cf-current").value = current.body;
    $("cf-mine").value = mine;
    $("cf-keep").onclick = () => {
      dialog.close();
      applyMessage(current);
    };
    $("cf-save").onclick = async () => {
      dialog.close();
      await saveEdit(current, $("cf-mine").value, current.version);
    };
    dialog.showModal();
  }

  async function showEditHistory(message) {
    const data = await api("GET", "/messages/" + message.id + "/edits");
    const list = $("edit-history");
    list.replaceChildren();
    for (const v of data.versions) {
      list.append(el("li", {}, el("strong", { text: "Version " + v.version }), " ", el("time", { text: new Date(v.replaced_at).toLocaleString() }), el("pre", { text: v.body })));
    }
    list.append(el("li", {}, el("strong", { text: "Current (version " + data.current.version + ")" }), el("pre", { text: data.current.body })));
    $("history-dialog").showModal();
  }

  async function showReplies(message) {
    const data = await api("GET", "/messages/" + message.id + "/replies");
    const list = $("replies-list");
    list.replaceChildren(renderMessage(data.parent, false), ...data.replies.map((r) => renderMessage(r, false)));
    for (const node of list.querySelectorAll(".actions")) node.remove();
    $("replies-dialog").showModal();
  }

  async function deleteMessage(message) {
    if (!confirm("Delete this message for everyone?")) return;
    try {
      const result = await socket.send({ type: "message.delete", message_id: message.id }).catch(() => api("DELETE", "/messages/" + message.id));
      if (result && result.id && result.deleted) applyMessage(result);
    } catch (error) {
      toast(error.message || "Could not delete.", "error");
    }
  }

  async function toggleReaction(message, emoji, mine) {
    const frame = { type: mine ? "reaction.remove" : "reaction.add", message_id: message.id, emoji };
    try {
      await socket.send(frame);
    } catch (_) {
      try {
        const updated = mine
          ? await api("DELETE", "/messages/" + message.id + "/reactions/" + encodeURIComponent(emoji))
          : await api("POST", "/messages/" + message.id + "/reactions", { emoji });
        applyMessage(updated);
      } catch (error) {
        toast(error.message, "error");
      }
    }
  }

  function openEmojiPicker(anchor, message) {
    const picker = $("emoji-picker");
    picker.replaceChildren(...QUICK_EMOJI.map((emoji) => el("button", {
      type: "button", role: "menuitem", class: "emoji", text: emoji, "aria-label": "React with " + emoji,
      onclick: () => {
        picker.hidden = true;
        const mineReacted = (message.reactions || []).some((r) => r.emoji === emoji && r.user_ids.includes(me.id));
        toggleReaction(message, emoji, mineReacted);
      },
    })));
    const rect = anchor.getBoundingClientRect();
    picker.style.top = Math.max(8, rect.top - 48) + "px";
    picker.style.left = Math.max(8, Math.min(window.innerWidth - 320, rect.left - 100)) + "px";
    picker.hidden = false;
    picker.querySelector("button").focus();
  }

  // ---------------------------------------------------------------- live events
  function applyMessage(message) {
    const store = threadMessages(message.thread_id);
    const old = store.get(message.seq);
    // An update older than the copy held (a REST answer overtaken by a live event) changes nothing.
    if (old && typeof old.version === "number" && typeof message.version === "number" && message.version < old.version) return;
    store.set(message.seq, message);
    if (message.client_msg_id && message.sender.id === me.id) {
      const pending = state.pending.get(message.client_msg_id);
      if (pending) {
        state.pending.delete(message.client_msg_id);
        const waiting = resends.get(message.client_msg_id);
        if (waiting) clearTimeout(waiting.timer);
        resends.delete(message.client_msg_id);
        outboxSave();
      }
    }
    const thread = state.threads.get(message.thread_id);
    if (thread && (!thread.last_message || thread.last_message.seq <= message.seq)) {
      thread.last_message = message;
      if (!old) thread.last_activity_at = message.created_at;
    }
    if (message.thread_id === state.current) renderMessages({ stick: false });
    else if (!old) trimThread(message.thread_id);
    renderThreadList();
  }

  function onThreadEvent(frame) {
    const threadId = frame.thread_id || (frame.data && frame.data.thread_id);
    if (frame.seq) {
      const last = state.lastSeq.get(threadId) || 0;
      if (frame.seq <= last && frame.type === "message.created" && threadMessages(threadId).has(frame.seq)) return;
      state.lastSeq.set(threadId, Math.max(last, frame.seq));
    }
    const data = frame.data || {};
    switch (frame.type) {
      case "message.created": {
        const message = data.message;
        const isNew = !threadMessages(threadId).has(message.seq);
        applyMessage(message);
        const thread = state.threads.get(threadId);
        if (isNew && message.sender.id !== me.id) {
          clearTyping(threadId, message.sender.id);
          if (threadId === state.current && !document.hidden) markRead(threadId);
          else {
            if (thread) thread.unread_count = (thread.unread_count || 0) + 1;
            queueReceipt(threadId, "delivered", message.seq);
          }
          renderThreadList();
        }
        if (!thread) threadNotListed(threadId);
        break;
      }
      case "message.updated":
        applyMessage(data.message);
        break;
      case "message.deleted": {
        applyMessage(data.message);
        // Replies loaded before the delete quote its text: they quote a deleted message now.
        let changed = false;
        for (const reply of threadMessages(threadId).values()) {
          if (reply.reply_to && reply.reply_to.id === data.message.id && !reply.reply_to.deleted) {
            reply.reply_to = { ...reply.reply_to, excerpt: "", deleted: true };
            changed = true;
          }
        }
        if (changed && threadId === state.current) renderMessages({ stick: false });
        break;
      }
      case "reaction.added":
      case "reaction.removed": {
        for (const store of [threadMessages(threadId)]) {
          for (const message of store.values()) {
            if (message.id === data.message_id) message.reactions = data.reactions;
          }
        }
        if (threadId === state.current) renderMessages({ stick: false });
        break;
      }
      case "thread.updated": {
        const thread = state.threads.get(threadId);
        if (thread) thread.title = data.thread.title;
        if (state.detail && state.detail.id === threadId) state.detail.title = data.thread.title;
        renderThreadList();
        if (threadId === state.current) renderHeader();
        break;
      }
      case "thread.participant_added":
      case "thread.participant_removed":
      case "thread.role_changed":
        if (threadId === state.current) refreshDetail();
        break;
      case "thread.deleted":
        dropThread(threadId, "This conversation was deleted.");
        break;
      default:
        break;
    }
  }

  function dropThread(threadId, why) {
    state.threads.delete(threadId);
    state.messages.delete(threadId);
    state.uploads.delete(threadId);
    if (state.current === threadId) {
      state.current = null;
      state.detail = null;
      if ($("members-dialog").open) $("members-dialog").close();
      if (location.hash) history.replaceState(null, "", location.pathname + location.search);
      $("thread-view").hidden = true;
      $("empty-state").hidden = false;
      toast(why);
    }
    renderThreadList();
  }

  let detailRequests = 0;

  async function refreshDetail() {
    const threadId = state.current;
    if (!threadId) return;
    const request = ++detailRequests;
    try {
      const detail = await api("GET", "/threads/" + threadId);
      // Another thread opened meanwhile, or a newer refresh was asked for: this answer is stale.
      if (state.current !== threadId || request !== detailRequests) return;
      state.detail = detail;
      renderHeader();
      renderMessages({ stick: false });
      // Someone changed my role or the members while the dialog is open: show what I may do now.
      if ($("members-dialog").open) renderMembers();
    } catch (error) {
      if (error.status === 404) dropThread(threadId, "You are no longer in this conversation.");
    }
  }

  function onReceipt(frame) {
    const data = frame.data || frame;
    if (!state.detail || state.detail.id !== frame.thread_id) return;
    const p = state.detail.participants.find((x) => x.user.id === data.user_id);
    if (!p) return;
    p.last_read_sequence = Math.max(p.last_read_sequence, data.read || 0);
    p.last_delivered_sequence = Math.max(p.last_delivered_sequence, data.delivered || 0);
    renderMessages({ stick: false });
  }

  function onTyping(frame) {
    const data = frame.data || frame;
    const threadId = frame.thread_id || data.thread_id;
    const userId = data.user_id || (data.user && data.user.id);
    if (userId === me.id) return;
    if (!state.typing.has(threadId)) state.typing.set(threadId, new Map());
    const map = state.typing.get(threadId);
    if (data.typing === false || data.state === "stop") map.delete(userId);
    else {
      const participant = state.detail && state.detail.participants.find((p) => p.user.id === userId);
      const name = data.name || (participant && participant.user.name) || "Someone";
      map.set(userId, { name, until: Date.now() + (data.expires_in || 6) * 1000 });
    }
    renderTyping();
  }

  function clearTyping(threadId, userId) {
    const map = state.typing.get(threadId);
    if (map) map.delete(userId);
    renderTyping();
  }

  function renderTyping() {
    const map = state.typing.get(state.current);
    const now = Date.now();
    const names = map ? [...map.entries()].filter(([, v]) => v.until > now).map(([, v]) => v.name) : [];
    $("typing").textContent = names.length === 0 ? "" : names.length === 1 ? names[0] + " is typing…" : names.join(", ") + " are typing…";
  }
  setInterval(renderTyping, 1000);

  function onPresence(frame) {
    const data = frame.data || frame;
    const userId = data.user_id || (data.user && data.user.id);
    const online = data.online !== undefined ? data.online : data.status === "online";
    if (userId !== undefined) state.presence.set(userId, !!online);
    if (Array.isArray(data.users)) {
      for (const u of data.users) state.presence.set(u.user_id || u.id, !!(u.online !== undefined ? u.online : u.status === "online"));
    }
    renderThreadList();
    if (state.detail) renderHeader();
  }

  function notificationCount() {
    return parseInt($("notif-count").textContent, 10) || 0;
  }

  function setNotificationCount(value) {
    const shown = Math.max(0, value);
    const count = $("notif-count");
    count.hidden = shown <= 0;
    count.textContent = String(shown);
    $("notif-btn").setAttribute("aria-label", shown ? "Notifications, " + shown + " unread" : "Notifications");
  }

  async function refreshNotificationCount() {
    const notes = (state.notes = { counted: null, early: [] });
    try {
      const unread = await api("GET", "/notifications?unread=1&limit=1");
      if (state.notes !== notes) return; // a newer refresh (a reconnect) owns the count
      const newest = unread.notifications.length ? unread.notifications[0].id : 0;
      const uncounted = notes.early.filter((id) => id > newest).length;
      state.notes = { counted: newest, early: [] };
      setNotificationCount(unread.unread_count + uncounted);
    } catch {
      if (state.notes === notes) state.notes = { counted: 0, early: [] }; // offline: live ones still count
    }
  }

  function onNotification(frame) {
    const data = frame.data || frame;
    if (state.notes.counted === null) state.notes.early.push(data.id);
    if (state.notes.counted === null || data.id > state.notes.counted) {
      setNotificationCount(notificationCount() + 1);
    }
    liveNotes.set(data.id, { ...data });
    if (liveNotes.size > NOTE_PAGE) liveNotes.delete(Math.min(...liveNotes.keys()));
    if (!$("notif-panel").hidden) renderNotePanel();
    const thread = state.threads.get(data.thread_id);
    if (document.hidden && "Notification" in window && Notification.permission === "granted") {
      const title = data.kind === "MENTION" ? "You were mentioned" : data.kind === "REPLY" ? "New reply" : "New direct message";
      const note = new Notification(title, { body: (thread ? threadName(thread) + ": " : "") + (data.excerpt || ""), tag: "chat-" + data.id });
      note.onclick = () => {
        window.focus();
        openThread(data.thread_id, data.seq);
      };
    }
  }

  // Read elsewhere (another tab or device, or this one): the list shows them read, and the count is
  // read again from the server (the read ones may or may not be in the count shown; the server knows).
  function onNotificationsRead(frame) {
    const data = frame.data || frame;
    const ids = Array.isArray(data.ids) ? data.ids : [];
    for (const id of ids) readNotes.add(id);
    for (const note of noteList()) if (ids.includes(note.id) && !note.read_at) note.read_at = new Date().toISOString();
    if (!$("notif-panel").hidden) renderNotePanel();
    refreshNotificationCount();
  }

  // ---------------------------------------------------------------- the bell's list
  const liveNotes = new Map(); // id -> notification that arrived live (the newest few), merged into the list
  const readNotes = new Set(); // ids read since the page loaded (here or elsewhere)
  let noteRequests = 0;

  // The list as shown: the page read from the server and what arrived live since, newest first.
  function noteList() {
    const byId = new Map();
    for (const note of state.noteItems || []) byId.set(note.id, note);
    for (const note of liveNotes.values()) if (!byId.has(note.id)) byId.set(note.id, note);
    const notes = [...byId.values()].sort((a, b) => b.id - a.id).slice(0, NOTE_PAGE);
    for (const note of notes) if (readNotes.has(note.id) && !note.read_at) note.read_at = new Date().toISOString();
    return notes;
  }

  function noteTitle(note) {
    if (note.kind === "MENTION") return "You were mentioned";
    if (note.kind === "REPLY") return "New reply";
    if (note.kind === "DIRECT") return "New direct message";
    return "Notification";
  }

  function renderNotePanel() {
    const notes = state.noteItems === null && !liveNotes.size ? null : noteList();
    $("notif-list").replaceChildren(...(notes || []).map((note) => {
      const thread = state.threads.get(note.thread_id);
      const unread = !note.read_at;
      return el("li", { class: "notif-item" + (unread ? " unread" : ""), dataset: { id: String(note.id) } },
        el("button", { type: "button", class: "notif-open", onclick: () => openNotification(note) },
          unread ? el("span", { class: "sr-only", text: "Unread: " }) : null,
          el("span", { class: "notif-kind", text: noteTitle(note) + (thread ? " · " + threadName(thread) : "") }),
          el("span", { class: "notif-excerpt", text: note.excerpt || "" }),
          note.created_at ? el("time", { datetime: note.created_at, text: fmtDay(note.created_at) + " " + fmtTime(note.created_at) }) : null));
    }));
    const empty = $("notif-empty");
    empty.hidden = notes !== null && notes.length > 0;
    if (notes === null) empty.textContent = "Loading…";
    else if (!notes.length) empty.textContent = "No notifications.";
    $("notif-read-all").disabled = notificationCount() === 0 && !(notes || []).some((note) => !note.read_at);
  }

  async function loadNotes() {
    const request = ++noteRequests;
    try {
      const page = await api("GET", "/notifications?limit=" + NOTE_PAGE);
      if (request !== noteRequests) return;
      state.noteItems = page.notifications;
    } catch (error) {
      if (request !== noteRequests) return;
      if (state.noteItems === null && !liveNotes.size) {
        $("notif-empty").hidden = false;
        $("notif-empty").textContent = navigator.onLine === false ? "You are offline." : "Could not load notifications: " + error.message;
        return;
      }
    }
    if (!$("notif-panel").hidden) renderNotePanel();
  }

  function openNotePanel() {
    $("notif-panel").hidden = false;
    $("notif-btn").setAttribute("aria-expanded", "true");
    renderNotePanel();
    loadNotes().then(() => {
      const panel = $("notif-panel");
      if (!panel.hidden && !panel.contains(document.activeElement)) {
        const first = panel.querySelector(".notif-open") || $("notif-read-all");
        first.focus();
      }
    });
  }

  function closeNotePanel(focusBell = false) {
    if ($("notif-panel").hidden) return;
    $("notif-panel").hidden = true;
    $("notif-btn").setAttribute("aria-expanded", "false");
    if (focusBell) $("notif-btn").focus();
  }

  // Opens what the notification is about, and marks that one read (only that one).
  async function openNotification(note) {
    closeNotePanel();
    if (!note.read_at) {
      note.read_at = new Date().toISOString();
      readNotes.add(note.id);
      setNotificationCount(notificationCount() - 1);
      api("POST", "/notifications/read", { ids: [note.id] }).catch((error) => {
        readNotes.delete(note.id);
        note.read_at = null;
        toast(error.message || "Could not mark the notification read.", "error");
        refreshNotificationCount();
      });
    }
    openThread(note.thread_id, note.seq || null);
  }

  async function markAllNotesRead() {
    const notes = noteList();
    try {
      await api("POST", "/notifications/read", {});
    } catch (error) {
      toast(error.message || "Could not mark the notifications read.", "error");
      return;
    }
    for (const note of notes) {
      readNotes.add(note.id);
      if (!note.read_at) note.read_at = new Date().toISOString();
    }
    refreshNotificationCount(); // live ones that came meanwhile still count
    if (!$("notif-panel").hidden) renderNotePanel();
  }

  // ---------------------------------------------------------------- other notices to the user
  // Archived or muted elsewhere (another tab or device): the thread moves to its tab, the mute shows.
  function onMembershipUpdated(frame) {
    const data = frame.data || frame;
    const threadId = data.thread_id;
    const thread = state.threads.get(threadId);
    for (const target of [thread, state.detail && state.detail.id === threadId ? state.detail : null]) {
      if (!target) continue;
      if (typeof data.archived === "boolean") target.archived = data.archived;
      if (typeof data.muted === "boolean") target.muted = data.muted;
    }
    if (!thread && data.archived === state.archived) {
      // It moved into the tab on screen, which has not listed it: the list is read again.
      unlisted.delete(threadId);
      threadNotListed(threadId);
    }
    renderThreadList();
    if (threadId === state.current) renderHeader();
  }

  // Someone's name changed (mine, from another tab or device): everywhere it shows.
  function onUserUpdated(frame) {
    const data = frame.data || frame;
    if (typeof data.id !== "number" || typeof data.name !== "string") return;
    const rename = (user) => {
      if (user && user.id === data.id) user.name = data.name;
    };
    if (data.id === me.id) {
      me.name = data.name;
      $("me-name").textContent = data.name;
    }
    for (const thread of state.threads.values()) {
      rename(thread.other_user);
      if (thread.last_message) rename(thread.last_message.sender);
    }
    for (const store of state.messages.values()) for (const message of store.values()) rename(message.sender);
    if (state.detail) for (const p of state.detail.participants) rename(p.user);
    for (const typing of state.typing.values()) {
      const entry = typing.get(data.id);
      if (entry) entry.name = data.name;
    }
    if (state.replyTo) rename(state.replyTo.sender);
    renderThreadList();
    if (state.current) {
      renderHeader();
      renderMessages({ stick: false });
      if ($("members-dialog").open && currentDetail()) renderMembers();
    }
  }

  // ---------------------------------------------------------------- subscriptions and receipts
  function subscribe(threadId) {
    if (!socket.connected) return Promise.resolve();
    const lastSeq = state.lastSeq.has(threadId) ? state.lastSeq.get(threadId) : null;
    return socket.send({ type: "subscribe", thread_id: threadId, last_seq: lastSeq }).catch((error) => {
      if (error && error.code === "not_found") dropThread(threadId, "You are no longer in this conversation.");
    });
  }

  function subscribeAll() {
    for (const threadId of state.threads.keys()) subscribe(threadId);
    if (state.current && !state.threads.has(state.current)) subscribe(state.current);
  }

  const receiptQueue = new Map(); // thread id -> {read, delivered}
  let receiptTimer = null;

  function queueReceipt(threadId, kind, seq) {
    const entry = receiptQueue.get(threadId) || {};
    entry[kind] = Math.max(entry[kind] || 0, seq);
    receiptQueue.set(threadId, entry);
    if (!receiptTimer) receiptTimer = setTimeout(flushReceipts, 800);
  }

  function flushReceipts() {
    receiptTimer = null;
    for (const [threadId, entry] of receiptQueue) {
      if (entry.read) socket.send({ type: "read", thread_id: threadId, seq: entry.read }, false).catch(() => {});
      else if (entry.delivered) socket.send({ type: "delivered", thread_id: threadId, seq: entry.delivered }, false).catch(() => {});
    }
    receiptQueue.clear();
  }

  function markRead(threadId) {
    const store = threadMessages(threadId);
    const newest = Math.max(0, ...store.keys());
    if (newest > 0) {
      if (socket.connected) queueReceipt(threadId, "read", newest);
      else api("POST", "/threads/" + threadId + "/read", { seq: newest }).catch(() => {});
    }
    const thread = state.threads.get(threadId);
    if (thread && thread.unread_count) {
      thread.unread_count = 0;
      renderThreadList();
    }
  }

  // ---------------------------------------------------------------- typing out
  let lastTypingSent = 0;
  let typingStopTimer = null;

  function typingActivity() {
    if (!state.current || !socket.connected) return;
    const now = Date.now();
    if (now - lastTypingSent > TYPING_THROTTLE_MS) {
      lastTypingSent = now;
      socket.send({ type: "typing.start", thread_id: state.current }, false).catch(() => {});
    }
    clearTimeout(typingStopTimer);
    typingStopTimer = setTimeout(stopTyping, 4000);
  }

  function stopTyping() {
    clearTimeout(typingStopTimer);
    if (lastTypingSent && state.current && socket.connected) {
      socket.send({ type: "typing.stop", thread_id: state.current }, false).catch(() => {});
    }
    lastTypingSent = 0;
  }

  // ---------------------------------------------------------------- mentions
  let mentionQuery = null;
  let mentionTimer = null;

  function checkMention() {
    const input = $("input");
    const upto = input.value.slice(0, input.selectionStart);
    const match = upto.match(/(?:^|\s)@([\w.+-]{0,30})$/);
    if (!match) {
      $("mention-list").hidden = true;
      mentionQuery = null;
      return;
    }
    mentionQuery = match[1];
    clearTimeout(mentionTimer);
    mentionTimer = setTimeout(async () => {
      const detail = currentDetail();
      const members = detail ? detail.participants.map((p) => p.user).filter((u) => u.id !== me.id) : [];
      const q = mentionQuery.toLowerCase();
      const found = members.filter((u) => u.username.toLowerCase().startsWith(q) || u.name.toLowerCase().startsWith(q)).slice(0, 8);
      const list = $("mention-list");
      list.replaceChildren(...found.map((u, i) => el("li", {
        role: "option", tabindex: "-1", class: i === 0 ? "active" : "", dataset: { username: u.username },
        onmousedown: (e) => {
          e.preventDefault();
          insertMention(u.username);
        },
      }, el("strong", { text: "@" + u.username }), " ", u.name)));
      list.hidden = found.length === 0;
    }, 80);
  }

  function insertMention(username) {
    const input = $("input");
    const pos = input.selectionStart;
    const before = input.value.slice(0, pos).replace(/@([\w.+-]{0,30})$/, "@" + username + " ");
    input.value = before + input.value.slice(pos);
    input.selectionStart = input.selectionEnd = before.length;
    $("mention-list").hidden = true;
    input.focus();
  }

  // ---------------------------------------------------------------- attachments
  function threadUploads(threadId) {
    return state.uploads.get(threadId) || [];
  }

  // The open thread's uploads: each thread keeps its own until they are sent with a message there.
  function renderUploads() {
    const list = $("uploads");
    const uploads = threadUploads(state.current);
    list.replaceChildren(...uploads.map((u) => el("li", { class: "upload" + (u.error ? " error" : u.done ? " done" : "") },
      el("span", { text: u.file.name }),
      u.error ? el("span", { class: "error", text: " " + u.error }) : el("progress", { max: "100", value: String(u.progress), "aria-label": "Upload progress" }),
      el("button", { type: "button", class: "icon-btn", "aria-label": "Remove " + u.file.name, onclick: () => {
        const index = uploads.indexOf(u);
        if (index >= 0) uploads.splice(index, 1);
        renderUploads();
      } }, "✕"))));
  }

  function uploadFiles(files) {
    const threadId = state.current;
    if (!threadId) return;
    if (!state.uploads.has(threadId)) state.uploads.set(threadId, []);
    const uploads = state.uploads.get(threadId);
    for (const file of files) {
      const entry = { file, id: null, progress: 0, error: null, done: false };
      uploads.push(entry);
      const form = new FormData();
      form.append("file", file, file.name);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", config.api + "/threads/" + threadId + "/attachments");
      xhr.setRequestHeader("X-CSRFToken", cookie("csrftoken"));
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", (e) => {
        if (e.lengthComputable) {
          entry.progress = Math.round((e.loaded / e.total) * 100);
          renderUploads();
        }
      });
      xhr.addEventListener("load", () => {
        let body = null;
        try {
          body = JSON.parse(xhr.responseText);
        } catch (_) {
          body = null;
        }
        if (xhr.status >= 200 && xhr.status < 300 && body) {
          entry.id = body.id;
          entry.done = true;
          entry.progress = 100;
        } else {
          entry.error = (body && body.error && body.error.message) || "Upload failed (" + xhr.status + ")";
        }
        renderUploads();
      });
      xhr.addEventListener("error", () => {
        entry.error = "Upload failed.";
        renderUploads();
      });
      xhr.send(form);
    }
    renderUploads();
  }

  // ---------------------------------------------------------------- dialogs: new thread, members
  function peoplePicker(inputId, resultsId, onPick) {
    let timer = null;
    $(inputId).addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const q = $(inputId).value.trim();
        const data = await api("GET", "/users?q=" + encodeURIComponent(q));
        $(resultsId).replaceChildren(...data.users.map((u) => el("li", {},
          el("button", { type: "button", class: "person", onclick: () => onPick(u) }, el("strong", { text: u.name }), " @" + u.username))));
      }, 150);
    });
  }

  const chosen = new Map();

  function renderChosen() {
    $("nt-chosen").replaceChildren(...[...chosen.values()].map((u) => el("li", { class: "chip" }, u.name,
      el("button", { type: "button", class: "icon-btn", "aria-label": "Remove " + u.name, onclick: () => { chosen.delete(u.id); renderChosen(); } }, "✕"))));
  }

  async function createThread(event) {
    event.preventDefault();
    const ids = [...chosen.keys()];
    if (!ids.length) {
      $("nt-error").textContent = "Pick at least one person.";
      return;
    }
    const kind = ids.length === 1 && !$("nt-name").value.trim() ? "DIRECT" : "GROUP";
    try {
      const thread = await api("POST", "/threads", { title: $("nt-name").value.trim(), kind, participant_ids: ids });
      $("new-thread-dialog").close();
      chosen.clear();
      renderChosen();
      await loadThreads();
      openThread(thread.id);
    } catch (error) {
      $("nt-error").textContent = error.message;
    }
  }

  function renderMembers() {
    const detail = state.detail;
    const myRole = detail.my_role;
    const list = $("members-list");
    list.replaceChildren();
    for (const p of detail.participants) {
      const row = el("li", { class: "member" },
        el("span", { class: "presence-dot" + (state.presence.get(p.user.id) ? " online" : "") }),
        el("span", { class: "member-name", text: p.user.name + (p.user.id === me.id ? " (you)" : "") }));
      if (myRole === "OWNER" && p.user.id !== me.id && detail.kind !== "DIRECT") {
        const select = el("select", { "aria-label": "Role of " + p.user.name },
          ...["MEMBER", "ADMIN", "OWNER"].map((r) => el("option", { value: r, selected: r === p.role, text: r.toLowerCase() })));
        select.addEventListener("change", () => memberAction(() => api("PATCH", "/threads/" + detail.id + "/participants/" + p.user.id, { role: select.value })));
        row.append(select);
      } else {
        row.append(el("span", { class: "role", text: p.role.toLowerCase() }));
      }
      const canRemove = detail.kind !== "DIRECT" && p.user.id !== me.id && (myRole === "OWNER" || (myRole === "ADMIN" && p.role === "MEMBER"));
      if (canRemove) {
        row.append(el("button", { type: "button", class: "link-btn", text: "Remove", onclick: () => memberAction(() => api("DELETE", "/threads/" + detail.id + "/participants/" + p.user.id)) }));
      }
      list.append(row);
    }
    $("members-add").hidden = detail.kind === "DIRECT" || !(myRole === "OWNER" || myRole === "ADMIN");
    $("mb-leave").hidden = detail.kind === "DIRECT";
  }

  async function memberAction(call) {
    $("mb-error").textContent = "";
    const threadId = state.current;
    try {
      await call();
      const request = ++detailRequests;
      const detail = await api("GET", "/threads/" + threadId);
      if (state.current !== threadId || request !== detailRequests) return;
      state.detail = detail;
      renderMembers();
      renderHeader();
    } catch (error) {
      $("mb-error").textContent = error.message;
    }
  }

  // ---------------------------------------------------------------- search
  let searchTimer = null;

  function search() {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(async () => {
      const q = $("search-input").value.trim();
      const box = $("search-results");
      if (!q) {
        box.hidden = true;
        $("thread-list").hidden = false;
        return;
      }
      const data = await api("GET", "/search?q=" + encodeURIComponent(q));
      box.replaceChildren(...data.results.map((r) => {
        const snippet = el("span", { class: "snippet" });
        if (r.highlight) snippet.innerHTML = r.highlight; // escaped by the server, only <mark> kept
        else snippet.textContent = r.message.body.slice(0, 120);
        return el("button", { type: "button", class: "search-hit", onclick: () => openThread(r.message.thread_id, r.message.seq) },
          el("strong", { text: r.message.sender.name }), snippet);
      }));
      if (!data.results.length) box.append(el("p", { class: "hint", text: "No messages found." }));
      box.hidden = false;
      $("thread-list").hidden = true;
    }, 250);
  }

  // ---------------------------------------------------------------- composer behaviour
  function autoGrow() {
    const input = $("input");
    input.style.height = "auto";
    input.style.height = Math.min(200, input.scrollHeight) + "px";
  }

  function bind() {
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      send();
    });
    $("input").addEventListener("keydown", (e) => {
      const list = $("mention-list");
      if (!list.hidden && (e.key === "Enter" || e.key === "Tab")) {
        const active = list.querySelector("li.active") || list.querySelector("li");
        if (active) {
          e.preventDefault();
          insertMention(active.dataset.username);
          return;
        }
      }
      if (!list.hidden && (e.key === "ArrowDown" || e.key === "ArrowUp")) {
        e.preventDefault();
        const items = [...list.querySelectorAll("li")];
        const index = items.findIndex((i) => i.classList.contains("active"));
        items.forEach((i) => i.classList.remove("active"));
        const next = (index + (e.key === "ArrowDown" ? 1 : -1) + items.length) % items.length;
        items[next].classList.add("active");
        return;
      }
      if (e.key === "Escape") list.hidden = true;
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send();
      }
    });
    $("input").addEventListener("input", () => {
      autoGrow();
      typingActivity();
      checkMention();
    });
    $("input").addEventListener("blur", () => setTimeout(() => { $("mention-list").hidden = true; }, 150));
    $("reply-cancel").addEventListener("click", () => {
      state.replyTo = null;
      $("reply-preview").hidden = true;
    });
    $("history").addEventListener("scroll", () => {
      if ($("history").scrollTop < 120) loadOlder();
    });
    $("attach-btn").addEventListener("click", () => {
      if (state.current) $("file-input").click();
    });
    $("file-input").addEventListener("change", (e) => {
      uploadFiles([...e.target.files]);
      e.target.value = "";
    });
    const pane = $("thread-pane");
    const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
    pane.addEventListener("dragover", (e) => {
      if (!state.current || !hasFiles(e)) return;
      e.preventDefault();
      $("drop-zone").hidden = false;
    });
    pane.addEventListener("dragleave", (e) => {
      if (e.target === $("drop-zone")) $("drop-zone").hidden = true;
    });
    pane.addEventListener("drop", (e) => {
      $("drop-zone").hidden = true;
      if (!hasFiles(e)) return;
      e.preventDefault();
      if (e.dataTransfer.files.length) uploadFiles([...e.dataTransfer.files]);
    });
    $("input").addEventListener("paste", (e) => {
      const files = [...(e.clipboardData ? e.clipboardData.files : [])];
      if (files.length) {
        e.preventDefault();
        uploadFiles(files);
      }
    });
    $("tab-active").addEventListener("click", () => switchTab(false));
    $("tab-archived").addEventListener("click", () => switchTab(true));
    $("threads-more").addEventListener("click", () => loadThreads(true));
    $("search-input").addEventListener("input", search);
    $("new-thread-btn").addEventListener("click", () => {
      $("nt-error").textContent = "";
      $("new-thread-dialog").showModal();
      $("nt-people").focus();
    });
    $("nt-cancel").addEventListener("click", () => $("new-thread-dialog").close());
    $("new-thread-form").addEventListener("submit", createThread);
    peoplePicker("nt-people", "nt-results", (u) => {
      chosen.set(u.id, u);
      renderChosen();
    });
    peoplePicker("mb-people", "mb-results", (u) => memberAction(() => api("POST", "/threads/" + state.current + "/participants", { user_id: u.id })));
    $("members-btn").addEventListener("click", () => {
      if (!currentDetail()) return;
      renderMembers();
      $("mb-error").textContent = "";
      $("members-dialog").showModal();
    });
    $("mb-close").addEventListener("click", () => $("members-dialog").close());
    $("mb-leave").addEventListener("click", async () => {
      try {
        await api("POST", "/threads/" + state.current + "/leave");
        $("members-dialog").close();
        dropThread(state.current, "You left the conversation.");
      } catch (error) {
        $("mb-error").textContent = error.message;
      }
    });
    $("archive-btn").addEventListener("click", async () => {
      const threadId = state.current;
      const thread = state.threads.get(threadId);
      // The open thread may not be in the loaded tab's list (opened from search): the detail knows too.
      const archived = !(thread ? thread.archived : state.detail && state.detail.archived);
      try {
        await api("PATCH", "/threads/" + threadId + "/membership", { archived });
      } catch (error) {
        toast(error.message, "error");
        return;
      }
      if (thread) thread.archived = archived;
      if (state.detail && state.detail.id === threadId) state.detail.archived = archived;
      renderThreadList();
      if (state.detail) renderHeader();
      toast(archived ? "Moved to Archived." : "Moved back to Active.");
    });
    $("mute-btn").addEventListener("click", async () => {
      const threadId = state.current;
      const thread = state.threads.get(threadId);
      const detail = currentDetail();
      const muted = !(thread && typeof thread.muted === "boolean" ? thread.muted : detail && detail.muted);
      try {
        await api("PATCH", "/threads/" + threadId + "/membership", { muted });
      } catch (error) {
        toast(error.message, "error");
        return;
      }
      onMembershipUpdated({ data: { thread_id: threadId, muted } });
    });
    $("hi-close").addEventListener("click", () => $("history-dialog").close());
    $("rp-close").addEventListener("click", () => $("replies-dialog").close());
    $("show-threads").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));
    $("notif-btn").addEventListener("click", () => {
      if ("Notification" in window && Notification.permission === "default") Notification.requestPermission();
      if ($("notif-panel").hidden) openNotePanel();
      else closeNotePanel();
    });
    $("notif-read-all").addEventListener("click", markAllNotesRead);
    document.addEventListener("click", (e) => {
      const picker = $("emoji-picker");
      if (!picker.hidden && !picker.contains(e.target) && !e.target.closest(".actions")) picker.hidden = true;
      if (!$("notif-panel").hidden && !e.target.closest(".notif-wrap")) closeNotePanel();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") {
        $("emoji-picker").hidden = true;
        if (!$("notif-panel").hidden) closeNotePanel($("notif-panel").contains(document.activeElement));
      }
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.current) markRead(state.current);
    });
    window.addEventListener("online", () => {
      if (!socket.connected) socket.connect();
    });
    window.addEventListener("offline", () => {
      if (!socket.connected) banner(OFFLINE_TEXT, "warn");
    });
    // Clerk's sign-out (clerk.js) calls this before signing out: nothing is written back, and the
    // stored copies are forgotten (Clerk's sign-out does not pass through our logout's Clear-Site-Data).
    window.chatappSignOut = async () => {
      state.signedOut = true;
      cancelResends();
      await forgetStoredData();
    };
    // Sign-out also forgets this browser's offline copies of the page and the conversations.
    const signout = document.querySelector("form.signout");
    if (signout) {
      signout.addEventListener("submit", async (e) => {
        e.preventDefault();
        state.signedOut = true; // nothing is written back to the outbox from here on
        await forgetStoredData(); // the server's Clear-Site-Data does it too, where the browser supports it
        signout.submit();
      });
    }
  }

  async function switchTab(archived) {
    state.archived = archived;
    unlisted.clear();
    $("tab-active").setAttribute("aria-selected", String(!archived));
    $("tab-archived").setAttribute("aria-selected", String(archived));
    await loadThreads();
  }

  // ---------------------------------------------------------------- connection banner
  const OFFLINE_TEXT = "You are offline. Messages you write are sent when the connection returns.";

  function banner(text, kind, ...actions) {
    const node = $("conn-banner");
    node.replaceChildren(text || "", ...actions.map((action) => [" ", action]).flat());
    node.className = "conn-banner " + (kind || "");
    node.hidden = !text;
  }

  // The session ended (signed out or revoked elsewhere, password changed, account deactivated): this
  // browser keeps nothing of the conversations, on screen or stored, for whoever uses it next.
  function endSession(code) {
    signedOutBanner(code);
    if (state.signedOut) return;
    state.signedOut = true;
    cancelResends();
    state.pending.clear();
    state.threads.clear();
    state.messages.clear();
    state.uploads.clear();
    state.typing.clear();
    state.current = null;
    state.detail = null;
    state.editing = null;
    state.noteItems = null;
    liveNotes.clear();
    forgetStoredData();
    for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
    closeNotePanel();
    setNotificationCount(0);
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    $("messages").replaceChildren();
    $("thread-view").hidden = true;
    $("empty-state").hidden = false;
    $("threads-more").hidden = true;
    $("search-results").replaceChildren();
    renderThreadList();
  }

  function signedOutBanner(code) {
    const signIn = el("a", { class: "link-btn", href: "/accounts/login/?next=" + encodeURIComponent(location.pathname), text: "Sign in" });
    if (code === 4403) banner("Your account was deactivated.", "error");
    else banner("Your session ended. Sign in again.", "error", signIn);
  }

  socket.on("open", async () => {
    banner("");
    document.body.classList.remove("offline");
    subscribeAll();
    if (!state.threadsLoaded) loadThreads().catch(() => {});
    if (state.current && state.openedOffline === state.current) openThread(state.current, null, { focus: false });
    await flushOutbox();
  });
  socket.on("offline", () => {
    document.body.classList.add("offline");
    banner(OFFLINE_TEXT, "warn");
  });
  socket.on("close", (event, tokenExpired) => {
    document.body.classList.add("offline");
    cancelResends(); // the reconnect sends what is left (flushOutbox)
    for (const item of state.pending.values()) if (item.status === "pending") item.status = "queued";
    if (state.current) renderMessages({ stick: false });
    if ((event.code === 4401 || event.code === 4403) && !tokenExpired) endSession(event.code);
  });
  socket.on("signedout", (code) => endSession(code));
  socket.on("retry", (delay, code) => {
    const now = el("button", { type: "button", class: "link-btn reconnect-now", text: "Reconnect now", onclick: () => socket.reconnectNow() });
    const wait = Math.ceil(delay / 1000) + "s…";
    if (navigator.onLine === false) banner(OFFLINE_TEXT, "warn");
    else if (code === 4429) banner("Too many open chat tabs or windows: close one. Reconnecting in " + wait, "warn", now);
    else banner("Connection lost. Reconnecting in " + wait, "warn", now);
  });
  // A few handshakes in a row refused: the browser cannot tell why (it shows 1006 either way), the API can.
  socket.on("authcheck", async () => {
    try {
      await api("GET", "/me");
      return false;
    } catch (error) {
      return error instanceof ApiError && (error.status === 401 || error.status === 403);
    }
  });
  for (const type of ["message.created", "message.updated", "message.deleted", "reaction.added", "reaction.removed",
    "thread.updated", "thread.deleted", "thread.participant_added", "thread.participant_removed", "thread.role_changed"]) {
    socket.on(type, onThreadEvent);
  }
  socket.on("receipt", onReceipt);
  socket.on("typing", onTyping);
  socket.on("typing.start", onTyping);
  socket.on("typing.stop", (frame) => onTyping({ ...frame, data: { ...(frame.data || frame), typing: false } }));
  socket.on("presence", onPresence);
  socket.on("notification", onNotification);
  socket.on("notification.read", onNotificationsRead);
  socket.on("thread.membership_updated", onMembershipUpdated);
  socket.on("user.updated", onUserUpdated);
  socket.on("thread.created", () => {
    unlisted.clear();
    loadThreads().catch(() => {});
  });
  socket.on("thread.removed", (frame) => dropThread((frame.data || frame).thread_id, "You were removed from this conversation."));
  socket.on("resync", (frame) => {
    // Too much was missed (or the server's log is behind us): the history is read again over REST,
    // and the socket continues live after the resync's seq.
    const threadId = frame.thread_id || (frame.data && frame.data.thread_id);
    if (typeof frame.seq === "number") state.lastSeq.set(threadId, frame.seq);
    state.messages.delete(threadId);
    state.oldestReached.delete(threadId);
    if (threadId === state.current) openThread(threadId, null, { focus: false });
  });
  socket.on("pong", () => {});
  socket.on("ping", () => socket.send({ type: "pong" }, false).catch(() => {}));
  // The server sends "ready" once the socket receives the user's notices: from then on a
  // notification either arrives live or is in the count fetched now (or both: see onNotification).
  socket.on("ready", () => refreshNotificationCount());

  // ---------------------------------------------------------------- start
  async function start() {
    for (const item of outboxLoad()) {
      item.status = "queued";
      state.pending.set(item.clientMsgId, item);
    }
    bind();
    try {
      await loadThreads();
    } catch (error) {
      if (navigator.onLine === false || !(error instanceof ApiError)) banner(OFFLINE_TEXT, "warn");
      else banner("Could not load conversations: " + error.message, "error");
    }
    socket.connect();
    const match = location.hash.match(/^#thread-(\d+)$/);
    if (match) openThread(Number(match[1]));
    registerServiceWorker();
  }

  function registerServiceWorker() {
    if (!("serviceWorker" in navigator) || !config.service_worker) return;
    navigator.serviceWorker.register(config.service_worker, { scope: "/" }).catch(() => {});
    // The shell is whatever this page loaded (static names are hashed in production): the worker keeps those.
    navigator.serviceWorker.ready.then((registration) => {
      const assets = [...document.querySelectorAll("script[src], link[rel='stylesheet'][href], link[rel='icon'][href]")]
        .map((node) => new URL(node.src || node.href, location.href))
        .filter((url) => url.origin === location.origin)
        .map((url) => url.pathname + url.search);
      if (registration.active) registration.active.postMessage({ type: "cache-shell", urls: [location.pathname, ...assets] });
    }).catch(() => {});
    if (!navigator.serviceWorker.controller) {
      // This first visit read the list and the open thread before the worker took over: read them
      // again through it, so that they show offline too.
      navigator.serviceWorker.addEventListener("controllerchange", () => {
        const paths = [threadListPath(), ...(state.current ? threadPaths(state.current) : [])];
        for (const path of paths) api("GET", path).catch(() => {});
      }, { once: true });
    }
  }

  window.chatapp = { state, socket, openThread }; // for debugging and the browser tests
  start();
})();
