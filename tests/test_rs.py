"""Rejection-sampling fine-tuning on tiny random models: picks are each prompt's RM argmax, the
round's SFT trains on exactly the picks, round 2 samples from round 1's model, a threshold keeps
only picks above it, resume never resamples, the CLI runs from the shipped config."""

import json

import pytest

from helpers import max_param_diff, model_weights
from preflab import loop, models
from preflab.config import RSConfig, load_config
from preflab.errors import DataError
from preflab.stages import rs


def write_prompts(path, n=8):
    rows = [{"id": f"p{i}", "prompt": f"Say the number {i}.", "split": "ppo" if i < n else "eval"}
            for i in range(n + 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rs_cfg(tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    base = ["models.policy.path=tiny:", "models.reward_model=tiny:", f"data.prompts={prompts}", "data.split=ppo",
            "sampling.n=3", "sampling.max_new_tokens=8", "sampling.temperature=1.0", "sampling.require_eos=false",
            "sampling.bf16=false", "train.max_steps=2", "train.batch_size=4", "train.bf16=false",
            "train.max_length=96", "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_steps=0",
            "run.progress=false", f"run.out={tmp_path / 'run'}"]
    return load_config(RSConfig, None, base + list(overrides))


def jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_picks_are_the_rm_argmax_and_sft_trains_on_them(tmp_path):
    out = rs.train(rs_cfg(tmp_path))
    run = tmp_path / "run"
    samples, picks = jsonl(run / "round1/samples.jsonl"), jsonl(run / "round1/picks.jsonl")
    assert len(samples) == 8 and all(len(s["candidates"]) == 3 for s in samples)  # the ppo split only
    for s, p in zip(samples, picks):
        best = max(range(3), key=lambda j: s["rewards"][j])
        assert s["pick"] == best and p["completion"] == s["candidates"][best] and p["reward"] == max(s["rewards"])
    # the round's SFT read exactly the picks and started from the initial policy
    manifest = json.loads((run / "round1/sft/manifest.json").read_text())
    assert manifest["config"]["data"]["train"] == str(run / "round1/picks.jsonl")
    assert manifest["config"]["model"]["path"] == "tiny:" and manifest["status"] == "finished"
    assert max_param_diff(model_weights(out), model_weights(run / "round1/sft/model")) == 0
    init, w = models.load_policy("tiny:").state_dict(), model_weights(out)
    assert max(float((w[k] - init[k]).abs().max()) for k in w) > 1e-4  # it trained
    rows = jsonl(run / "metrics.jsonl")
    assert rows[0]["round1/picks"] == 8 and rows[0]["round1/best_reward_mean"] >= rows[0]["round1/reward_mean"]
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"


def test_round_two_samples_from_round_one_and_threshold_filters(tmp_path):
    first = rs.train(rs_cfg(tmp_path / "a", "train.max_steps=1"))
    picks1 = jsonl(tmp_path / "a/run/round1/picks.jsonl")
    threshold = sorted(p["reward"] for p in picks1)[3]  # keeps at least 5 of 8 in round 1
    rs.train(rs_cfg(tmp_path / "b", "train.rounds=2", "train.max_steps=1", f"sampling.threshold={threshold}"))
    run = tmp_path / "b/run"
    picks = jsonl(run / "round1/picks.jsonl")
    assert picks and all(p["reward"] >= threshold for p in picks)
    kept = [s for s in jsonl(run / "round1/samples.jsonl") if s["kept"]]
    assert len(kept) == len(picks) == sum(p["reward"] >= threshold for p in picks1)
    r2 = json.loads((run / "round2/sft/manifest.json").read_text())["config"]["model"]["path"]
    assert r2 == str(run / "round1/sft/model")
    # the same seed samples the same round-1 candidates; round 2 draws new ones
    a1 = jsonl(tmp_path / "a/run/round1/samples.jsonl")
    assert [s["candidates"] for s in jsonl(run / "round1/samples.jsonl")] == [s["candidates"] for s in a1]
    assert [s["candidates"] for s in jsonl(run / "round2/samples.jsonl")] != [s["candidates"] for s in a1]
    assert first.is_dir()


def test_too_few_picks_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="picks, fewer than one SFT batch"):
        rs.train(rs_cfg(tmp_path, "sampling.threshold=1e9"))


def test_resume_keeps_the_picks_and_resumes_the_rounds_sft(tmp_path, monkeypatch):
    cfg = rs_cfg(tmp_path, "train.max_steps=3", "run.save_every=1")
    full = rs_cfg(tmp_path / "full", "train.max_steps=3")
    w_full = model_weights(rs.train(full))
    calls = {"n": 0}
    real = loop.clip_grad

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(loop, "clip_grad", boom)
    with pytest.raises(KeyboardInterrupt):
        rs.train(cfg)
    monkeypatch.undo()
    picks = (tmp_path / "run/round1/picks.jsonl").read_text()

    def no_sampling(*a, **k):
        raise AssertionError("resume resampled a round whose picks were written")

    monkeypatch.setattr(rs, "best_of_n", no_sampling)
    out = rs.train(cfg, resume=True)
    assert (tmp_path / "run/round1/picks.jsonl").read_text() == picks
    assert max_param_diff(w_full, model_weights(out)) < 1e-6
    rs.train(cfg, resume=True)  # a finished round is kept as it is


def test_cli_runs_rs_from_the_shipped_config(tmp_path):
    from preflab.cli import main

    prompts = write_prompts(tmp_path / "p.jsonl")
    main(["rs", "--config", "configs/rs_tiny.yaml", f"data.prompts={prompts}", f"run.out={tmp_path / 'o'}"])
    assert (tmp_path / "o/model/config.json").is_file() and (tmp_path / "o/round1/picks.jsonl").is_file()
