"""Where the RM and the preference trainers read their rankings: a JSONL file or the store.

A source is a path of grouped K-way or TRL-pairs JSONL (parsed by ``data.rankings``) or
``store:PATH``, the preference store's rankings of one split with each prompt's category and
slice. This module sits above ``data/`` because it opens the store (``feedback.store``); the
trainers, RM evaluation and rounds call it, ``data/`` never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preflab.data.rankings import Group, consensus, read_group_file, split_val
from preflab.data.schema import ranks_from_order
from preflab.errors import DataError


def read_groups(source: str, fmt: str | None = None, split: str | None = None) -> list[Group]:
    """Every group of a JSONL file (bad row: DataError ``file:line: reason``; pairs, K = 2, of one
    prompt and labeler that form a cycle: DataError naming their lines) or of ``store:PATH`` (the
    preference store's rankings of ``split``, with the prompts' category and slice; ``PATH`` may be
    a postgresql:// URL)."""
    if not source.startswith("store:"):
        return read_group_file(source, fmt)
    from preflab.feedback.store import PreferenceStore, is_url

    spec = source.removeprefix("store:")
    if not is_url(spec) and not Path(spec).is_file():  # PreferenceStore() would create an empty store
        raise DataError(f"{Path(spec)}: preference store not found")
    with PreferenceStore(spec) as store:
        rows = store.grouped_kway(split=split)
        prompts = {p.id: p for p in store.prompts(split=split)}
    out = []
    for row in rows:
        p = prompts.get(row["meta"].get("prompt_id"))
        labeler = row["meta"].get("labeler")
        out.append(Group(row["prompt"], list(row["responses"]), ranks_from_order(row["order"]),
                         category=p.category if p else None, slice=p.slice if p else None,
                         labeler=None if labeler is None else str(labeler)))
    return out


def read_train_val(d: Any, seed: int) -> tuple[list[Group], list[Group], int]:
    """Training and held-out groups of a ``config.RankingData`` section, all-tied rankings dropped:
    ``d.val`` when given, else ``d.val_fraction`` of the training prompts; with ``d.labels`` =
    consensus, one training group per prompt (``data.rankings.consensus``). Returns (train, val,
    number of all-tied training rankings dropped). Every source is parsed before training starts."""
    train = read_groups(d.train, d.format, d.split)
    val = read_groups(d.val, d.format, d.val_split) if d.val else []
    if not d.val:
        train, val = split_val(train, d.val_fraction, seed)
    if d.labels == "consensus":
        train = consensus(train)
    kept = [g for g in train if g.pairs()]
    return kept, [g for g in val if g.pairs()], len(train) - len(kept)
