"""A run is a directory that explains itself (docs/architecture.md, "The run directory").

    runs/NAME/
      manifest.json      resolved config, versions, git commit, seed, host, start/end times
      metrics.jsonl      one JSON object per logged step, namespaced keys (train/loss, perf/...)
      checkpoints/       step-000010/ ... written to a temporary directory, then renamed
      log.txt            human-readable log
      .lock              flock'ed by the one process that writes the run (its pid inside)

A checkpoint holds the model weights, optimizer, scheduler, RNG states and whatever the stage
adds (e.g. a KL controller); under train.parallel=fsdp the model and optimizer are every rank's
shards in ``sharded/`` (torch.distributed.checkpoint), the rest in ``state.pt``. ``--resume`` loads the newest complete one; ``metrics.jsonl`` is cut
back to that step so a resumed run's log equals an uninterrupted one; a directory without a
manifest.json is refused (nothing to resume). Two processes never write one run directory: the
second is refused with the pid of the first (``lock_run_dir``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preflab.data.jsonl import atomic_dir, atomic_write_text, clean_stale_tmp_dirs
from preflab.errors import ConfigError, DataError, ModelError, PreflabError

CKPT_RE = re.compile(r"^step-(\d{6,})$")
SHARDED = "sharded"  # in a checkpoint of a sharded (FSDP) run: every rank's shards of model and optimizer


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _say(message: str) -> None:
    import click

    click.secho(message, fg="yellow", err=True)


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
    """Peak resident memory of this process in MiB: Linux's VmHWM where there is one, since
    ``ru_maxrss`` keeps the parent's resident size at fork across exec (a stage started by a
    process holding a model would report that model); else ``ru_maxrss`` (KiB on Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
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


# Config keys whose change on --resume cannot change the results: how a run reports and paces
# itself, not what it computes. Matched on the last part of the dotted key (``run.progress``,
# ``model.threads``, ``models.policy.threads``).
RESUME_ALLOWED_CHANGES = frozenset({
    "progress", "threads", "log_every", "trackers", "save_every", "keep_checkpoints", "worst_k", "device",
})

_FORCE_RESUME: list[bool] = [False]  # set by session(force=...); RunDir(force=None) reads it
_OPEN_RUNS: list[RunDir] = []  # writer RunDirs of this process that have not finished or failed


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists are values)."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Dotted keys whose value differs between two configs: ``{key: {"old": a, "new": b}}``
    (a key missing on one side has the value None there)."""
    a, b = flatten(old), flatten(new)
    return {k: {"old": a.get(k), "new": b.get(k)} for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def with_new_keys(old: dict[str, Any], schema: Any) -> dict[str, Any]:
    """``old`` (a config a run was started with, perhaps by an older preflab) with the keys the
    ``schema`` (a config model) has added since, at their defaults: a new key at its default is no
    change. The keys ``old`` has stay as they are; an ``old`` the schema refuses is returned as is."""
    from preflab.config.base import deep_merge

    if schema is None:
        return old
    try:
        full = schema.model_validate(old).model_dump(mode="json")
    except ValueError:  # pydantic's ValidationError is one: compare the config as written
        return old
    return deep_merge(full, old)  # every key old has, as old has it


def check_config_change(old: dict[str, Any], new: dict[str, Any], *, force: bool, where: Any,
                        allowed: frozenset[str] = RESUME_ALLOWED_CHANGES,
                        schema: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compare the config a run was started with (``old``) with the one it is resumed with.

    Returns ``(changes, refused)``: every changed dotted key as ``{"old", "new"}``, and those not in
    ``allowed`` (matched on the key's last part). Refused changes raise ConfigError naming each key
    with both values, unless ``force``. ``where`` names the file the old config came from. With the
    config's ``schema``, keys added to preflab since the run began count at their defaults
    (``with_new_keys``). The pipeline checks ``pipeline_config.json`` with it; RunDir checks
    ``manifest.json``.
    """
    changes = config_changes(with_new_keys(old, schema), new)
    refused = {k: v for k, v in changes.items() if k.rsplit(".", 1)[-1] not in allowed}
    if refused and not force:
        shown = "; ".join(f"{k}: {v['old']!r} -> {v['new']!r}" for k, v in refused.items())
        raise ConfigError(
            f"{where}: --resume with a different config ({shown}). Resume with the run's own config, or pass "
            "--force to apply the change from the last checkpoint on (recorded in the manifest)"
        )
    return changes, refused


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except (OSError, OverflowError, ValueError):
        return False
    return True


