"""A run is a directory that explains itself (DESIGN.md principle 5).

    runs/NAME/
      manifest.json      resolved config, versions, git commit, seed, host, start/end times
      metrics.jsonl      one JSON object per logged step, namespaced keys (train/loss, perf/...)
      checkpoints/       step-000010/ ... written to a temporary directory, then renamed
      log.txt            human-readable log

A checkpoint holds the model weights, optimizer, scheduler, RNG states and whatever the stage
adds (e.g. a KL controller). ``--resume`` loads the newest complete one; ``metrics.jsonl`` is cut
back to that step so a resumed run's log equals an uninterrupted one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from preflab.data.jsonl import atomic_dir, atomic_write_text
from preflab.errors import PreflabError

CKPT_RE = re.compile(r"^step-(\d{6,})$")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("preflab", "torch", "transformers", "peft", "accelerate", "pydantic", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunDir:
    """The directory of one run. Only the main rank (``writer=True``) writes anything."""

    def __init__(self, path: str | os.PathLike, *, stage: str, config: dict[str, Any], seed: int,
                 resume: bool = False, writer: bool = True):
        self.path = Path(path)
        self.stage = stage
        self.writer = writer
        self.ckpt_dir = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        if writer:
            if not resume and self.metrics_path.exists() and self.metrics_path.stat().st_size:
                raise PreflabError(
                    f"{self.path} already holds a run; pass --resume to continue it or choose another --out"
                )
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "stage": stage,
                "config": config,
                "seed": seed,
                "versions": versions(),
                "git_commit": git_commit(),
                "host": socket.gethostname(),
                "started_at": _now(),
                "finished_at": None,
                "status": "running",
            }
            old = self.path / "manifest.json"
            if resume and old.exists():
                prev = json.loads(old.read_text())
                self.manifest["started_at"] = prev.get("started_at", self.manifest["started_at"])
                self.manifest["resumed_at"] = prev.get("resumed_at", []) + [_now()]
            self._write_manifest()

    # -- manifest and logs -------------------------------------------------------------------

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=2, default=str))

    def finish(self, status: str = "finished", **extra: Any) -> None:
        if not self.writer:
            return
        self.manifest.update(status=status, finished_at=_now(), **extra)
        self._write_manifest()

    def log(self, message: str) -> None:
        if self.writer:
            with open(self.path / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"{_now()} {message}\n")

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.writer:
            return
        row = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after ``step`` (they belong to work the resume will redo)."""
        if not self.writer or not self.metrics_path.exists():
            return
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.ckpt_dir.exists():
            return []
        found = []
        for p in self.ckpt_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and (p / "state.pt").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1][1] if ckpts else None

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int = 1) -> Path | None:
        """Write ``state`` (torch-serialisable) as checkpoints/step-N atomically; prune old ones.

        The state is written into a hidden temporary directory and renamed into place, so a
        crash mid-write leaves the previous checkpoint as the newest complete one.
        """
        if not self.writer:
            return None
        import torch

        final = self.ckpt_dir / f"step-{step:06d}"
        with atomic_dir(final) as tmp:
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "saved_at": _now()}))
        for _, old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def save_training(self, step: int, model: Any, optimizer: Any, scheduler: Any, keep: int = 1,
                      **extra: Any) -> None:
        """Checkpoint a training loop: model, optimizer, scheduler, RNG states, step and ``extra``
        objects with ``state_dict()`` (e.g. a KL controller). Every rank waits for rank 0."""
        from preflab import distributed

        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step,
                 "extra": {k: v.state_dict() for k, v in extra.items()}}
        self.save_checkpoint(step, state, keep=keep)
        distributed.barrier()

    def resume_training(self, model: Any, optimizer: Any, scheduler: Any, **extra: Any) -> int:
        """Load the newest checkpoint into the given objects; returns its step (0: none).

        Metric rows after that step are dropped: the resumed run logs them again.
        """
        state = self.load_checkpoint()
        if state is None:
            return 0
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for k, v in extra.items():
            v.load_state_dict(state["extra"][k])
        set_rng_state(state["rng"])
        self.truncate_metrics(state["step"])
        self.log(f"resumed at step {state['step']}")
        return state["step"]

    def load_checkpoint(self, path: Path | None = None) -> dict[str, Any] | None:
        import torch

        path = path or self.latest_checkpoint()
        if path is None:
            return None
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


class GeneratorState:
    """``state_dict``/``load_state_dict`` for a ``torch.Generator``, so checkpoints can hold it."""

    def __init__(self, generator: Any):
        self.generator = generator

    def state_dict(self) -> Any:
        return self.generator.get_state()

    def load_state_dict(self, state: Any) -> None:
        self.generator.set_state(state)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


def table_console(width: int = 160) -> Any:
    """A rich ``Console`` for tables: a log file or a pipe gets ``width`` columns, not rich's 80."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=width)


class Progress:
    """A rich progress bar with ETA and the latest metrics; silent when disabled."""

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0,
                 keys: tuple[str, ...] = ()):
        self.enabled = enabled
        self.keys = keys
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), transient=False,
            )
            self._task = self._bar.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, metrics: dict[str, Any] | None = None, advance: int = 1) -> None:
        if self._bar is None:
            return
        info = ""
        if metrics:
            shown = [(k, metrics[k]) for k in self.keys if k in metrics] or list(metrics.items())[:4]
            info = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in shown if isinstance(v, int | float))
        self._bar.update(self._task, advance=advance, info=info)

