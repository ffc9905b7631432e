"""Rounds 2..n of the main job on tiny models: fresh rankings of the current policy, the RM refit on
every ranking so far, the trainer continued from the current policy, on-policy RM accuracy; and a
run killed inside round 2 resumes to the same models as an uninterrupted one."""

import json

import pytest
from safetensors.torch import load_file

from preflab.cli import main
from preflab.config import PipelineConfig
from preflab.errors import ConfigError
from preflab.evals.report import rounds_table
from preflab.feedback.store import PreferenceStore
from preflab.pipeline import PRESETS, Pipeline, deep_merge

ROUNDS = ["rounds=2", "rl=[rloo]", "round.prompts=8", "round.heldout=4", "eval.models=[sft,rloo]"]


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_two_rounds_resume_inside_round_two_equals_uninterrupted(tmp_path, monkeypatch):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    real = Pipeline.train

    def boom(self, step):
        if step == "round-2/rloo":
            raise KeyboardInterrupt("killed")
        real(self, step)

    monkeypatch.setattr(Pipeline, "train", boom)
    with pytest.raises(SystemExit):
        main(["pipeline", "--preset", "tiny", "--out", str(killed), *ROUNDS])
    done = [s["step"] for s in json.loads((killed / "pipeline.json").read_text())["steps"]]
    assert done[-3:] == ["round-2/label", "round-2/rm", "round-2/onpolicy"]
    monkeypatch.setattr(Pipeline, "train", real)
    main(["pipeline", "--preset", "tiny", "--out", str(killed), *ROUNDS])
    main(["pipeline", "--preset", "tiny", "--out", str(whole), *ROUNDS])

    for d in ("round-2/rm/model", "round-2/rloo/model"):
        a, b = _weights(killed / d), _weights(whole / d)
        assert all((a[k] == b[k]).all() for k in a), d

    run = whole
    # The round's store holds round 1's rankings plus the fresh ones, all of them samples of the
    # round-1 policy (not of SFT), on prompts never ranked before; held-out prompts by three labelers.
    with PreferenceStore(run / "store.sqlite") as s1, PreferenceStore(run / "round-2/store.sqlite") as s2:
        r1, r2 = s1.rankings(split="rm"), s2.rankings(split="rm")
        held = s2.rankings(split="heldout-2")
        first = {r.prompt for r in r1}
        fresh = [r for r in r2 if r.prompt not in first]
        assert len({r.prompt for r in r2}) == len(first) + 8
        models = {m for r in fresh for _, _, m in s2.candidates(r.prompt_id)}
        assert models == {str(run / "rloo/model")}
        assert len({r.prompt for r in held}) == 4 and len(held) == 12  # three labelers each
        assert not {r.prompt for r in held} & {r.prompt for r in r2}
    # The round's RM trained on the round's store from SFT; its trainer started from round 1's policy
    # with the new RM and the KL leash to SFT.
    rm_manifest = json.loads((run / "round-2/rm/manifest.json").read_text())["config"]
    assert rm_manifest["data"]["train"] == f"store:{run / 'round-2/store.sqlite'}"
    assert rm_manifest["model"]["path"] == str(run / "sft/model")
    rl = json.loads((run / "round-2/rloo/manifest.json").read_text())["config"]
    assert rl["models"]["policy"]["path"] == str(run / "rloo/model")
    assert rl["models"]["reward_model"] == str(run / "round-2/rm/model")
    assert rl["models"]["reference"] == str(run / "sft/model")
    onp = json.loads((run / "round-2/onpolicy.json").read_text())
    assert onp["rm_before"]["model"] == str(run / "rm/model") and onp["rm_after"]["model"] == str(run / "round-2/rm/model")
    assert onp["rm_before"]["n_groups"] == 12 and 0 < onp["labeler_agreement"]["n_pairs"] <= 4 * 6 * 3
    # ... and against the gold judge, which scores the held-out responses from the suite's records
    assert set(onp["gold"]["models"]) == {"rm_before", "rm_after"} and 0 <= onp["gold"]["decided"] <= 1
    assert onp["gold"]["labelers"]["n_pairs"] == round(onp["gold"]["decided"] * onp["gold"]["n_strict_pairs"])
    final = json.loads((run / "final/onpolicy.json").read_text())
    assert final["policy"] == str(run / "round-2/rloo/model") and final["rm_before"]["model"] == str(run / "round-2/rm/model")
    # The round's eval judged its own policy against the run's SFT samples (reused, not resampled).
    res = json.loads((run / "round-2/eval/results.json").read_text())
    assert set(res["models"]) == {"sft", "rloo@2"}
    assert res["models"]["rloo@2"]["spec"] == str(run / "round-2/rloo/model")
    assert (run / "round-2/eval/generations/sft.jsonl").read_text() == (run / "eval/generations/sft.jsonl").read_text()
    rows = rounds_table(run)
    assert [r["round"] for r in rows] == [1, 2, "final"]
    assert rows[1]["win_rate"] == res["models"]["rloo@2"]["win_rate"]
    assert rows[1]["rm_before"] == onp["rm_before"]["accuracy"]
    assert rows[1]["rm_gold"] == onp["gold"]["models"]["rm_after"]["accuracy"]  # the refit RM, not the old one
    assert rows[2]["rm_gold"] == final["gold"]["models"]["rm_before"]["accuracy"]  # the final check has one RM
    assert "Rounds" in (run / "report.html").read_text()


