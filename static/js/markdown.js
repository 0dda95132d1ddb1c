// Markdown for OptimaChat's replies, built as DOM nodes: text only ever goes in through textContent and
// attributes are set one by one (a link's address only when it is http, https or mailto), so no HTML and no
// script from a model or a user can run, whatever the text holds. Code blocks are highlighted by a small
// tokenizer and get a Copy button. Thinking (<think>) and tool blocks (<tool_call>, <tool_response>) are
// cut out of the text first and shown as collapsible blocks.
(function () {
  "use strict";

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- thinking and tool blocks --------------------------------------------------------------------------
  const BLOCK = /<(think|tool_call|tool_response)>/;

  // [{kind: "text"|"think"|"tool_call"|"tool_response", text, open}] where open means not closed yet.
  function segments(text) {
    const out = [];
    let rest = text;
    for (;;) {
      const start = rest.match(BLOCK);
      if (!start) { if (rest) out.push({kind: "text", text: rest}); break; }
      if (start.index) out.push({kind: "text", text: rest.slice(0, start.index)});
      const kind = start[1];
      const body = rest.slice(start.index + start[0].length);
      const end = body.indexOf("</" + kind + ">");
      if (end < 0) { out.push({kind, text: body, open: true}); break; }
      out.push({kind, text: body.slice(0, end), open: false});
      rest = body.slice(end + kind.length + 3);
    }
    return out;
  }

  // -- code highlighting ----------------------------------------------------------------------------------
  const KEYWORDS = new Set(("and as assert async await break case catch class const continue def default del " +
    "do elif else enum except export extends false False finally fn for from func function go if impl import " +
    "in interface is lambda let loop match mod mut new nil None not null or package pass pub raise return " +
    "self static struct super switch this throw true True try type typeof use var void while with yield " +
    "select insert update delete where join into values create table").split(" "));
  const TOKEN = new RegExp([
    String.raw`(\/\/[^\n]*|\/\*[\s\S]*?\*\/|#[^\n]*|--[^\n]*)`,  // comments (#, -- and // families)
    String.raw`("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|` + "`(?:[^`\\\\]|\\\\.)*`)",  // strings
    String.raw`\b(\d+(?:\.\d+)?(?:e[+-]?\d+)?|0x[0-9a-f]+)\b`,  // numbers
    String.raw`\b([A-Za-z_][A-Za-z0-9_]*)\b`,  // words: keywords among them
  ].join("|"), "gi");
  const HASH_COMMENTS = /^(python|py|bash|sh|shell|zsh|ruby|rb|perl|r|yaml|yml|toml|ini|conf|dockerfile|make|makefile)$/i;
  const DASH_COMMENTS = /^(sql|lua|haskell|hs)$/i;

  function highlight(code, language) {
    const target = el("code", language ? "language-" + language.replace(/[^\w-]/g, "") : "");
    let last = 0;
    const plain = (to) => { if (to > last) target.append(document.createTextNode(code.slice(last, to))); };
    for (const match of code.matchAll(TOKEN)) {
      let kind = null;
      if (match[1] !== undefined) {
        const hash = match[1][0] === "#", dash = match[1].startsWith("--");
        if ((hash && !HASH_COMMENTS.test(language)) || (dash && !DASH_COMMENTS.test(language))) continue;
        kind = "tok-comment";
      } else if (match[2] !== undefined) kind = "tok-string";
      else if (match[3] !== undefined) kind = "tok-number";
      else if (KEYWORDS.has(match[4])) kind = "tok-keyword";
      if (!kind) continue;
      plain(match.index);
      target.append(el("span", kind, match[0]));
      last = match.index + match[0].length;
    }
    plain(code.length);
    return target;
  }

  function copyButton(getText, label) {
    const button = el("button", "copy", label || "Copy");
    button.type = "button";
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(getText());
        button.textContent = "Copied";
      } catch (e) {
        button.textContent = "Copy failed";
      }
      setTimeout(() => { button.textContent = label || "Copy"; }, 1500);
    });
    return button;
  }

  function codeBlock(code, language) {
    const wrap = el("div", "code-block");
    const head = el("div", "code-head", language || "code");
    head.append(copyButton(() => code));
    const pre = el("pre");
    pre.append(highlight(code, language || ""));
    wrap.append(head, pre);
    return wrap;
  }

  // -- inline -------------------------------------------------------------------------------------------
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;
  const INLINE = new RegExp([
    "(`+)([\\s\\S]*?[^`])\\1(?!`)",  // code span
    // Emphasis opens before a non-space and closes after one; underscores never inside a word (snake_case,
    // window.__name stay as they are).
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*|(?<!\\w)__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)",  // strong
    "~~(?=\\S)([\\s\\S]*?\\S)~~",  // strikethrough
    "\\*(?=[^*\\s])([^*]*?[^*\\s])\\*|(?<!\\w)_(?=[^_\\s])([^_]*?[^_\\s])_(?!\\w)",  // emphasis
    "!?\\[([^\\]\\n]*)\\]\\(\\s*<?([^\\s)>]*)>?(?:\\s+\"[^\"]*\")?\\s*\\)",  // link (an image shows as a link)
    "(https?:\\/\\/[^\\s<>()]+[^\\s<>().,;:!?'\"])",  // bare address
  ].join("|"), "g");

  function inline(text, parent) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
      last = m.index + m[0].length;
      if (m[1] !== undefined) parent.append(el("code", "", m[2].replace(/^ (.*) $/, "$1")));
      else if (m[3] !== undefined || m[4] !== undefined) inline(m[3] ?? m[4], parent.appendChild(el("strong")));
      else if (m[5] !== undefined) inline(m[5], parent.appendChild(el("del")));
      else if (m[6] !== undefined || m[7] !== undefined) inline(m[6] ?? m[7], parent.appendChild(el("em")));
      else if (m[8] !== undefined) {
        const address = m[9];
        if (SAFE_URL.test(address)) {
          const a = parent.appendChild(el("a"));
          a.href = address; a.rel = "noopener noreferrer nofollow"; a.target = "_blank";
          inline(m[8] || address, a);
        } else {
          parent.append(document.createTextNode(m[0]));  // javascript:, data: and the rest stay text
        }
      } else if (m[10] !== undefined) {
        const a = parent.appendChild(el("a", "", m[10]));
        a.href = m[10]; a.rel = "noopener noreferrer nofollow"; a.target = "_blank";
      }
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
    return parent;
  }

  // -- blocks -------------------------------------------------------------------------------------------
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const BULLET = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_RULE = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

  function cells(line) {
    return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
  }

  function blocks(text, parent) {
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    let paragraph = [];
    const flush = () => {
      if (paragraph.length) inline(paragraph.join("\n"), parent.appendChild(el("p")));
      paragraph = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = line.match(FENCE))) {
        flush();
        const fence = m[1];
        const code = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence)) code.push(lines[i++]);
        i++;  // the closing fence (absent while a reply is still streaming)
        parent.append(codeBlock(code.join("\n"), m[2]));
        continue;
      }
      if ((m = line.match(HEADING))) {
        flush();
        inline(m[2], parent.appendChild(el("h" + Math.min(m[1].length + 2, 6))));
        i++; continue;
      }
      if (RULE.test(line)) { flush(); parent.append(el("hr")); i++; continue; }
      if (/^ {0,3}>/.test(line)) {
        flush();
        const quoted = [];
        while (i < lines.length && /^ {0,3}>/.test(lines[i])) quoted.push(lines[i++].replace(/^ {0,3}> ?/, ""));
        blocks(quoted.join("\n"), parent.appendChild(el("blockquote")));
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
        flush();
        const table = parent.appendChild(el("table", "md-table"));
        const head = table.appendChild(el("thead")).appendChild(el("tr"));
        cells(line).forEach((c) => inline(c, head.appendChild(el("th"))));
        const body = table.appendChild(el("tbody"));
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          const row = body.appendChild(el("tr"));
          cells(lines[i++]).forEach((c) => inline(c, row.appendChild(el("td"))));
        }
        continue;
      }
      if ((m = line.match(BULLET))) {
        flush();
        const ordered = /\d/.test(m[2]);
        const list = parent.appendChild(el(ordered ? "ol" : "ul"));
        if (ordered && parseInt(m[2], 10) !== 1) list.start = parseInt(m[2], 10);
        const indent = m[1].length;
        while (i < lines.length) {
          const item = lines[i].match(BULLET);
          if (!item || item[1].length !== indent || /\d/.test(item[2]) !== ordered) break;
          const body = [item[3]];
          i++;
          // Lines indented under the item (a nested list, a continued line) belong to it.
          while (i < lines.length && lines[i].trim() && (/^\s+/.exec(lines[i]) || [""])[0].length > indent
                 && !(lines[i].match(BULLET) && lines[i].match(BULLET)[1].length === indent)) {
            body.push(lines[i++].slice(indent + 2));
          }
          const li = list.appendChild(el("li"));
          if (body.length === 1) inline(body[0], li); else blocks(body.join("\n"), li);
        }
        continue;
      }
      if (!line.trim()) { flush(); i++; continue; }
      paragraph.push(line);
      i++;
    }
    flush();
    return parent;
  }

  // -- a whole reply ---------------------------------------------------------------------------------------
  const LABELS = {think: "Thinking", tool_call: "Tool call", tool_response: "Tool result"};

  // Draw `text` into `container`. options: {finished, expand, opened: Set of block indexes the user opened}.
  // Returns what the run's status line needs: {thinking, tools, responding}.
  function render(container, text, options) {
    const opts = options || {};
    const parts = segments(text);
    const fragment = document.createDocumentFragment();
    const state = {thinking: false, tools: 0, responding: false};
    parts.forEach((part, index) => {
      if (part.kind === "text") {
        if (part.text.trim()) state.responding = true;
        blocks(part.text, fragment);
        return;
      }
      if (part.kind === "think" && part.open) state.thinking = true;
      if (part.kind === "tool_call") state.tools++;
      const details = el("details", "block block-" + part.kind.replace("_", "-"));
      details.dataset.index = String(index);
      // Open while the run goes on; folded when it finishes unless the user keeps them open.
      details.open = !opts.finished || opts.expand || (opts.opened && opts.opened.has(index));
      const summary = el("summary", "", LABELS[part.kind] + (part.open && !opts.finished ? "…" : ""));
      // Only the user's own clicks are remembered (the next redraw keeps what they opened or closed).
      summary.addEventListener("click", () => {
        if (!opts.opened) return;
        if (details.open) opts.opened.delete(index); else opts.opened.add(index);
      });
      details.append(summary);
      if (part.kind === "think") blocks(part.text.trim(), details.appendChild(el("div", "block-body")));
      else details.append(el("pre", "block-body", part.text.trim()));
      fragment.append(details);
    });
    container.replaceChildren(fragment);
    return state;
  }

  window.OptimaMarkdown = {render, segments, highlight, copyButton};
})();
