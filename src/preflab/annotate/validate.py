"""What a labeler may submit, checked before anything is written.

A submission ranks the K responses *as the labeler saw them* (display positions; the app
shuffles candidates per labeler and maps positions back). Every problem raises
``Invalid(field, message)``; the app answers it with a 4xx naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from preflab.data.schema import validate_order

# InstructGPT's metadata questions (Ouyang et al. 2022, fig. 10), one flag each, per response.
FLAGS = (
    "fails_instruction",
    "inappropriate_for_customer_assistant",
    "hallucination",
    "sexual_content",
    "violent_content",
    "encourages_violence_abuse_self_harm",
    "denigrates_protected_class",
    "harmful_advice",
    "expresses_opinion",
    "expresses_moral_judgment",
)
MAX_BODY = 64 * 1024  # bytes of one request body
MAX_NOTE = 4000  # characters
MAX_TIME_S = 24 * 3600.0
FIELDS = ("order", "scores", "flags", "note", "time_s")


class Invalid(Exception):
    """A request the app refuses: ``status`` (4xx), the ``field`` at fault, and why."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass
class Submission:
    order: list[list[int]]  # tiers of display positions, best first
    scores: list[int | None]  # 1-7 per display position, or None
    flags: list[list[str]]  # per display position
    note: str
    time_s: float | None


def parse_submission(body: Any, k: int) -> Submission:
    """Check a submission for a task with ``k`` responses; return it normalised or raise Invalid."""
    if not isinstance(body, dict):
        raise Invalid("body", "must be a JSON object", 400)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise Invalid(unknown[0], f"unknown field (allowed: {', '.join(FIELDS)})")
    if "order" not in body:
        raise Invalid("order", "missing: rank every response (tiers of positions, best first)")
    try:
        order = validate_order(body["order"], k)
    except ValueError as e:
        raise Invalid("order", str(e)) from None
    return Submission(order, _scores(body.get("scores"), k), _flags(body.get("flags"), k), _note(body.get("note")),
                      _time(body.get("time_s")))


def _scores(v: Any, k: int) -> list[int | None]:
    if v is None:
        return [None] * k
    if not isinstance(v, list) or len(v) != k:
        raise Invalid("scores", f"must be a list of {k} entries (1-7 or null), one per response")
    for i, s in enumerate(v):
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 7):
            raise Invalid(f"scores[{i}]", f"must be an integer 1-7 or null, got {s!r}")
    return list(v)


def _flags(v: Any, k: int) -> list[list[str]]:
    if v is None:
        return [[] for _ in range(k)]
    if not isinstance(v, list) or len(v) != k:
        raise Invalid("flags", f"must be a list of {k} lists of flags, one per response")
    out = []
    for i, fl in enumerate(v):
        if not isinstance(fl, list) or not all(isinstance(f, str) for f in fl):
            raise Invalid(f"flags[{i}]", "must be a list of flag names")
        bad = [f for f in fl if f not in FLAGS]
        if bad:
            raise Invalid(f"flags[{i}]", f"unknown flag {bad[0]!r}")
        out.append(sorted(set(fl)))
    return out


def _note(v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise Invalid("note", "must be a string")
    if len(v) > MAX_NOTE:
        raise Invalid("note", f"is {len(v)} characters; at most {MAX_NOTE}")
    return v


def _time(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0 <= v <= MAX_TIME_S:
        raise Invalid("time_s", f"must be a number of seconds in 0..{MAX_TIME_S:.0f}, got {v!r}")
    return float(v)


def parse_order_only(body: Any, k: int) -> list[list[int]]:
    """An admin's final ranking: ``{"order": tiers}`` over the group's candidates."""
    if not isinstance(body, dict) or "order" not in body:
        raise Invalid("order", "missing")
    try:
        return validate_order(body["order"], k)
    except ValueError as e:
        raise Invalid("order", str(e)) from None
