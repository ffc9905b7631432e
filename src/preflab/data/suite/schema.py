"""The row of a prompt file: ``SuitePrompt``, and ``load_prompts`` that validates a user's file.

Only ``id`` and ``prompt`` are required, so users can bring their own prompts; every other
field has a default. Suite rows fill them all.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from preflab.constraints import validate_constraint
from preflab.data.chat import check_token_budget
from preflab.data.jsonl import read_jsonl
from preflab.data.suite.templates import CATEGORIES
from preflab.errors import DataError

SPLITS: tuple[str, ...] = ("sft", "rm", "ppo", "eval")
SLICES: tuple[str, ...] = ("ordinary", "harmful", "alarming_harmless", "misconception")


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt and what the gold judge needs to score a response to it.

    Attributes:
        id: unique within a file.
        prompt: the user's request, constraint sentences included.
        category: one of ``CATEGORIES`` (InstructGPT's use-case table).
        slice: ``ordinary``, ``harmful`` (should be refused), ``alarming_harmless`` (sounds
            alarming, should be answered) or ``misconception`` (has true and false answers).
        split: ``sft``, ``rm``, ``ppo``, ``eval``, or None for a user's unsplit prompt.
        constraints: verifiable constraints, e.g. ``{"type": "max_words", "n": 50}``.
        template, topic: what the prompt was made from; splits never share either.
        paraphrase_group: prompts with the same value ask for the same thing in other words.
        keywords: content words an on-topic answer is likely to use.
        answer: the canonical short answer where the task has one (closed QA, classification,
            extraction), else None.
        answer_keywords: phrases of which an on-task answer contains at least one.
        true_answers, false_answers: misconception slice: phrases a truthful answer asserts,
            and phrases that assert the misconception.
        source: the passage embedded in the prompt, if any.
        max_new_tokens: the prompt's own sampling budget (long-form tasks); None: the
            sampler's default.
    """

    id: str
    prompt: str
    category: str = "other"
    slice: str = "ordinary"
    split: str | None = None
    constraints: tuple[dict[str, Any], ...] = ()
    template: str | None = None
    topic: str | None = None
    paraphrase_group: str | None = None
    keywords: tuple[str, ...] = ()
    answer: str | None = None
    answer_keywords: tuple[str, ...] = ()
    true_answers: tuple[str, ...] = ()
    false_answers: tuple[str, ...] = ()
    source: str | None = None
    max_new_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __hash__(self) -> int:  # ids are unique within a file; constraints (dicts) are not hashable
        return hash(self.id)

    def to_dict(self) -> dict[str, Any]:
        """The JSONL row (lists, not tuples; ``extra`` only if non-empty)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        if not d["extra"]:
            del d["extra"]
        if d["max_new_tokens"] is None:  # most rows have none: keep files as they were
            del d["max_new_tokens"]
        return d

    @classmethod
    def from_dict(cls, obj: Any) -> SuitePrompt:
        """Validate a row; raises KeyError/ValueError/TypeError with a reason (no file:line)."""
        if not isinstance(obj, dict):
            raise TypeError(f"row must be a JSON object, got {type(obj).__name__}")
        for key in ("id", "prompt"):
            if key not in obj:
                raise KeyError(key)
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise ValueError(f"{key!r} must be a non-empty string")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(obj) - known)
        extra = dict(obj.get("extra") or {})
        for k in unknown:  # keep the user's own fields rather than failing on them
            extra[k] = obj[k]
        category = obj.get("category", "other")
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r} (known: {', '.join(CATEGORIES)})")
        slice_ = obj.get("slice", "ordinary")
        if slice_ not in SLICES:
            raise ValueError(f"unknown slice {slice_!r} (known: {', '.join(SLICES)})")
        split = obj.get("split")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        constraints = obj.get("constraints") or []
        if not isinstance(constraints, list):
            raise ValueError("'constraints' must be a list")
        for c in constraints:
            validate_constraint(c)

        def strs(key: str) -> tuple[str, ...]:
            v = obj.get(key) or []
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise ValueError(f"{key!r} must be a list of strings")
            return tuple(v)

        def opt_str(key: str) -> str | None:
            v = obj.get(key)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{key!r} must be a string or null")
            return v

        if slice_ == "misconception" and not obj.get("true_answers"):
            raise ValueError("a misconception prompt needs 'true_answers'")
        return cls(
            id=obj["id"], prompt=obj["prompt"], category=category, slice=slice_, split=split,
            constraints=tuple(dict(c) for c in constraints), template=opt_str("template"), topic=opt_str("topic"),
            paraphrase_group=opt_str("paraphrase_group"), keywords=strs("keywords"), answer=opt_str("answer"),
            answer_keywords=strs("answer_keywords"), true_answers=strs("true_answers"),
            false_answers=strs("false_answers"), source=opt_str("source"),
            max_new_tokens=check_token_budget(obj.get("max_new_tokens")), extra=extra,
        )


def as_prompt(p: SuitePrompt | dict[str, Any]) -> SuitePrompt:
    return p if isinstance(p, SuitePrompt) else SuitePrompt.from_dict(p)


def load_prompts(path: str | os.PathLike, id_field: str = "id") -> list[SuitePrompt]:
    """Read and validate a prompt file (the suite's or a user's); errors name ``file:line``.
    ``id_field`` names the rows' id key when it is not ``id`` (e.g. ``key``; integers become strings)."""

    def parse(obj: Any) -> SuitePrompt:
        if id_field != "id" and isinstance(obj, dict):
            if id_field not in obj:
                raise KeyError(id_field)
            key = obj[id_field]
            obj = {**{k: v for k, v in obj.items() if k != id_field}, "id": str(key) if isinstance(key, int) else key}
        return SuitePrompt.from_dict(obj)

    seen: dict[str, int] = {}
    rows: list[SuitePrompt] = []
    for i, p in enumerate(read_jsonl(path, parse)):
        if p.id in seen:
            # read_jsonl skips blank lines, so find the real line number for the message.
            raise DataError(f"{path}:{_line_of(path, i)}: duplicate id {p.id!r} (first at row {seen[p.id] + 1})")
        seen[p.id] = i
        rows.append(p)
    return rows


def _line_of(path: str | os.PathLike, row_index: int) -> int:
    n = -1
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                n += 1
                if n == row_index:
                    return lineno
    return row_index + 1
