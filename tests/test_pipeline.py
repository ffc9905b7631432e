"""The main job's graph on tiny models: every step runs, the report exists, and a killed run
resumes without redoing finished steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preflab.cli import main
from preflab.config import PipelineConfig, load_config
from preflab.errors import ConfigError
from preflab.pipeline import PRESETS, Pipeline, deep_merge, steps_of
from preflab.rl.stats import wilson_interval


def test_tiny_pipeline_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    STEPS = steps_of(PipelineConfig.model_validate(deep_merge(PipelineConfig().model_dump(mode="json"), PRESETS["tiny"])))
    # Kill the run inside the PPO-ptx step; everything before it is recorded as done.
    real = Pipeline.train

    def boom(self, step):
        if step == "ppo_ptx":
            raise KeyboardInterrupt("killed")
        real(self, step)

    monkeypatch.setattr(Pipeline, "train", boom)
    with pytest.raises(SystemExit) as e:  # the CLI turns Ctrl-C into exit status 130
        main(["pipeline", "--preset", "tiny", "--out", str(out), "eval.models=[base,sft,ppo_ptx,rloo]"])
    assert e.value.code == 130
    state = json.loads((out / "pipeline.json").read_text())
    assert [s["step"] for s in state["steps"]] == list(STEPS[:STEPS.index("ppo_ptx")])
    sft_model = (out / "sft/model/model.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(Pipeline, "train", real)
    main(["pipeline", "--preset", "tiny", "--out", str(out), "eval.models=[base,sft,ppo_ptx,rloo]"])
    state = json.loads((out / "pipeline.json").read_text())
    assert [s["step"] for s in state["steps"]] == list(STEPS)
    assert (out / "sft/model/model.safetensors").stat().st_mtime_ns == sft_model  # not redone

    results = json.loads((out / "eval/results.json").read_text())
    assert set(results["models"]) == {"base", "sft", "ppo_ptx", "rloo"}
    samples = [json.loads(x) for x in (out / "eval/samples.jsonl").read_text().splitlines()]
    gold = {(r["model"], r["id"]): r["gold"]["total"] for r in samples}
    ids = [r["id"] for r in samples if r["model"] == "sft"]
    for name in ("base", "ppo_ptx", "rloo"):  # each model's win-rate, recomputed prompt by prompt against SFT
        wr = results["models"][name]["win_rate"]
        wins = sum(gold[name, i] > gold["sft", i] for i in ids) + 0.5 * sum(gold[name, i] == gold["sft", i] for i in ids)
        assert wr["n"] == len(ids) == 16 and wr["rate"] == pytest.approx(wins / len(ids))
        assert (wr["lo"], wr["hi"]) == pytest.approx(tuple(wilson_interval(wins, len(ids))))
    html = (out / "report.html").read_text()
    assert "ppo_ptx" in html and "<img" in html
    ptx_rows = [json.loads(x) for x in (out / "ppo_ptx/metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/ptx"] > 0 for r in ptx_rows)
    assert json.loads((out / "agreement.json").read_text())["groups"] >= 1
    # Finished training stages keep their exported model, not their (optimizer-state) checkpoints.
    for stage in ("sft", "rm", "ppo_ptx", "rloo"):
        assert (out / stage / "model/config.json").is_file()
        assert not (out / stage / "checkpoints").exists()

    # benchmarks/best_of_n.py reads a finished run: best-of-N from its SFT model, judged by gold.
    script = Path(__file__).parents[1] / "benchmarks/best_of_n.py"
    proc = subprocess.run([sys.executable, str(script), "--run", str(out), "--n", "2", "--limit", "6",
                           "--threads", "1"], capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best of 2" in proc.stdout and "ppo_ptx (RUN/eval/results.json)" in proc.stdout
    assert len(list((out / "eval/best_of_n").glob("sft-seed*.jsonl"))) == 2
    # benchmarks/labeler_ceiling.py: the panel's agreement on every held-out RM prompt, next to the RM.
    script = Path(__file__).parents[1] / "benchmarks/labeler_ceiling.py"
    proc = subprocess.run([sys.executable, str(script), "--run", str(out), str(out / "rm/eval/rm_eval.json")],
                          capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "labeler vs labeler" in proc.stdout and "rm_eval.json" in proc.stdout


@pytest.mark.parametrize("keep", [False, True])
def test_finished_stage_checkpoints_are_pruned_unless_kept(tmp_path, keep):
    data = PipelineConfig().model_dump(mode="json") | {"keep_checkpoints": keep}
    pipe = Pipeline(PipelineConfig.model_validate(data), tmp_path)
    for d in ("sft/checkpoints/step-000004", "sft/best", "sft/model", "label"):
        (tmp_path / d).mkdir(parents=True)
    pipe._prune_checkpoints("sft")
    pipe._prune_checkpoints("label")  # not a training stage: untouched
    assert (tmp_path / "sft/checkpoints").exists() == keep and (tmp_path / "sft/best").exists() == keep
    assert (tmp_path / "sft/model").is_dir() and (tmp_path / "label").is_dir()


def test_bad_stage_override_fails_before_anything_starts(tmp_path):
    cfg = load_config(PipelineConfig, None, ["sft.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"pipeline\.sft: optim\.lrr: unknown key"):
        Pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_presets_validate():
    from preflab.config import validate

    for name, data in PRESETS.items():
        Pipeline(validate(PipelineConfig, data, name), "/nonexistent/never-created")


def test_long_preset_sizes_what_rl_needs():
    """>= 1,000 RM prompts x K = 4, >= 3,000 RL episodes, >= 500 eval prompts, and splits big enough."""
    from preflab.config import validate
    from preflab.data.suite.generate import SPLIT_FRACTIONS

    cfg = validate(PipelineConfig, deep_merge(PipelineConfig().model_dump(mode="json"), PRESETS["long"]), "long")
    p = Pipeline(cfg, "/nonexistent/never-created")
    assert cfg.labeling.limit >= 1000 and cfg.labeling.k == 4
    assert cfg.labeling.limit <= cfg.suite.n * SPLIT_FRACTIONS["rm"]
    assert cfg.eval.limit >= 500 and cfg.eval.limit <= cfg.suite.n * SPLIT_FRACTIONS["eval"]
    for method in cfg.rl:
        rl = p.stage_configs[method]
        episodes = rl.train.steps * rl.rollout.batch_size * rl.rollout.samples_per_prompt
        assert episodes >= 3000, (method, episodes)
        assert 0 < rl.train.save_every <= rl.train.steps // 5  # a killed hour-long step loses minutes
    for name in ("sft", "rm"):
        assert p.stage_configs[name].run.save_every > 0
    rm = p.stage_configs["rm"].train  # trained until held-out accuracy stops rising, not a guessed epoch count
    assert rm.select_best and rm.eval_every > 0


def test_rerun_with_a_changed_config_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    pipe = Pipeline(load_config(PipelineConfig, None, []), out)
    pipe.out.mkdir(parents=True)
    (out / "pipeline_config.json").write_text(json.dumps(pipe.cfg.model_dump(mode="json")))
    (out / "pipeline.json").write_text(json.dumps({"steps": [{"step": "suite", "seconds": 1.0}]}))
    changed = Pipeline(load_config(PipelineConfig, None, ["seed=7"]), out)
    with pytest.raises(ConfigError, match=r"seed: 0 -> 7"):
        changed.run(only=lambda s: False)
    assert json.loads((out / "pipeline_config.json").read_text())["seed"] == 0  # not overwritten
    changed.run(only=lambda s: False, force=True)
    assert json.loads((out / "pipeline_config.json").read_text())["seed"] == 7
    record = json.loads((out / "pipeline.json").read_text())["config_changes"][0]
    assert record["after"] == ["suite"] and record["changes"]["seed"] == {"old": 0, "new": 7}
    # threads may change freely
    Pipeline(load_config(PipelineConfig, None, ["seed=7", "threads=1"]), out).run(only=lambda s: False)
    # a key preflab added after the run began (absent from the saved config) is no change at its default
    saved = json.loads((out / "pipeline_config.json").read_text())
    del saved["rm_ensemble"]
    (out / "pipeline_config.json").write_text(json.dumps(saved))
    Pipeline(load_config(PipelineConfig, None, ["seed=7", "threads=1"]), out).run(only=lambda s: False)
    assert len(json.loads((out / "pipeline.json").read_text())["config_changes"]) == 2  # seed, then threads only


def test_pipeline_print_config_needs_no_config_file(capsys):
    main(["pipeline", "--preset", "tiny", "--print-config", "rl=[rloo]"])
    text = capsys.readouterr().out
    assert "base_model: 'tiny:'" in text and "- rloo" in text


def test_preference_trainers_are_pipeline_steps_with_their_own_run_dirs():
    from preflab.config import validate

    cfg = validate(PipelineConfig, deep_merge(PRESETS["tiny"], {"rl": ["rloo"], "preference": ["dpo", "rs"],
                                                                 "rl_overrides": {"dpo": {"dpo": {"beta": 0.3}}}}))
    p = Pipeline(cfg, "/nonexistent/never-created")
    assert p.steps[p.steps.index("rm"):] == ("rm", "rloo", "dpo", "rs", "eval", "report")
    assert p.stage_of("dpo") == "dpo" and p.stage_of("rs") == "rs" and p.stage_of("rloo") == "rl"
    assert p.stage_configs["dpo"].dpo.beta == 0.3 and p.stage_configs["dpo"].run.out.endswith("/dpo")
    assert p.stage_configs["rs"].models.reward_model.endswith("/rm/model")
    assert p.eval_models == ["sft", "rloo", "dpo", "rs"]  # the pretrained model only when listed


def test_rm_ensemble_members_train_with_their_own_seeds_and_reach_the_rl_methods(tmp_path):
    out = tmp_path / "run"
    main(["pipeline", "--preset", "tiny", "--out", str(out), "rm_ensemble=2", "rl=[rloo]", "eval.models=[sft,rloo]"])
    steps = [s["step"] for s in json.loads((out / "pipeline.json").read_text())["steps"]]
    assert steps[steps.index("rm") + 1] == "rm-2"
    one, two = (json.loads((out / d / "manifest.json").read_text())["config"] for d in ("rm", "rm-2"))
    assert two["run"]["seed"] == one["run"]["seed"] + 1 and two["data"] == one["data"]
    rl = json.loads((out / "rloo/manifest.json").read_text())["config"]["models"]
    assert rl["reward_model"] == str(out / "rm/model") and rl["reward_ensemble"] == [str(out / "rm-2/model")]
    from safetensors.torch import load_file

    a, b = load_file(str(out / "rm/model/model.safetensors")), load_file(str(out / "rm-2/model/model.safetensors"))
    assert any(not (a[k] == b[k]).all() for k in a)  # two members, not one model twice


def test_offline_trainers_get_their_presets_and_rs_the_labeling_budget(tmp_path):
    """ipo is the DPO stage with IPO's loss (config.OFFLINE_METHODS); rs's candidates are as long as
    the ranked samples the RM learnt from (labeling.max_new_tokens)."""
    data = deep_merge(PipelineConfig().model_dump(mode="json"),
                      {"preference": ["ipo", "dpo", "rs"], "labeling": {"max_new_tokens": 96}})
    pipe = Pipeline(PipelineConfig.model_validate(data), tmp_path)
    assert pipe.stage_configs["ipo"].dpo.loss == "ipo" and pipe.stage_configs["dpo"].dpo.loss == "dpo"
    assert pipe.stage_names == {"sft": "sft", "rm": "rm", "rloo": "rl", "ipo": "dpo", "dpo": "dpo", "rs": "rs"}
    assert pipe.stage_configs["rs"].sampling.max_new_tokens == 96
