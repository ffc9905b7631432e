"""Projects: prompts with K candidate responses, turned into tasks of the store's queue.

Candidates come from a file of existing responses (``{"prompt", "responses": [...]}`` per
line) or are sampled from a model (`preflab generate`'s sampler). An ``overlap`` share of
the prompts is enqueued ``overlap_labelers`` times (each copy goes to a different labeler:
the agreement slice). Gold items (a file of ``{"prompt", "responses", "order"?, "flags"?}``:
a known correct ranking and/or flags a response must get) are mixed into the same queue,
so labelers cannot tell them apart; their answers stay in ``annotate_gold``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preflab.annotate.db import ensure_tables, has_tables, now
from preflab.annotate.validate import FLAGS
from preflab.data.jsonl import read_jsonl, read_text_utf8
from preflab.data.schema import Prompt, validate_order
from preflab.errors import DataError
from preflab.feedback.store import PreferenceStore


@dataclass
class Item:
    """One prompt and its K candidates; ``gold_order``/``gold_flags`` only for gold items."""

    prompt: str
    responses: list[str]
    uid: str | None = None
    category: str | None = None
    slice: str | None = None
    model: str | None = None
    gold_order: list[list[int]] | None = None
    gold_flags: dict[int, list[str]] = field(default_factory=dict)

    @property
    def is_gold(self) -> bool:
        return self.gold_order is not None or bool(self.gold_flags)


@dataclass
class Project:
    id: int
    name: str
    queue: str
    k: int
    split: str | None
    guidelines: str
    settings: dict[str, Any]


def parse_item(obj: Any, *, gold: bool = False) -> Item:
    """A row of a responses (or gold) file; raises ValueError/KeyError naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"a row must be a JSON object, got {type(obj).__name__}")
    prompt, responses = obj["prompt"], obj["responses"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: must be a non-empty string")
    if not isinstance(responses, list) or not 2 <= len(responses) <= 9:
        raise ValueError("responses: must be a list of 2 to 9 strings")
    if not all(isinstance(r, str) and r.strip() for r in responses):
        raise ValueError("responses: every response must be a non-empty string")
    item = Item(prompt, list(responses), uid=_opt_str(obj, "id"), category=_opt_str(obj, "category"),
                slice=_opt_str(obj, "slice"), model=_opt_str(obj, "model"))
    if not gold:
        return item
    if obj.get("order") is not None:
        item.gold_order = validate_order(obj["order"], len(responses))
    for pos, flags in (obj.get("flags") or {}).items():
        p = int(pos)
        if not 0 <= p < len(responses):
            raise ValueError(f"flags: position {pos} is outside 0..{len(responses) - 1}")
        unknown = sorted(set(flags) - set(FLAGS))
        if unknown:
            raise ValueError(f"flags: unknown flag(s) {unknown}; known: {', '.join(FLAGS)}")
        item.gold_flags[p] = sorted(set(flags))
    if not item.is_gold:
        raise ValueError("a gold item needs 'order' (the correct ranking) or 'flags' ({position: [flag]})")
    return item


def _opt_str(obj: dict, key: str) -> str | None:
    v = obj.get(key)
    if v is not None and not isinstance(v, str | int):
        raise ValueError(f"{key}: must be a string")
    return None if v is None else str(v)


def read_items(path: str | Path, *, gold: bool = False) -> list[Item]:
    items = read_jsonl(path, lambda obj: parse_item(obj, gold=gold))
    if not items:
        raise DataError(f"{path}: no rows")
    return items


def sample_items(prompts: list, model_spec: str, *, k: int, max_new_tokens: int = 128, temperature: float = 0.7,
                 batch_size: int = 16, seed: int = 0) -> list[Item]:
    """K samples per suite prompt from a model (the project's sampler: temperature, seed)."""
    import torch

    from preflab import models
    from preflab.rollout import generate_texts

    torch.manual_seed(seed)
    tokenizer, model = models.load_tokenizer(model_spec), models.load_policy(model_spec)
    flat = generate_texts(model, tokenizer, [p.prompt for p in prompts for _ in range(k)],
                          max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                          bf16=False, progress=True)
    return [Item(p.prompt, [t if t.strip() else "(empty response)" for t in flat[i * k:(i + 1) * k]], uid=p.id,
                 category=p.category, slice=p.slice, model=model_spec) for i, p in enumerate(prompts)]


def create_project(store: PreferenceStore, name: str, items: list[Item], *, gold: list[Item] = (),
                   overlap: float = 0.1, overlap_labelers: int = 3, gold_copies: int = 3, guidelines: str = "",
                   split: str | None = "rm", seed: int = 0) -> Project:
    """Store prompts, candidates and tasks of a new project (all or nothing); return it."""
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise DataError(f"project name {name!r}: use letters, digits, '-', '_' or '.'")
    if not items:
        raise DataError("a project needs at least one prompt")
    ks = {len(it.responses) for it in [*items, *gold]}
    if len(ks) != 1:
        raise DataError(f"every prompt needs the same number of responses K; got K in {sorted(ks)}")
    if not 0 <= overlap <= 1:
        raise DataError(f"overlap must be in [0, 1], got {overlap}")
    if overlap_labelers < 1 or gold_copies < 1:
        raise DataError("overlap_labelers and gold_copies must be >= 1")
    uids = [it.uid for it in [*items, *gold] if it.uid is not None]
    dup = sorted({u for u in uids if uids.count(u) > 1})
    if dup:
        raise DataError(f"duplicate prompt id(s) {dup[:5]}")
    ensure_tables(store)
    rng = random.Random(seed)
    n_overlap = round(overlap * len(items))
    overlapped = set(rng.sample(range(len(items)), n_overlap))
    entries = [(it, overlap_labelers if i in overlapped else 1) for i, it in enumerate(items)]
    entries += [(g, gold_copies) for g in gold]
    rng.shuffle(entries)  # gold items mixed in among the others
    queue = f"annotate:{name}"
    settings = {"overlap": overlap, "overlap_labelers": overlap_labelers, "gold_copies": gold_copies, "seed": seed,
                "prompts": len(items), "gold": len(gold), "flags": list(FLAGS)}
    with store.transaction() as c:
        if c.execute("SELECT 1 FROM annotate_projects WHERE name = ?", (name,)).fetchone():
            raise DataError(f"project {name!r} exists in {store.path}")
        pid = int(c.execute(
            "INSERT INTO annotate_projects(name, queue, k, split, guidelines, settings, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, queue, ks.pop(), split, guidelines, json.dumps(settings), now())).lastrowid)
        for it, copies in entries:
            prompt_id = store.add_prompts([Prompt(text=it.prompt, category=it.category, slice=it.slice, uid=it.uid,
                                                  meta={"annotate_project": name})], split=split)[0]
            cids = store.add_candidates(prompt_id, it.responses, model=it.model)
            store.enqueue(queue, prompt_id, cids, copies=copies)
            if it.is_gold:
                c.execute('INSERT INTO annotate_gold(project_id, prompt_id, candidate_ids, "order", required_flags) '
                          "VALUES (?, ?, ?, ?, ?)",
                          (pid, prompt_id, json.dumps(cids), json.dumps(it.gold_order),
                           json.dumps({str(p): f for p, f in it.gold_flags.items()})))
    return load_project(store, name)


def load_project(store: PreferenceStore, name: str | None = None) -> Project:
    """The named project, or the only one in the store when ``name`` is None."""
    if not has_tables(store):
        raise DataError(f"{store.path}: no annotation project (create one with `preflab annotate create`)")
    rows = store.query("SELECT * FROM annotate_projects" + (" WHERE name = ?" if name else "") + " ORDER BY id",
                       (name,) if name else ())
    if not rows:
        raise DataError(f"{store.path}: no project named {name!r}" if name else f"{store.path}: no project")
    if len(rows) > 1:
        names = ", ".join(r["name"] for r in rows)
        raise DataError(f"{store.path} has several projects ({names}): name one with --project")
    r = rows[0]
    return Project(int(r["id"]), r["name"], r["queue"], int(r["k"]), r["split"], r["guidelines"],
                   json.loads(r["settings"]))


def read_guidelines(path: str | Path | None) -> str:
    return read_text_utf8(path) if path else ""
