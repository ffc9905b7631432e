"""Print `preflab compare` results as one markdown table (what the README's tables are made from).

    .venv/bin/python benchmarks/compare_table.py runs/demo/compare runs/demo/compare-pref runs/demo/kl-sweep

Each argument is a compare output directory (its compare.json); the SFT reference row is printed once.
Cells with more than one seed get a second table over their seeds (``seed_summary``): mean, range,
the lowest interval bound and how many seeds' intervals lie above 50%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from preflab.compare import result_settings
from preflab.evals.metrics import seed_summary


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    a = ap.parse_args()
    rows, summary, seen_ref = [], [], False
    for d in a.dirs:
        cells = json.loads((d / "compare.json").read_text())
        summary += [s for s in seed_summary(cells) if len(s["seeds"]) > 1]
        for r in cells:
            if r["gold_winrate"] is None:
                if seen_ref:
                    continue
                seen_ref = True
            rows.append((d.name, r))
    print("| cell | seed | gold win-rate vs SFT [95% CI] | RM win-rate | KL (nats) | words | follows constraints "
          "| refuses harmful | over-refusal | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for _, r in rows:
        win = "(reference)" if r["gold_winrate"] is None else \
            f"{pct(r['gold_winrate'])} [{pct(r['gold_ci'][0])}, {pct(r['gold_ci'][1])}]"
        extra = "".join(f", {k}={v}" for k, v in result_settings(r.get("settings") or {}).items() if k not in r["label"])
        print(f"| {r['label']}{extra} | {'' if r['seed'] is None else r['seed']} | {win} | {pct(r['rm_winrate'])} "
              f"| {r['kl']:.2f} | {r['mean_words']:.1f} | {pct(r['constraint_rate'])} | {pct(r['refuses_harmful'])} "
              f"| {pct(r['over_refusal'])} | {'' if r['seconds'] is None else round(r['seconds'])} |")

    if summary:
        print("\n| cell | seeds | mean gold win-rate | lowest-highest | lowest interval bound | seeds above 50% "
              "| mean KL | mean words | follows constraints |")
        print("|---|---|---|---|---|---|---|---|---|")
        for s in summary:
            print(f"| {s['label']} | {','.join(map(str, s['seeds']))} | {pct(s['gold_winrate_mean'])} "
                  f"| {pct(s['gold_winrate_min'])}-{pct(s['gold_winrate_max'])} | {pct(s['lowest_ci_low'])} "
                  f"| {s['seeds_above_half']}/{len(s['seeds'])} | {s['kl_mean']:.2f} | {s['mean_words_mean']:.1f} "
                  f"| {pct(s['constraint_rate_mean'])} |")


if __name__ == "__main__":
    main()
