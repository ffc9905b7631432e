"""Rankings -> pairwise comparisons, and the grouped K-way format the RM stage reads.

InstructGPT (Ouyang et al. 2022, eq. 1) trains the RM on all C(K,2) comparisons of one
ranking as ONE batch element, so that a prompt's pairs are not spread over many batches
(which overfits). Ties carry no preference and are dropped. The grouped K-way JSONL keeps
that grouping on disk:

    {"prompt": str, "responses": [str, ...], "order": [[int, ...], ...], "meta": {...}}

``order`` is a list of tiers, best first, indexing ``responses`` (see preflab.data.schema).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from preflab.data.jsonl import read_jsonl, write_jsonl
from preflab.data.schema import KWay, Order, Pair, Ranking, validate_order


def ranking_to_pairs(order: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """All ``(winner, loser)`` position pairs implied by a tiered order; tied candidates give none.

    Deterministic: by the winner's tier, then the loser's tier, then position within tiers.
    ``[[2], [0, 3], [1]] -> [(2,0), (2,3), (2,1), (0,1), (3,1)]`` (C(4,2)=6 minus 1 tie).
    """
    pairs: list[tuple[int, int]] = []
    for i, better in enumerate(order):
        for worse in order[i + 1 :]:
            for w in better:
                for loser in worse:
                    pairs.append((int(w), int(loser)))
    return pairs


def count_pairs(order: Sequence[Sequence[int]]) -> int:
    """Number of untied pairs: C(K,2) minus sum over tiers of C(size,2)."""
    k = sum(len(t) for t in order)
    return k * (k - 1) // 2 - sum(len(t) * (len(t) - 1) // 2 for t in order)


def kway_to_pairs(group: KWay, *, normalize: bool = False) -> list[Pair]:
    """The Pair objects of one K-way group. With ``normalize`` each pair has weight 1/n_pairs,
    so a group contributes 1 to a loss summed over pairs (InstructGPT's 1/C(K,2) factor, with ties dropped)."""
    idx = ranking_to_pairs(group.order)
    w = 1.0 / len(idx) if normalize and idx else 1.0
    return [
        Pair(
            prompt=group.prompt,
            chosen=group.responses[a],
            rejected=group.responses[b],
            weight=w,
            meta={**group.meta, "chosen_idx": a, "rejected_idx": b},
        )
        for a, b in idx
    ]


def rankings_to_pairs(rankings: Iterable[Ranking], *, normalize: bool = False) -> list[list[Pair]]:
    """Pairs grouped per ranking (one inner list per prompt-and-labeler ranking); empty groups dropped."""
    groups = []
    for r in rankings:
        meta = {"prompt_id": r.prompt_id, "ranking_id": r.id, "labeler": r.labeler}
        ps = kway_to_pairs(KWay(r.prompt, list(r.candidates), r.order, meta), normalize=normalize)
        if ps:
            groups.append(ps)
    return groups


def flatten_pairs(groups: Iterable[Iterable[Pair]]) -> list[Pair]:
    return [p for g in groups for p in g]


def pair_to_kway(pair: Pair) -> KWay:
    """A pairwise preference as a K=2 group: responses ``[chosen, rejected]``, order ``[[0], [1]]``."""
    return KWay(prompt=pair.prompt, responses=[pair.chosen, pair.rejected], order=[[0], [1]], meta=dict(pair.meta))


def kway_record(prompt: str, responses: Sequence[str], order: Order, meta: dict | None = None) -> dict:
    """Build (and validate) one grouped K-way JSON object."""
    order = validate_order(order, len(responses))
    return KWay(prompt, list(responses), order, dict(meta or {})).to_dict()


def read_kway(path: str | os.PathLike) -> list[KWay]:
    """Read a grouped K-way JSONL; a bad row raises DataError ``path:line: reason``."""
    return read_jsonl(path, KWay.from_dict)


def write_kway(path: str | os.PathLike, groups: Iterable[KWay | dict]) -> int:
    """Atomically write grouped K-way JSONL; returns the number of groups."""
    return write_jsonl(path, (g.to_dict() if isinstance(g, KWay) else g for g in groups))
