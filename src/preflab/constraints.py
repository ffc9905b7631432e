"""Verifiable instruction constraints: the types, how a prompt phrases them, and their checkers.

A constraint is a plain dict, machine-readable in the suite's JSONL::

    {"type": "max_words", "n": 50}
    {"type": "include_keywords", "keywords": ["honey", "hive"]}

Each type has a checker ``check(text, params) -> bool``, several phrasings (so a model
cannot learn one sentence), and the *slots* it occupies: two constraints that share a slot
are never put on the same prompt (e.g. ``json_output`` and ``bullet_count`` both shape the
whole response). The types follow IFEval (Zhou et al., 2023), cut down to what a 135M model
can satisfy within about 60-100 words.

Checkers are case-insensitive where case is not the point (keywords, start and end phrases,
the P.S. marker), so ``lowercase`` combines with ``end_with: "Is there anything else?"``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Constraint = dict[str, Any]

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")
_BULLET = re.compile(r"^[ \t]*[-*•][ \t]+\S", re.MULTILINE)
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t]*\n")
_TITLE = re.compile(r"<<[^<>\n]+>>")
_POSTSCRIPT = re.compile(r"^[ \t]*p\.[ \t]?s\.", re.MULTILINE | re.IGNORECASE)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def count_words(text: str) -> int:
    """Words are runs of letters and digits (apostrophes inside a word keep it whole)."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Split on ``.``, ``!`` or ``?`` followed by space; blank pieces are dropped."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def count_paragraphs(text: str) -> int:
    """Blocks separated by blank lines, not counting a block that is only a <<title>> or a P.S."""
    n = 0
    for block in _PARAGRAPH_SPLIT.split(text.strip()):
        b = block.strip()
        if not b or _TITLE.fullmatch(b) or _POSTSCRIPT.match(b):
            continue
        n += 1
    return n


@functools.lru_cache(maxsize=4096)
def _phrase_re(phrase: str) -> re.Pattern[str]:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(phrase.lower()) + r"(?![A-Za-z0-9])")


def count_phrase(text: str, phrase: str) -> int:
    """Case-insensitive occurrences of ``phrase`` as whole words (``bee`` does not match ``beehive``)."""
    return len(_phrase_re(phrase).findall(text.lower()))


def strip_json_fence(text: str) -> str:
    s = text.strip()
    m = _FENCE.match(s)
    return m.group(1).strip() if m else s


# --- checkers: (text, params) -> bool -------------------------------------------------------


def _max_words(text: str, p: Mapping[str, Any]) -> bool:
    return 0 < count_words(text) <= p["n"]


def _min_words(text: str, p: Mapping[str, Any]) -> bool:
    return count_words(text) >= p["n"]


def _max_sentences(text: str, p: Mapping[str, Any]) -> bool:
    return 0 < len(split_sentences(text)) <= p["n"]


def _bullet_count(text: str, p: Mapping[str, Any]) -> bool:
    return len(_BULLET.findall(text)) == p["n"]


def _paragraph_count(text: str, p: Mapping[str, Any]) -> bool:
    return count_paragraphs(text) == p["n"]


def _lowercase(text: str, p: Mapping[str, Any]) -> bool:
    return text == text.lower() and any(c.isalpha() for c in text)


def _uppercase(text: str, p: Mapping[str, Any]) -> bool:
    return text == text.upper() and any(c.isalpha() for c in text)


def _include_keywords(text: str, p: Mapping[str, Any]) -> bool:
    low = text.lower()
    return all(_phrase_re(k).search(low) for k in p["keywords"])


def _avoid_words(text: str, p: Mapping[str, Any]) -> bool:
    low = text.lower()
    return not any(_phrase_re(w).search(low) for w in p["words"])


def _start_with(text: str, p: Mapping[str, Any]) -> bool:
    return text.lstrip().lower().startswith(p["phrase"].lower())


def _end_with(text: str, p: Mapping[str, Any]) -> bool:
    return text.rstrip().lower().endswith(p["phrase"].lower())


