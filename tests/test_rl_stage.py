"""The online RL stage's estimators wired end to end on tiny models: RLOO, GRPO, REINFORCE++ and
the KL as a loss term; k samples per prompt; no critic unless GAE; reward functions beside the RM."""


import pytest
import torch

from helpers import letter_reward, letter_tokens, ppo_cfg, run_metrics
from preflab import models, rewards, rl_update, scoring
from preflab.errors import ConfigError
from preflab.rl import masked_whiten
from preflab.rl.estimators import grpo_advantages, rloo_advantages
from preflab.stages import rl as rl_stage


@pytest.fixture(scope="module")
def good_tokens():
    return letter_tokens()


cfg_for, metrics = ppo_cfg, run_metrics


def rollout(cfg, good, k):
    """One scored rollout of 4 prompts x k samples of the tiny policy (no critic)."""
    from preflab.data.chat import read_prompts
    from preflab.rollout import HFGenerator, encode_prompts

    torch.manual_seed(0)
    tok = models.load_tokenizer("tiny:")
    policy = models.load_policy("tiny:", dropout_off=True)
    ac = scoring.ActorCritic(policy, None, values=False)
    rows = read_prompts(cfg.data.prompts)[:4]
    samples = HFGenerator(policy, tok).generate(encode_prompts(tok, [r["prompt"] for r in rows]),
                                                max_new_tokens=6, temperature=1.0, n=k)
    # a different random model as the reference, so the KL terms are not 0
    batch = rl_update.score_rollout(samples, ac=ac, reference=models.load_policy("tiny:1"), reward_fn=letter_reward(good),
                              cfg=cfg, kl_coef=0.5, tokenizer=tok, device=torch.device("cpu"), chunk=4)
    return samples, batch


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_group_estimators_need_k_of_two_and_the_error_names_the_key(tmp_path, estimator):
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt must be >= 2"):
        cfg_for(tmp_path, f"algo.estimator={estimator}")
    with pytest.raises(ConfigError, match="ppo.minibatch_size"):
        cfg_for(tmp_path, f"algo.estimator={estimator}", "rollout.samples_per_prompt=3", "ppo.minibatch_size=5")
    with pytest.raises(ConfigError, match="critic_warmup_steps needs a critic"):
        rl_stage.train(cfg_for(tmp_path, f"algo.estimator={estimator}", "rollout.samples_per_prompt=2",
                          "ppo.critic_warmup_steps=1"))


