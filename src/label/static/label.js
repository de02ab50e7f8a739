// The labeling page: one item at a time from /api/next, submitted to /api/labels.
// Every text from the server lands through el()/textContent, never as HTML.
"use strict";

const data = pageData();
const $ = (id) => document.getElementById(id);
let item = null;        // the item shown
let shownAt = 0;        // when it was shown (ms)
let pending = null;     // client id of the submission in flight: a retry reuses it
let pendingAnswer = null; // the answer that client id was made for
let selected = 0;       // rank page: the selected card's position
let busy = false;

function status(text, cls) {
  const s = $("status");
  s.textContent = text || "";
  s.className = "status " + (cls || "");
}

function renderPrompt(p) {
  const box = $("prompt");
  box.replaceChildren();
  if (Array.isArray(p)) {
    for (const m of p) {
      box.append(el("div", { class: "msg" }, el("span", { class: "role" }, String(m.role) + ":"),
        el("span", { class: "text" }, typeof m.content === "string" ? m.content : JSON.stringify(m.content))));
    }
  } else {
    box.append(el("div", { class: "text" }, String(p)));
  }
}

// ---- rank ----------------------------------------------------------------
function cards() { return Array.from(document.querySelectorAll("#work .resp")); }

function renumber() {
  let rank = 0;
  cards().forEach((c, pos) => {
    const tie = c.querySelector("input.tie");
    if (pos === 0) { tie.checked = false; tie.disabled = true; } else { tie.disabled = false; }
    if (!(pos > 0 && tie.checked)) rank = pos;
    c.dataset.rank = rank;
    c.classList.toggle("tied", pos > 0 && tie.checked);
    c.querySelector(".rank").textContent = "#" + (rank + 1);
    c.classList.toggle("selected", pos === selected);
  });
}

function renderRank(it) {
  const work = $("work");
  work.replaceChildren();
  it.responses.forEach((r, pos) => {
    const score = el("select", { class: "score", "aria-label": "score 1 to 7" },
      el("option", { value: "" }, "score –"), [1, 2, 3, 4, 5, 6, 7].map((n) => el("option", { value: String(n) }, String(n))));
    const flags = el("div", { class: "flags" }, data.flags.map((f) =>
      el("label", {}, el("input", { type: "checkbox", class: "flag", value: f.key }), " " + f.text)));
    const card = el("div", { class: "card resp", draggable: "true", dataset: { index: String(r.index) } },
      el("div", { class: "rank" }, "#" + (pos + 1)),
      el("div", { class: "row controls" },
        el("label", {}, el("input", { type: "checkbox", class: "tie", onchange: renumber }), " tied with the one above"),
        el("span", { class: "grow" }), score),
      el("div", { class: "text body" }, r.text),
      flags);
    card.addEventListener("click", () => { selected = cards().indexOf(card); renumber(); });
    card.addEventListener("dragstart", (e) => { card.classList.add("dragging"); e.dataTransfer.effectAllowed = "move"; });
    card.addEventListener("dragend", () => { card.classList.remove("dragging"); selected = cards().indexOf(card); renumber(); });
    work.append(card);
  });
  selected = 0;
  renumber();
}

function dropTarget(y) {
  return cards().filter((c) => !c.classList.contains("dragging")).find((c) => {
    const b = c.getBoundingClientRect();
    return y < b.top + b.height / 2;
  });
}

function moveSelected(delta) {
  const cs = cards();
  const to = selected + delta;
  if (to < 0 || to >= cs.length) return;
  const c = cs[selected];
  if (delta < 0) cs[to].before(c); else cs[to].after(c);
  selected = to;
  renumber();
}

function rankPayload() {
  const k = data.k;
  const ranking = new Array(k), scores = new Array(k).fill(null), flags = Array.from({ length: k }, () => []);
  for (const c of cards()) {
    const i = Number(c.dataset.index);
    ranking[i] = Number(c.dataset.rank);
    const s = c.querySelector("select.score").value;
    scores[i] = s === "" ? null : Number(s);
    flags[i] = Array.from(c.querySelectorAll("input.flag:checked"), (x) => x.value);
  }
  return { ranking, scores, flags };
}

// ---- compare and demonstrate ------------------------------------------------
function renderCompare(it) {
  const side = (name, text) => el("div", { class: "card" }, el("div", { class: "caption" }, name), el("div", { class: "text body" }, text));
  const choices = [["left", "Left is better ←"], ["right", "Right is better →"], ["tie", "Tie (t)"], ["both_bad", "Both bad (b)"]];
  $("work").replaceChildren(
    el("div", { class: "compare" }, side("Left", it.left), side("Right", it.right)),
    el("div", { class: "row" }, choices.map(([c, text]) => el("button", { class: "choice", dataset: { choice: c }, onclick: () => send({ choice: c }) }, text))));
  $("submit").hidden = true;
}

