"""Re-run a finished pipeline run's PPO-ptx stage with other settings and evaluate each against its SFT model.

Each setting is a list of dotted overrides of the run's own PPO-ptx config (the ``config`` in
``RUN/ppo_ptx/manifest.json``): ``preflab ppo`` into ``OUT/NAME``, then ``preflab eval`` of that
policy against ``RUN/sft/model`` on the run's eval prompts and settings, reusing the run's SFT
generations (so every setting is judged against the same SFT samples as the run's own PPO-ptx).
About 8 minutes per setting on 2 CPU cores; one run per setting, so read differences of a few
points as noise (the run-to-run spread of the default setting is several points).

    .venv/bin/python benchmarks/ppo_sweep.py --run runs/demo            # the settings below
    .venv/bin/python benchmarks/ppo_sweep.py --run runs/demo --only lr5e-5
    .venv/bin/python benchmarks/ppo_sweep.py --run runs/demo --only seed1 --extra seed1=run.seed=1
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

SETTINGS: dict[str, list[str]] = {
    "default": [],
    "lr5e-5": ["optim.lr=5e-5"],
    "minibatch16": ["ppo.minibatch_size=16", "optim.lr=4e-5", "ppo.critic_lr=1e-4"],
    "minibatch16-lam1": ["ppo.minibatch_size=16", "optim.lr=4e-5", "ppo.critic_lr=1e-4", "ppo.lam=1.0"],
    "ptx4": ["ptx.coef=4.0", "ptx.batch_size=4"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--out", type=Path, default=Path("runs/ppo-sweep"))
    ap.add_argument("--only", action="append",
                    help="of the settings above, run only these (--extra settings always run)")
    ap.add_argument("--extra", action="append", default=[], help="NAME=override,override,... (another setting)")
    a = ap.parse_args()
    extra = {name: [o for o in overrides.split(",") if o]
             for name, _, overrides in (spec.partition("=") for spec in a.extra)}
    unknown = sorted(set(a.only or []) - set(SETTINGS) - set(extra))
    if unknown:
        ap.error(f"--only: unknown setting(s) {', '.join(unknown)}; known: {', '.join([*SETTINGS, *extra])}")
    settings = {k: v for k, v in SETTINGS.items() if not a.only or k in a.only} | extra

    from preflab.evals.results import load as load_results
    from preflab.run import table_console

    a.out.mkdir(parents=True, exist_ok=True)
    base_cfg = a.out / "ppo_ptx_config.json"
    base_cfg.write_text(json.dumps(json.loads((a.run / "ppo_ptx/manifest.json").read_text())["config"], indent=1))
    ev = json.loads((a.run / "pipeline_config.json").read_text())["eval"]
    preflab = [str(Path(sys.executable).with_name("preflab"))]  # the console script beside this Python
    rows = []
    for name, overrides in settings.items():
        out = a.out / name
        if not (out / "model/config.json").is_file():
            subprocess.run([*preflab, "ppo", "--config", str(base_cfg), f"run.out={out}", "run.progress=false",
                            *overrides], check=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "eval/generations").mkdir(parents=True, exist_ok=True)
        shutil.copy(a.run / "eval/generations/sft.jsonl", out / "eval/generations/sft.jsonl")
        subprocess.run([*preflab, "eval", "--models", f"sft={a.run / 'sft/model'}", "--models", f"ptx={out / 'model'}",
                        "--prompts", str(a.run / "data/prompts.jsonl"), "--split", "eval", "--limit", str(ev["limit"]),
                        "--max-new-tokens", str(ev["max_new_tokens"]), "--temperature", str(ev["temperature"]),
                        "--batch-size", str(ev["batch_size"]), "--bf16" if ev["bf16"] else "--no-bf16",
                        "--rm", str(a.run / "rm/model"), "--out", str(out / "eval")], check=True,
                       stdout=subprocess.DEVNULL)
        results_path = out / "eval/results.json"
        m = load_results(results_path).model("ptx", str(results_path))
        rows.append((name, " ".join(overrides) or "(the run's own)", m))

    from rich.table import Table

    t = Table(title=f"PPO-ptx settings on {a.run}'s SFT model and RM, gold win-rate vs its SFT samples")
    for c in ("setting", "overrides", "gold win [95% CI]", "RM win", "KL", "refuses harmful", "follows constraints"):
        t.add_column(c, justify="left" if c in ("setting", "overrides") else "right")
    def pct(x: float | None) -> str:  # None: the eval split has no such prompt
        return "-" if x is None else f"{100 * x:.1f}%"

    for name, overrides, m in rows:
        w, rmw = m.win_rate, m.rm_win_rate
        t.add_row(name, overrides, f"{pct(w.rate)} [{pct(w.lo)}, {pct(w.hi)}]", pct(rmw.rate if rmw else None),
                  f"{m.kl:.2f}", pct(m.refusal.harmful), pct(m.metadata.follows_constraints))
    table_console().print(t)


if __name__ == "__main__":
    main()
