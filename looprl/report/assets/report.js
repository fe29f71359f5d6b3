// The trajectory viewer: list, filter and open the evaluation episodes embedded in the page.
// Everything from a record is inserted as text (textContent), never parsed as HTML.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const byId = new Map(data.episodes.map((e) => [e.id, e]));
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  for (const name of [...new Set(data.episodes.map((e) => e.eval))]) {
    const option = el("option", "", name);
    option.value = name;
    $("f-eval").appendChild(option);
  }

  function matches(e) {
    const evalName = $("f-eval").value, outcome = $("f-outcome").value;
    const text = $("f-text").value.trim().toLowerCase();
    return (!evalName || e.eval === evalName)
      && (!outcome || (outcome === "success") === Boolean(e.success))
      && (!text || String(e.seed) === text || String(e.task_id).toLowerCase().includes(text));
  }

  function renderList() {
    const body = $("episodes").tBodies[0];
    body.replaceChildren();
    const shown = data.episodes.filter(matches);
    for (const e of shown) {
      const row = el("tr", e.success ? "ok" : "fail");
      row.dataset.id = e.id;
      for (const v of [e.eval, e.seed, e.task_id, e.success ? "✓" : "✗", fmt(e.return), e.turns, e.tokens]) {
        row.appendChild(el("td", "", String(v)));
      }
      row.addEventListener("click", () => {
        const hash = new URLSearchParams(location.hash.slice(1));
        hash.set("episode", e.id);
        location.hash = hash.toString();
      });
      body.appendChild(row);
    }
    $("f-count").textContent = shown.length + " of " + data.episodes.length + " episodes";
    markOpen();
  }

  const fmt = (v) => (typeof v === "number" ? Number(v.toPrecision(4)).toString() : String(v));

  function openFromHash() {
    const e = byId.get(openId());
    if (e) showEpisode(e);
    markOpen();
  }

  const openId = () => new URLSearchParams(location.hash.slice(1)).get("episode");

  function markOpen() {
    for (const row of $("episodes").tBodies[0].rows) row.classList.toggle("open", row.dataset.id === openId());
  }

  function showEpisode(e) {
    const panel = $("episode");
    panel.replaceChildren();
    panel.dataset.id = e.id;
    panel.appendChild(el("h3", "", e.eval + " · seed " + e.seed + " · " + e.task_id));
    const facts = el("p", "facts");
    facts.textContent = [e.success ? "success" : "failure", "return " + fmt(e.return), e.turns + " turns",
      e.tokens + " sampled tokens", e.truncated ? "truncated" : "not truncated"].join(" · ");
    panel.appendChild(facts);
    if (!Array.isArray(e.messages)) {
      panel.appendChild(el("p", "missing", "This record holds the episode's summary only: the evaluation "
        + "did not record its messages (the model's text, tool calls and tool results)."));
      return;
    }
    const turns = splitTurns(e.messages);
    if (turns.prompt.length) {
      const details = el("details", "prompt");
      details.appendChild(el("summary", "", "prompt (" + turns.prompt.length + " messages)"));
      for (const msg of turns.prompt) details.appendChild(message(msg.role, msg.content));
      panel.appendChild(details);
    }
    turns.turns.forEach((turn, i) => panel.appendChild(renderTurn(turn, i + 1)));
  }

  // A turn is an assistant message and the messages the environment answered it with.
  function splitTurns(messages) {
    const prompt = [], turns = [];
    for (const msg of messages) {
      if (msg.role === "assistant") turns.push({ action: msg, replies: [] });
      else if (turns.length) turns[turns.length - 1].replies.push(msg);
      else prompt.push(msg);
    }
    return { prompt, turns };
  }

  const CALL = /<tool_call>([\s\S]*?)(<\/tool_call>|$)/g;

  function renderTurn(turn, n) {
    const box = el("div", "turn");
    box.dataset.turn = String(n);
    box.appendChild(el("h4", "", "turn " + n));
    const content = String(turn.action.content || "");
    const text = content.replace(CALL, "").trim();
    if (text) box.appendChild(message("assistant", text, "model-text"));
    for (const call of content.matchAll(CALL)) box.appendChild(message("tool call", call[1].trim(), "tool-call"));
    for (const call of turn.action.tool_calls || []) {
      const fn = call.function || call;
      box.appendChild(message("tool call", fn.name + " " + (typeof fn.arguments === "string"
        ? fn.arguments : JSON.stringify(fn.arguments)), "tool-call"));
    }
    for (const reply of turn.replies) {
      const label = reply.role === "tool" ? "tool result" + (reply.name ? " (" + reply.name + ")" : "") : reply.role;
      box.appendChild(message(label, reply.content, reply.role === "tool" ? "tool-result" : "observation"));
    }
    return box;
  }

  function message(label, content, cls) {
    const box = el("div", "msg " + (cls || label));
    box.appendChild(el("span", "role", label));
    box.appendChild(el("pre", "", typeof content === "string" ? content : JSON.stringify(content, null, 1)));
    return box;
  }

  // `#eval=final/sampled&outcome=failure&q=calc:2&episode=final/sampled/3`: a view that can be linked to.
  const params = new URLSearchParams(location.hash.slice(1));
  for (const [key, id] of [["eval", "f-eval"], ["outcome", "f-outcome"], ["q", "f-text"]]) {
    if (params.has(key)) $(id).value = params.get(key);
  }
  for (const id of ["f-eval", "f-outcome", "f-text"]) $(id).addEventListener("input", renderList);
  window.addEventListener("hashchange", openFromHash);
  renderList();
  openFromHash();
})();
