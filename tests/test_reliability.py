"""Failed runs that say so (issue 15): NaN updates never applied or saved, resume refuses a
changed config, manifest status on failure/Ctrl-C/kill, finite configs, umask, clear errors."""

import json
import math
import os
import sqlite3
import stat
import subprocess
import sys

import pytest
import torch

from helpers import run_cli, write_demos
from preflab import loop
from preflab.config import PipelineConfig, RLConfig, SFTConfig, load_config
from preflab.errors import ConfigError, DataError, ModelError, PreflabError, TrainingError
from preflab.optim import clip_and_step, clip_grad
from preflab.run import RunDir, check_config_change, dead_owner, read_manifest, session


def sft_args(tmp_path, *extra):
    demos = write_demos(tmp_path / "demos.jsonl", 16)
    return ["sft", "model.path=tiny:", f"data.train={demos}", "data.val_fraction=0", "data.max_length=96",
            "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", "train.bf16=false",
            "train.batch_size=4", "run.progress=false", f"run.out={tmp_path / 'run'}", *extra]


def finite_state(path) -> bool:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)["model"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# -- 1. non-finite gradients ------------------------------------------------------------------


def test_clip_grad_refuses_a_nan_norm_and_the_step_is_not_taken():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    w.grad = torch.tensor([float("nan"), 1.0])
    with pytest.raises(TrainingError, match=r"non-finite gradient norm nan at step 7; .*last good checkpoint: "
                                            r"runs/x/checkpoints/step-000006"):
        clip_and_step(opt, [w], 1.0, step=7, last_good="runs/x/checkpoints/step-000006")
    assert w.tolist() == [1.0, 2.0]  # untouched
    w.grad = torch.tensor([float("inf"), 0.0])
    with pytest.raises(TrainingError, match="non-finite gradient norm inf"):
        clip_grad([w], None)
    # A finite norm: the same value and clipping as torch's clip_grad_norm_.
    w.grad = torch.tensor([3.0, 4.0])
    assert clip_grad([w], 1.0) == 5.0
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8]))


