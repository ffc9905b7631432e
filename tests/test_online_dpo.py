"""Online DPO in the RL stage: the pair of each prompt is its best and worst scored fresh sample,
the loss is DPO's on their sequence log-ratios to the reference, and the samples come from the
policy being trained (not from the SFT model)."""

import torch

from helpers import letter_reward, ppo_cfg
from preflab import models, rl_update
from preflab.rl.estimators import online_dpo_pairs
from preflab.rl.preference import dpo_loss
from preflab.stages import rl as rl_stage


def test_pairs_are_each_prompts_best_and_worst():
    scores = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0, -1.0, 4.0, 2.0, 2.0, 1.0])
    mask = torch.tensor([[1, 1, 0]] * 12)
    tags = online_dpo_pairs(scores, mask, 3)
    assert tags.per_sequence.tolist() == [-1, 1, 0, 0, 0, 0, 0, -1, 1, 1, 0, -1]  # ties: the first
    assert tags.advantages[:, 2].abs().sum() == 0  # padding


def test_online_dpo_term_is_dpo_on_the_tagged_rows():
    """Two prompts of k = 2 (rollout rows 0-1 and 2-3) reach the update as rows 3, 0, 2, 1: each
    chosen row is paired with its own prompt's rejected row."""
    from types import SimpleNamespace

    order = [3, 0, 2, 1]  # micro-batch row j is rollout row order[j]; prompts: rows (1, 3) and (0, 2)
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5], [-3.0, 0.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.5], [-1.0, -1.0], [-2.0, 0.0], [-1.0, -2.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    tags = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, 0.0], [-1.0, -1.0]])
    full_ref, full_tags = torch.zeros(4, 2), torch.zeros(4, 2)
    full_ref[order], full_tags[order] = ref, tags
    cfg = ppo_cfg("unused", "algo.estimator=online_dpo", "rollout.samples_per_prompt=2", "algo.dpo_beta=0.5")
    got = rl_update.online_dpo_term(lp, SimpleNamespace(ref_logprobs=full_ref, advantages=full_tags), order, m, cfg)
    r = ((lp - ref) * m).sum(1)  # -0.5, 1.0, -1.0, 1.0
    want = dpo_loss(r[[1, 2]], r[[3, 0]], 0.5, 0.0).sum()  # chosen 1 vs rejected 3 (prompt 0), 2 vs 0 (prompt 1)
    torch.testing.assert_close(got, want)
    wrong = dpo_loss(r[[1, 2]], r[[0, 3]], 0.5, 0.0).sum()
    assert not torch.allclose(got, wrong)


def test_samples_come_from_the_policy_being_trained(tmp_path, monkeypatch):
    seen = []
    real = rl_stage.HFGenerator.generate

    def spy(self, prompts, **kw):
        name, param = next((n, q) for n, q in self.model.named_parameters() if n.endswith("q_proj.weight"))
        seen.append((name, param.detach().clone()))
        return real(self, prompts, **kw)

    monkeypatch.setattr(rl_stage.HFGenerator, "generate", spy)
    cfg = ppo_cfg(tmp_path, "algo.estimator=online_dpo", "rollout.samples_per_prompt=2", "rollout.batch_size=4",
                  "ppo.minibatch_size=4", "train.steps=2", "train.save_every=1", "run.keep_checkpoints=3")
    tok = models.load_tokenizer("tiny:")
    good = torch.tensor([tok.convert_tokens_to_ids(c) for c in "aeiou"])
    rl_stage.train(cfg, reward_fn=letter_reward(good))
    (name, at1), (_, at2) = seen
    after1 = torch.load(tmp_path / "checkpoints/step-000001/state.pt", weights_only=False)["model"][f"policy.{name}"]
    sft = models.load_policy("tiny:").state_dict()[name]
    torch.testing.assert_close(at1, sft)  # step 1 samples the initial policy
    torch.testing.assert_close(at2, after1)  # step 2 samples the policy after step 1's update
    assert not torch.equal(at2, sft)
