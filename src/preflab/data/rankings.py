"""K-way rankings as the RM and the preference trainers read them: rows -> ``Group`` -> token ids.

Files: grouped K-way JSONL (``{prompt, responses, order}``) or TRL pairs (``{prompt, chosen,
rejected}``, K = 2); the preference store (``store:PATH``) is read one layer up, by
``feedback.ranking_sources``, which the trainers call. ``encode_pair`` gives exactly the
sequence a rollout gives the reward model: chat-rendered prompt, response, EOS.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from preflab.data.chat import render_prompt
from preflab.data.jsonl import read_jsonl_lines
from preflab.data.schema import check_pair_cycles, ranks_from_order, validate_order


@dataclass
class Group:
    """One prompt's K ranked responses. ``ranks[i]``: tier of response i, 0 = best, equal = tied."""

    prompt: str | list[dict[str, str]]
    responses: list[str]
    ranks: list[int]
    category: str | None = None
    slice: str | None = None
    labeler: str | None = None

    def pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) index pairs; ties give none."""
        k = len(self.responses)
        return [(w, v) for w in range(k) for v in range(k) if self.ranks[w] < self.ranks[v]]


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_group(obj: Any, fmt: str | None = None) -> Group:
    """A grouped K-way row ``{prompt, responses, order, category?, slice?, labeler?}`` (also under
    ``meta``) or a TRL pair ``{prompt, chosen, rejected}`` (K = 2). ``fmt`` None: by the keys."""
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    kind = fmt or ("pairs" if "chosen" in obj else "kway")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)):
        raise ValueError("'prompt' must be a string or a list of chat messages")
    if kind == "pairs":
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], str):
                raise ValueError(f"{key!r} must be a string")
        responses, ranks = [obj["chosen"], obj["rejected"]], [0, 1]
    else:
        if "responses" not in obj and "chosen" in obj:
            raise ValueError("a pairs row, but data.format is kway")
        responses = obj["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise ValueError("'responses' must be a list of strings")
        ranks = ranks_from_order(validate_order(obj["order"], len(responses)), len(responses))
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    pick = {k: _text_or_none(obj.get(k, meta.get(k))) for k in ("category", "slice", "labeler")}
    return Group(prompt, list(responses), ranks, **pick)


def read_group_file(path: str, fmt: str | None = None) -> list[Group]:
    """Every group of a JSONL file (bad row: DataError ``file:line: reason``; pairs, K = 2, of one
    prompt and labeler that form a cycle: DataError naming their lines)."""
    rows = read_jsonl_lines(path, lambda obj: parse_group(obj, fmt))
    check_pair_cycles(path, [(g.prompt, g.labeler, g.responses[w], g.responses[v], line)
                             for line, g in rows if len(g.responses) == 2 for w, v in g.pairs()])
    return [g for _, g in rows]


def split_val(groups: list[Group], fraction: float, seed: int) -> tuple[list[Group], list[Group]]:
    """Hold out ``fraction`` of the *prompts* (every labeler's ranking of a prompt goes to the same side)."""
    keys = sorted({json.dumps(g.prompt) for g in groups})
    if fraction <= 0 or len(keys) < 2:
        return groups, []
    random.Random(seed).shuffle(keys)
    val = set(keys[:max(1, int(round(len(keys) * fraction)))])
    return [g for g in groups if json.dumps(g.prompt) not in val], [g for g in groups if json.dumps(g.prompt) in val]


def consensus(groups: list[Group]) -> list[Group]:
    """One group per prompt and response set: several labelers' rankings of the same responses
    become one ranking by their mean tier (equal means tie; a pair the labelers split evenly is a
    tie and trains nothing). A prompt ranked once stays as it is; order of first appearance."""
    by: dict[str, list[Group]] = {}
    for g in groups:
        by.setdefault(json.dumps([g.prompt, g.responses]), []).append(g)
    out = []
    for same in by.values():
        if len(same) == 1:
            out.append(same[0])
            continue
        mean = [sum(g.ranks[i] for g in same) / len(same) for i in range(len(same[0].responses))]
        tiers = sorted(set(mean))
        first = same[0]
        out.append(Group(first.prompt, list(first.responses), [tiers.index(m) for m in mean],
                         category=first.category, slice=first.slice, labeler="consensus"))
    return out


def encode_pair(tokenizer, prompt: str | list[dict[str, str]], response: str, max_length: int) -> list[int]:
    """Token ids of chat-rendered prompt + response + EOS: the sequence a PPO rollout gives the RM.

    Prompt and response are tokenized apart, as in rollouts (query ids, then sampled ids). Over
    ``max_length``, the response keeps its head (at most max_length - min(prompt, max_length/2)
    tokens, EOS then lost, like a cut-off sample) and the prompt keeps its tail.
    """
    p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(r) > max_length:
        r = r[:max_length - min(len(p), max_length // 2)]
        p = p[len(p) - (max_length - len(r)):]
    return p + r


@dataclass
class Encoded:
    ids: list[list[int]]  # K token sequences
    ranks: list[int]
    weights: list[float] | None = None  # the ranking's bootstrap count in each reward head's loss


def encode_groups(tokenizer, groups: list[Group], max_length: int) -> list[Encoded]:
    return [Encoded([encode_pair(tokenizer, g.prompt, r, max_length) for r in g.responses], list(g.ranks))
            for g in groups]
