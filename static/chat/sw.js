/* Service worker: caches the page's shell so the chat opens offline, and keeps the last copy of the
 * thread list and of each opened thread's newest page so they show offline too. Messages written
 * while offline wait in the page's outbox (localStorage) and are sent, once each thanks to their
 * client message ids, when the socket is back. Everything else (writes, files, the socket) always
 * goes to the network. Sign-out deletes these caches (app.js). */
const SHELL = "chatapp-shell-v2";
const DATA = "chatapp-data-v1";
const ASSETS = ["/", "/static/chat/app.js", "/static/chat/app.css"];
// Reads the page needs to show the conversations: the list, a thread's detail and its newest messages.
const OFFLINE_READS = [/^\/api\/v1\/threads$/, /^\/api\/v1\/threads\/\d+$/, /^\/api\/v1\/threads\/\d+\/messages$/];

// Best effort, and never a redirect (a signed-out "/" answers with the login page, which is no shell).
function precache(urls) {
  return caches.open(SHELL).then((cache) => Promise.all(urls.map((url) => fetch(url)
    .then((response) => (response.ok && !response.redirected ? cache.put(url, response) : null))
    .catch(() => null))));
}

self.addEventListener("install", (event) => {
  event.waitUntil(precache(ASSETS).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys().then((keys) => Promise.all(keys.filter((k) => k !== SHELL && k !== DATA).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

// The page names the files it actually loaded (static names carry a hash in production).
self.addEventListener("message", (event) => {
  const data = event.data || {};
  if (data.type !== "cache-shell" || !Array.isArray(data.urls)) return;
  const urls = data.urls.filter((u) => typeof u === "string" && new URL(u, location.origin).origin === location.origin);
  event.waitUntil(precache(urls));
});

function networkFirst(request, cacheName) {
  return fetch(request)
    .then((response) => {
      if (response.ok && !response.redirected && response.type === "basic") {
        const copy = response.clone();
        caches.open(cacheName).then((cache) => cache.put(request, copy));
      }
      return response;
    })
    .catch((error) => caches.match(request, { cacheName }).then((cached) => cached || Promise.reject(error)));
}

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== location.origin) return;
  if (OFFLINE_READS.some((re) => re.test(url.pathname))) {
    // Only the pages the chat opens with (the newest page of a thread, the first page of the list).
    if (url.searchParams.has("before") || url.searchParams.has("after") || url.searchParams.has("cursor")) return;
    event.respondWith(networkFirst(event.request, DATA));
    return;
  }
  if (url.pathname.startsWith("/api/") || url.pathname.startsWith("/ws/") || url.pathname.startsWith("/admin/")) return;
  const isShell = url.pathname === "/" || url.pathname.startsWith("/static/chat/");
  if (!isShell) return;
  // Network first (fresh page and config when online), cached shell when offline.
  event.respondWith(networkFirst(event.request, SHELL));
});