def _cfg(**over):
    return PipelineConfig.model_validate(deep_merge(deep_merge(PipelineConfig().model_dump(mode="json"),
                                                                PRESETS["tiny"]), over))


def test_round_settings_reach_the_round_configs(tmp_path):
    pipe = Pipeline(_cfg(rounds=3, rl=["rloo", "ppo_ptx"], round={"method": "ppo_ptx", "kl_anchor": "previous",
                                                                   "rm_init": "previous",
                                                                   "overrides": {"train": {"steps": 5}}}), tmp_path)
    c3 = pipe.stage_configs["round-3/ppo_ptx"]
    assert c3.models.policy.path == str(tmp_path / "round-2/ppo_ptx/model")
    assert c3.models.reference == str(tmp_path / "round-2/ppo_ptx/model")  # the previous round's policy
    assert c3.models.reward_model == str(tmp_path / "round-3/rm/model")
    assert c3.train.steps == 5 and c3.ptx.coef == 1.0 and c3.run.seed == 2000
    assert pipe.stage_configs["round-3/rm"].model.path == str(tmp_path / "round-2/rm/model")
    assert pipe.stage_configs["round-2/rm"].model.path == str(tmp_path / "rm/model")
    assert pipe.stage_configs["round-2/rm"].run.save_every == 32 and pipe.stage_configs["rm"].run.save_every == 0
    mine = Pipeline(_cfg(rounds=2, rl=["rloo"], rm={"run": {"save_every": 5}}), tmp_path)
    assert mine.stage_configs["round-2/rm"].run.save_every == 5  # the user's own setting stands
    dpo = Pipeline(_cfg(rounds=2, rl=[], preference=["dpo"]), tmp_path).stage_configs["round-2/dpo"]
    assert dpo.model.path == str(tmp_path / "dpo/model") and dpo.model.reference == str(tmp_path / "sft/model")
    assert dpo.data.train == f"store:{tmp_path / 'round-2/store.sqlite'}"
    with pytest.raises(ConfigError, match="round.method"):
        Pipeline(_cfg(rounds=2, rl=["rloo"], round={"method": "grpo"}), tmp_path)


def test_too_few_prompts_for_the_rounds_is_one_error(tmp_path):
    pipe = Pipeline(_cfg(rounds=40, rl=["rloo"]), tmp_path)
    pipe.step_suite()
    with pytest.raises(ConfigError, match="RM-split prompts"):
        pipe.rounds.fresh_prompts(40)


