"""`preflab data suite`: write the built-in task suite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from preflab.data.suite.schema import SLICES, SPLITS
from preflab.data.suite.templates import CATEGORIES


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write prompts.jsonl into (created if missing).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed gives the same file.")
@click.option("--n", "n", default=3200, show_default=True, type=click.IntRange(min=40),
              help="Number of prompts (split ~25/30/25/20 into sft/rm/ppo/eval).")
@click.option("--long-form", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of generation, open-QA and chat requests that ask for 80-120 words, with their own "
                   "token budget.")
def suite(out_dir: Path, seed: int, n: int, long_form: float) -> None:
    """Write the built-in task suite (OUT/prompts.jsonl) and print counts per category, slice and split.

    Splits never share a template or a topic, so the eval split measures generalisation.

    \b
    Example:
      preflab data suite --out data/suite --n 3200
    """
    from rich.console import Console
    from rich.table import Table

    from preflab.data.suite import write_suite

    path = out_dir / "prompts.jsonl"
    rows = write_suite(path, seed=seed, n=n, long_form=long_form)
    counts = Counter((p.split, p.category) for p in rows)
    slice_counts = Counter((p.split, p.slice) for p in rows)
    table = Table(title=f"{len(rows)} prompts -> {path}")
    table.add_column("category / slice")
    for s in SPLITS:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for key, source in [(c, counts) for c in CATEGORIES] + [(s, slice_counts) for s in SLICES]:
        cells = [source[(split, key)] for split in SPLITS]
        table.add_row(key, *map(str, cells), str(sum(cells)), end_section=key in (CATEGORIES[-1], SLICES[-1]))
    split_totals = Counter(p.split for p in rows)
    table.add_row("all", *(str(split_totals[s]) for s in SPLITS), str(len(rows)))
    Console().print(table)
