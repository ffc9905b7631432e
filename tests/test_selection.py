"""Checkpoint selection in the online RL stage: the dev split is held out of training, every scored
step is logged, the step the dev scores favour is exported, and the panel's win-rate is what the
labelers say."""


import torch
from safetensors.torch import load_file

from helpers import ppo_cfg, run_metrics
from preflab import selection
from preflab.data.suite import generate_suite
from preflab.stages import rl as rl_stage


def test_exports_the_step_the_scripted_dev_scores_favour(tmp_path, monkeypatch):
    scripted = iter([0.1, 0.9, 0.3])  # steps 0, 2, 4: step 2 is best
    monkeypatch.setattr(selection.Selection, "score", lambda self: next(scripted))
    trained_on = []
    real_generate = rl_stage.HFGenerator.generate

    def spy(self, prompts, **kw):
        trained_on.append(prompts)
        return real_generate(self, prompts, **kw)

    monkeypatch.setattr(rl_stage.HFGenerator, "generate", spy)
    cfg = ppo_cfg(tmp_path, "train.steps=4", "select.every=2", "select.n=4", "select.by=reward",
                  "train.save_every=2", "run.keep_checkpoints=5")
    out = rl_stage.train(cfg, reward_fn=lambda s: s.response_mask.sum(1).float())
    rows = run_metrics(cfg)
    assert [(r["step"], r["select/score"]) for r in rows if "select/score" in r] == [(0, 0.1), (2, 0.9), (4, 0.3)]
    assert rows[-1]["select/best_step"] == 2
    exported = load_file(str(out / "model.safetensors"))
    step2 = torch.load(tmp_path / "checkpoints/step-000002/state.pt", weights_only=False)["model"]
    step4 = torch.load(tmp_path / "checkpoints/step-000004/state.pt", weights_only=False)["model"]
    name = next(k for k in exported if k.endswith("q_proj.weight"))
    torch.testing.assert_close(exported[name], step2[f"policy.{name}"].to(exported[name].dtype))
    assert not torch.equal(exported[name], step4[f"policy.{name}"].to(exported[name].dtype))
    # The 4 dev prompts (the split's last) are never rolled out for training.
    from preflab import models
    from preflab.data.chat import read_prompts
    from preflab.rollout import encode_prompts

    tok = models.load_tokenizer("tiny:")
    dev = {tuple(x) for x in encode_prompts(tok, [r["prompt"] for r in read_prompts(cfg.data.prompts)][-4:])}
    assert not dev & {tuple(p) for batch in trained_on for p in batch}


def test_without_selection_the_last_step_is_exported(tmp_path):
    cfg = ppo_cfg(tmp_path, "train.steps=2")
    rl_stage.train(cfg, reward_fn=lambda s: s.response_mask.sum(1).float())
    assert not any("select/score" in r for r in run_metrics(cfg))


def test_panel_win_rate_is_what_the_labelers_prefer():
    from preflab.data.suite.reference import reference_answer

    suite = [p for p in generate_suite(seed=0, n=200) if p.slice == "ordinary" and reference_answer(p)][:6]
    rows, good = [p.to_dict() for p in suite], [reference_answer(p) for p in suite]
    empty = [""] * len(rows)
    assert selection.panel_win_rate(rows, good, empty, seed=0) == 1.0
    assert selection.panel_win_rate(rows, empty, good, seed=0) == 0.0

