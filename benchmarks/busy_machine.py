"""The cost of a busy machine: one fixed SFT workload alone, beside a competing process with the
default threads, and beside it with one thread per core (the old fixed default).

The workload is ``sft_step.py --one bf16``: a few SFT steps of SmolLM2-135M-Instruct (8 x 128
tokens, bf16 autocast, 1 warm-up step then the median of 5; ``--smoke``: the tiny random model,
1 timed step). Each condition runs it in a fresh subprocess:

- ``alone``: threads auto (preflab's default, ``threads: null``: one per core that other
  processes leave free, ``models.free_cores``);
- ``competitor, auto``: the same beside a competitor;
- ``competitor, all cores``: beside the competitor with threads = this process's cores.

The competitor stands for another training job: a subprocess looping a 1-thread bf16 matmul,
started (and seen running) before the first workload beside it and stopped after the last. The table gives
seconds per step, the slowdown against ``alone`` and the threads each condition ran with; the
JSON also records how many cores' worth other processes kept busy before each condition (the
competitor's included). ``OMP_NUM_THREADS``, when set, caps what auto chooses: run it unset.

    .venv/bin/python benchmarks/busy_machine.py            # SmolLM2-135M; JSON in benchmarks/results/
    .venv/bin/python benchmarks/busy_machine.py --smoke    # tiny model: every condition runs (seconds)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKLOAD = str(HERE / "sft_step.py")
CONDITIONS = (("alone", False, "auto"), ("competitor, auto", True, "auto"), ("competitor, all cores", True, "all"))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compete(n: int) -> None:
    """The competitor: a 1-thread bf16 matmul loop until killed; says "ready" once it runs."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    a @ b
    print("ready", flush=True)
    while True:
        a @ b


def start_competitor(n: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "--competitor", str(n)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("the competitor process did not start")
    time.sleep(0.5)  # running, so the workload's own look at /proc/stat sees it
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def condition(name: str, competitor: bool, threads: str, smoke: bool) -> dict:
    from preflab.models import busy_cores_of_others

    n_threads = str(cores()) if threads == "all" else "auto"
    busy = round(busy_cores_of_others(0.5), 2)
    row = common.spawn(WORKLOAD, ["--one", "bf16", "--threads", n_threads] + (["--smoke"] if smoke else []), name)
    keep = ("status", "reason", "s_per_step", "step_times_s", "tokens_per_s", "peak_rss_gib", "threads")
    return {"config": name, "competitor": competitor, "threads_asked": n_threads, "busy_cores_of_others_before": busy,
            **{k: v for k, v in row.items() if k in keep}}


def run_conditions(smoke: bool) -> list[dict]:
    """The conditions in order; one competitor runs from before the first condition that has it to
    the end (each workload is still a fresh process)."""
    results, rival = [], None
    try:
        for name, competitor, threads in CONDITIONS:
            if competitor and rival is None:
                rival = start_competitor(256 if smoke else 1024)
            results.append(condition(name, competitor, threads, smoke))
    finally:
        if rival is not None:
            stop(rival)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--competitor", type=int, metavar="N", help=argparse.SUPPRESS)  # the competitor itself
    common.add_options(ap, with_threads=False)  # each condition sets its own
    a = ap.parse_args()
    if a.competitor:
        compete(a.competitor)
        return
    record = common.start(a)
    results = run_conditions(a.smoke)
    alone = results[0].get("s_per_step") if results[0]["status"] == "ran" else None
    for r in results:
        if alone and r["status"] == "ran":
            r["slowdown_vs_alone"] = r["s_per_step"] / alone
    notes = []
    if os.environ.get("OMP_NUM_THREADS"):
        notes.append(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} caps the auto conditions' threads")
    common.print_table(
        f"A busy machine: SFT step ({common.model_label(a.smoke)}, bf16 autocast), {cores()} cores, a 1-thread bf16 matmul competitor",
        [("condition", ""), ("s/step (median)", "{s_per_step:.2f}"), ("slowdown vs alone", "{slowdown_vs_alone:.2f}x"),
         ("threads", "threads"), ("others' busy cores before", "busy_cores_of_others_before")], results, notes)
    common.write(common.out_path(a, "busy_machine"), "busy_machine", record, cores=cores(),
                 workload={"script": "benchmarks/sft_step.py --one bf16" + (" --smoke" if a.smoke else ""),
                           "competitor": "1-thread bf16 matmul loop, " + ("256" if a.smoke else "1024") + "^2"},
                 results=results, notes=notes)


if __name__ == "__main__":
    main()