def test_a_non_finite_model_state_is_never_saved(tmp_path):
    run = RunDir(tmp_path / "run", stage="t", config={}, seed=0)
    good = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(good.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run.save_training(1, good, opt, sched)
    with torch.no_grad():
        good.weight[0, 1] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite model weights \(weight\).* at step 2.*step-000001"):
        run.save_training(2, good, opt, sched)
    assert [s for s, _ in run.checkpoints()] == [1] and finite_state(run.latest_checkpoint())


def test_lr_1e30_stops_before_a_nan_update_and_the_run_says_failed(tmp_path, capsys):
    """The issue's reproduction: lr=1e30 gives a finite loss at step 2 but a NaN gradient norm. The
    update is refused, the step-1 checkpoint (finite) is named as last good, the manifest says failed."""
    code = run_cli(sft_args(tmp_path, "optim.lr=1e30", "optim.max_grad_norm=null", "train.max_steps=4",
                            "run.save_every=1"))
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite gradient norm nan" in err and "last good checkpoint:" in err and "step-000001" in err
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert finite_state(run / "checkpoints/step-000001")
    manifest = read_manifest(run)
    assert manifest["status"] == "failed" and "non-finite gradient norm" in manifest["reason"]
    assert manifest["failures"][0]["last_checkpoint"].endswith("step-000001")


# -- 2. resume with a changed config ----------------------------------------------------------


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path):
    cfg = {"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "run": {"progress": True, "out": "x"}, "model": {"threads": 1}}
    RunDir(tmp_path, stage="t", config=cfg, seed=0).log_metrics(1, {"a": 1.0})
    changed = json.loads(json.dumps(cfg))
    changed["optim"]["lr"] = 2e-3
    changed["optim"]["betas"] = [0.9, 0.99]
    with pytest.raises(ConfigError, match=r"optim\.betas: \[0\.9, 0\.95\] -> \[0\.9, 0\.99\]; optim\.lr: 0\.001 -> 0\.002"
                                          r".*--force"):
        RunDir(tmp_path, stage="t", config=changed, seed=0, resume=True)
    assert read_manifest(tmp_path)["config"] == cfg  # untouched
    # Logging and threads may change freely (recorded, not refused).
    allowed = json.loads(json.dumps(cfg))
    allowed["run"]["progress"] = False
    allowed["model"]["threads"] = 2
    RunDir(tmp_path, stage="t", config=allowed, seed=0, resume=True)
    rec = read_manifest(tmp_path)["config_changes"]
    assert rec[-1]["forced"] is False and set(rec[-1]["changes"]) == {"run.progress", "model.threads"}


def test_forced_resume_records_the_change_at_the_checkpoint_step(tmp_path, capsys):
    assert run_cli(sft_args(tmp_path, "train.max_steps=2", "run.save_every=1")) == 0
    # Resuming with another LR is refused, by key, and changes nothing...
    assert run_cli(sft_args(tmp_path, "train.max_steps=2", "run.save_every=1", "optim.lr=5e-4", "--resume")) == 2
    assert "optim.lr: 0.001 -> 0.0005" in capsys.readouterr().err
    assert read_manifest(tmp_path / "run")["config"]["optim"]["lr"] == 1e-3
    # ...and accepted with --force, recorded with the step it applies from.
    assert run_cli(sft_args(tmp_path, "train.max_steps=3", "run.save_every=1", "optim.lr=5e-4", "--resume",
                            "--force")) == 0
    m = read_manifest(tmp_path / "run")
    assert m["status"] == "finished" and m["config"]["optim"]["lr"] == 5e-4
    change = m["config_changes"][-1]
    assert change["forced"] and change["from_step"] == 2
    assert change["changes"]["optim.lr"] == {"old": 1e-3, "new": 5e-4}
    assert change["changes"]["train.max_steps"] == {"old": 2, "new": 3}
    assert run_cli(sft_args(tmp_path, "--force")) == 2  # --force means nothing without --resume
    assert "--force only applies with --resume" in capsys.readouterr().err


# -- 5. manifest status -----------------------------------------------------------------------


def test_run_dir_records_failed_and_interrupted_with_the_reason(tmp_path):
    with pytest.raises(RuntimeError), RunDir(tmp_path / "a", stage="t", config={}, seed=0) as run:
        run.log_metrics(1, {"x": 1.0})
        raise RuntimeError("boom")
    m = read_manifest(tmp_path / "a")
    assert m["status"] == "failed" and m["reason"] == "RuntimeError: boom" and m["finished_at"]
    assert m["pid"] == os.getpid() and m["host"]
    with pytest.raises(KeyboardInterrupt), session():
        RunDir(tmp_path / "b", stage="t", config={}, seed=0).log_metrics(1, {"x": 1.0})
        raise KeyboardInterrupt
    assert read_manifest(tmp_path / "b")["status"] == "interrupted"
    done = RunDir(tmp_path / "c", stage="t", config={}, seed=0)
    done.finish()
    done.fail("too late")  # a finished run stays finished
    assert read_manifest(tmp_path / "c")["status"] == "finished"


def test_ctrl_c_marks_the_run_interrupted_and_prints_the_resume_command(tmp_path, monkeypatch, capsys):

    calls = {"n": 0}
    real = loop.clip_grad

    def ctrl_c(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "clip_grad", ctrl_c)
    args = sft_args(tmp_path, "train.max_steps=4", "run.save_every=2")
    assert run_cli(args) == 130
    err = capsys.readouterr().err
    assert "checkpoints/step-000002" in err
    assert "preflab sft model.path=tiny: " in err and "run.save_every=2 --resume\n" in err
    m = read_manifest(tmp_path / "run")
    assert m["status"] == "interrupted" and "Ctrl-C" in m["reason"]
    monkeypatch.undo()
    assert run_cli([*args, "--resume"]) == 0
    m = read_manifest(tmp_path / "run")
    assert m["status"] == "finished" and m["failures"][0]["status"] == "interrupted"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_owner_is_detected_on_the_next_open(tmp_path, capsys):
    run = RunDir(tmp_path, stage="t", config={"a": 1}, seed=0)
    run.log_metrics(1, {"x": 1.0})
    m = read_manifest(tmp_path)
    assert m["status"] == "running" and dead_owner(m) is None  # this process: alive
    m["pid"] = _dead_pid()  # as if the owner had been killed with -9
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert "it was killed" in dead_owner(m)
    with pytest.raises(PreflabError, match=r"already holds a run \(the process that ran it \(pid \d+ .*it was killed\)"):
        RunDir(tmp_path, stage="t", config={"a": 1}, seed=0)
    RunDir(tmp_path, stage="t", config={"a": 1}, seed=0, resume=True)
    err = capsys.readouterr().err
    assert "it was killed" in err and "left no checkpoint" in err and "starting from step 0" in err
    m2 = read_manifest(tmp_path)
    assert m2["status"] == "running" and m2["pid"] == os.getpid() and "it was killed" in m2["owner_died"][0]["message"]
    # Killed again after a checkpoint: the note names the step it resumes from.
    RunDir(tmp_path, stage="t", config={"a": 1}, seed=0, resume=True).save_checkpoint(3, {"model": {}})
    m2["pid"] = _dead_pid()
    (tmp_path / "manifest.json").write_text(json.dumps(m2))
    RunDir(tmp_path, stage="t", config={"a": 1}, seed=0, resume=True)
    assert "resuming from its checkpoint at step 3" in capsys.readouterr().err


def test_a_live_owner_in_another_process_is_refused(tmp_path):
    RunDir(tmp_path, stage="t", config={}, seed=0).log_metrics(1, {"x": 1.0})
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        m = read_manifest(tmp_path)
        m["pid"] = proc.pid
        (tmp_path / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(PreflabError, match=rf"is in use: .* pid {proc.pid}"):
            RunDir(tmp_path, stage="t", config={}, seed=0, resume=True)
        RunDir(tmp_path, stage="t", config={}, seed=0, resume=True, force=True)
    finally:
        proc.kill()
        proc.wait()


def test_bad_data_leaves_no_half_created_run_directory(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    args = [a if not a.startswith("data.train=") else f"data.train={bad}" for a in sft_args(tmp_path)]
    assert run_cli(args) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- 6. non-finite config values --------------------------------------------------------------


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=.inf", "optim.lr=1e999", "optim.lr=nan",
                                      "optim.betas=[0.9, .inf]", "optim.max_grad_norm=inf"])
def test_non_finite_numbers_are_rejected_by_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}(\.1)?: Input should be a finite number"):
        load_config(SFTConfig, None, [override])


