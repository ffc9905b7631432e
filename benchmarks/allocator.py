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
    .venv/bin/python benchmarks/allocator.py --smoke   # the tiny model on 8 made-up rankings, 2 steps

``--smoke`` needs no run: the tiny random model and a few rankings written to a temporary folder.
No outside peer: the modes are glibc's and oneDNN's settings against preflab's.

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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

MODES = ("tuned", "onednn-1024", "untuned", "tuned+trim5")
SMOKE = {"steps": 2, "batch_prompts": 2, "modes": "tuned,untuned"}


def smoke_data(where: Path) -> Path:
    """8 K = 2 rankings of made-up responses (the smoke setting's data; the model is ``tiny:``)."""
    path = where / "rankings.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Name a number near {i}.", "responses": [f"{i + 1}.", f"{i}0, no"],
                                        "order": [[0], [1]]}) + "\n" for i in range(8)))
    return path


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(mode: str, model: str, data: str, out: Path, steps: int, batch_prompts: int, threads: int | None) -> dict:
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
        f"model.path={model}", f"model.threads={'null' if threads is None else threads}", f"data.train={data}",
        "data.val_fraction=0", "data.max_length=320", f"train.batch_prompts={batch_prompts}",
        f"train.max_steps={steps}", "optim.lr=5e-6", "run.progress=false", f"run.out={out}"])
    run_stage("dpo", cfg)
    gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
    return {"config": mode, "status": "ran", "mode": mode, "steps": len(samples), "rss_mb": [round(r) for _, r in samples],
            "rss_first_mb": samples[0][1], "rss_last_mb": samples[-1][1], "rss_max_mb": max(r for _, r in samples),
            "median_step_s": statistics.median(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="A pipeline run with sft/model and store.sqlite.")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-prompts", type=int, default=4)
    ap.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated subset of {', '.join(MODES)}.")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    common.add_options(ap, threads=1)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.model, a.data, a.dir, a.steps, a.batch_prompts, a.threads)))
        return
    if a.smoke:
        vars(a).update(SMOKE)
    record = common.start(a)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model, data = ((common.TINY, str(smoke_data(Path(tmp)))) if a.smoke
                       else (str(a.run / "sft" / "model"), f"store:{a.run / 'store.sqlite'}"))
        for what in ([] if a.smoke else [a.run / "sft" / "model", a.run / "store.sqlite"]):
            if not what.exists():
                raise SystemExit(f"{what} not found: give --run a finished pipeline run (or --smoke)")
        ref = Path(tmp) / "reference_logps.json"
        for mode in a.modes.split(","):
            d = Path(tmp) / mode
            d.mkdir()
            if ref.is_file():
                shutil.copy(ref, d / ref.name)
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)} if a.threads else None
            results.append(common.spawn(__file__, ["--one", mode, "--model", model, "--data", data, "--dir", str(d),
                                                   "--steps", str(a.steps), "--batch-prompts", str(a.batch_prompts),
                                                   "--threads", "auto" if a.threads is None else str(a.threads)],
                                        mode, env))
            if not ref.is_file() and (d / ref.name).is_file():
                shutil.copy(d / ref.name, ref)
    common.print_table(
        f"DPO stage, {a.steps} steps of {a.batch_prompts} prompts: resident set per heap setting",
        [("mode", ""), ("RSS after step 1 MiB", "{rss_first_mb:.0f}"), (f"after step {a.steps} MiB", "{rss_last_mb:.0f}"),
         ("max MiB", "{rss_max_mb:.0f}"), ("median s/step", "{median_step_s:.2f}")], results, [])
    common.write(common.out_path(a, "allocator"), "allocator", record, results=results,
                 workload={"run": "tiny: + 8 made-up rankings" if a.smoke else str(a.run), "steps": a.steps,
                           "batch_prompts": a.batch_prompts})


if __name__ == "__main__":
    main()
