/* Service worker: caches the page's shell so the chat opens offline. Messages written while
 * offline wait in the page's outbox (localStorage) and are sent, once each thanks to their
 * client message ids, when the socket is back. API calls and the socket always go to the network. */
const SHELL = "chatapp-shell-v1";
const ASSETS = ["/", "/static/chat/app.js", "/static/chat/app.css"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((cache) => cache.addAll(ASSETS)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys().then((keys) => Promise.all(keys.filter((k) => k !== SHELL).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== location.origin) return;
  if (url.pathname.startsWith("/api/") || url.pathname.startsWith("/ws/") || url.pathname.startsWith("/admin/")) return;
  const isShell = url.pathname === "/" || url.pathname.startsWith("/static/chat/");
  if (!isShell) return;
  // Network first (fresh page and config when online), cached shell when offline.
  event.respondWith(
    fetch(event.request)
      .then((response) => {
        if (response.ok && !response.redirected) {
          const copy = response.clone();
          caches.open(SHELL).then((cache) => cache.put(event.request, copy));
        }
        return response;
      })
      .catch(() => caches.match(event.request)),
  );
});
