"""Evaluation: gold-judged win-rate, KL, length, diversity, toxicity and truthfulness proxies,
refusals, failure bins, and the HTML report.

- ``metrics``: pure functions over judged responses (numpy only);
- ``truthfulness``: log-likelihood of given responses, MC1-style truthfulness proxy;
- ``evaluate``: ``evaluate(models, prompts, ...)`` -> ``results.json`` + ``samples.jsonl``;
- ``cli``: ``preflab eval``; ``report``: ``preflab report RUN_DIR`` -> ``report.html``.

Importing this package is cheap; ``evaluate`` and ``write_report`` load their modules (and
torch, matplotlib) when first used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "write_report"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from preflab.evals.evaluate import evaluate

        return evaluate
    if name == "write_report":
        from preflab.evals.report import write_report

        return write_report
    raise AttributeError(f"module 'preflab.evals' has no attribute {name!r}")