def test_non_finite_numbers_are_rejected_in_free_form_sections():
    with pytest.raises(ConfigError, match=r"rl_stage: Value error, kl\.coef must be a finite number, got inf"):
        load_config(PipelineConfig, None, ["rl_stage.kl.coef=.inf"])
    with pytest.raises(ConfigError, match=r"rollout\.temperature: Input should be a finite number"):
        load_config(RLConfig, None, ["models.reward_model=x", "data.prompts=y", "rollout.temperature=-inf"])
    assert load_config(SFTConfig, None, ["optim.lr=1e-3"]).optim.lr == 1e-3


# -- 7. outputs honour the umask --------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    from preflab.data.jsonl import atomic_dir, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
        run = RunDir(tmp_path / "run", stage="t", config={}, seed=0)
        ckpt = run.save_checkpoint(1, {"model": {}})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "run/manifest.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o777 & ~umask


# -- 4 and 8. one clear error instead of a traceback ------------------------------------------


def test_a_full_disk_while_writing_a_directory_is_one_clear_error_and_keeps_the_old_one(tmp_path, monkeypatch):
    """ENOSPC, or torch.save's RuntimeError with the disk (nearly) full: one DataError naming the
    directory and what to do; the previous directory stays; any other error passes unchanged."""
    import errno
    from collections import namedtuple

    from preflab.data import jsonl
    from preflab.data.jsonl import atomic_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("kept")
    usage = namedtuple("usage", "total used free")
    free = {"bytes": 10 * 2**30}
    monkeypatch.setattr(jsonl.shutil, "disk_usage", lambda p: usage(2**40, 2**40 - free["bytes"], free["bytes"]))

    def fail_with(error):
        with atomic_dir(target) as d:
            (d / "half").write_text("x")
            raise error

    with pytest.raises(DataError, match=r"model: no space left on the device while writing it; free some space"):
        fail_with(OSError(errno.ENOSPC, "No space left on device"))
    free["bytes"] = 2**20
    with pytest.raises(DataError, match="no space left"):
        fail_with(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 506259456 vs 506259344"))
    free["bytes"] = 10 * 2**30
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left it is not the disk
        fail_with(RuntimeError("unexpected pos"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (target / "old").read_text() == "kept"


def test_a_store_that_is_not_sqlite_is_one_clear_error(tmp_path):
    from preflab.feedback.store import PreferenceStore

    not_db = tmp_path / "prefs.jsonl"
    not_db.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 50)
    with pytest.raises(DataError, match=r"prefs\.jsonl: not a SQLite preference store \(file is not a database\)"):
        PreferenceStore(not_db)
    assert not_db.read_text().startswith('{"prompt"')  # untouched
    with pytest.raises(DataError, match="is a directory"):
        PreferenceStore(tmp_path)
    assert not isinstance(DataError("x"), sqlite3.Error)


def test_a_data_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    from preflab.data.chat import read_demos
    from preflab.data.io import read_label_studio

    latin = tmp_path / "demos.jsonl"
    latin.write_bytes('{"prompt": "a", "response": "b"}\n{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"demos\.jsonl:2: not UTF-8 text \(byte 0xe9 .*save the file as UTF-8"):
        read_demos(str(latin))
    utf16 = tmp_path / "ls.json"
    utf16.write_text("[]", encoding="utf-16")
    with pytest.raises(DataError, match=r"ls\.json: not UTF-8 text"):
        read_label_studio(utf16)


def test_metrics_never_hold_bare_nan(tmp_path):
    run = RunDir(tmp_path, stage="t", config={}, seed=0)
    run.log_metrics(3, {"a": float("nan"), "b": torch.tensor(float("inf")), "c": 1.5, "d": [1.0, float("-inf")]})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 3, "a": None, "b": None, "c": 1.5, "d": [1.0, None]}
    assert "non-finite metrics written as null: a=nan, b=inf, d=[1.0, -inf]" in (tmp_path / "log.txt").read_text()


def test_a_killed_checkpoint_write_leaves_no_tmp_dir_on_the_next_start(tmp_path):
    run = RunDir(tmp_path, stage="t", config={}, seed=0)
    run.save_checkpoint(1, {"model": {}})
    # A write killed half-way (no finally ran): its temporary directory stays behind.
    (tmp_path / "checkpoints/.tmp-step-000002-abc123").mkdir()
    (tmp_path / "checkpoints/.tmp-step-000002-abc123/state.pt").write_bytes(b"half")
    (tmp_path / ".tmp-model-xyz").mkdir()
    RunDir(tmp_path, stage="t", config={}, seed=0, resume=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert not (tmp_path / ".tmp-model-xyz").exists()
    assert "removed unfinished checkpoint writes: .tmp-step-000002-abc123, .tmp-model-xyz" in (tmp_path / "log.txt").read_text()


def test_a_mistyped_relative_model_path_fails_at_once(tmp_path, monkeypatch):
    from preflab import models

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the hub would be tried if this were a hub id
    (tmp_path / "runs").mkdir()
    for spec in ("runs/sft-modle", "./sft/model", "../nope", "runs/a/model"):
        with pytest.raises(ModelError, match=rf"{spec.replace('.', '[.]')}: model directory not found"):
            models.resolve(spec)
    assert models.resolve("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id stays one


def test_report_on_a_directory_that_is_not_a_run_is_an_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    assert run_cli(["report", str(tmp_path)]) == 2
    assert "not a preflab run directory" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_generate_rejects_duplicate_ids(tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n')
    assert run_cli(["generate", "--model", "tiny:", "--prompts", str(p), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "p.jsonl:4: duplicate id 'a' (first at line 1)" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_takes_another_id_field(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"key": 1001, "prompt": "x"}\n{"key": 1002, "prompt": "y"}\n')
    out = tmp_path / "o.jsonl"
    assert run_cli(["generate", "--model", "tiny:", "--prompts", str(p), "--out", str(out), "--id-field", "key",
                    "--max-new-tokens", "2"]) == 0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1001, 1002]


# -- 3. reward models are marked ---------------------------------------------------------------


def test_only_a_marked_reward_model_is_accepted_as_one(tmp_path):
    from preflab import models

    tok = models.load_tokenizer("tiny:")
    sft_dir = models.save_model(models.load_policy("tiny:"), tok, tmp_path / "sft")
    with pytest.raises(ModelError, match=rf"{tmp_path / 'sft'}: not a reward model: .*preflab_reward_model mark"):
        models.load_reward_model(str(sft_dir))
    models.load_scorer(str(sft_dir))  # a new head on an SFT trunk is what the RM stage starts from
    scorer = models.load_scorer("tiny:")
    plain = models.save_model(scorer, tok, tmp_path / "plain")  # no normalisation: not a reward model
    assert not models.is_reward_model(str(plain))
    scorer.config.preflab_reward_gain, scorer.config.preflab_reward_bias = 1.0, 0.5  # what the RM stage sets
    rm = models.save_model(scorer, tok, tmp_path / "rm")
    assert json.loads((rm / "config.json").read_text())["preflab_reward_model"] is True
    assert models.is_reward_model(str(rm)) and models.load_reward_model(str(rm)) is not None


def test_a_reward_model_directory_not_made_yet_is_not_one(tmp_path):
    """benchmarks/ppo_step.py asks before it saves its RM fixture (fresh clone: no directory yet)."""
    from preflab import models

    missing = tmp_path / "bench" / "rm"
    assert models.is_reward_model(str(missing)) is False
    (tmp_path / "empty").mkdir()
    assert models.is_reward_model(str(tmp_path / "empty")) is False  # no config.json
    with pytest.raises(ModelError, match=r"rm: model directory not found"):
        models.load_reward_model(str(missing))  # loading it still says what is wrong


def test_rm_eval_refuses_an_sft_directory(tmp_path, capsys):
    from preflab import models

    sft_dir = models.save_model(models.load_policy("tiny:"), models.load_tokenizer("tiny:"), tmp_path / "sft")
    data = tmp_path / "k.jsonl"
    data.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "order": [[0], [1]]}) + "\n")
    assert run_cli(["rm-eval", "--model", str(sft_dir), "--data", str(data)]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_apply_reward_norm_makes_plain_transformers_score_like_preflab(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from preflab import models

    scorer = models.load_scorer("tiny:3")
    scorer.config.preflab_reward_gain, scorer.config.preflab_reward_bias = 2.5, -0.75
    out = models.save_model(scorer, models.load_tokenizer("tiny:"), tmp_path / "rm")
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    plain = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    with torch.no_grad():
        raw = plain(input_ids=ids).logits[:, 0]
        folded = models.apply_reward_norm(plain)(input_ids=ids).logits[:, 0]
    torch.testing.assert_close(folded, 2.5 * raw - 0.75)
    assert plain.config.preflab_reward_gain == 1.0 and plain.config.preflab_reward_bias == 0.0
    assert not math.isnan(float(folded.sum()))


def test_check_config_change_for_the_pipeline():
    old = {"seed": 0, "threads": 1, "sft": {"optim": {"lr": 3e-5}}}
    new = {"seed": 0, "threads": 2, "sft": {"optim": {"lr": 1e-4}}}
    with pytest.raises(ConfigError, match=r"pipeline_config\.json: --resume with a different config \(sft\.optim\.lr: "
                                          r"3e-05 -> 0\.0001\)"):
        check_config_change(old, new, force=False, where="runs/x/pipeline_config.json")
    changes, refused = check_config_change(old, new, force=True, where="x")
    assert set(changes) == {"threads", "sft.optim.lr"} and set(refused) == {"sft.optim.lr"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_memory_returns_what_the_tuned_allocator_keeps():
    """With the training allocator tuning (freed blocks stay mapped), 400 MB of freed tensors stay
    in the process until release_memory, which the pipeline and compare call between stages."""
    code = """
import torch
from preflab import models
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
models.set_threads(1)
base = rss()
xs = [torch.ones(256 * 1024) for _ in range(400)]  # 400 x 1 MiB, below the raised mmap threshold
del xs
kept = rss()
models.release_memory()
print(base, kept, rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base, kept, released = map(float, out)
    assert kept - base > 300  # the freed tensors are still resident
    assert kept - released > 300  # and go back to the OS


@pytest.mark.parametrize("preset, evicted", [(None, True), ("1024", False)])
def test_set_threads_bounds_onednn_primitive_cache_unless_the_user_set_it(preset, evicted):
    """After set_threads a training process keeps at most PRIMITIVE_CACHE compiled bf16 matmul
    kernels: the first shape's kernel is rebuilt after PRIMITIVE_CACHE + 8 other shapes (oneDNN's
    verbose log says cache_miss); a capacity the user set is left alone (the kernel is reused)."""
    code = """
import torch
from preflab import models
models.set_threads(1)
w = torch.ones(64, 64, dtype=torch.bfloat16)
for m in [2, *range(3, models.PRIMITIVE_CACHE + 11), 2]:
    torch.ones(m, 64, dtype=torch.bfloat16) @ w
"""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    env |= {"ONEDNN_VERBOSE": "2"} | ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": preset} if preset else {})
    log = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    first_shape = [line for line in log.splitlines() if "create:cache_" in line and ",2x64:64x64," in line]
    assert len(first_shape) == 2 and "cache_miss" in first_shape[0], log[-2000:]
    assert ("cache_miss" in first_shape[1]) == evicted, first_shape


def test_progress_prints_plain_lines_with_eta_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    """In a log file rich draws nothing until the end; the plain line says how far and how long."""
    from preflab.run import Progress

    monkeypatch.setattr(Progress, "every_s", 0.0)
    with Progress(4, "generate") as bar:
        for _ in range(4):
            bar.update(advance=1)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("generate: ")]
    assert [x.split()[1] for x in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(" elapsed 0:00:0" in x and " eta " in x for x in lines) and lines[-1].endswith("eta 0:00:00")
    monkeypatch.setattr(Progress, "every_s", 3600.0)
    with Progress(3, "rank") as bar:
        for _ in range(3):
            bar.update(advance=1)
    assert [x.split()[1] for x in capsys.readouterr().err.splitlines() if x.startswith("rank: ")] == ["3/3"]
    with Progress(1, "sft", keys=("train/loss", "val/loss", "perf/tokens_per_s")) as bar:
        bar.update({"train/loss": 1.5, "val/loss": 2.25, "perf/tokens_per_s": 300.0, "note": "x"})
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("sft: "))
    assert line.endswith("  train/loss=1.5  val/loss=2.25  tokens_per_s=300")  # alike names in full


def test_a_key_added_since_the_run_began_is_no_change_at_its_default(tmp_path):
    """A run whose manifest lacks a key preflab has since added (here rewards.length_debias) resumes
    without --force when the key is at its default; set to something else it is refused, and so
    is a change of a key the run had. Without the schema the missing key counts as a change."""
    from preflab.config import RLConfig, dump_config, load_config

    cfg = load_config(RLConfig, "configs/rl_tiny.yaml", [f"run.out={tmp_path}"])
    old = dump_config(cfg)
    del old["rewards"]["length_debias"]
    RunDir(tmp_path, stage="rl", config=old, seed=0).log_metrics(1, {"a": 1.0})
    RunDir(tmp_path, stage="rl", config=dump_config(cfg), seed=0, resume=True, schema=RLConfig)
    assert "config_changes" not in read_manifest(tmp_path) or not read_manifest(tmp_path)["config_changes"]
    on = load_config(RLConfig, "configs/rl_tiny.yaml", [f"run.out={tmp_path}", "rewards.length_debias=true",
                                                       "rollout.samples_per_prompt=2"])
    with pytest.raises(ConfigError, match=r"rewards\.length_debias: False -> True"):
        check_config_change(old, dump_config(on), force=False, where="x", schema=RLConfig)
    with pytest.raises(ConfigError, match=r"rewards\.length_debias: None -> False"):
        check_config_change(old, dump_config(cfg), force=False, where="x")
    lr = load_config(RLConfig, "configs/rl_tiny.yaml", [f"run.out={tmp_path}", "optim.lr=1e-4"])
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.003 -> 0\.0001"):
        check_config_change(old, dump_config(lr), force=False, where="x", schema=RLConfig)
    # a stage resumed through the CLI passes its schema: the same, end to end
    (tmp_path / "sft").mkdir()
    assert run_cli(sft_args(tmp_path / "sft", "train.max_steps=2", "run.save_every=1")) == 0
    manifest = tmp_path / "sft" / "run" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["config"]["train"]["length_groups"]
    manifest.write_text(json.dumps(m))
    assert run_cli(sft_args(tmp_path / "sft", "train.max_steps=2", "run.save_every=1", "--resume")) == 0
    # a config the schema refuses (a key since removed) is compared as written
    gone = {**old, "removed_key": 1}
    changes, _ = check_config_change(gone, dump_config(cfg), force=True, where="x", schema=RLConfig)
    assert set(changes) == {"removed_key", "rewards.length_debias"}


def test_the_pipeline_resumes_a_run_begun_before_a_key_was_added():
    from preflab.config import dump_config
    from preflab.config.pipeline import PipelineConfig

    new = dump_config(PipelineConfig())
    old = json.loads(json.dumps(new))
    del old["rm_ensemble"]
    assert check_config_change(old, new, force=False, where="x", schema=PipelineConfig) == ({}, {})
    with pytest.raises(ConfigError, match=r"rm_ensemble: None -> 1"):
        check_config_change(old, new, force=False, where="x")
