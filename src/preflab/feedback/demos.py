"""Demonstrations for SFT, written by a stand-in for InstructGPT's human writers.

``mode`` says where a response comes from:

- ``"best_of_n"``: sample ``n`` responses per prompt and keep the one the gold judge scores
  highest (rejection sampling under the gold judge). An empty best sample falls back as below.
- ``"reference"``: no model; the suite's ``reference_answer`` (a compliant answer that meets
  the prompt's constraints) or, for harmful prompts, ``templated_refusal``.
- ``"mixed"`` (default): best of N, but when no sample reaches ``threshold`` (gold total) the
  fallback is used: ``templated_refusal`` for harmful prompts, ``reference_answer`` otherwise.
  A prompt with no reference (a user's own prompt on an unknown topic) keeps its best sample.

Each row is ``{"id", "prompt", "response", "source", "gold"}`` with ``source`` one of
``"sample"``, ``"reference"``, ``"refusal"``; SFT reads ``prompt`` and ``response`` and ignores
the rest. Prompts that get no response at all (reference mode, no reference) are left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from preflab.data.suite.reference import reference_answer, templated_refusal
from preflab.data.suite.schema import SuitePrompt, as_prompt
from preflab.errors import PreflabError
from preflab.feedback.rubric import judge

Mode = Literal["best_of_n", "reference", "mixed"]
MODES: tuple[str, ...] = ("mixed", "best_of_n", "reference")
DEFAULT_THRESHOLD = 0.6


def fallback_demonstration(p: SuitePrompt) -> dict[str, Any] | None:
    """The templated row for a prompt: a refusal if harmful, else the reference; None if there is none."""
    if p.slice == "harmful":
        text, source = templated_refusal(p), "refusal"
    else:
        text, source = reference_answer(p), "reference"
    if not text:
        return None
    return {"id": p.id, "prompt": p.prompt, "response": text, "source": source, "gold": judge(p, text).total}


def pick_demonstration(p: SuitePrompt, samples: Sequence[str], *, mode: Mode = "mixed",
                       threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any] | None:
    """Choose one prompt's demonstration from its samples (see the module docstring for ``mode``).

    Among samples with equal gold the first wins. Returns None when nothing can be written.
    """
    if mode not in MODES:
        raise PreflabError(f"unknown demonstration mode {mode!r} (known: {', '.join(MODES)})")
    if mode == "reference" or not samples:
        return fallback_demonstration(p)
    scores = [judge(p, s).total for s in samples]
    best = max(range(len(samples)), key=lambda i: (scores[i], -i))
    row = {"id": p.id, "prompt": p.prompt, "response": samples[best], "source": "sample", "gold": scores[best]}
    usable = bool(samples[best].strip())
    if mode == "best_of_n" and usable:
        return row
    if usable and scores[best] >= threshold:
        return row
    return fallback_demonstration(p) or (row if usable else None)


def write_demonstrations(prompts: Iterable[SuitePrompt | Mapping[str, Any]], model: Any = None, tokenizer: Any = None,
                         *, n: int = 4, max_new_tokens: int = 128, temperature: float = 0.7,
                         threshold: float = DEFAULT_THRESHOLD, mode: Mode = "mixed", batch_size: int = 16,
                         bf16: bool = False, progress: bool = False,
                         out: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Demonstration rows for ``prompts``; written to ``out`` as JSONL (atomically) when given.

    ``model`` and ``tokenizer`` are needed unless ``mode="reference"``; the ``n`` samples per
    prompt are drawn in batches with ``rollout.generate_texts`` (seed torch beforehand for
    reproducible samples).
    """
    if mode not in MODES:
        raise PreflabError(f"unknown demonstration mode {mode!r} (known: {', '.join(MODES)})")
    ps = [as_prompt(dict(p) if isinstance(p, Mapping) else p) for p in prompts]
    samples: list[list[str]] = [[] for _ in ps]
    if mode != "reference":
        if model is None or tokenizer is None:
            raise PreflabError(f"mode {mode!r} samples from a model: give a model (or use mode 'reference')")
        if n < 1:
            raise PreflabError(f"n must be >= 1, got {n}")
        from preflab.rollout import generate_texts

        flat = generate_texts(model, tokenizer, [p.prompt for p in ps for _ in range(n)], max_new_tokens=max_new_tokens,
                              temperature=temperature, batch_size=batch_size, bf16=bf16, progress=progress)
        samples = [flat[i * n:(i + 1) * n] for i in range(len(ps))]
    rows = [r for p, s in zip(ps, samples) if (r := pick_demonstration(p, s, mode=mode, threshold=threshold))]
    if out is not None:
        from preflab.data.jsonl import write_jsonl

        write_jsonl(out, rows)
    return rows


def source_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many rows came from each source."""
    out = {"sample": 0, "reference": 0, "refusal": 0}
    for r in rows:
        out[r["source"]] = out.get(r["source"], 0) + 1
    return out


__all__ = ["DEFAULT_THRESHOLD", "MODES", "fallback_demonstration", "pick_demonstration", "source_counts",
           "write_demonstrations"]
