"""Experiment trackers beside ``metrics.jsonl``: TensorBoard and MLflow, chosen by ``run.trackers``.

``metrics.jsonl`` is always written (``RunDir.log_metrics``); each tracker named in the config
gets the same rows with the same namespaced keys (``train/loss``, ``perf/step_s``...) at the
same step. Both are optional extras, imported only when named:

- ``tensorboard`` (``pip install 'preflab[tensorboard]'``): event files in ``RUN/tensorboard``;
  ``tensorboard --logdir RUN/tensorboard``.
- ``mlflow`` (``pip install 'preflab[mlflow]'``: mlflow-skinny, the client alone): one MLflow run
  per stage run, in the server or store ``MLFLOW_TRACKING_URI`` names, else ``RUN/mlflow.db``
  (with the full ``mlflow`` package) or ``RUN/mlruns`` (skinny); the experiment is
  ``MLFLOW_EXPERIMENT_NAME``, else ``preflab``. The resolved config goes in as flattened params.

A non-finite value reaches no tracker (metrics.jsonl writes it as null); a value that is not a
number (a string, a list) is left out too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from preflab.errors import ConfigError

KNOWN = ("tensorboard", "mlflow")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("run.trackers: tensorboard needs the tensorboard package: "
                              "pip install 'preflab[tensorboard]'") from e
        self.log_dir = run_dir / "tensorboard"
        # A resumed run logs the steps after its checkpoint again: purge_step hides the first try's.
        self.writer = SummaryWriter(log_dir=str(self.log_dir),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self, status: str = "finished") -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, run_dir: Path, run_name: str, params: dict[str, Any], state: dict[str, Any]):
        try:
            import mlflow
        except ImportError as e:
            raise ConfigError("run.trackers: mlflow needs the mlflow package: pip install 'preflab[mlflow]'") from e
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(run_dir)
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        previous = state.get("mlflow_run_id") if state.get("mlflow_uri") == uri else None
        if previous:  # a resumed run continues its MLflow run (params stay as first logged)
            self.run_id = previous
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "preflab")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        state.update(mlflow_run_id=self.run_id, mlflow_uri=uri)
        flat = [mlflow.entities.Param(k, str(v)[:500]) for k, v in _flatten(params).items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [self.mlflow.entities.Metric(_mlflow_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def close(self, status: str = "finished") -> None:
        mlflow_status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)


def default_mlflow_uri(run_dir: Path) -> str:
    """Where a run's MLflow data goes without ``MLFLOW_TRACKING_URI``: ``RUN/mlflow.db`` (SQLite)
    when the full ``mlflow`` package's database backend (sqlalchemy, alembic) is installed, else
    the plain directory ``RUN/mlruns`` that ``mlflow-skinny`` can write (MLflow 3 keeps that
    backend in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is set for this process)."""
    import importlib.util

    if importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic"):
        return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir / "mlruns").resolve().as_uri()


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / `` and spaces; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


class Trackers:
    """The trackers of one run; ``log`` sends finite numeric metrics to each."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.trackers:
            return
        scalars = _scalars(metrics)
        for t in self.trackers:
            t.log(step, scalars)

    def close(self, status: str = "finished") -> None:
        """End each tracker; ``status`` is the run's (finished, failed, interrupted)."""
        for t in self.trackers:
            t.close(status)
        self.trackers = []


def open_trackers(names: list[str], run_dir: str | os.PathLike, *, run_name: str = "preflab",
                  params: dict[str, Any] | None = None, resume_step: int | None = None,
                  state: dict[str, Any] | None = None) -> Trackers:
    """The trackers named (``[]``: none; metrics.jsonl is written by RunDir regardless).

    ``resume_step``: the run resumed from this step's checkpoint (TensorBoard hides its later
    points from before); ``state``: a dict kept in the manifest (MLflow keeps its run id there,
    so a resumed run continues the same MLflow run)."""
    run_dir = Path(run_dir)
    out: list[Any] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            out.append(TensorBoardTracker(run_dir, resume_step))
        elif name == "mlflow":
            out.append(MLflowTracker(run_dir, run_name, params or {}, state if state is not None else {}))
        else:
            raise ConfigError(f"run.trackers: unknown tracker {name!r} (known: {', '.join(KNOWN)})")
    return Trackers(out)