def _json_output(text: str, p: Mapping[str, Any]) -> bool:
    s = strip_json_fence(text)
    if not s or s[0] not in "{[":
        return False
    try:
        return isinstance(json.loads(s), dict | list)
    except ValueError:
        return False


def _title(text: str, p: Mapping[str, Any]) -> bool:
    return _TITLE.search(text) is not None


def _no_commas(text: str, p: Mapping[str, Any]) -> bool:
    return "," not in text and "，" not in text and bool(text.strip())


def _postscript(text: str, p: Mapping[str, Any]) -> bool:
    return _POSTSCRIPT.search(text) is not None


def _quoted(text: str, p: Mapping[str, Any]) -> bool:
    s = text.strip()
    return len(s) >= 2 and s[0] in "\"“" and s[-1] in "\"”"


def _keyword_frequency(text: str, p: Mapping[str, Any]) -> bool:
    return count_phrase(text, p["word"]) >= p["n"]


# --- the registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstraintType:
    """One kind of constraint: its checker, required params, phrasings and slots."""

    name: str
    check: Callable[[str, Mapping[str, Any]], bool]
    params: tuple[str, ...]
    phrasings: tuple[str, ...]
    slots: frozenset[str]


def _t(name, check, params, phrasings, slots) -> ConstraintType:
    return ConstraintType(name, check, tuple(params), tuple(phrasings), frozenset(slots))


CONSTRAINT_TYPES: dict[str, ConstraintType] = {
    c.name: c
    for c in [
        _t("max_words", _max_words, ["n"], [
            "Answer in at most {n} words.",
            "Use no more than {n} words.",
            "Keep your response to {n} words or fewer.",
            "Limit your reply to {n} words.",
        ], ["length"]),
        _t("min_words", _min_words, ["n"], [
            "Write at least {n} words.",
            "Your answer should be {n} words or longer.",
            "Use a minimum of {n} words.",
        ], ["length"]),
        _t("max_sentences", _max_sentences, ["n"], [
            "Answer in at most {n} sentences.",
            "Use no more than {n} sentences.",
            "Keep it to {n} sentences or fewer.",
        ], ["length", "shape"]),
        _t("bullet_count", _bullet_count, ["n"], [
            "Use exactly {n} bullet points, each starting with '- '.",
            "Format your answer as exactly {n} bullet points (lines starting with '- ').",
            "Give exactly {n} bullet points using '- ' at the start of each line.",
        ], ["shape"]),
        _t("paragraph_count", _paragraph_count, ["n"], [
            "Write exactly {n} paragraphs separated by a blank line.",
            "Your answer must have {n} paragraphs, with a blank line between them.",
            "Use {n} paragraphs, separated by empty lines.",
        ], ["shape"]),
        _t("lowercase", _lowercase, [], [
            "Write your whole answer in lowercase letters, with no capitals.",
            "Use only lowercase letters.",
            "Do not use any capital letters.",
        ], ["case"]),
        _t("uppercase", _uppercase, [], [
            "Write your entire answer in capital letters.",
            "Use only uppercase letters.",
            "Your whole response must be in ALL CAPS.",
        ], ["case"]),
        _t("include_keywords", _include_keywords, ["keywords"], [
            "Include the words {keywords}.",
            "Make sure to use the words {keywords}.",
            "Your answer must mention {keywords}.",
        ], ["keywords"]),
        _t("avoid_words", _avoid_words, ["words"], [
            "Do not use the words {words}.",
            "Avoid the words {words}.",
            "Never use the words {words} in your answer.",
        ], ["avoid"]),
        _t("start_with", _start_with, ["phrase"], [
            "Start your answer with '{phrase}'.",
            "Begin your response with the words '{phrase}'.",
            "Your reply must begin with '{phrase}'.",
        ], ["start"]),
        _t("end_with", _end_with, ["phrase"], [
            "End your answer with '{phrase}'.",
            "Make '{phrase}' the very last words of your reply.",
            "Your reply must end with '{phrase}'.",
        ], ["end"]),
        _t("json_output", _json_output, [], [
            "Format your entire answer as JSON.",
            "Reply only with a valid JSON object.",
            "Wrap your whole output in JSON format.",
        ], ["shape", "start", "end", "punct", "wrap", "title"]),
        _t("title", _title, [], [
            "Give your answer a title wrapped in double angle brackets, like <<title>>.",
            "Open with a short title set between << and >>.",
            "Start with a title inside << and >>.",
        ], ["title", "start"]),
        _t("no_commas", _no_commas, [], [
            "Do not use any commas.",
            "Your answer must not contain a single comma.",
            "Avoid commas entirely.",
        ], ["punct"]),
        _t("postscript", _postscript, ["marker"], [
            "Close with a postscript that opens with {marker}",
            "Finish with a postscript that begins with {marker}",
            "Add a note at the end starting with {marker}",
        ], ["end", "ps"]),
        _t("quoted", _quoted, [], [
            "Begin and end your reply with a double quote mark.",
            "Put your whole answer inside double quotes.",
            "Enclose the entire reply in double quotation marks.",
        ], ["start", "end", "title", "wrap"]),
        _t("keyword_frequency", _keyword_frequency, ["word", "n"], [
            "Use the word '{word}' at least {n} times.",
            "The word '{word}' should appear at least {n} times.",
            "Mention '{word}' {n} or more times.",
        ], ["keywords"]),
    ]
}


