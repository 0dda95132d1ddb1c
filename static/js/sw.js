// OptimaChat's service worker: the app's shell (its styles, scripts and icons, and a page to show offline) from a
// cache, so OptimaChat opens as an installed app. API answers are never cached or even seen: only GETs of /static/
// and page navigations pass through here; everything else goes to the network untouched.
"use strict";
const VERSION = "optimachat-shell-1";
const SHELL = [
  "/offline/",
  "/static/css/optimagpt.css",
  "/static/js/pages.js",
  "/static/js/chat.js",
  "/static/js/markdown.js",
  "/static/icons/optimachat-192.png",
  "/static/icons/optimachat-512.png",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(VERSION).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((names) => Promise.all(names.filter((n) => n !== VERSION).map((n) => caches.delete(n))))
    .then(() => self.clients.claim()));
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== "GET" || url.origin !== self.location.origin) return;
  if (request.mode === "navigate") {
    // Pages always from the network (they are the signed-in person's); the offline page when there is none.
    event.respondWith(fetch(request).catch(() => caches.match("/offline/")));
    return;
  }
  if (url.pathname.startsWith("/static/")) {
    // The shell: from the cache at once, refreshed from the network for next time.
    event.respondWith(caches.open(VERSION).then(async (cache) => {
      const cached = await cache.match(request);
      const fresh = fetch(request).then((response) => {
        if (response.ok) cache.put(request, response.clone());
        return response;
      });
      return cached || fresh;
    }));
  }
  // Anything else (/v1, /optima, /api, /manage, ...) is not ours to answer.
});
