// Behaviour the console pages declare in attributes, since their Content-Security-Policy runs no inline script:
// <form data-confirm="Question?"> asks before it is sent; <select data-autosubmit> sends its form when changed.
(function () {
  "use strict";
  document.addEventListener("submit", (event) => {
    const question = event.target.dataset && event.target.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });
  document.addEventListener("change", (event) => {
    if (event.target.matches && event.target.matches("select[data-autosubmit]")) event.target.form.requestSubmit();
  });
  // OptimaChat installs as an app (manifest.webmanifest); its service worker keeps the shell (never API answers).
  if ("serviceWorker" in navigator && window.isSecureContext) {
    navigator.serviceWorker.register("/sw.js").catch(() => {});
  }
})();