function renderDemonstrate() {
  const area = el("textarea", { id: "demo-text", rows: "8", placeholder: "Write the response an ideal assistant would give." });
  $("work").replaceChildren(el("label", { class: "caption", for: "demo-text" }, "Your response"), area);
  area.focus();
}

// ---- flow ------------------------------------------------------------------
function show(resp) {
  const p = resp.progress;
  $("progress").textContent = `done ${p.done} · left ${p.remaining}`;
  $("undo").disabled = $("undo-empty").disabled = !resp.can_undo;
  item = resp.item;
  pending = null;
  pendingAnswer = null;
  $("skip-reason").value = "";
  if (!item) { $("item").hidden = true; $("empty").hidden = false; return; }
  $("empty").hidden = true;
  $("item").hidden = false;
  renderPrompt(item.prompt);
  if (data.kind === "rank") renderRank(item);
  else if (data.kind === "compare") renderCompare(item);
  else renderDemonstrate();
  shownAt = Date.now();
}

async function load() {
  try { show(await api("/api/next")); } catch (e) { status(e.message, "error"); }
}

async function send(fields) {
  if (!item || busy) return;
  busy = true;
  // One client id per answer: a retry of the same answer reuses it (stored once), a
  // changed answer gets a new one (the server refuses an id reused for another).
  const answer = JSON.stringify(fields);
  if (!pending || pendingAnswer !== answer) { pending = clientId(); pendingAnswer = answer; }
  const body = Object.assign({ client_id: pending, item_id: item.id, seconds: (Date.now() - shownAt) / 1000 }, fields);
  try {
    await api("/api/labels", body);
    status(fields.skip ? "Skipped." : "Saved.", "ok");
    await load();
  } catch (e) {
    // A 4xx will not change on retry: forget the id. A network error keeps it, so the
    // next try cannot store the label twice.
    if (e.status && e.status < 500) pending = null;
    status(e.message, "error");
  } finally {
    busy = false;
  }
}

function submit() {
  if (data.kind === "rank") send(rankPayload());
  else if (data.kind === "demonstrate") send({ text: $("demo-text").value });
}

function skip() {
  const reason = $("skip-reason").value.trim();
  if (!reason) { status("Type a reason to skip, then press Skip (or Enter).", "error"); $("skip-reason").focus(); return; }
  send({ skip: reason });
}

async function undo() {
  try { await api("/api/undo", {}); status("Undone: the item is back.", "ok"); await load(); }
  catch (e) { status(e.message, "error"); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);
  $("undo-empty").addEventListener("click", undo);
  $("work").addEventListener("dragover", (e) => {
    const dragging = document.querySelector(".resp.dragging");
    if (!dragging) return;
    e.preventDefault();
    const after = dropTarget(e.clientY);
    if (after) after.before(dragging); else $("work").append(dragging);
  });
  $("work").addEventListener("drop", (e) => { e.preventDefault(); renumber(); });
  $("skip-reason").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); skip(); } });
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type === "text") || t.tagName === "SELECT");
    if (data.kind === "demonstrate" && t && t.tagName === "TEXTAREA") {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); }
      if (e.key === "Escape") t.blur();
      return;
    }
    if (typing || e.altKey || e.ctrlKey || e.metaKey || !item) return;
    const key = e.key;
    if (key === "u") { e.preventDefault(); undo(); return; }
    if (key === "s") { e.preventDefault(); $("skip-reason").focus(); return; }
    if (data.kind === "compare") {
      const c = { ArrowLeft: "left", ArrowRight: "right", t: "tie", b: "both_bad" }[key];
      if (c) { e.preventDefault(); send({ choice: c }); }
      return;
    }
    if (data.kind !== "rank") return;
    const n = cards().length;
    if (key === "Enter") { e.preventDefault(); submit(); }
    else if ((key === "ArrowDown" && e.shiftKey) || key === "J") { e.preventDefault(); moveSelected(1); }
    else if ((key === "ArrowUp" && e.shiftKey) || key === "K") { e.preventDefault(); moveSelected(-1); }
    else if (key === "ArrowDown" || key === "j") { e.preventDefault(); selected = Math.min(n - 1, selected + 1); renumber(); }
    else if (key === "ArrowUp" || key === "k") { e.preventDefault(); selected = Math.max(0, selected - 1); renumber(); }
    else if (key === "t") { const tie = cards()[selected].querySelector("input.tie"); if (!tie.disabled) { tie.checked = !tie.checked; renumber(); } }
    else if (/^[1-7]$/.test(key)) { cards()[selected].querySelector("select.score").value = key; }
  });
  load();
});
