"""The simulated labelers' own agreement on every held-out RM prompt: the ceiling RM accuracy reads against.

The RM stage measures labeler-labeler agreement where the store has several rankings of one
prompt (the pipeline's 15% overlap slice: 11 of the demo's 60 held-out prompts). The labelers
here are simulated and deterministic (noise seeded by labeler, prompt and response), so the whole
default panel can rank every held-out candidate set again; on the prompts the store has, each
labeler's ranking is the stored one. This prints the pooled pairwise agreement of the five
labelers (ties excluded) on the held-out prompts of a run (the RM stage's split: the same
``val_fraction`` 0.2 and seed 0), next to the held-out accuracy of each ``rm_eval.json`` given.

    .venv/bin/python benchmarks/labeler_ceiling.py --run runs/demo runs/demo/rm/eval/rm_eval.json runs/rm-3ep/eval/rm_eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a pipeline run directory")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("reports", nargs="*", type=Path, help="rm_eval.json files of RMs trained on this run's store")
    a = ap.parse_args()

    from rich.table import Table

    from preflab.data.rankings import split_val
    from preflab.data.suite.schema import load_prompts
    from preflab.feedback.labelers import agreement_summary, default_panel, panel_groups
    from preflab.feedback.ranking_sources import read_groups
    from preflab.run import table_console

    groups = [g for g in read_groups(f"store:{a.run / 'store.sqlite'}", None, "rm") if g.pairs()]
    _, held = split_val(groups, a.val_fraction, a.seed)
    suite = {p.prompt: p for p in load_prompts(a.run / "data/prompts.jsonl")}
    sets: dict[str, list[str]] = {}
    for g in held:  # one candidate set per prompt (several labelers' groups share it)
        sets.setdefault(g.prompt, g.responses)
    prompts = [suite[text] for text in sets]
    summary = agreement_summary(panel_groups(default_panel(), prompts, list(sets.values()), seed=a.seed))
    ceiling = summary["pairwise"]

    t = Table(title=f"{a.run}: {len(prompts)} held-out RM prompts, {len(default_panel())} simulated labelers")
    for c in ("", "pairs", "accuracy / agreement", "points below the labelers"):
        t.add_column(c, justify="left" if not c else "right")
    t.add_row("labeler vs labeler (every pair of the panel)", str(summary["pairs"]), f"{100 * ceiling:.1f}%", "")
    t.add_row("labeler vs gold", "", f"{100 * summary['gold']:.1f}%", "")
    for path in a.reports:
        rep = json.loads(path.read_text())
        lo, hi = rep["ci"]
        t.add_row(f"RM {path}", str(rep["n_pairs"]),
                  f"{100 * rep['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]",
                  f"{100 * (ceiling - rep['accuracy']):.1f}")
    table_console().print(t)


if __name__ == "__main__":
    main()