@pytest.mark.parametrize("trainer", [["preference=[dpo]", "rl=[]"], ["preference=[rs]", "rl=[]"], ["rl=[online_dpo]"]])
def test_every_trainer_can_be_the_rounds_trainer(tmp_path, trainer):
    out = tmp_path / "run"
    main(["pipeline", "--preset", "tiny", "--out", str(out), "rounds=2", "round.prompts=8", "round.heldout=0",
          "eval.models=[sft]", *trainer])
    method = trainer[0].split("[")[1].rstrip("]")
    manifest = json.loads((out / f"round-2/{method}/manifest.json").read_text())
    assert manifest["status"] == "finished"
    cfg = manifest["config"]
    start = cfg["models"]["policy"]["path"] if "models" in cfg else cfg["model"]["path"]
    assert start == str(out / method / "model")  # from round 1's policy, not from SFT
    assert (out / "round-2/eval/results.json").is_file() and not (out / "final").exists()


def test_a_rounds_evaluation_reuses_the_runs_sft_samples_and_ifeval_scores(tmp_path, monkeypatch):
    pipe = Pipeline(_cfg(rounds=2, rl=["rloo"]), tmp_path)
    seen = {}
    monkeypatch.setattr(Pipeline, "evaluate_paths", lambda self, models, d, **kw: seen.update(models=models, d=d, **kw))
    (tmp_path / "eval/generations").mkdir(parents=True)
    (tmp_path / "eval/generations/sft.jsonl").write_text('{"x": 1}\n')
    pipe.rounds.step_eval(2)
    assert seen["models"] == {"sft": str(tmp_path / "sft/model"), "rloo@2": str(tmp_path / "round-2/rloo/model")}
    assert seen["reward_model"] == str(tmp_path / "round-2/rm/model")  # the round's refit RM
    assert seen["ifeval_reuse"] == tmp_path / "eval"
    assert (tmp_path / "round-2/eval/generations/sft.jsonl").read_text() == '{"x": 1}\n'


def test_a_rounds_moves_win_over_every_section_and_a_refit_rm_stands_alone(tmp_path):
    """rl_overrides / rl_stage may pin the policy, RM, reference, seed or ensemble for the run; a later
    round still starts from the previous policy, against its refit RM alone, with its own seed."""
    over = {"run": {"seed": 5}, "models": {"policy": {"path": "/X"}, "reward_model": "/RMX", "reference": "/REFX"}}
    pipe = Pipeline(_cfg(rounds=2, rl=["rloo"], rl_overrides={"rloo": over},
                         rl_stage={"models": {"reward_ensemble": ["/E"]}}), tmp_path)
    one, two = pipe.stage_configs["rloo"], pipe.stage_configs["round-2/rloo"]
    assert (one.models.policy.path, one.models.reward_model, one.run.seed) == ("/X", "/RMX", 5)
    assert one.models.reward_ensemble == ["/E"]
    assert two.models.policy.path == str(tmp_path / "rloo/model")
    assert two.models.reward_model == str(tmp_path / "round-2/rm/model") and two.models.reward_ensemble == []
    assert two.models.reference == str(tmp_path / "sft/model") and two.run.seed == 1000
    assert two.run.out == str(tmp_path / "round-2/rloo")


def test_the_rounds_table_shows_each_rounds_ifeval_beside_the_gold_judge(tmp_path):
    cfg = _cfg(rounds=2, rl=["rloo"]).model_dump(mode="json")
    (tmp_path / "pipeline_config.json").write_text(json.dumps(cfg))
    win = {"rate": 0.6, "lo": 0.5, "hi": 0.7}

    def results(name, prompt, words):
        return {"models": {name: {"win_rate": win, "kl": 1.0, "length_words": {"mean": 30.0}, "metadata": {}}},
                "ifeval": {"models": {name: {"prompt_level_strict": prompt, "mean_words": words}}}}

    for where, name, prompt, words in (("eval", "rloo", 0.2, 117.0), ("round-2/eval", "rloo@2", 0.25, 59.0)):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "results.json").write_text(json.dumps(results(name, prompt, words)))
    rows = rounds_table(tmp_path)
    assert [(r["round"], r["ifeval_prompt"], r["ifeval_words"]) for r in rows] == [(1, 0.2, 117.0), (2, 0.25, 59.0)]
