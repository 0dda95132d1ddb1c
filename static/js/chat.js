// OptimaChat: conversations through /optima/v1/conversations with a token this page asks its session for.
// What a user writes is put on the page as text; a model's reply goes through OptimaMarkdown, which builds
// DOM nodes from it and never parses HTML. The page's Content-Security-Policy is the second wall.
(function () {
  "use strict";
  const root = document.getElementById("chat");
  const $ = (id) => document.getElementById(id);
  const api = "/optima/v1";
  const md = window.OptimaMarkdown;
  const PARTS = [["system", "System"], ["tools", "Tools"], ["user", "User"], ["assistant", "AI"],
                 ["template", "Template"]];
  let token = null;
  let current = null;       // the open conversation
  let all = [];             // the user's conversations, newest activity first
  let running = null;       // AbortController of the reply being streamed
  let preferences = {expandBlocks: false};
  let contextView = "bar";
  let lastContext = null;

  async function freshToken() {
    const response = await fetch(root.dataset.tokenUrl, {method: "POST", headers: {"X-CSRFToken": root.dataset.csrf},
                                                         credentials: "same-origin"});
    if (!response.ok) throw new Error("Your session has ended: log in again.");
    token = (await response.json()).access_token;
  }

  async function call(method, path, body, signal) {
    if (!token) await freshToken();
    const send = () => fetch(api + path, {method, signal, headers: {"Authorization": "Bearer " + token,
      "Content-Type": "application/json"}, body: body === undefined ? undefined : JSON.stringify(body)});
    let response = await send();
    if (response.status === 401) { await freshToken(); response = await send(); }
    return response;
  }

  async function errorText(response) {
    try { return (await response.json()).error.message; } catch (e) { return "Error " + response.status; }
  }

  function notice(text) { $("notice").textContent = text || ""; }

  // -- models and conversations -------------------------------------------------------------------------
  async function loadModels() {
    const response = await call("GET", "/models");
    const select = $("model");
    select.replaceChildren();
    if (!response.ok) { notice(await errorText(response)); return; }
    for (const m of (await response.json()).chat_models) {
      const option = document.createElement("option");
      option.value = m.id; option.textContent = m.name || m.id;
      select.append(option);
    }
    if (!select.options.length) notice("No model is online right now.");
  }

  async function loadList() {
    const search = $("search").value.trim();
    const response = await call("GET", "/conversations?returnCount=200" +
                                (search ? "&search=" + encodeURIComponent(search) : ""));
    if (!response.ok) { notice(await errorText(response)); return; }
    all = (await response.json()).data;
    drawList();
  }

  function drawList() {
    const list = $("conversations");
    list.replaceChildren();
    for (const c of all) {
      const item = document.createElement("li");
      item.textContent = c.title || "New chat";
      item.dataset.id = c.id;
      if (current && c.id === current.id) item.classList.add("active");
      item.addEventListener("click", () => { if (!running) open(c.id); });
      list.append(item);
    }
  }

  // A conversation's new title, in the list and, when it is the open one, in the bar.
  function setTitle(id, title) {
    const listed = all.find((c) => c.id === id);
    if (listed) { listed.title = title; drawList(); }
    if (current && current.id === id) { current.title = title; $("title").textContent = title || "New chat"; }
  }

  // -- messages -----------------------------------------------------------------------------------------
  function mark(item, m) {
    item.querySelector(".mark")?.remove();
    if (m.status === "stopped") item.append(Object.assign(document.createElement("p"),
                                                          {className: "mark", textContent: "Stopped"}));
    if (m.status === "error") item.append(Object.assign(document.createElement("p"),
      {className: "mark", textContent: "Ended by an error: " + (m.error || "the reply was cut short") +
                                       ". What arrived is kept."}));
  }

  function drawMessage(m) {
    const item = document.createElement("li");
    item.className = m.role + (m.status && m.status !== "complete" ? " " + m.status : "");
    const body = document.createElement("div");
    body.className = "content";
    item.append(body);
    if (m.role === "assistant") {
      item.opened = new Set();
      item.text = m.content;
      item.calls = new Map();
      for (const c of m.toolCalls || []) drawCall(item, c, true);
      md.render(body, m.content, {finished: true, expand: preferences.expandBlocks, opened: item.opened});
      const tools = document.createElement("div");
      tools.className = "message-tools";
      if (m.modelId) tools.append(Object.assign(document.createElement("span"), {className: "small muted",
                                                                                 textContent: m.modelId}));
      tools.append(md.copyButton(() => item.text, "Copy reply"));
      item.append(tools);
    } else {
      body.textContent = m.content;
    }
    mark(item, m);
    $("messages").append(item);
    return item;
  }

  // An MCP tool call the gateway made: a block that opens to its input and output, all put on the page as text.
  function drawCall(item, c, finished) {
    let list = item.querySelector(".tool-calls");
    if (!list) {
      list = Object.assign(document.createElement("div"), {className: "tool-calls"});
      item.prepend(list);
    }
    let block = item.calls.get(c.id);
    if (!block) {
      block = document.createElement("details");
      block.className = "tool-call";
      block.open = preferences.expandBlocks;
      block.append(document.createElement("summary"));
      for (const label of ["Input", "Output"]) {
        block.append(Object.assign(document.createElement("div"), {className: "small muted", textContent: label}));
        block.append(document.createElement("pre"));
      }
      item.calls.set(c.id, block);
      list.append(block);
    }
    const [input, output] = block.querySelectorAll("pre");
    input.textContent = c.arguments || "{}";
    const done = finished || c.output !== undefined;
    output.textContent = done ? (c.output ?? "") : "…";
    block.classList.toggle("failed", Boolean(c.error));
    block.querySelector("summary").textContent = `${c.server_label} · ${c.name}` + (!done ? " (running…)"
      : c.error ? " (failed)" : c.duration_ms !== undefined ? ` (${(c.duration_ms / 1000).toFixed(1)}s)` : "");
  }

  function redrawReplies() {
    for (const item of $("messages").querySelectorAll("li.assistant:not(.streaming)")) {
      md.render(item.querySelector(".content"), item.text || "",
                {finished: true, expand: preferences.expandBlocks, opened: item.opened});
    }
  }

  async function open(id) {
    const response = await call("GET", "/conversations/" + encodeURIComponent(id));
    if (!response.ok) { notice(await errorText(response)); return; }
    current = await response.json();
    $("title").textContent = current.title || "New chat";
    $("messages").replaceChildren();
    current.messages.forEach(drawMessage);
    if (current.modelId && [...$("model").options].some((o) => o.value === current.modelId)) {
      $("model").value = current.modelId;
    }
    $("regenerate").hidden = !current.messages.length;
    $("run-status").textContent = "";
    notice("");
    drawList();
    drawSettings();
    drawToolsCount();
    if (!$("tools-panel").hidden) drawTools();
    loadContext();
  }

  async function newChat() {
    const response = await call("POST", "/conversations", {modelId: $("model").value || ""});
    if (!response.ok) { notice(await errorText(response)); return null; }
    const created = await response.json();
    all.unshift(created);
    await open(created.id);
    return created;
  }

  // The run's status line: what the model is doing now, and at the end how long it took.
  function status(state, startedAt, finished, ending) {
    const seconds = ((performance.now() - startedAt) / 1000).toFixed(1);
    let text;
    if (ending === "stopped") text = `Stopped after ${seconds}s`;
    else if (ending === "error") text = `Ended by an error after ${seconds}s`;
    else if (finished) text = state.tools ? `Used ${state.tools} tool${state.tools === 1 ? "" : "s"} in ${seconds}s`
                                          : `Finished in ${seconds}s`;
    else if (state.thinking) text = "Thinking...";
    else if (state.tools && !state.responding) text = `Using tools (${state.tools})`;
    else text = "Responding...";
    $("run-status").textContent = text;
  }

  async function send(body) {
    if (running) return;
    if (!current && !(await newChat())) return;
    const conversation = current;
    if (body.content) drawMessage({role: "user", content: body.content});
    if (body.regenerate) {
      const last = $("messages").lastElementChild;
      if (last && last.classList.contains("assistant")) last.remove();
    }
    const reply = drawMessage({role: "assistant", content: "", modelId: $("model").value});
    const content = reply.querySelector(".content");
    reply.classList.add("streaming");
    const controller = running = new AbortController();
    setBusy(true);
    const startedAt = performance.now();
    let state = {thinking: false, tools: 0, responding: false};
    let frame = 0;
    let mcpRunning = 0;
    const draw = (finished, ending) => {
      frame = 0;
      state = md.render(content, reply.text, {finished, expand: preferences.expandBlocks, opened: reply.opened});
      state.tools += reply.calls.size;  // the gateway's MCP calls, next to tool blocks in the text itself
      if (mcpRunning) state.responding = false;
      status(state, startedAt, finished, ending);
    };
    // The reply is over (done, error or stopped): fold its blocks, mark it and free the composer. The model's
    // title may still come on the same stream, but nothing waits for it.
    let settled = false;
    const settle = (outcome) => {
      if (settled) return;
      settled = true;
      if (frame) cancelAnimationFrame(frame);
      reply.classList.remove("streaming");
      if (reply.isConnected) {
        draw(true, outcome && outcome.status);
        if (outcome) {
          if (outcome.status && outcome.status !== "complete") reply.classList.add(outcome.status);
          mark(reply, outcome);
        }
      }
      if (running === controller) running = null;
      setBusy(false);
    };
    $("run-status").textContent = "Waiting for the model...";
    let outcome = null;
    try {
      const response = await call("POST", "/conversations/" + conversation.id + "/messages",
                                  {...body, modelId: $("model").value}, controller.signal);
      if (!response.ok) { reply.remove(); notice(await errorText(response)); $("run-status").textContent = "";
                          return; }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          if (!line.startsWith("data: ")) continue;
          const event = JSON.parse(line.slice(6));
          if (event.type === "delta") {
            reply.text += event.content;
            if (!frame) frame = requestAnimationFrame(() => draw(false));
          } else if (event.type === "tool_start") {
            mcpRunning += event.calls.length;
            for (const c of event.calls) drawCall(reply, c, false);
            draw(false);
          } else if (event.type === "tool_result") {
            mcpRunning = Math.max(0, mcpRunning - event.calls.length);
            for (const c of event.calls) drawCall(reply, c, true);
            draw(false);
          } else if (event.type === "done") {
            settle(outcome = event.message);
          } else if (event.type === "error") {
            notice(event.error.message);
            settle(outcome = event.message);
          } else if (event.type === "title") {
            setTitle(conversation.id, event.title);
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") { if (!outcome) outcome = {status: "stopped"}; }
      else { outcome = outcome || {status: "error", error: String(e.message || e)}; notice(String(e.message || e)); }
    } finally {
      settle(outcome);
      await loadList();
      if (current && current.id === conversation.id) {
        const shown = all.find((c) => c.id === conversation.id);
        if (shown) $("title").textContent = shown.title || "New chat";
        loadContext();
      }
    }
  }

  function setBusy(busy) {
    $("send").hidden = busy; $("stop").hidden = !busy;
    $("regenerate").hidden = busy || !$("messages").children.length;
  }

  // -- settings panel and the context-window visualiser -----------------------------------------------------
  function drawSettings() {
    if (!current) return;
    $("system-prompt").value = current.systemPrompt ?? "";
    $("temperature").value = current.temperature ?? 0.7;
    $("temperature-value").textContent = Number($("temperature").value).toFixed(1);
    $("settings-saved").textContent = "";
  }

  async function saveSettings(changes) {
    if (!current) await newChat();
    if (!current) return;
    const response = await call("PATCH", "/conversations/" + current.id, changes);
    if (!response.ok) { $("settings-saved").textContent = await errorText(response); return; }
    Object.assign(current, await response.json());
    drawSettings();
    $("settings-saved").textContent = "Saved: applies from the next message.";
    loadContext();
  }

  async function loadContext() {
    if (!current || !$("model").value || $("settings").hidden) return;
    const query = "?modelId=" + encodeURIComponent($("model").value);
    const response = await call("GET", "/conversations/" + current.id + "/context" + query);
    if (!response.ok) { $("context-total").textContent = await errorText(response); return; }
    lastContext = await response.json();
    drawContext();
  }

  function drawContext() {
    const c = lastContext;
    const bar = $("context"), legend = $("context-legend");
    bar.replaceChildren(); legend.replaceChildren();
    if (!c) return;
    const window_ = c.window || c.used || 1;
    bar.className = "context-" + contextView;
    $("context-total").textContent = c.window
      ? `${c.used} of ${c.window} tokens` + (c.countedWith === "estimate" ? " (estimated)" : "")
      : `${c.used} tokens (estimated; this upstream does not say its window)`;
    if (contextView === "bar") {
      for (const [part] of PARTS) {
        if (!c[part]) continue;
        const piece = document.createElement("span");
        piece.className = "part-" + part;
        piece.style.width = Math.max(100 * c[part] / window_, 0.5) + "%";
        bar.append(piece);
      }
    } else {
      // 100 cells, each 1% of the window, coloured by the part that fills it.
      const cells = [];
      for (const [part] of PARTS) for (let n = c[part] ? Math.max(Math.round(100 * c[part] / window_), 1) : 0; n > 0; n--) cells.push(part);
      for (let i = 0; i < 100; i++) {
        const cell = document.createElement("span");
        cell.className = "part-" + (cells[i] || "free");
        bar.append(cell);
      }
    }
    for (const [part, label] of [...PARTS, ["free", "Free"]]) {
      const value = part === "free" ? c.free : c[part];
      if (value === null || value === undefined) continue;
      const item = document.createElement("li");
      item.dataset.part = part;
      const swatch = document.createElement("span");
      swatch.className = "swatch part-" + part;
      item.append(swatch, document.createTextNode(`${label} ${value}`));
      legend.append(item);
    }
  }

  // -- wiring -------------------------------------------------------------------------------------------
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const content = $("input").value;
    if (!content.trim()) return;
    $("input").value = "";
    send({content});
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (running) running.abort(); });
  $("regenerate").addEventListener("click", () => send({regenerate: true}));
  $("new-chat").addEventListener("click", () => {
    if (running) return;
    current = null; $("messages").replaceChildren(); $("title").textContent = ""; $("run-status").textContent = "";
    $("regenerate").hidden = true; drawList(); newChat();
  });
  let searching = 0;
  $("search").addEventListener("input", () => {  // on the server: titles and everything said
    clearTimeout(searching);
    searching = setTimeout(loadList, 200);
  });
  $("model").addEventListener("change", () => {
    if (current && !running) saveSettings({modelId: $("model").value}).then(() => { $("settings-saved").textContent = ""; });
  });
  $("rename").addEventListener("click", async () => {
    if (!current) return;
    const title = window.prompt("New title", current.title || "");
    if (title === null || !title.trim()) return;
    const response = await call("PATCH", "/conversations/" + current.id, {title});
    if (!response.ok) { notice(await errorText(response)); return; }
    setTitle(current.id, (await response.json()).title);
    await loadList();
  });
  $("delete").addEventListener("click", async () => {
    if (!current || running || !window.confirm("Delete this conversation?")) return;
    const response = await call("DELETE", "/conversations/" + current.id);
    if (!response.ok) { notice(await errorText(response)); return; }
    current = null;
    $("messages").replaceChildren(); $("title").textContent = ""; $("run-status").textContent = "";
    $("regenerate").hidden = true;
    await loadList();
  });
  // -- the tools panel: which MCP servers (or single tools) this conversation uses -------------------------
  async function drawTools() {
    const box = $("mcp-tools");
    const response = await call("GET", "/chat/tools");
    box.replaceChildren();
    if (!response.ok) { box.textContent = await errorText(response); return; }
    const servers = (await response.json()).data;
    if (!servers.length) { box.textContent = "No MCP servers are available to Chat."; return; }
    const chosen = new Set(current ? current.mcpTools || [] : []);
    for (const s of servers) {
      const group = Object.assign(document.createElement("fieldset"), {className: "tool-server"});
      const all = Object.assign(document.createElement("input"), {type: "checkbox", checked: chosen.has(s.server)});
      all.dataset.choice = s.server;
      const legend = document.createElement("label");
      legend.className = "check";
      legend.append(all, ` ${s.server} (all ${s.tools.length} tools)`);
      group.append(legend);
      for (const t of s.tools) {
        const one = Object.assign(document.createElement("input"), {type: "checkbox",
                                                                    checked: chosen.has(s.server) || chosen.has(t.name),
                                                                    disabled: chosen.has(s.server)});
        one.dataset.choice = t.name;
        const label = Object.assign(document.createElement("label"), {className: "check small", title: t.description});
        label.append(one, ` ${t.tool}`);
        const about = Object.assign(document.createElement("div"), {className: "muted small tool-about",
                                                                    textContent: t.description});
        group.append(label, about);
      }
      box.append(group);
    }
  }

  async function saveTools() {
    if (!current) await newChat();
    if (!current) return;
    const chosen = [];
    for (const input of $("mcp-tools").querySelectorAll("input[data-choice]:checked:not(:disabled)")) {
      chosen.push(input.dataset.choice);
    }
    const response = await call("PATCH", "/conversations/" + current.id, {mcpTools: chosen});
    if (!response.ok) { $("tools-saved").textContent = await errorText(response); return; }
    Object.assign(current, await response.json());
    $("tools-saved").textContent = chosen.length ? "Saved: the model may use these from the next message."
                                                 : "Saved: no tools.";
    drawToolsCount();
    await drawTools();
  }

  function drawToolsCount() {
    const n = current && current.mcpTools ? current.mcpTools.length : 0;
    $("tools-toggle").textContent = n ? `Tools (${n})` : "Tools";
  }

  $("mcp-tools").addEventListener("change", (e) => { if (e.target.dataset.choice) saveTools(); });
  $("tools-toggle").addEventListener("click", () => {
    const panel = $("tools-panel");
    panel.hidden = !panel.hidden;
    $("tools-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    $("tools-saved").textContent = "";
    if (!panel.hidden) drawTools();
  });

  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    drawSettings();
    loadContext();
  });
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(1);
  });
  $("settings-save").addEventListener("click", () => saveSettings({systemPrompt: $("system-prompt").value,
                                                                   temperature: Number($("temperature").value)}));
  $("system-clear").addEventListener("click", () => { $("system-prompt").value = ""; });
  $("context-view").addEventListener("click", () => {
    contextView = contextView === "bar" ? "grid" : "bar";
    $("context-view").textContent = contextView === "bar" ? "Grid" : "Bar";
    drawContext();
  });
  $("expand-blocks").addEventListener("change", async () => {
    const response = await call("PATCH", "/preferences", {expandBlocks: $("expand-blocks").checked});
    if (response.ok) preferences = await response.json();
    redrawReplies();
  });

  (async () => {
    try {
      const response = await call("GET", "/preferences");
      if (response.ok) preferences = await response.json();
      $("expand-blocks").checked = preferences.expandBlocks;
      await loadModels();
      await loadList();
      if (all.length) await open(all[0].id);
    } catch (e) { notice(String(e.message || e)); }
  })();
})();