def dead_owner(manifest: dict[str, Any]) -> str | None:
    """For a manifest that still says ``running``: a sentence saying its process is gone (killed,
    e.g. by ``kill -9`` or the OOM killer, before it could mark the run), else None. Only a
    process on this host can be checked; one on another host is assumed alive."""
    if not isinstance(manifest, dict) or manifest.get("status") != "running":
        return None
    pid, host = manifest.get("pid"), manifest.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    if pid == os.getpid() or pid_alive(pid):
        return None
    return (f"the process that ran it (pid {pid} on {host}, started {manifest.get('started_at')}) is gone "
            f"without marking the run finished or failed: it was killed")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``RUN/manifest.json`` as a dict; PreflabError naming the file when it is missing or unreadable."""
    f = Path(path) / "manifest.json"
    if not f.is_file():
        raise PreflabError(f"{path}: not a preflab run directory (no manifest.json)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PreflabError(f"{f}: unreadable manifest ({e})") from None
    if not isinstance(data, dict):
        raise PreflabError(f"{f}: unreadable manifest (not a JSON object)")
    return data


# Files that make a directory a run: a pipeline run's or a stage run's (what the report reads).
RUN_MARKERS = ("manifest.json", "pipeline.json", "pipeline_config.json", "eval/results.json",
               "rm/eval/rm_eval.json", "agreement.json", "ppo/metrics.jsonl", "ppo_ptx/metrics.jsonl")


def check_run_dir(path: str | os.PathLike) -> Path:
    """``path`` if it is a run directory (a pipeline's or a stage's), else PreflabError naming it.
    Says so on stderr when a run in it was killed (``dead_owner``)."""
    path = Path(path)
    if not path.is_dir() or not any((path / m).is_file() for m in RUN_MARKERS):
        raise PreflabError(f"{path}: not a preflab run directory (it has none of {', '.join(RUN_MARKERS)}); "
                           "pass the --out of `preflab pipeline` or the run.out of a stage")
    for manifest in [path / "manifest.json", *sorted(path.glob("*/manifest.json"))]:
        if manifest.is_file():
            try:
                died = dead_owner(json.loads(manifest.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
            if died:
                _say(f"{manifest.parent}: {died}")
    return path


def _finite_or_none(v: Any) -> Any:
    """``v`` with every NaN/inf float (also inside lists and dicts) replaced by None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list | tuple):
        return [_finite_or_none(x) for x in v]
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    return v


def _non_finite_tensors(state: dict[str, Any]) -> list[str]:
    import torch

    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


@contextlib.contextmanager
def session(force: bool = False) -> Iterator[None]:
    """What a command wraps around a stage: RunDirs opened inside accept a changed config on
    ``--resume`` when ``force``, and any still running when an exception leaves are marked
    ``interrupted`` (Ctrl-C) or ``failed`` (anything else) with the reason, in their manifest."""
    before = len(_OPEN_RUNS)
    _FORCE_RESUME.append(force)
    try:
        yield
    except BaseException as e:
        for run in list(_OPEN_RUNS[before:]):
            run.fail_from(e)
        raise
    finally:
        _FORCE_RESUME.pop()