def validate_constraint(c: Any) -> Constraint:
    """Check one constraint dict (known type, params present and well typed); return it.

    Raises ValueError with a reason, so file readers can name the line.
    """
    if not isinstance(c, dict):
        raise ValueError(f"constraint must be an object, got {type(c).__name__}")
    name = c.get("type")
    if name not in CONSTRAINT_TYPES:
        raise ValueError(f"unknown constraint type {name!r} (known: {', '.join(sorted(CONSTRAINT_TYPES))})")
    for p in CONSTRAINT_TYPES[name].params:
        if p not in c:
            raise ValueError(f"constraint {name!r} needs parameter {p!r}")
        v = c[p]
        if p == "n" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"constraint {name!r}: 'n' must be a positive integer, got {v!r}")
        if p in ("keywords", "words") and (
            not isinstance(v, list) or not v or not all(isinstance(w, str) and w.strip() for w in v)
        ):
            raise ValueError(f"constraint {name!r}: {p!r} must be a non-empty list of strings")
        if p in ("phrase", "word", "marker") and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"constraint {name!r}: {p!r} must be a non-empty string")
    return c


def check(c: Mapping[str, Any], text: str) -> bool:
    """Whether ``text`` satisfies constraint ``c``."""
    return CONSTRAINT_TYPES[c["type"]].check(text, c)


def check_all(constraints: list[Constraint] | tuple[Constraint, ...], text: str) -> list[bool]:
    return [CONSTRAINT_TYPES[c["type"]].check(text, c) for c in constraints]


def _quote_list(words: list[str]) -> str:
    q = [f"'{w}'" for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def describe(c: Mapping[str, Any], variant: int = 0) -> str:
    """The instruction sentence for ``c``, in phrasing number ``variant`` (taken modulo the count)."""
    ct = CONSTRAINT_TYPES[c["type"]]
    fmt = ct.phrasings[variant % len(ct.phrasings)]
    kw = {k: v for k, v in c.items() if k != "type"}
    for k in ("keywords", "words"):
        if k in kw:
            kw[k] = _quote_list(kw[k])
    text = fmt.format(**kw)
    for mark in ".?!":  # "end with 'That is all.'." -> "end with 'That is all.'"
        text = text.replace(f"{mark}'.", f"{mark}'")
    return text


def compatible(a: str, b: str) -> bool:
    """Two constraint types can sit on one prompt when they occupy no common slot."""
    return not (CONSTRAINT_TYPES[a].slots & CONSTRAINT_TYPES[b].slots) and a != b
