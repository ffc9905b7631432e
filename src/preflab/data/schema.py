"""Plain dataclasses that every part of preflab passes around, and the rules of a ranking.

A **ranking** of K candidates is an ``order``: a list of *tiers*, best first, each tier a
list of candidate positions ``0..K-1``. ``[[2], [0, 3], [1]]`` means candidate 2 is best,
0 and 3 are tied, 1 is worst. Every position appears exactly once (a complete ranking);
two candidates share a rank only by sharing a tier. Positions index the candidate list
that travels with the order (``Ranking.candidates`` / ``KWay.responses``), never store ids.

The equivalent *rank vector* (``ranks_from_order``) gives each candidate its tier index
(0 = best); it is what ``preflab.feedback.agreement`` consumes.

Nothing here imports numpy or torch; the module is cheap to import.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from preflab.errors import DataError

Order = list[list[int]]

# Flags a labeler may set on a ranking (InstructGPT's labelers flag unsafe outputs, PII,
# and prompts that cannot be ranked). Other strings are allowed; these are the known ones.
KNOWN_FLAGS = ("unsafe", "pii", "not_rankable", "low_quality", "duplicate")


def _is_list_like(x: Any) -> bool:
    return hasattr(x, "__iter__") and not isinstance(x, str | bytes | dict)


def validate_order(order: Any, k: int, *, allow_empty: bool = False) -> Order:
    """Check that ``order`` is a complete tiered ranking of ``k`` candidates; return it normalised.

    Normalised: a list of lists of Python ints, each tier sorted. Raises ValueError with a
    reason naming the problem (wrong K, duplicate, out of range, empty tier, not a list).
    ``allow_empty`` accepts ``[]`` (a ranking flagged not_rankable has no order).
    """
    if not _is_list_like(order):
        raise ValueError(f"order must be a list of tiers, got {type(order).__name__}")
    order = list(order)
    if not order:
        if allow_empty:
            return []
        raise ValueError("order is empty")
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 candidates, got K={k}")
    seen: set[int] = set()
    out: Order = []
    for t, tier in enumerate(order):
        if not _is_list_like(tier):
            raise ValueError(f"tier {t} of order must be a list of candidate positions, got {tier!r}")
        tier = list(tier)
        if not tier:
            raise ValueError(f"tier {t} of order is empty")
        norm = []
        for x in tier:
            if isinstance(x, bool) or not isinstance(x, numbers.Integral):
                raise ValueError(f"order entry {x!r} in tier {t} is not an integer position")
            if not 0 <= x < k:
                raise ValueError(f"order entry {x} in tier {t} is outside 0..{k - 1} (K={k})")
            x = int(x)
            if x in seen:
                raise ValueError(f"candidate {x} is ranked twice (candidates share a rank only inside one tier)")
            seen.add(x)
            norm.append(int(x))
        out.append(sorted(norm))
    if len(seen) != k:
        missing = sorted(set(range(k)) - seen)
        raise ValueError(f"order ranks {len(seen)} of K={k} candidates (missing positions {missing})")
    return out


def ranks_from_order(order: Sequence[Sequence[int]], k: int | None = None) -> list[int]:
    """Tier index of each candidate (0 = best; tied candidates share it). ``[[2],[0,3],[1]] -> [1,2,0,1]``."""
    k = sum(len(t) for t in order) if k is None else k
    ranks = [-1] * k
    for t, tier in enumerate(order):
        for x in tier:
            ranks[x] = t
    if any(r < 0 for r in ranks):
        raise ValueError(f"order does not rank every one of K={k} candidates")
    return ranks


def order_from_ranks(ranks: Sequence[float]) -> Order:
    """Inverse of ``ranks_from_order``: lower rank = better; equal ranks form one tier."""
    levels = sorted(set(ranks))
    return [[i for i, r in enumerate(ranks) if r == level] for level in levels]


def order_from_scores(scores: Sequence[float], *, higher_is_better: bool = True) -> Order:
    """Tiered order implied by scores: best score first, equal scores tied. NaN is not allowed."""
    if any(isinstance(s, float) and math.isnan(s) for s in scores):
        raise ValueError("scores contain NaN")
    return order_from_ranks([-s if higher_is_better else s for s in scores])



def _cycle(edges: Sequence[tuple[Any, Any, Any]]) -> list[tuple[Any, Any, Any]] | None:
    """A cycle of the directed graph of ``(winner, loser, where)`` edges, as its edges in order
    (``[(a, b, w1), (b, c, w2), (c, a, w3)]``; a self-pair is a cycle of one), else None."""
    graph: dict[Any, list[tuple[Any, Any]]] = {}
    for winner, loser, where in edges:
        graph.setdefault(winner, []).append((loser, where))
    done: set[Any] = set()
    for start in graph:
        if start in done:
            continue
        on_path = {start: 0}  # node -> its index in stack
        stack, path = [(start, iter(graph[start]))], []  # path[i]: the edge from stack[i] to stack[i + 1]
        while stack:
            node, todo = stack[-1]
            step = next(todo, None)
            if step is None:
                done.add(node)
                del on_path[node]
                stack.pop()
                if path:
                    path.pop()
                continue
            to, where = step
            if to in on_path:
                return path[on_path[to]:] + [(node, to, where)]
            if to not in done:
                on_path[to] = len(stack)
                path.append((node, to, where))
                stack.append((to, iter(graph.get(to, ()))))
    return None


def check_pair_cycles(source: Any, pairs: Sequence[tuple[Any, str | None, str, str, int]]) -> None:
    """Pairs ``(prompt, labeler, chosen, rejected, line)`` read from ``source``: one labeler's pairs
    of one prompt must order its responses (A > B, B > C, C > A orders nothing, as a K-way
    ranking cannot rank a response twice). DataError naming the file, the lines and the cycle.
    Rows without a labeler count as one labeler's; different people may disagree."""
    groups: dict[tuple[str, str | None], list[tuple[str, str, int]]] = {}
    for prompt, labeler, chosen, rejected, line in pairs:
        groups.setdefault((repr(prompt), labeler), []).append((chosen, rejected, line))
    for (_, labeler), edges in groups.items():
        cycle = _cycle(edges)
        if cycle is None:
            continue
        lines = sorted(where for _, _, where in cycle)
        shown = " > ".join(_short(winner) for winner, _, _ in cycle) + f" > {_short(cycle[0][0])}"
        by = f" by labeler {labeler!r}" if labeler is not None else ""
        hint = "" if labeler is not None else ' (pairs from different people: give each row its "labeler")'
        raise DataError(f"{source}: line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}: cyclic "
                        f"preferences for one prompt{by} ({shown}): no ranking satisfies them; fix or drop one "
                        f"of these lines{hint}")


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n - 3] + "...")

