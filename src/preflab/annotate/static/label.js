// The labeling page: rank K responses by keyboard or drag, score 1-7, flag, note, submit or skip.
"use strict";
const $ = (id) => document.getElementById(id);
const LETTERS = "ABCDEFGHI";
let me = null, task = null, state = null;

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  if (r.status === 401) { location.href = "/login"; throw new Error("not logged in"); }
  const data = await r.json();
  if (!r.ok) throw new Error(`${data.field}: ${data.error}`);
  return data;
}

function say(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function setMode(m) { state.mode = m; $("mode").textContent = m; }

function render() {
  const cards = $("cards");
  cards.style.gridTemplateColumns = `repeat(${task.k}, minmax(0, 1fr))`;
  cards.replaceChildren(...task.responses.map((text, d) => {
    const card = document.createElement("article");
    card.className = "card" + (d === state.focus ? " focus" : "");
    card.dataset.d = d;
    card.draggable = true;
    const head = document.createElement("div");
    head.className = "head";
    const name = document.createElement("span");
    name.textContent = `Response ${LETTERS[d]}`;
    const rank = document.createElement("span");
    rank.className = "rank" + (state.ranks[d] ? " set" : "");
    rank.textContent = state.ranks[d] ? `rank ${state.ranks[d]}` : "unranked";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = state.scores[d] ? `score ${state.scores[d]}/7` : "no score";
    head.append(name, rank, score);
    const flags = document.createElement("div");
    flags.className = "flags";
    for (const f of state.flags[d]) {
      const s = document.createElement("span");
      s.textContent = f.replaceAll("_", " ");
      flags.append(s);
    }
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    card.append(head, flags, body);
    card.addEventListener("click", () => { state.focus = d; render(); });
    card.addEventListener("dragstart", (ev) => ev.dataTransfer.setData("text/plain", String(d)));
    card.addEventListener("dragover", (ev) => ev.preventDefault());
    card.addEventListener("drop", (ev) => { ev.preventDefault(); dropOn(Number(ev.dataTransfer.getData("text/plain")), d, ev.shiftKey); });
    return card;
  }));
  $("flaglist").replaceChildren(...me.flags.map((f, i) => {
    const li = document.createElement("li");
    li.textContent = `${(i + 1) % 10}: ${f.replaceAll("_", " ")}`;
    if (state.flags[state.focus].has(f)) li.className = "on";
    return li;
  }));
}

function dropOn(a, b, tie) {
  if (a === b) return;
  if (tie) { state.ranks[a] = state.ranks[b] || 1; render(); return; }
  // reorder: a goes just above b; ranks become 1..K in the new order
  const seq = [...Array(task.k).keys()].sort((x, y) => (state.ranks[x] || 99) - (state.ranks[y] || 99) || x - y)
    .filter((x) => x !== a);
  seq.splice(seq.indexOf(b), 0, a);
  seq.forEach((x, i) => { state.ranks[x] = i + 1; });
  render();
}

function order() {
  const missing = state.ranks.map((r, d) => (r ? null : LETTERS[d])).filter((x) => x);
  if (missing.length) throw new Error(`order: rank every response (missing: ${missing.join(", ")})`);
  const levels = [...new Set(state.ranks)].sort((x, y) => x - y);
  return levels.map((lv) => state.ranks.map((r, d) => (r === lv ? d : -1)).filter((d) => d >= 0));
}

async function submit() {
  let tiers;
  try { tiers = order(); } catch (e) { say(e.message, true); return; }
  const body = {order: tiers, scores: state.scores, flags: state.flags.map((s) => [...s]),
                note: $("note").value, time_s: Math.round(performance.now() - state.t0) / 1000};
  try {
    const r = await api(`/api/tasks/${task.task_id}/submit`, body);
    say(`${r.updated ? "Updated" : "Saved"} task ${task.task_id} (ranking ${r.ranking_id}).`);
    me.done += r.duplicate ? 0 : 1;
    $("done-count").textContent = me.done;
    await next();
  } catch (e) { say(e.message, true); }
}

async function skip() {
  try {
    await api(`/api/tasks/${task.task_id}/skip`, {});
    say(`Skipped task ${task.task_id}.`);
    await next();
  } catch (e) { say(e.message, true); }
}

async function next() {
  const r = await api("/api/task");
  task = r.task;
  $("note").value = "";
  if (!task) {
    $("task-id").textContent = "-";
    $("prompt").textContent = "No tasks left. Thank you!";
    $("cards").replaceChildren();
    state = null;
    return;
  }
  state = {ranks: Array(task.k).fill(null), scores: Array(task.k).fill(null),
           flags: Array.from({length: task.k}, () => new Set()), focus: 0, mode: "rank", t0: performance.now()};
  $("task-id").textContent = task.task_id;
  $("prompt").textContent = task.prompt;
  setMode("rank");
  render();
}

function onKey(ev) {
  if (ev.target === $("note")) {
    if (ev.key === "Escape") $("note").blur();
    return;
  }
  if (ev.key === "g" || ev.key === "?") { $("guidelines").classList.toggle("hidden"); return; }
  if (!state) return;
  const k = task.k, d = state.focus, digit = /^[0-9]$/.test(ev.key) ? Number(ev.key) : null;
  let handled = true;
  if (ev.key === "Escape") setMode("rank");
  else if (state.mode === "score" && digit !== null) {
    if (digit >= 1 && digit <= 7) state.scores[d] = digit;
    setMode("rank");
  } else if (state.mode === "flag" && digit !== null) {
    const f = me.flags[(digit + 9) % 10];
    if (state.flags[d].has(f)) state.flags[d].delete(f); else state.flags[d].add(f);
  } else if (ev.key === "ArrowRight") state.focus = (d + 1) % k;
  else if (ev.key === "ArrowLeft") state.focus = (d + k - 1) % k;
  else if (ev.key === "ArrowUp") state.ranks[d] = Math.max(1, (state.ranks[d] || k + 1) - 1);
  else if (ev.key === "ArrowDown") state.ranks[d] = Math.min(k, (state.ranks[d] || 0) + 1);
  else if (digit !== null && digit >= 1 && digit <= k) { state.ranks[d] = digit; state.focus = (d + 1) % k; }
  else if (ev.key === "Backspace" || ev.key === "Delete") state.ranks[d] = null;
  else if (ev.key === "r") setMode(state.mode === "score" ? "rank" : "score");
  else if (ev.key === "f") setMode(state.mode === "flag" ? "rank" : "flag");
  else if (ev.key === "n") { ev.preventDefault(); $("note").focus(); return; }
  else if (ev.key === "Enter") { ev.preventDefault(); submit(); return; }
  else if (ev.key === "s") { skip(); return; }
  else handled = false;
  if (handled) { ev.preventDefault(); render(); }
}

async function start() {
  me = await api("/api/me");
  $("who").textContent = me.name;
  $("project").textContent = me.project;
  $("done-count").textContent = me.done;
  const g = $("guidelines");
  g.innerHTML = me.guidelines_html || "<p>No guidelines for this project.</p>";  // server-rendered, escaped
  if (me.role === "admin") $("admin-link").classList.remove("hidden");
  $("show-guidelines").addEventListener("click", () => g.classList.toggle("hidden"));
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("logout").addEventListener("click", async () => { await api("/api/logout", {}); location.href = "/login"; });
  document.addEventListener("keydown", onKey);
  await next();
}

start().catch((e) => say(e.message, true));
