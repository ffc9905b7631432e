"""What every benchmark shares: its options (``--out``, ``--smoke``, ``--threads``), the record of
the run (the machine from machine.py, the date, the threads, and whether other processes kept the
CPUs busy at the start), rows for a peer that could not run (the reason instead of a number:
a number measured elsewhere never sits beside one measured here), one configuration run in a
fresh subprocess, TRL's step timer, the table and the JSON file.

    import common   # benchmarks/ is on sys.path for its scripts

``--smoke`` is each benchmark's smallest setting: tiny random models (``tiny:``), a step or two,
its configurations in one process, seconds; its numbers say only that every row runs
(tests/test_benchmarks.py runs them all). Its JSON goes to ``benchmarks/results/smoke/`` (not committed) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BUNDLED = "bundled:smollm2-135m-instruct"
TINY = "tiny:"
BUSY_CORES = 0.5  # other processes using at least this many cores' worth at the start: "others busy"


def threads_arg(text: str) -> int | None:
    """``--threads``: a count, or ``auto`` (None): one thread per core other processes leave free
    (``preflab.models.free_cores``, the ``threads: null`` default)."""
    if text == "auto":
        return None
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("threads: a count >= 1, or auto")
    return n


def add_options(ap: argparse.ArgumentParser, threads: int | None = 2, with_threads: bool = True) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help="the JSON file (default: benchmarks/results/NAME.json; with --smoke, results/smoke/NAME.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest setting: tiny random models, a step or two (seconds; the numbers mean nothing)")
    if with_threads:
        ap.add_argument("--threads", type=threads_arg, default=threads,
                        help=f"torch threads, or auto: one per core other processes leave free (default: "
                             f"{'auto' if threads is None else threads})")


def out_path(args: argparse.Namespace, name: str) -> Path:
    if args.out is not None:
        return args.out
    return RESULTS / "smoke" / f"{name}.json" if args.smoke else RESULTS / f"{name}.json"


def set_threads(threads: int | None) -> int:
    """preflab's thread setting (None: auto) in this process; returns torch's thread count."""
    import torch

    from preflab import models

    models.set_threads(threads)
    return torch.get_num_threads()


def peer_threads(threads: int | None) -> int:
    """A peer's torch threads: the same count preflab's configurations get, without preflab's allocator
    settings (``set_threads``), so the peer runs as its users run it."""
    import torch

    from preflab import models

    torch.set_num_threads(threads or models.free_cores())
    return torch.get_num_threads()


def start(args: argparse.Namespace) -> dict[str, Any]:
    """The run's record, taken before any configuration runs; printed. Whether other processes were
    busy is read from /proc/stat over half a second (``models.busy_cores_of_others``) and from the
    1-minute load average."""
    from machine import describe, print_machine

    from preflab.models import busy_cores_of_others

    busy = round(busy_cores_of_others(0.5), 2)
    info = describe(probe=not args.smoke)
    threads = getattr(args, "threads", "each process its own")
    record = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": info,
        "threads": "auto" if threads is None else threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_1m_start": info["load_1m"], "busy_cores_of_others_start": busy, "others_busy": busy >= BUSY_CORES,
        "smoke": bool(args.smoke), "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print_machine(info)
    print(f"  other processes at the start: {busy} cores busy ({'busy' if record['others_busy'] else 'quiet'}); "
          f"threads {record['threads']}{' (smoke setting)' if args.smoke else ''}")
    return record


def write(path: Path, name: str, record: dict[str, Any], **payload: Any) -> dict[str, Any]:
    """The JSON of a run: its record (with the load at the end), then the benchmark's own keys."""
    from machine import load_1m

    doc = {"benchmark": name, **record, "load_1m_end": load_1m(), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return doc


def missing(module: str) -> str | None:
    """None if ``module`` imports, else why not (the reason a peer row gives)."""
    trl_env()
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{module} is not importable ({e})"
    return None


def not_run(config: str, reason: str, status: str = "not installed", **extra: Any) -> dict[str, Any]:
    """The row of a configuration that did not run: its status and why, no number."""
    return {"config": config, "status": status, "reason": reason, **extra}


def version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def peak_rss_gib() -> float:
    from preflab.run import peak_rss_mb  # this process's own peak, not its parent's at fork

    return peak_rss_mb() / 1024


def spawn(script: str, args: list[str], config: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One configuration in a fresh process (``script --one ...`` prints its row as the last line of
    stdout): its peak RSS is its own. A failure is a row with status "error" and the last lines."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return not_run(config, " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]), status="error")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.setdefault("status", "ran")
    return row


def run(script: str, args: list[str], config: str, one: Callable[[], dict[str, Any]], smoke: bool,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """A configuration's row: ``spawn``ed in a fresh process, or under ``--smoke`` run in this one
    (``one()``; a process start per configuration would cost more than the tiny run itself)."""
    if not smoke:
        return spawn(script, args, config, env)
    try:
        return {"status": "ran", **one()}
    except Exception as e:  # the row says so; the other configurations still run
        traceback.print_exc()
        return not_run(config, f"{type(e).__name__}: {e}", status="error")


def print_row(row: dict[str, Any]) -> None:
    """The last line of a ``--one`` run: its row as JSON (what ``spawn`` reads)."""
    print(json.dumps({"status": "ran", **row}))


def trl_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def step_timer() -> Any:
    """A TRL/transformers callback whose ``marks`` are (wall, process) times at the first step's start
    and at every step's end: a step's time is the gap between consecutive marks."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.marks:
                self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            self.marks.append((time.perf_counter(), time.process_time()))

        def times(self, which: int = 0) -> list[float]:
            return [b[which] - a[which] for a, b in zip(self.marks, self.marks[1:])]

    return Timer()


def ratio_note(rows: list[dict[str, Any]], ours: str, theirs: str, what: str) -> list[str]:
    """"preflab / TRL ...: 0.53x" where both rows ran (none otherwise)."""
    by = {r["config"]: r for r in rows if r.get("status") == "ran"}
    if ours not in by or theirs not in by:
        return []
    return [f"preflab / TRL {what}: {by[ours]['s_per_step'] / by[theirs]['s_per_step']:.2f}x"]


def model_label(smoke: bool) -> str:
    return "tiny random model" if smoke else "SmolLM2-135M"


def print_table(title: str, columns: list[tuple[str, str]], rows: list[dict[str, Any]], notes: list[str]) -> None:
    """``columns``: (header, row key or format with {key} fields). A row that did not run shows its
    status and reason instead of numbers."""
    from rich.table import Table

    from preflab.run import table_console

    t = Table(title=title)
    for i, (head, _) in enumerate(columns):
        t.add_column(head, justify="left" if i == 0 else "right")
    for r in rows:
        name = str(r.get("label") or r.get("config"))
        if r.get("status", "ran") != "ran":
            why = str(r.get("reason", ""))[:100]
            t.add_row(name, *([r["status"], *[""] * (len(columns) - 3), why] if len(columns) > 2
                              else [f"{r['status']}: {why}"]))
            continue
        t.add_row(name, *[cell(r, spec) for _, spec in columns[1:]])
    console = table_console()
    console.print(t)
    for n in notes:
        console.print(n)


def cell(row: dict[str, Any], spec: str) -> str:
    if "{" in spec:
        try:
            return spec.format(**row)
        except (KeyError, TypeError, ValueError):
            return ""
    value = row.get(spec)
    return "" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
