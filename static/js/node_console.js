// Node console pages: live status, graphs and log over the /ws/console/ WebSocket.
// Everything from the server is put into the page as text (textContent), never parsed as HTML.
(function () {
  "use strict";
  const MAX_POINTS = 600, MAX_LINES = 2000;

  function socket(query, onEvent) {
    let retry = 500;
    function open() {
      const scheme = window.location.protocol === "https:" ? "wss" : "ws";
      const ws = new WebSocket(`${scheme}://${window.location.host}/ws/console/${query}`);
      ws.onopen = () => { retry = 500; document.body.dataset.console = "live"; };
      ws.onmessage = (message) => onEvent(JSON.parse(message.data));
      ws.onclose = (event) => {
        document.body.dataset.console = "closed";
        if (event.code !== 4403) setTimeout(open, retry = Math.min(retry * 2, 10000));
      };
    }
    open();
  }

  function throttled(fn, ms) {
    let pending = false;
    return () => { if (!pending) { pending = true; setTimeout(() => { pending = false; fn(); }, ms); } };
  }

  async function state(url) {
    const response = await fetch(url, {credentials: "same-origin"});
    return response.ok ? response.json() : null;
  }

  function setStatus(dot, status) { dot.className = "dot dot-" + status; dot.title = status; }

  // -- the list of nodes ------------------------------------------------------------
  const list = document.getElementById("nodes");
  if (list) {
    const refresh = throttled(async () => {
      const data = await state(window.location.pathname + "?format=json");
      if (!data) return;
      for (const node of data.data) {
        const row = list.querySelector(`tr[data-id="${node.id}"]`);
        if (!row) { window.location.reload(); return; }
        setStatus(row.querySelector('[data-field="status"]'), node.status);
        row.querySelector('[data-field="error"]').textContent =
          node.status === "red" ? (node.last_error || "").slice(0, 200) : "";
      }
    }, 1000);
    socket("", (event) => { if (event.kind !== "logs") refresh(); });
    setInterval(refresh, 5000);  // a node that falls silent sends nothing: its red comes from time passing
  }

  // -- one node ---------------------------------------------------------------------
  const page = document.getElementById("node");
  if (!page) return;
  const nodeId = page.dataset.node;
  const history = JSON.parse(document.getElementById("node-history").textContent);
  const points = history.points;
  const gib = (bytes) => (bytes / 2 ** 30).toFixed(1) + " GiB";
  const graphs = {
    cpu: {value: (p) => p.cpu, max: () => 100, label: (p) => p.cpu.toFixed(0) + " %"},
    ram: {value: (p) => p.ram, max: (p) => p.ram_total, label: (p) => `${gib(p.ram)} of ${gib(p.ram_total)}`},
    gpu: {value: (p) => p.gpu, max: () => 100, label: (p) => p.gpu.toFixed(0) + " %"},
    vram: {value: (p) => p.vram, max: (p) => p.vram_total, label: (p) => `${gib(p.vram)} of ${gib(p.vram_total)}`},
  };

  function draw() {
    const last = points[points.length - 1];
    for (const [name, graph] of Object.entries(graphs)) {
      const canvas = page.querySelector(`canvas[data-graph="${name}"]`);
      const now = page.querySelector(`[data-now="${name}"]`);
      const usable = points.filter((p) => graph.value(p) !== null && graph.value(p) !== undefined);
      const ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      if (!usable.length) {
        now.textContent = (name === "gpu" || name === "vram") && last ? "absent (no GPU)" : "no data yet";
        canvas.dataset.points = "0";
        continue;
      }
      const top = Math.max(1, ...usable.map((p) => graph.max(p) || 0));
      ctx.strokeStyle = "#2f5bea"; ctx.lineWidth = 1.5; ctx.beginPath();
      usable.forEach((p, i) => {
        const x = usable.length === 1 ? canvas.width : (i / (usable.length - 1)) * canvas.width;
        const y = canvas.height - (graph.value(p) / top) * (canvas.height - 4) - 2;
        i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
      });
      ctx.stroke();
      canvas.dataset.points = String(usable.length);
      now.textContent = graph.label(usable[usable.length - 1]);
    }
  }

  const log = document.getElementById("log");
  const filters = document.getElementById("log-filters");
  const shown = () => new Set([...filters.querySelectorAll("input:checked")].map((i) => i.dataset.level));

  function addLine(line) {
    const row = document.createElement("div");
    const level = line.level === "CRITICAL" ? "ERROR" : line.level;
    row.className = "l-" + line.level;
    row.dataset.level = level;
    const time = document.createElement("span");
    time.className = "t";
    time.textContent = new Date(line.t * 1000).toLocaleTimeString() + " ";
    const lv = document.createElement("span");
    lv.className = "lv";
    lv.textContent = line.level.padEnd(8);
    row.append(time, lv, document.createTextNode(` ${line.logger}: ${line.message}`));
    row.hidden = !shown().has(level);
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(row);
    while (log.childElementCount > MAX_LINES) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  filters.addEventListener("change", () => {
    const levels = shown();
    for (const row of log.children) row.hidden = !levels.has(row.dataset.level);
  });

  const refreshState = throttled(async () => {
    const data = await state(window.location.pathname + "?format=json");
    if (!data) return;
    setStatus(document.getElementById("node-status"), data.status);
    for (const e of data.executors) {
      const cell = document.querySelector(`#node-executors tr[data-id="${e.id}"] [data-field="state"]`);
      if (cell) { cell.textContent = e.state; cell.className = "state state-" + e.state; }
    }
  }, 500);

  history.lines.forEach(addLine);
  draw();
  socket(`?node=${nodeId}`, (event) => {
    if (event.kind === "metrics") {
      points.push(event.point);
      if (points.length > MAX_POINTS) points.shift();
      draw();
    } else if (event.kind === "logs") {
      event.lines.forEach(addLine);
    } else {
      refreshState();
    }
  });
  setInterval(refreshState, 5000);
})();
