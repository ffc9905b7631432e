"""The built-in task suite: prompts with verifiable constraints, split by template and topic.

``generate_suite(seed, n)`` makes the rows, ``write_suite(path, seed, n)`` writes them,
``load_prompts(path)`` reads the suite's or a user's file, and ``reference_answer(prompt)``
gives a compliant response that meets the prompt's constraints.
"""

from __future__ import annotations

import os

from preflab.data.jsonl import write_jsonl
from preflab.data.suite.generate import generate_suite
from preflab.data.suite.reference import reference_answer, templated_refusal
from preflab.data.suite.schema import SLICES, SPLITS, SuitePrompt, as_prompt, load_prompts
from preflab.data.suite.templates import CATEGORIES


def write_suite(path: str | os.PathLike, seed: int = 0, n: int = 3200, long_form: float = 0.0) -> list[SuitePrompt]:
    """Generate the suite and write it atomically to ``path`` (JSONL); returns the rows."""
    rows = generate_suite(seed=seed, n=n, long_form=long_form)
    write_jsonl(path, (p.to_dict() for p in rows))
    return rows


__all__ = [
    "CATEGORIES", "SLICES", "SPLITS", "SuitePrompt", "as_prompt", "generate_suite", "load_prompts",
    "reference_answer", "templated_refusal", "write_suite",
]
