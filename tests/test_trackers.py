"""run.trackers: TensorBoard and MLflow get the same namespaced scalars as metrics.jsonl."""

import json

import pytest

from preflab.config import SFTConfig, load_config
from preflab.errors import ConfigError
from preflab.run import RunDir

ROWS = [(1, {"train/loss": 2.5, "perf/step_s": 0.25, "note": "text"}),
        (2, {"train/loss": 1.5, "perf/step_s": 0.5, "train/grad_norm": float("nan")})]


def log_run(path, trackers):
    run = RunDir(path, stage="sft", config={"run": {"trackers": trackers}}, seed=0)
    for step, metrics in ROWS:
        run.log_metrics(step, metrics)
    run.finish()
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_trackers_are_validated_and_default_to_none():
    assert load_config(SFTConfig).run.trackers == []
    assert load_config(SFTConfig, None, ["run.trackers=[tensorboard, mlflow]"]).run.trackers == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match=r"run\.trackers\.0: Input should be 'tensorboard' or 'mlflow'"):
        load_config(SFTConfig, None, ["run.trackers=[wandb]"])


def test_tensorboard_reads_back_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = log_run(tmp_path, ["tensorboard"])
    assert rows[1]["train/grad_norm"] is None  # metrics.jsonl still gets every row
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["perf/step_s", "train/loss"]
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 2.5), (2, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("perf/step_s")] == [(1, 0.25), (2, 0.5)]


def test_mlflow_reads_back_the_same_scalars(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "preflab-test")
    log_run(tmp_path, ["mlflow"])
    from preflab.trackers import default_mlflow_uri

    client = MlflowClient(tracking_uri=default_mlflow_uri(tmp_path))
    exp = client.get_experiment_by_name("preflab-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == f"sft:{tmp_path.name}"
    assert run.data.params["run.trackers"] == "['mlflow']"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.5), (2, 1.5)]
    assert "train/grad_norm" not in run.data.metrics and "note" not in run.data.metrics


def test_a_resumed_run_continues_its_trackers(tmp_path, monkeypatch):
    """Resumed from the step-1 checkpoint, the run logs step 2 again: TensorBoard shows the second
    try only, and MLflow continues the same run (one run, its history has both tries of step 2)."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from preflab.trackers import default_mlflow_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "preflab-resume")
    cfg = {"run": {"trackers": ["tensorboard", "mlflow"]}}
    first = RunDir(tmp_path, stage="sft", config=cfg, seed=0)
    first.log_metrics(1, {"train/loss": 3.0})
    first.log_metrics(2, {"train/loss": 2.0})
    first.interrupt()
    client = MlflowClient(tracking_uri=default_mlflow_uri(tmp_path))
    exp_id = client.get_experiment_by_name("preflab-resume").experiment_id
    assert client.search_runs([exp_id])[0].info.status == "KILLED"
    again = RunDir(tmp_path, stage="sft", config=cfg, seed=0, resume=True)
    again.truncate_metrics(1)  # what resume_training does after loading the step-1 checkpoint
    again.log_metrics(2, {"train/loss": 1.0})
    again.finish()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 1.0)]
    (run,) = client.search_runs([exp_id])
    assert run.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")) == \
        [(1, 3.0), (2, 1.0), (2, 2.0)]
    assert [json.loads(x)["train/loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3.0, 1.0]
