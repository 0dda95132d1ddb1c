// Keeps the executors table live: states, errors and replicas, polled from the same page as JSON.
(function () {
  "use strict";
  const table = document.getElementById("executors");
  if (!table) return;
  const labels = {offline: "Offline", starting: "Starting", online: "Online", stopping: "Stopping", failed: "Failed"};

  async function refresh() {
    try {
      const response = await fetch(window.location.pathname + "?format=json", {credentials: "same-origin"});
      if (!response.ok) return;
      const rows = (await response.json()).data;
      const known = new Set();
      for (const e of rows) {
        known.add(String(e.id));
        const row = table.querySelector(`tr[data-id="${e.id}"]`);
        if (!row) { window.location.reload(); return; }  // a new file or upstream: the server renders it
        const state = row.querySelector('[data-field="state"]');
        state.textContent = labels[e.state] || e.state;  // textContent: nothing from the server is parsed as HTML
        state.className = "state state-" + e.state;
        row.querySelector('[data-field="error"]').textContent = (e.error || "").slice(0, 200);
        const nCtx = row.querySelector('[data-field="n_ctx"]');
        if (nCtx) nCtx.textContent = e.n_ctx ? String(e.n_ctx) : "—";
        const replicas = row.querySelector('[data-field="replicas_online"]');
        if (replicas) replicas.textContent = String(e.replicas_online);
      }
      for (const row of table.querySelectorAll("tr[data-id]")) {
        if (!known.has(row.dataset.id)) row.remove();
      }
    } catch (err) {
      // The gateway restarting or the network gone: try again next time.
    }
  }
  setInterval(refresh, 2000);
})();