def latest_checkpoint_in(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of the run in ``path`` (None: none), without opening it."""
    found = _checkpoints(Path(path) / "checkpoints")
    return found[-1][1] if found else None


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of each complete checkpoint in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


LOCK_FILE = ".lock"  # inside a run directory: flock'ed by the process writing the run
_HELD_LOCKS: dict[Path, list[Any]] = {}  # resolved run directory -> [open lock file, holds in this process]


def make_dir(path: Path) -> None:
    """``path`` and its parents as directories; PreflabError naming ``path`` when a file is in the way."""
    if path.exists() and not path.is_dir():
        raise PreflabError(f"{path}: is a file, not a directory; choose another output directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreflabError(f"{path}: cannot create the directory ({e.strerror}: {e.filename})") from None


def _read_holder(f, wait_s: float = 2.0) -> str:
    """The holder's line from a lock file held by another process. The holder writes it just after it
    takes the lock, so a process refused in between waits up to ``wait_s`` for it to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        f.seek(0)
        holder = f.read().strip()
        if (holder and not _stale(holder)) or time.monotonic() > deadline:
            return holder or "a process that has not written its pid yet"
        time.sleep(0.01)


def _stale(holder: str) -> bool:
    """Whether a lock file's line names a process of this host that is gone (a killed holder's line,
    until the next holder overwrites it)."""
    m = re.fullmatch(r"pid (\d+) on (\S+)", holder)
    return bool(m) and m.group(2) == socket.gethostname() and not pid_alive(int(m.group(1)))


def lock_run_dir(path: str | os.PathLike) -> None:
    """Create ``path`` if needed and take an exclusive lock on ``path/.lock`` (``fcntl.flock``),
    held until ``unlock_run_dir`` or the end of the process (a killed holder releases it). Another
    process gets PreflabError naming the directory and the holder's pid; this process may take
    it again (each take needs its own unlock)."""
    path = Path(path)
    make_dir(path)
    key = path.resolve()
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        return
    f = open(path / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held open while the lock is held
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(f)
        f.close()
        raise PreflabError(f"{path} is in use by {holder} (it holds {path / LOCK_FILE}); wait for it to end "
                           "or choose another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD_LOCKS[key] = [f, 1]


def unlock_run_dir(path: str | os.PathLike) -> None:
    """Give back one ``lock_run_dir`` of ``path``; the lock goes with the last one."""
    key = Path(path).resolve()
    held = _HELD_LOCKS.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD_LOCKS[key]
        held[0].truncate(0)  # the next holder's line is the only one a refused process can read
        held[0].close()  # closing the file releases the flock


@contextlib.contextmanager
def run_dir_lock(path: str | os.PathLike) -> Iterator[None]:
    """``lock_run_dir(path)`` for the length of a ``with`` block."""
    lock_run_dir(path)
    try:
        yield
    finally:
        unlock_run_dir(path)


def clear_run_dir(path: str | os.PathLike) -> None:
    """Delete what ``path`` holds (``--restart``), under its lock: a run in progress there is refused."""
    path = Path(path)
    if not path.exists():
        return
    with run_dir_lock(path):
        for p in path.iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def check_resumable(path: Path) -> None:
    """PreflabError naming ``path`` unless it holds a run to resume (its manifest.json)."""
    if (path / "manifest.json").is_file():
        return
    if not path.exists():
        why = "it does not exist"
    elif not path.is_dir():
        why = "it is a file, not a directory"
    else:
        why = "it is not a preflab run directory (no manifest.json)"
    raise PreflabError(f"{path}: nothing to resume: {why}; check run.out, or start a new run without --resume")


class RunDir:
    """The directory of one run. Only the main rank (``writer=True``) writes anything.

    ``manifest.json`` says ``running`` (with this process's pid and host) until ``finish()``;
    ``fail(reason)``/``interrupt(reason)`` (or leaving ``with RunDir(...)`` by an exception, or
    ``session()``) records ``failed``/``interrupted`` and why. Opening a run whose manifest says
    ``running`` while its process is gone says so (``dead_owner``). ``resume=True`` refuses a
    config that differs from the run's in anything but RESUME_ALLOWED_CHANGES unless ``force``
    (with the config's ``schema``, keys added to preflab since count at their defaults);
    every change is recorded in the manifest's ``config_changes`` with the step it applies from.

    Before writing anything the writer takes the directory's lock (``lock_run_dir``; a second
    process on the same directory is refused, naming the holder's pid) and ``resume=True``
    checks that the directory holds a run (``check_resumable``). The lock goes with the run's
    end (``finish``/``fail``) or the process.
    """

    def __init__(self, path: str | os.PathLike, *, stage: str, config: dict[str, Any], seed: int,
                 resume: bool = False, writer: bool = True, force: bool | None = None, schema: Any = None):
        self.path = Path(path)
        self.stage = stage
        self.writer = writer
        self.ckpt_dir = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self._trackers: Any = None
        self._resumed_at: int | None = None
        self._created = False
        self._locked = False
        self._schema = schema
        force = _FORCE_RESUME[-1] if force is None else force
        if writer:
            if resume:
                check_resumable(self.path)
            self._created = not self.path.exists()
            lock_run_dir(self.path)  # before any write: a second process on this directory stops here
            self._locked = True
            try:
                self._open(config, seed, resume, force)
            except BaseException:
                self._unlock()
                raise

    def _open(self, config: dict[str, Any], seed: int, resume: bool, force: bool) -> None:
        """The writer's start: refuse a live or finished run it may not touch, write the manifest."""
        prev = read_manifest(self.path) if (self.path / "manifest.json").exists() else None
        died = dead_owner(prev) if prev else None
        if prev and not died and prev.get("status") == "running" and isinstance(prev.get("pid"), int) \
                and prev.get("pid") != os.getpid() and prev.get("host") == socket.gethostname() and not force:
            raise PreflabError(f"{self.path} is in use: its manifest says running in pid {prev['pid']} on "
                               f"{prev['host']}, which is alive (if that process is not preflab, pass --force)")
        if not resume and self.metrics_path.exists() and self.metrics_path.stat().st_size:
            why = f" ({died})" if died else ""
            raise PreflabError(
                f"{self.path} already holds a run{why}; pass --resume to continue it or choose another --out"
            )
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.cleaned = clean_stale_tmp_dirs(self.ckpt_dir) + clean_stale_tmp_dirs(self.path)
        self.manifest = {
            "stage": self.stage,
            "config": config,
            "seed": seed,
            "versions": versions(),
            "git_commit": git_commit(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": _now(),
            "finished_at": None,
            "status": "running",
        }
        if resume and prev:
            changes, refused = check_config_change(prev.get("config") or {}, config, force=force,
                                                   where=self.path / "manifest.json", schema=self._schema)
            self.manifest["started_at"] = prev.get("started_at", self.manifest["started_at"])
            self.manifest["resumed_at"] = prev.get("resumed_at", []) + [_now()]
            self.manifest["config_changes"] = list(prev.get("config_changes", []))
            if changes:
                step = self.checkpoints()[-1][0] if self.checkpoints() else 0
                self.manifest["config_changes"].append(
                    {"from_step": step, "at": _now(), "forced": bool(refused), "changes": changes})
            for key in ("owner_died", "failures", "trackers"):
                if key in prev:
                    self.manifest[key] = prev[key]
        if died:
            self.manifest.setdefault("owner_died", []).append({"noticed_at": _now(), "message": died})
        self._write_manifest()
        if died:
            ckpts = self.checkpoints()
            if not resume:
                then = "starting it again"
            elif ckpts:
                then = f"resuming from its checkpoint at step {ckpts[-1][0]}"
            else:
                then = "it left no checkpoint (run.save_every sets how often): starting from step 0"
            self.log(f"note: {died}; {then}")
            _say(f"{self.path}: {died}; {then}")
        if self.cleaned:
            self.log("removed unfinished checkpoint writes: " + ", ".join(p.name for p in self.cleaned))
        for old in [r for r in _OPEN_RUNS if r.path.resolve() == self.path.resolve()]:
            _OPEN_RUNS.remove(old)  # an earlier open of this directory in this process, left unfinished
            old._unlock()
        _OPEN_RUNS.append(self)

    # -- manifest and logs -------------------------------------------------------------------

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=2, default=str))

    def _close(self, status: str = "finished") -> None:
        if self in _OPEN_RUNS:
            _OPEN_RUNS.remove(self)
        if self._trackers is not None:
            self._trackers.close(status)
            self._trackers = None
        self._unlock()

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            unlock_run_dir(self.path)

    def finish(self, status: str = "finished", **extra: Any) -> None:
        if not self.writer:
            return
        self.manifest.update(status=status, finished_at=_now(), **extra)
        self.manifest.pop("reason", None)
        self._write_manifest()
        self._close(status)

    def fail(self, reason: str, status: str = "failed") -> None:
        """Record that the run stopped without finishing (``failed`` or ``interrupted``) and why."""
        if not self.writer or self.manifest.get("status") != "running":
            return
        self.manifest.update(status=status, reason=reason, finished_at=_now())
        self.manifest.setdefault("failures", []).append({"status": status, "reason": reason, "at": _now(),
                                                        "last_checkpoint": str(self.latest_checkpoint())})
        self._write_manifest()
        self.log(f"{status}: {reason}")
        self._close(status)

    def interrupt(self, reason: str = "interrupted (Ctrl-C)") -> None:
        self.fail(reason, status="interrupted")

    def fail_from(self, exc: BaseException) -> None:
        """``fail`` with the reason an exception gives. A run created by this process that fails
        on its input (data, config, model) before logging or saving anything is removed instead,
        so a bad data file leaves no half-created run directory."""
        if not self.writer or self.manifest.get("status") != "running" or (isinstance(exc, SystemExit) and not exc.code):
            return
        if isinstance(exc, KeyboardInterrupt):
            self.interrupt(f"interrupted (Ctrl-C){f': {exc}' if str(exc) else ''}")
            return
        if isinstance(exc, DataError | ConfigError | ModelError) and self._created and not self.read_metrics() \
                and not self.checkpoints():
            self._close()
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.fail(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.fail_from(exc)

    def log(self, message: str) -> None:
        if self.writer:
            with open(self.path / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"{_now()} {message}\n")

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one row to metrics.jsonl (and the configured trackers). A NaN or inf value is
        written as null (JSON has no NaN) and named in log.txt."""
        if not self.writer:
            return
        row = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        clean = {k: _finite_or_none(v) for k, v in row.items()}
        bad = [k for k in row if clean[k] != row[k]]  # NaN != NaN: every non-finite value differs
        if bad:
            self.log(f"step {step}: non-finite metrics written as null: "
                     + ", ".join(f"{k}={row[k]}" for k in bad))
            row = clean
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        self.trackers().log(step, {k: v for k, v in row.items() if k != "step"})

    def trackers(self) -> Any:
        """The trackers named in the config's ``run.trackers`` (opened on first use)."""
        if self._trackers is None:
            from preflab.trackers import open_trackers

            names = ((self.manifest.get("config") or {}).get("run") or {}).get("trackers") or []
            self._trackers = open_trackers(names, self.path, run_name=f"{self.stage}:{self.path.name}",
                                           params=self.manifest.get("config") or {}, resume_step=self._resumed_at,
                                           state=self.manifest.setdefault("trackers", {}) if names else None)
            if self._trackers.trackers:
                self._write_manifest()  # e.g. the MLflow run id, which a resumed run continues
        return self._trackers

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
        self._resumed_at = step  # trackers opened from now on drop what they hold after it

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, Path]]:
        return _checkpoints(self.ckpt_dir)

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1][1] if ckpts else None

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int = 1) -> Path | None:
        """Write ``state`` (torch-serialisable) as checkpoints/step-N atomically; prune old ones.

        The state is written into a hidden temporary directory and renamed into place, so a
        crash mid-write leaves the previous checkpoint as the newest complete one. A model state
        (``state["model"]``) with a NaN or inf is refused (TrainingError): the newest checkpoint
        is always one that ``--resume`` can continue from.
        """
        if not self.writer:
            return None
        self._refuse_non_finite(step, _non_finite_tensors(state.get("model") or {})
                                if isinstance(state.get("model"), dict) else [])
        final = self.ckpt_dir / f"step-{step:06d}"
        with atomic_dir(final) as tmp:
            self._write_state(tmp, step, state)
        self._prune(keep)
        return final

    def save_sharded_checkpoint(self, step: int, model: Any, optimizer: Any, state: dict[str, Any],
                                keep: int = 1) -> None:
        """``save_checkpoint`` for a sharded (FSDP) model, called by every rank: each writes its shards
        of the model and optimizer into the temporary directory's ``sharded/``
        (torch.distributed.checkpoint), then rank 0 adds ``state`` (the rest) and renames it into
        place. Every rank must see the run directory (several machines: shared storage)."""
        from preflab import distributed

        bad = distributed.all_gather_object(_non_finite_tensors(distributed.local_shards(model)))
        self._refuse_non_finite(step, sorted({k for names in bad for k in names}))
        final = self.ckpt_dir / f"step-{step:06d}"
        with atomic_dir(final) if self.writer else contextlib.nullcontext() as tmp:
            tmp = Path(distributed.broadcast_object(str(tmp)))
            distributed.save_sharded(model, optimizer, tmp / SHARDED)  # returns on rank 0 once all wrote
            if self.writer:
                self._write_state(tmp, step, state)
        if self.writer:
            self._prune(keep)

    def _refuse_non_finite(self, step: int, bad: list[str]) -> None:
        if bad:
            from preflab.optim import non_finite_error

            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise non_finite_error(f"model weights ({shown}); not saved as a checkpoint", step=step,
                                   last_good=self.latest_checkpoint() or "none")

    @staticmethod
    def _write_state(tmp: Path, step: int, state: dict[str, Any]) -> None:
        import torch

        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "saved_at": _now()}))

    def _prune(self, keep: int) -> None:
        for _, old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def save_training(self, step: int, model: Any, optimizer: Any, scheduler: Any, keep: int = 1,
                      **extra: Any) -> None:
        """Checkpoint a training loop: model, optimizer, scheduler, RNG states (every rank's), step and ``extra``
        objects with ``state_dict()`` (e.g. a KL controller). Every rank waits for rank 0. A sharded
        (FSDP) model and its optimizer go to ``sharded/``, written by every rank."""
        from preflab import distributed

        # Every rank's random state (ranks draw differently: the RL stage samples its own prompts),
        # and rank 0's under "rng" as before.
        ranks = distributed.all_gather_object(rng_state())
        state = {"scheduler": scheduler.state_dict(), "rng": ranks[0], "rng_ranks": ranks, "step": step,
                 "extra": {k: v.state_dict() for k, v in extra.items()}}
        if distributed.is_sharded(model):
            self.save_sharded_checkpoint(step, model, optimizer, state, keep=keep)
        else:
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
            self.save_checkpoint(step, state, keep=keep)
        distributed.barrier()

    def resume_training(self, model: Any, optimizer: Any, scheduler: Any, **extra: Any) -> int:
        """Load the newest checkpoint into the given objects; returns its step (0: none).

        A sharded checkpoint is resharded to this run's ranks (any number, or one process); a
        full one cannot be read into a sharded model. Metric rows after that step are dropped:
        the resumed run logs them again.
        """
        from preflab import distributed

        path = self.latest_checkpoint()
        if path is None:
            return 0
        state = self.load_checkpoint(path)
        if (path / SHARDED).is_dir():
            distributed.load_sharded(model, optimizer, path / SHARDED)
        elif distributed.is_sharded(model):
            raise ConfigError(f"{path}: a full (train.parallel=ddp or one-process) checkpoint, and this run "
                              "shards the model (train.parallel=fsdp): resume with train.parallel=ddp")
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for k, v in extra.items():
            v.load_state_dict(state["extra"][k])
        dist = distributed.current()
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else state["rng"])
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
    """A rich progress bar with ETA and the latest metrics; silent when disabled.

    When stderr is not a terminal (a log file, CI), rich draws nothing until the end, so a plain
    line with the count, elapsed time and ETA is printed instead, at most every ``every_s``
    seconds (and for the last item)."""

    every_s = 30.0

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0,
                 keys: tuple[str, ...] = ()):
        self.enabled = enabled
        self.keys = keys
        self._bar = None
        self.total, self.description, self.done = total, description, start
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
            self._plain = not self._bar.console.is_terminal
            self._t0 = self._last = time.monotonic()
            self._start = start

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
            shown = [(k, v) for k, v in ([(k, metrics[k]) for k in self.keys if k in metrics]
                                         or list(metrics.items())[:4]) if isinstance(v, int | float)]
            short = [k.split("/")[-1] for k, _ in shown]  # the whole key where two would read alike
            info = "  ".join(f"{s if short.count(s) == 1 else k}={v:.4g}" for s, (k, v) in zip(short, shown))
        self._bar.update(self._task, advance=advance, info=info)
        self.done += advance
        now = time.monotonic()
        if self._plain and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            elapsed, new = now - self._t0, self.done - self._start
            eta = elapsed / new * (self.total - self.done) if new > 0 else float("nan")
            print(f"{self.description}: {self.done}/{self.total} elapsed {_clock(elapsed)} eta {_clock(eta)}"
                  + (f"  {info}" if info else ""), file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    return "?" if math.isnan(seconds) else str(dt.timedelta(seconds=round(seconds)))

