// Keeps the MCP servers table live (polled as JSON), and asks for a check of each server still Connecting.
(function () {
  "use strict";
  const table = document.getElementById("mcp-servers");
  if (!table) return;
  const csrf = (document.querySelector('input[name="csrfmiddlewaretoken"]') || {}).value || "";
  const asked = new Set();

  function show(row, s) {
    const status = row.querySelector('[data-field="status"]');
    status.textContent = s.status_label;  // textContent: nothing from a server is parsed as HTML
    if (s.status === "connecting") {
      const spinner = document.createElement("span");
      spinner.className = "spinner";
      spinner.setAttribute("aria-hidden", "true");
      status.prepend(spinner);
    }
    status.className = "state state-" + s.status;
    row.dataset.status = s.status;
    row.querySelector('[data-field="error"]').textContent = (s.error || "").slice(0, 300);
    row.querySelector('[data-field="tool_count"]').textContent = String(s.tool_count);
  }

  async function check(row) {
    asked.add(row.dataset.id);
    try {
      const response = await fetch(`${window.location.pathname}${row.dataset.id}/refresh/`, {
        method: "POST", credentials: "same-origin",
        headers: {"X-CSRFToken": csrf, "Accept": "application/json"}});
      if (response.ok) show(row, await response.json());
    } catch (err) {
      // The gateway restarting: the poll below shows the status once it is back.
    }
  }

  async function refresh() {
    try {
      const response = await fetch(window.location.pathname + "?format=json", {credentials: "same-origin"});
      if (!response.ok) return;
      const known = new Set();
      for (const s of (await response.json()).data) {
        known.add(String(s.id));
        const row = table.querySelector(`tr[data-id="${s.id}"]`);
        if (!row) { window.location.reload(); return; }  // added elsewhere: the server renders it
        show(row, s);
      }
      for (const row of table.querySelectorAll("tr[data-id]")) {
        if (!known.has(row.dataset.id)) row.remove();
      }
    } catch (err) {
      // Try again next time.
    }
  }

  for (const row of table.querySelectorAll('tr[data-status="connecting"]')) {
    if (!asked.has(row.dataset.id)) check(row);
  }
  setInterval(refresh, 2000);
})();
