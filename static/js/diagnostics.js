// Diagnostics: the live log of every node and the gateway (polled), and the System Tracing viewer.
(function () {
  "use strict";
  const MAX_LINES = 2000;
  const POLL_MS = 2000;

  // -- logs -------------------------------------------------------------------------------------
  const log = document.getElementById("diagnostics-log");
  const filters = document.getElementById("log-filters");
  const nodePick = document.getElementById("log-node");
  let since = 0;
  let polling = null;

  const levels = () => [...filters.querySelectorAll("input[name=level]:checked")].map((i) => i.value);

  function addLine(line) {
    const row = document.createElement("div");
    row.className = "l-" + line.level + (line.source === "gateway" ? " l-GATEWAY" : "");
    row.dataset.level = line.level;
    const time = document.createElement("span");
    time.className = "t";
    time.textContent = new Date(line.t * 1000).toLocaleTimeString() + " ";
    const lv = document.createElement("span");
    lv.className = "lv";
    lv.textContent = line.level.padEnd(8);
    const src = document.createElement("span");
    src.className = "src";
    src.textContent = ` [${line.node}] `;
    const msg = document.createElement("span");
    msg.className = "msg";
    msg.textContent = `${line.logger}: ${line.message}`;
    row.append(time, lv, src, msg);
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(row);
    while (log.childElementCount > MAX_LINES) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  async function poll() {
    const query = new URLSearchParams({ since: String(since), levels: levels().join(","), node: nodePick.value });
    try {
      const response = await fetch(log.dataset.url + "?" + query, { credentials: "same-origin" });
      if (response.ok) {
        const body = await response.json();
        body.lines.forEach(addLine);
        since = body.until;
        log.dataset.loaded = "true";
      }
    } catch (error) {
      // the gateway restarting: the next poll tries again
    }
    polling = setTimeout(poll, POLL_MS);
  }

  function restart() {
    clearTimeout(polling);
    log.replaceChildren();
    since = 0;
    poll();
  }
  filters.addEventListener("change", restart);
  restart();

  // -- traces -----------------------------------------------------------------------------------
  const traces = document.getElementById("traces");
  const list = document.querySelector("#trace-list tbody");
  const view = document.getElementById("trace-view");
  let channel = null;
  let shown = [];

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function showTrace(trace, row) {
    for (const r of list.children) r.classList.toggle("active", r === row);
    view.hidden = false;
    view.querySelector("[data-field=title]").textContent =
      `${trace.name} · ${trace.duration_ms.toFixed(1)} ms · ${new Date(trace.start * 1000).toLocaleString()}`;
    const timeline = view.querySelector("[data-field=timeline]");
    timeline.replaceChildren();
    const total = Math.max(trace.duration_ms, 0.001);
    const depth = {};
    for (const span of trace.spans) {
      depth[span.span_id] = span.parent_id && span.parent_id in depth ? depth[span.parent_id] + 1 : 0;
      const row = document.createElement("div");
      row.className = "span-row depth-" + Math.min(depth[span.span_id], 2);
      row.dataset.span = span.name;
      const name = document.createElement("div");
      name.className = "span-name";
      name.textContent = span.name;
      const track = document.createElement("div");
      track.className = "span-track";
      const bar = document.createElement("div");
      bar.className = "span-bar";
      bar.style.left = (100 * span.offset_ms / total).toFixed(3) + "%";
      bar.style.width = (100 * span.duration_ms / total).toFixed(3) + "%";
      bar.title = `${span.name}: starts at ${span.offset_ms.toFixed(2)} ms, lasts ${span.duration_ms.toFixed(2)} ms`;
      track.append(bar);
      const duration = document.createElement("div");
      duration.className = "small";
      duration.textContent = span.duration_ms.toFixed(2) + " ms";
      row.append(name, track, duration);
      const attributes = Object.entries(span.attributes || {});
      if (attributes.length) {
        const attrs = document.createElement("div");
        attrs.className = "span-attrs";
        attrs.textContent = attributes.map(([k, v]) => `${k}=${v}`).join("  ");
        row.append(attrs);
      }
      timeline.append(row);
    }
  }

  async function loadChannel(name) {
    channel = name;
    for (const b of traces.querySelectorAll("[data-channel]")) b.classList.toggle("active", b.dataset.channel === name);
    try {
      const response = await fetch(traces.dataset.url + "?" + new URLSearchParams({ channel: name }),
                                   { credentials: "same-origin" });
      if (!response.ok) return;
      const body = await response.json();
      for (const b of traces.querySelectorAll("[data-channel]")) {
        b.querySelector("[data-count]").textContent = String(body.counts[b.dataset.channel] || 0);
      }
      shown = body.traces;
      list.replaceChildren();
      for (const trace of shown) {
        const row = document.createElement("tr");
        row.dataset.trace = trace.trace_id;
        row.append(cell(new Date(trace.start * 1000).toLocaleTimeString()), cell(trace.name),
                   cell(String(trace.attributes["http.response.status_code"] || (trace.error ? "error" : "ok")),
                        trace.error ? "bad" : ""),
                   cell(trace.duration_ms.toFixed(1) + " ms"));
        row.addEventListener("click", () => showTrace(trace, row));
        list.append(row);
      }
      if (!shown.length) {
        const row = document.createElement("tr");
        const td = cell("No traces in this channel.", "muted");
        td.colSpan = 4;
        row.append(td);
        list.append(row);
      }
      traces.dataset.loaded = "true";
    } catch (error) {
      // try again on the next click
    }
  }

  for (const button of traces.querySelectorAll("[data-channel]")) {
    button.addEventListener("click", () => loadChannel(button.dataset.channel));
  }
  loadChannel(traces.querySelector("[data-channel]").dataset.channel);
})();
