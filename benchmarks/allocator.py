"""Resident memory and step time of the real DPO stage under three heap settings.

Shapes that change every step (DPO, RM and RL batches) make a long process's resident set grow:
a long-preset DPO run reached 16.6 GiB after 142 steps with preflab's heap tuning
(``models.keep_large_blocks``), and another 11.7 GiB after 111 steps without it. This runs
``preflab.stages.dpo.train`` for ``--steps`` steps from a pipeline run's SFT model and rankings,
once per mode, each in its own process, and samples the process's resident set after every
optimizer step:

- ``tuned``: preflab's default, large freed blocks kept mapped;
- ``tuned+trim5``: the same, plus ``malloc_trim(0)`` after every fifth optimizer step (an
  experiment: does returning the stranded memory bound the growth?);
- ``untuned``: glibc's defaults (``PREFLAB_MALLOC_TUNE=0``);
- ``onednn-1024``: the heap tuned, oneDNN's primitive cache at its default 1,024 entries
  instead of preflab's ``models.PRIMITIVE_CACHE`` (every other mode runs with preflab's).

    .venv/bin/python benchmarks/allocator.py --run runs/demo --out benchmarks/results/allocator.json

The reference log-probs are computed by the first process and copied to the others (the first
process's resident set includes that pass). Read step times as a ratio within one run (the
machine may be shared); the resident set does not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("tuned", "onednn-1024", "untuned", "tuned+trim5")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(mode: str, run: Path, out: Path, steps: int, batch_prompts: int) -> dict:
    """One mode in this process: the DPO stage, the resident set after each optimizer step."""
    if mode == "untuned":
        os.environ["PREFLAB_MALLOC_TUNE"] = "0"
    if mode == "onednn-1024":
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "1024"
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from preflab.config import DPOConfig, load_config
    from preflab.registry import run_stage

    samples: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(lambda *a: samples.append((time.perf_counter(), rss_mb())))
    if mode == "tuned+trim5":  # after the sample: it sees each fifth step's memory before the trim
        import ctypes

        libc = ctypes.CDLL("libc.so.6")

        def trim(*_: object) -> None:
            if len(samples) % 5 == 0:
                libc.malloc_trim(0)

        register_optimizer_step_post_hook(trim)
    cfg = load_config(DPOConfig, None, [
        f"model.path={run / 'sft' / 'model'}", "model.threads=1", f"data.train=store:{run / 'store.sqlite'}",
        "data.val_fraction=0", "data.max_length=320", f"train.batch_prompts={batch_prompts}",
        f"train.max_steps={steps}", "optim.lr=5e-6", "run.progress=false", f"run.out={out}"])
    run_stage("dpo", cfg)
    gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
    return {"mode": mode, "steps": len(samples), "rss_mb": [round(r) for _, r in samples],
            "rss_first_mb": samples[0][1], "rss_last_mb": samples[-1][1], "rss_max_mb": max(r for _, r in samples),
            "median_step_s": statistics.median(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="A pipeline run with sft/model and store.sqlite.")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-prompts", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    ap.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated subset of {', '.join(MODES)}.")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.run, a.dir, a.steps, a.batch_prompts)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference_logps.json"
        for mode in a.modes.split(","):
            d = Path(tmp) / mode
            d.mkdir()
            if ref.is_file():
                shutil.copy(ref, d / ref.name)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, __file__, "--one", mode, "--run", str(a.run), "--dir", str(d),
                                   "--steps", str(a.steps), "--batch-prompts", str(a.batch_prompts)],
                                  env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if not ref.is_file():
                shutil.copy(d / ref.name, ref)
    print(f"| mode | RSS after step 1 | after step {a.steps} | max | median s/step |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['rss_first_mb'] / 1024:.2f} GiB | {r['rss_last_mb'] / 1024:.2f} GiB | "
              f"{r['rss_max_mb'] / 1024:.2f} GiB | {r['median_step_s']:.2f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"results": results, "run": str(a.run), "steps": a.steps,
                                     "batch_prompts": a.batch_prompts, "command": " ".join(sys.argv),
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