@dataclass
class Prompt:
    """A prompt. ``id`` is the store's integer id (None until stored); ``uid`` an optional external key."""

    text: str
    category: str | None = None
    slice: str | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    uid: str | None = None


@dataclass
class Demonstration:
    """A labeler-written (or best-of-N) response to a prompt, for SFT."""

    prompt: str
    response: str
    prompt_id: int | None = None
    labeler: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Ranking:
    """One labeler's ranking of K candidate responses to one prompt.

    ``order`` indexes ``candidates`` (texts) and ``candidate_ids`` (store ids, same
    length, empty for a ranking that was never stored). ``flags`` is a list of strings
    (see KNOWN_FLAGS). ``time_s`` is the labeler's time on the task in seconds.
    """

    prompt: str
    candidates: list[str]
    order: Order
    labeler: str
    prompt_id: int | None = None
    candidate_ids: list[int] = field(default_factory=list)
    time_s: float | None = None
    flags: list[str] = field(default_factory=list)
    models: list[str | None] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    split: str | None = None
    created_at: str | None = None

    @property
    def k(self) -> int:
        return len(self.candidates)

    def ranks(self) -> list[int]:
        return ranks_from_order(self.order, self.k)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Ranking:
        """Parse a dict written by ``to_dict`` (e.g. one line of a rankings JSONL); ValueError if invalid."""
        if not isinstance(obj, dict):
            raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
        for key in ("prompt", "candidates", "order", "labeler"):
            if key not in obj:
                raise KeyError(key)
        cands = obj["candidates"]
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            raise ValueError("'candidates' must be a list of strings")
        flags = list(obj.get("flags") or [])
        order = validate_order(obj["order"], len(cands), allow_empty="not_rankable" in flags)
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in obj.items() if k in known}
        kwargs.update(order=order, flags=flags, candidates=cands)
        return cls(**kwargs)

    def to_kway(self) -> KWay:
        return KWay(prompt=self.prompt, responses=list(self.candidates), order=[list(t) for t in self.order])


@dataclass
class Pair:
    """A pairwise preference: ``chosen`` preferred to ``rejected``. ``weight`` scales its loss term."""

    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_trl(self) -> dict[str, str]:
        """TRL's standard preference row ``{"prompt", "chosen", "rejected"}``."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class KWay:
    """One element of the reward model's training set: a prompt, K responses, their tiered order.

    JSON form (the grouped K-way JSONL, one object per line)::

        {"prompt": str, "responses": [str, ...], "order": [[int, ...], ...], "meta": {...}}

    ``meta`` is optional (prompt_id, ranking_id, labeler, split, flags when exported from the
    store); readers ignore it and any other unknown key.
    """

    prompt: str
    responses: list[str]
    order: Order
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "responses": self.responses, "order": self.order}
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, obj: Any) -> KWay:
        """Parse and validate one grouped K-way object; ValueError/KeyError/TypeError with a reason."""
        if not isinstance(obj, dict):
            raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
        prompt, responses = obj["prompt"], obj["responses"]
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise ValueError("'responses' must be a list of strings")
        order = validate_order(obj["order"], len(responses))
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError("'meta' must be an object")
        return cls(prompt=prompt, responses=responses, order=order, meta=meta)
