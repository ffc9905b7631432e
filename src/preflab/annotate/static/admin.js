// The admin page: progress, per-labeler numbers, agreement per slice, adjudication, notes. Refreshes every 5 s.
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 3) => (v === null || v === undefined ? "-" : (Number.isInteger(v) ? String(v) : v.toFixed(digits)));

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  if (r.status === 401) { location.href = "/login"; throw new Error("not logged in"); }
  const data = await r.json();
  if (!r.ok) throw new Error(`${data.field}: ${data.error}`);
  return data;
}

function row(cells, id) {
  const tr = document.createElement("tr");
  if (id) tr.id = id;
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c;
    tr.append(td);
  }
  return tr;
}

function ranksToOrder(ranks) {
  const levels = [...new Set(ranks)].sort((a, b) => a - b);
  return levels.map((lv) => ranks.map((r, i) => (r === lv ? i : -1)).filter((i) => i >= 0));
}

async function adjudicate(item, ranks) {
  try {
    await api("/api/admin/adjudicate", {prompt_id: item.prompt_id, candidate_ids: item.candidate_ids,
                                         order: ranksToOrder(ranks)});
    $("status").textContent = `Adjudicated prompt ${item.prompt_id}.`;
    await load();
  } catch (e) { $("status").textContent = e.message; }
}

function disagreement(item) {
  const box = document.createElement("div");
  box.className = "disagreement";
  const p = document.createElement("p");
  p.textContent = `Prompt #${item.prompt_id} (agreement ${fmt(item.agreement, 2)}): ${item.prompt}`;
  const ol = document.createElement("ol");
  for (const text of item.responses) {
    const li = document.createElement("li");
    li.textContent = text;
    ol.append(li);
  }
  box.append(p, ol);
  for (const [name, ranks] of Object.entries(item.ranks)) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = `use ${name}: ${ranks.map((r) => r + 1).join(",")}`;
    b.addEventListener("click", () => adjudicate(item, ranks));
    box.append(b, " ");
  }
  const input = document.createElement("input");
  input.placeholder = "ranks, e.g. 1,2,2,3";
  input.setAttribute("aria-label", "final ranks");
  const go = document.createElement("button");
  go.type = "button";
  go.textContent = "adjudicate";
  go.addEventListener("click", () => adjudicate(item, input.value.split(",").map((s) => Number(s.trim()))));
  box.append(input, " ", go);
  return box;
}

async function load() {
  const s = await api("/api/admin/stats");
  $("project").textContent = s.project;
  $("as-of").textContent = s.as_of.slice(11, 19);
  const pr = s.progress;
  for (const k of ["tasks", "done", "assigned", "pending", "skipped", "adjudicated"]) $(`p-${k}`).textContent = pr[k];
  $("p-gold").textContent = pr.gold_items;
  $("t-last-hour").textContent = s.throughput.last_hour;
  $("t-per-hour").textContent = fmt(s.throughput.per_hour, 1);
  $("labelers").tBodies[0].replaceChildren(...s.labelers.map((l) => row([
    l.labeler, l.rankings, l.skipped, fmt(l.median_time_s, 1), fmt(l.gold_accuracy), fmt(l.gold_flag_recall),
    fmt(l.agreement_with_others), l.agreement_pairs], `labeler-${l.labeler}`)));
  $("agreement").tBodies[0].replaceChildren(...Object.entries(s.agreement).map(([name, a]) => row([
    name, a.groups ?? 0, fmt(a.pairwise), a.pairs ?? 0, fmt(a.krippendorff_alpha), fmt(a.loo_majority)],
    `slice-${name}`)));
  $("p-notes").textContent = pr.notes;
  $("notes").tBodies[0].replaceChildren(...s.notes.map((n) => row([n.labeler, n.task_id, n.prompt, n.note],
    `note-${n.ranking_id}`)));
  $("disagreements").replaceChildren(...(s.disagreements.length ? s.disagreements.map(disagreement)
    : [document.createTextNode("Nothing to adjudicate.")]));
}

$("refresh").addEventListener("click", load);
$("logout").addEventListener("click", async () => { await api("/api/logout", {}); location.href = "/login"; });
load().catch((e) => { $("status").textContent = e.message; });
setInterval(() => load().catch(() => {}), 5000);