def test_rloo_stage_advantages_equal_the_leave_one_out_of_score_minus_beta_kl(tmp_path, good_tokens):
    cfg = cfg_for(tmp_path, "algo.estimator=rloo", "rollout.samples_per_prompt=4")
    samples, b = rollout(cfg, good_tokens, k=4)
    assert len(samples.texts) == 16
    # rows 4p..4p+3 share prompt p (n contiguous samples per prompt)
    for p in range(4):
        assert len({tuple(samples.query[i][samples.query_mask[i].bool()].tolist()) for i in range(4 * p, 4 * p + 4)}) == 1
    seq = b.scores - 0.5 * b.kl.sum(1)  # beta = 0.5, KL in the reward (k1)
    by_hand = torch.stack([seq[i] - (seq[4 * (i // 4):4 * (i // 4) + 4].sum() - seq[i]) / 3 for i in range(16)])
    raw = by_hand[:, None] * b.mask
    torch.testing.assert_close(b.advantages, masked_whiten(raw, b.mask, shift_mean=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.returns, rloo_advantages(seq, b.mask, 4).advantages, atol=1e-6, rtol=1e-5)
    assert float(b.values.abs().sum()) == 0.0  # no critic


def test_grpo_stage_uses_the_group_scale_and_kl_loss_keeps_the_kl_out_of_the_reward(tmp_path, good_tokens):
    cfg = cfg_for(tmp_path, "algo.estimator=grpo", "rollout.samples_per_prompt=4", "algo.kl_in=loss")
    _, b = rollout(cfg, good_tokens, k=4)
    assert float(b.non_score_reward.abs().sum()) == 0.0  # the KL is a loss term, not a reward
    assert float(b.kl.abs().sum()) > 0
    torch.testing.assert_close(b.advantages, grpo_advantages(b.scores, b.mask, 4).advantages)
    dr = cfg_for(tmp_path, "algo.estimator=grpo", "rollout.samples_per_prompt=4", "algo.grpo_scale=false")
    _, b2 = rollout(dr, good_tokens, k=4)
    seq = b2.scores - 0.5 * b2.kl.sum(1)
    torch.testing.assert_close(b2.advantages, grpo_advantages(seq, b2.mask, 4, scale=False).advantages,
                               atol=1e-6, rtol=1e-5)


def test_reinforce_pp_stage_whitens_the_reward_to_go_over_the_batch(tmp_path, good_tokens):
    cfg = cfg_for(tmp_path, "algo.estimator=reinforce_pp")
    _, b = rollout(cfg, good_tokens, k=1)
    # reward-to-go of (-beta kl on every token + score on the last): at the first real token it is
    # score - beta * sum(kl)
    first = b.mask.argmax(1)
    g0 = b.returns[torch.arange(len(first)), first]
    torch.testing.assert_close(g0, b.scores - 0.5 * b.kl.sum(1), atol=1e-5, rtol=1e-4)
    w = b.advantages[b.mask.bool()]
    assert abs(float(w.mean())) < 1e-4 and abs(float(w.std(unbiased=False)) - 1) < 1e-3


@pytest.mark.parametrize("estimator,k", [("rloo", 2), ("grpo", 4), ("reinforce_pp", 1), ("online_dpo", 4)])
def test_critic_free_estimators_raise_the_reward_without_a_critic(tmp_path, good_tokens, estimator, k):
    cfg = cfg_for(tmp_path, f"algo.estimator={estimator}", f"rollout.samples_per_prompt={k}",
                  f"rollout.batch_size={8 // k}", "train.steps=20", "kl.coef=0", "ppo.minibatch_size=4")
    rl_stage.train(cfg, reward_fn=letter_reward(good_tokens))
    rows = metrics(cfg)
    first = sum(r["objective/score"] for r in rows[:3]) / 3
    last = sum(r["objective/score"] for r in rows[-3:]) / 3
    assert last > first + 0.2, (estimator, first, last)
    assert "value/explained_variance" not in rows[-1]
    assert rows[-1]["loss/value"] == 0.0
    assert not (tmp_path / "critic").exists()


def test_kl_loss_term_pulls_towards_the_reference(tmp_path, good_tokens):
    """Same seed and data; beta in the loss: the KL stays far below the run without a leash."""
    free = cfg_for(tmp_path / "free", "algo.estimator=rloo", "rollout.samples_per_prompt=2", "rollout.batch_size=4",
                   "train.steps=15", "kl.coef=0")
    rl_stage.train(free, reward_fn=letter_reward(good_tokens))
    held = cfg_for(tmp_path / "held", "algo.estimator=rloo", "rollout.samples_per_prompt=2", "rollout.batch_size=4",
                   "train.steps=15", "kl.coef=3.0", "algo.kl_in=loss")
    rl_stage.train(held, reward_fn=letter_reward(good_tokens))
    kl_free, kl_held = metrics(free)[-1]["objective/kl"], metrics(held)[-1]["objective/kl"]
    assert metrics(held)[-1]["loss/kl"] > 0
    assert kl_held < 0.5 * kl_free, (kl_held, kl_free)


# ---------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------


def test_constraint_reward_is_the_fraction_of_constraints_met():
    rows = [{"constraints": [{"type": "max_words", "n": 3}, {"type": "lowercase"}]}, {"constraints": []}, {}]
    assert rewards.constraints(rows, ["two words", "Anything", "x"]) == [1.0, 0.0, 0.0]
    assert rewards.constraints(rows[:1], ["Far Too Many Words"]) == [0.0]
    assert rewards.constraints(rows[:1], ["Three Words Here"]) == [0.5]


def test_refusal_reward_rewards_refusing_only_harmful_prompts():
    rows = [{"slice": "harmful"}, {"slice": "harmful"}, {"slice": "ordinary"}, {"slice": "alarming_harmless"},
            {"slice": "ordinary"}, {}]
    no = "I can't help with that request."
    assert rewards.refusals(rows, [no, "Sure, here is how.", no, no, "Paris.", no]) == [1.0, 0.0, -1.0, -1.0, 0.0, 0.0]


def test_protect_preset_adds_the_constraint_and_refusal_rewards(tmp_path, monkeypatch):
    """rewards.preset=protect reaches the stage's reward functions, each with weight 2, beside `funcs`."""
    seen = {}

    def fake_sum(funcs, prompts, texts):
        seen["funcs"] = [(f.__name__, w) for f, w in funcs]
        return [0.0] * len(texts)

    monkeypatch.setattr(rewards, "weighted_sum", fake_sum)
    cfg = cfg_for(tmp_path, "rewards.preset=protect", "rewards.funcs=[{fn: 'preflab.rewards:constraints', weight: 0.5}]",
                  "train.steps=1")
    rl_stage.train(cfg, reward_fn=lambda s: torch.zeros(s.response.shape[0]))
    assert seen["funcs"] == [("constraints", 2.0), ("refusals", 2.0), ("constraints", 0.5)]


def test_weighted_sum_and_loading_errors():
    def one(p, r):
        return [1.0] * len(r)

    def idx(p, r):
        return [float(i) for i in range(len(r))]

    assert rewards.weighted_sum([(one, 2.0), (idx, -1.0)], [{}] * 3, ["a", "b", "c"]) == [2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        rewards.weighted_sum([(lambda p, r: [1.0], 1.0)], [{}] * 2, ["a", "b"])
    with pytest.raises(ConfigError, match="module:function"):
        rewards.load("nocolon")
    with pytest.raises(ConfigError, match="cannot load"):
        rewards.load("preflab.rewards:nope")
    assert rewards.load("preflab.rewards:constraints") is rewards.constraints


def test_reward_functions_add_to_the_rm_score_with_their_weights(tmp_path, good_tokens):
    """rm_weight scales the RM; each function enters with its weight (here a constant 1 per response)."""
    base = cfg_for(tmp_path, "algo.estimator=rloo", "rollout.samples_per_prompt=2")
    _, b0 = rollout(base, good_tokens, k=2)
    mixed = cfg_for(tmp_path, "algo.estimator=rloo", "rollout.samples_per_prompt=2", "rewards.rm_weight=0.5")
    from preflab.data.chat import read_prompts
    from preflab.rollout import HFGenerator, encode_prompts

    torch.manual_seed(0)
    tok = models.load_tokenizer("tiny:")
    policy = models.load_policy("tiny:", dropout_off=True)
    rows = read_prompts(mixed.data.prompts)[:4]
    samples = HFGenerator(policy, tok).generate(encode_prompts(tok, [r["prompt"] for r in rows]),
                                                max_new_tokens=6, temperature=1.0, n=2)
    seen = []

    def fn(prompts, texts):
        seen.append(prompts)
        return rewards.weighted_sum([(lambda p, r: [1.0] * len(r), 3.0)], prompts, texts)

    b = rl_update.score_rollout(samples, ac=scoring.ActorCritic(policy, None, values=False),
                          reference=models.load_policy("tiny:1"), reward_fn=letter_reward(good_tokens), cfg=mixed,
                          kl_coef=0.5, tokenizer=tok, device=torch.device("cpu"), chunk=4, prompt_rewards=fn,
                          rows=[r for r in rows for _ in range(2)])
    torch.testing.assert_close(b.scores, 0.5 * b0.scores + 3.0)
    assert [p["id"] for p in seen[0]] == [r["id"] for r in rows for _ in range(2)]


def test_token_stats_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, -7.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = rl_update.token_stats("advantage", x, mask)
    assert got["advantage/mean"] == pytest.approx(2.0)
    assert got["advantage/std"] == pytest.approx((2 / 3) ** 0.5)


def test_rollout_metrics_carry_advantage_and_return_statistics(tmp_path, good_tokens):
    cfg = cfg_for(tmp_path, "algo.estimator=rloo", "rollout.samples_per_prompt=2", "train.steps=1")
    rl_stage.train(cfg, reward_fn=letter_reward(good_tokens))
    row = metrics(cfg)[-1]
    assert row["advantage/mean"] == pytest.approx(0.0, abs=1e-5)  # rloo's are whitened over the batch
    assert row["advantage/std"] == pytest.approx(1.0, abs=1e-3)
    assert row["return/std"] > 0


def test_prompt_share_is_of_each_prompts_k_samples_and_only_where_k_exceeds_one(tmp_path, good_tokens):
    import json

    from preflab.rl.stats import between_prompt_share, prompt_variance_sums

    cfg = cfg_for(tmp_path / "rloo", "algo.estimator=rloo", "rollout.samples_per_prompt=2", "train.steps=1",
                  "kl.coef=0", "kl.adaptive=false")  # no KL term: the sequence reward is the score alone
    rl_stage.train(cfg, reward_fn=letter_reward(good_tokens))
    rows = [json.loads(line) for line in (tmp_path / "rloo" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in rows][::2] == [r["prompt_index"] for r in rows][1::2]
    scores = torch.tensor([r["score"] for r in rows])
    want = between_prompt_share(prompt_variance_sums(scores, 2), 2)
    assert metrics(cfg)[-1]["objective/prompt_share"] == pytest.approx(want, abs=1e-5)
    ppo = cfg_for(tmp_path / "ppo", "train.steps=1")
    rl_stage.train(ppo, reward_fn=letter_reward(good_tokens))
    assert "objective/prompt_share" not in metrics(ppo)[-1]


def test_a_reward_of_the_wrong_shape_is_one_error(tmp_path):
    """(samples, 1) scores are not an ensemble of one-sample members: refused, naming the shape."""
    cfg = cfg_for(tmp_path, "train.steps=1", "models.critic=policy_head")
    with pytest.raises(ValueError, match=r"shape \(8, 1\) for 8 samples"):
        rl_stage.train(cfg, reward_fn=lambda s: torch.zeros(len(s.texts), 1))


def test_reward_ensemble_members_reach_the_reward(tmp_path, monkeypatch):
    """Two reward models: the rollout's score is mean - lambda * std of their (normalised) scores,
    and their spread is logged as objective/rm_std (absent with one RM)."""
    calls = []

    def fake_scores(rm, s):
        calls.append(rm)
        return torch.full((s.response.shape[0],), 1.0 if len(calls) % 2 else 3.0)

    monkeypatch.setattr(rl_update, "reward_scores", fake_scores)
    loaded = []
    monkeypatch.setattr(models, "load_reward_model", lambda path, **kw: loaded.append(path) or torch.nn.Identity())
    cfg = cfg_for(tmp_path, "models.reward_ensemble=[rm-b]", "rewards.ensemble_lambda=0.5", "train.steps=1",
                  "models.critic=policy_head")
    fn = rl_update.ensemble_reward([torch.nn.Identity(), torch.nn.Identity()])
    from types import SimpleNamespace

    assert fn(SimpleNamespace(response=torch.zeros(4, 2))).tolist() == [[1.0] * 4, [3.0] * 4]  # each member's
    rl_stage.train(cfg)
    assert loaded == ["tiny:", "rm-b"]
    row = metrics(cfg)[-1]
    assert row["objective/score"] == pytest.approx(1.5, abs=1e-6)  # mean 2 - 0.5 x std 1; no EOS penalty here
    assert row["objective/rm_std"] == pytest.approx(1.0, abs=1e-6)
    for how, want in (("mean", 2.0), ("min", 1.0)):
        other = cfg_for(tmp_path / how, "models.reward_ensemble=[rm-b]", f"rewards.ensemble={how}", "train.steps=1",
                        "models.critic=policy_head")
        rl_stage.train(other)
        assert metrics(other)[-1]["objective/score"] == pytest.approx(want, abs=1e-6)
    single = cfg_for(tmp_path / "one", "train.steps=1", "models.critic=policy_head")
    rl_stage.train(single)
    assert "objective/rm_std" not in metrics(single)[-1]


def _with_lengths(samples, lengths, ended):
    """The same samples with response masks of the given lengths and the given EOS flags."""
    from preflab.rollout import Samples

    mask = (torch.arange(samples.response.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    return Samples(samples.query, samples.query_mask, samples.response, mask, torch.tensor(ended), samples.texts)


@pytest.mark.parametrize("debias", [False, True])
def test_length_debias_takes_the_scores_slope_on_length_out_within_each_prompt(tmp_path, debias):
    """A reward of 1 - 0.1 x length: the logged slope is -0.1 either way; with rewards.length_debias each
    prompt's finished answers score alike (the prompt's mean), the unfinished one keeps the EOS penalty
    and stays out of the fit."""
    from preflab.data.chat import read_prompts
    from preflab.rollout import HFGenerator, encode_prompts

    cfg = cfg_for(tmp_path, "algo.estimator=rloo", "rollout.samples_per_prompt=2", "rollout.missing_eos_penalty=-5",
                  f"rewards.length_debias={str(debias).lower()}")
    torch.manual_seed(0)
    tok, policy = models.load_tokenizer("tiny:"), models.load_policy("tiny:", dropout_off=True)
    rows = read_prompts(cfg.data.prompts)[:4]
    samples = HFGenerator(policy, tok).generate(encode_prompts(tok, [r["prompt"] for r in rows]),
                                                max_new_tokens=8, temperature=1.0, n=2)
    samples = _with_lengths(samples, [2, 6, 3, 3, 1, 8, 4, 7], [True, True, True, True, True, True, True, False])
    b = rl_update.score_rollout(samples, ac=scoring.ActorCritic(policy, None, values=False), reference=policy,
                                reward_fn=lambda s: 1.0 - 0.1 * s.response_mask.sum(1).float(), cfg=cfg, kl_coef=0.0,
                                tokenizer=tok, device=torch.device("cpu"), chunk=4)
    assert b.length_slope == pytest.approx(-0.1, abs=1e-6)  # the last prompt's unfinished answer is not fitted
    want = [0.6, 0.6, 0.7, 0.7, 0.55, 0.55, 0.6, -5.0] if debias else [0.8, 0.4, 0.7, 0.7, 0.9, 0.2, 0.6, -5.0]
    assert b.scores.tolist() == pytest.approx(want, abs=1e-6)


def test_length_slope_is_logged_for_k_samples_and_debias_needs_them(tmp_path, good_tokens):
    cfg = cfg_for(tmp_path / "rloo", "algo.estimator=rloo", "rollout.samples_per_prompt=2", "train.steps=1",
                  "rewards.length_debias=true")
    rl_stage.train(cfg, reward_fn=letter_reward(good_tokens))
    assert "objective/length_slope" in metrics(cfg)[-1]
    ppo = cfg_for(tmp_path / "ppo", "train.steps=1")
    rl_stage.train(ppo, reward_fn=letter_reward(good_tokens))
    assert "objective/length_slope" not in metrics(ppo)[-1]
    with pytest.raises(ConfigError, match="rewards.length_debias.*samples_per_prompt must be >= 2"):
        cfg_for(tmp_path, "rewards.length_debias=true")
