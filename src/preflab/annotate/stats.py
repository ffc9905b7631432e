"""The admin page's numbers: progress, throughput, gold accuracy, agreement, disagreements, and
the labelers' notes.

Agreement comes from ``preflab.feedback.labelers.agreement_summary`` (the agreement module's
pairwise agreement, Krippendorff's alpha, leave-one-out majority), per slice and overall.
Rankings are grouped by (prompt, set of candidates), positions aligned by candidate id, as
`preflab data agreement` does. Adjudicated rankings are left out of agreement.
"""

from __future__ import annotations

import json
import math
import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from preflab.annotate.db import now
from preflab.annotate.project import Project
from preflab.annotate.validate import Invalid
from preflab.data.schema import ranks_from_order
from preflab.errors import DataError
from preflab.feedback.agreement import agreement_from_labels, pair_labels
from preflab.feedback.labelers import RatedGroup, agreement_summary
from preflab.feedback.store import PreferenceStore

ADJUDICATOR = "adjudicator:"


def _clean(v: Any) -> Any:
    """NaN -> None, numpy scalars -> Python, recursively (JSON-ready)."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def project_rankings(store: PreferenceStore, project: Project) -> list:
    return [r for r in store.rankings() if (r.meta or {}).get("project") == project.name]


def _groups(rankings: list) -> dict[tuple[int, tuple[int, ...]], dict[str, list[int]]]:
    """{(prompt id, sorted candidate ids): {labeler: rank vector aligned with the sorted ids}}."""
    out: dict[tuple[int, tuple[int, ...]], dict[str, list[int]]] = {}
    for r in rankings:
        if not r.order or r.labeler.startswith(ADJUDICATOR):
            continue
        ids = tuple(sorted(r.candidate_ids))
        ranks = ranks_from_order(r.order, len(r.candidate_ids))
        pos = {cid: i for i, cid in enumerate(r.candidate_ids)}
        out.setdefault((r.prompt_id, ids), {})[r.labeler] = [ranks[pos[c]] for c in ids]
    return out


def _gold(store: PreferenceStore, project: Project) -> dict[tuple[int, tuple[int, ...]], dict[str, Any]]:
    out = {}
    for g in store.query('SELECT prompt_id, candidate_ids, "order", required_flags FROM annotate_gold '
                         "WHERE project_id = ?", (project.id,)):
        cids = json.loads(g["candidate_ids"])
        order = json.loads(g["order"]) if g["order"] else None
        ids = tuple(sorted(cids))
        ranks = None
        if order:
            r = ranks_from_order(order, len(cids))
            ranks = [r[cids.index(c)] for c in ids]
        flags = {cids[int(p)]: set(f) for p, f in json.loads(g["required_flags"]).items()}
        out[(int(g["prompt_id"]), ids)] = {"ranks": ranks, "flags": flags}
    return out


def _labeler_rows(rankings: list, groups: dict, gold: dict, skips: dict[str, int]) -> list[dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for r in rankings:
        if r.labeler.startswith(ADJUDICATOR):
            continue
        d = by.setdefault(r.labeler, {"times": [], "gold": ([], []), "flag_hits": 0, "flag_need": 0,
                                      "others": ([], [])})
        if r.time_s is not None:
            d["times"].append(r.time_s)
        g = gold.get((r.prompt_id, tuple(sorted(r.candidate_ids))))
        if g is None:
            continue
        given = dict(zip(r.candidate_ids, (r.meta or {}).get("response_flags") or [[]] * len(r.candidate_ids)))
        for cid, need in g["flags"].items():
            d["flag_need"] += len(need)
            d["flag_hits"] += len(need & set(given.get(cid, [])))
    for key, ranks in groups.items():
        g = gold.get(key)
        for name, rv in ranks.items():
            d = by[name]
            mine = pair_labels(np.array(rv, float))
            if g is not None and g["ranks"] is not None:
                d["gold"][0].append(mine)
                d["gold"][1].append(pair_labels(np.array(g["ranks"], float)))
            for other, ov in ranks.items():
                if other != name:
                    d["others"][0].append(mine)
                    d["others"][1].append(pair_labels(np.array(ov, float)))
    rows = []
    for name, d in sorted(by.items()):
        gold_acc, gold_pairs = _pooled(d["gold"])
        agree, agree_pairs = _pooled(d["others"])
        rows.append({"labeler": name, "rankings": sum(1 for r in rankings if r.labeler == name),
                     "skipped": skips.get(name, 0),
                     "median_time_s": statistics.median(d["times"]) if d["times"] else None,
                     "gold_accuracy": gold_acc, "gold_pairs": gold_pairs,
                     "gold_flag_recall": d["flag_hits"] / d["flag_need"] if d["flag_need"] else None,
                     "agreement_with_others": agree, "agreement_pairs": agree_pairs})
    return rows


def _pooled(pair: tuple[list, list]) -> tuple[float, int]:
    if not pair[0]:
        return float("nan"), 0
    return agreement_from_labels(np.concatenate(pair[0]), np.concatenate(pair[1]), "exclude")


def _by_slice(store: PreferenceStore, groups: dict) -> dict[str, dict[str, Any]]:
    slices: dict[str, list[RatedGroup]] = {"all": []}
    prompt_slice = {int(r["id"]): r["slice"] or "-" for r in store.query("SELECT id, slice FROM prompts")}
    for (pid, ids), ranks in groups.items():
        g = RatedGroup(ranks=ranks, key=(pid, list(ids)))
        slices["all"].append(g)
        slices.setdefault(prompt_slice.get(pid, "-"), []).append(g)
    out = {}
    for name, gs in slices.items():
        s = agreement_summary(gs) if gs else {}
        out[name] = {k: s.get(k) for k in ("groups", "rankings", "pairwise", "pairs", "krippendorff_alpha",
                                           "loo_majority", "tie_rate")}
    return out


def _disagreements(store: PreferenceStore, project: Project, groups: dict, gold: dict,
                   limit: int = 50) -> list[dict[str, Any]]:
    done = {(int(r["prompt_id"]), tuple(json.loads(r["candidate_ids"])))
            for r in store.query("SELECT prompt_id, candidate_ids FROM annotate_adjudications WHERE project_id = ?",
                                 (project.id,))}
    out = []
    for (pid, ids), ranks in groups.items():
        if len(ranks) < 2 or (pid, ids) in done:
            continue
        names = sorted(ranks)
        la = [pair_labels(np.array(ranks[a], float)) for a in names for b in names if a < b]
        lb = [pair_labels(np.array(ranks[b], float)) for a in names for b in names if a < b]
        agree, _ = agreement_from_labels(np.concatenate(la), np.concatenate(lb), "label")
        if agree >= 1.0:
            continue
        texts = dict((cid, text) for cid, text, _ in store.candidates(pid))
        g = gold.get((pid, ids))
        out.append({"prompt_id": pid, "prompt": store.prompt(pid).text, "candidate_ids": list(ids),
                    "responses": [texts[c] for c in ids], "ranks": ranks, "agreement": agree,
                    "gold_ranks": g["ranks"] if g else None})
    out.sort(key=lambda d: (d["agreement"], d["prompt_id"]))
    return out[:limit]


def _notes(rankings: list, limit: int = 100) -> list[dict[str, Any]]:
    """The labelers' notes (the labeling page's note box), newest first: for admins only."""
    noted = sorted((r for r in rankings if (r.meta or {}).get("note")), key=lambda r: r.id, reverse=True)
    return [{"ranking_id": r.id, "task_id": r.meta.get("task_id"), "labeler": r.labeler, "prompt_id": r.prompt_id,
             "prompt": r.prompt, "note": r.meta["note"], "created_at": r.created_at,
             "updated_at": r.meta.get("updated_at")} for r in noted[:limit]]


def project_stats(store: PreferenceStore, project: Project) -> dict[str, Any]:
    """Everything the admin page shows, JSON-ready (NaN as None)."""
    rankings = project_rankings(store, project)
    counts = {s: 0 for s in ("pending", "assigned", "done")}
    for r in store.query("SELECT status, COUNT(*) AS n FROM queue WHERE queue = ? GROUP BY status", (project.queue,)):
        counts[r["status"]] = int(r["n"])
    skips = {r["labeler"]: int(r["n"]) for r in store.query(
        "SELECT s.labeler, COUNT(*) AS n FROM annotate_skips s JOIN queue q ON q.id = s.task_id "
        "WHERE q.queue = ? GROUP BY s.labeler", (project.queue,))}
    groups = _groups(rankings)
    gold = _gold(store, project)
    stamps = [datetime.fromisoformat(r.created_at) for r in rankings if r.created_at]
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    span_h = (max(stamps) - min(stamps)).total_seconds() / 3600 if len(stamps) > 1 else 0.0
    return _clean({
        "project": project.name, "k": project.k, "split": project.split, "as_of": now(),
        "progress": {**counts, "tasks": sum(counts.values()), "skipped": sum(skips.values()),
                     "rankings": len(rankings), "gold_items": len(gold),
                     "adjudicated": sum(1 for r in rankings if r.labeler.startswith(ADJUDICATOR)),
                     "notes": sum(1 for r in rankings if (r.meta or {}).get("note"))},
        "throughput": {"last_hour": sum(1 for t in stamps if t >= hour_ago),
                       "per_hour": len(stamps) / span_h if span_h >= 1 / 60 else None},  # >= 1 minute
        "labelers": _labeler_rows(rankings, groups, gold, skips),
        "agreement": _by_slice(store, groups),
        "disagreements": _disagreements(store, project, groups, gold),
        "notes": _notes(rankings),
    })


def adjudicate(store: PreferenceStore, project: Project, admin: str, prompt_id: int, candidate_ids: list[int],
               order: list[list[int]]) -> int:
    """Store the admin's final ranking of a group (positions index ``candidate_ids``); return its id."""
    ids = sorted(candidate_ids)
    if ids != list(candidate_ids):
        raise Invalid("candidate_ids", "must be the group's candidate ids in ascending order")
    with store.transaction() as c:
        known = c.execute("SELECT 1 FROM queue WHERE queue = ? AND prompt_id = ?", (project.queue, prompt_id)).fetchone()
        if known is None:
            raise Invalid("prompt_id", f"prompt {prompt_id} is not in project {project.name!r}", 404)
        key = json.dumps(ids)
        if c.execute("SELECT 1 FROM annotate_adjudications WHERE project_id = ? AND prompt_id = ? AND "
                     "candidate_ids = ?", (project.id, prompt_id, key)).fetchone():
            raise Invalid("prompt_id", "this group is already adjudicated", 409)
        try:
            rid = store.add_ranking(prompt_id, ids, order, ADJUDICATOR + admin,
                                    meta={"project": project.name, "source": "annotate", "adjudication": True})
        except DataError as e:
            raise Invalid("candidate_ids", str(e)) from None
        c.execute("INSERT INTO annotate_adjudications(project_id, prompt_id, candidate_ids, ranking_id, admin, "
                  "created_at) VALUES (?, ?, ?, ?, ?, ?)", (project.id, prompt_id, key, rid, admin, now()))
    return rid
