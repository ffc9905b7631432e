"""`preflab judge`: score responses to suite prompts with the gold judge."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click


@click.command()
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Prompt file (the suite's prompts.jsonl or your own in the same format).")
@click.option("--responses", "responses_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help='JSONL of {"id": prompt_id, "response": str}.')
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL to write: one row per response with per-criterion scores and the total.")
def judge(prompts_path: Path, responses_path: Path, out_path: Path) -> None:
    """Score responses to suite prompts with the gold judge and print the throughput.

    \b
    Example:
      preflab judge --prompts runs/demo/data/prompts.jsonl --responses responses.jsonl --out judged.jsonl
    """
    from preflab.data.jsonl import read_jsonl, write_jsonl
    from preflab.data.suite.schema import load_prompts
    from preflab.feedback.rubric import judge_batch

    prompts = {p.id: p for p in load_prompts(prompts_path)}

    def parse(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise TypeError(f"row must be a JSON object, got {type(obj).__name__}")
        pid, response = obj["id"], obj["response"]
        if not isinstance(pid, str):
            raise ValueError(f"'id' must be a string, got {type(pid).__name__}")
        if not isinstance(response, str):
            raise ValueError(f"'response' must be a string, got {type(response).__name__}")
        if pid not in prompts:
            raise ValueError(f"unknown prompt id {pid!r} (not in {prompts_path})")
        return {"id": pid, "response": response}

    rows = read_jsonl(responses_path, parse)
    t0 = time.perf_counter()
    results = judge_batch(prompts, rows)
    dt = max(time.perf_counter() - t0, 1e-9)
    write_jsonl(out_path, ({"id": r["id"], **j.as_dict()} for r, j in zip(rows, results)))
    mean = sum(j.total for j in results) / len(results) if results else 0.0
    click.echo(f"judged {len(results)} responses in {dt:.3f}s ({len(results) / dt:,.0f}/s); "
               f"mean total {mean:.3f} -> {out_path}")
