"""The RL stage's glue, pinned: each test fails if the stage wires a correct pure function wrongly
(swapped gamma/lambda, returns as the value clip centre, the wrong temperature in one of three
places, a dropped ptx coefficient, the EOS penalty on the wrong rows, SFT labels on the prompt, a
critic that does not start as the RM)."""

import pytest
import torch

from preflab import loop, models, rl_update, scoring
from preflab.config import RLConfig, load_config
from preflab.data.chat import IGNORE, read_lm_rows, read_prompts
from preflab.rl import gae, masked_whiten, ppo_rewards
from preflab.rollout import HFGenerator, encode_prompts

TINY = "configs/rl_tiny.yaml"


def cfg_for(tmp_path, *overrides):
    return load_config(RLConfig, TINY, [f"run.out={tmp_path}", *overrides])


def letter_reward(s):
    tok = models.load_tokenizer("tiny:")
    good = torch.tensor([tok.convert_tokens_to_ids(c) for c in "aeiou"])
    return (torch.isin(s.response, good).float() * s.response_mask).sum(1)


def rollout(cfg, *, seed=0, n=8, value_std=0.1):
    torch.manual_seed(seed)
    tok = models.load_tokenizer("tiny:")
    policy = models.load_policy("tiny:", dropout_off=True)
    ac = scoring.ActorCritic(policy, None)
    torch.nn.init.normal_(ac.value_head.weight, std=value_std)  # non-zero values
    rows = read_prompts(cfg.data.prompts)[:n]
    samples = HFGenerator(policy, tok).generate(encode_prompts(tok, [r["prompt"] for r in rows]),
                                                max_new_tokens=6, temperature=cfg.rollout.temperature)
    batch = rl_update.score_rollout(samples, ac=ac, reference=models.load_policy("tiny:1"), reward_fn=letter_reward,
                              cfg=cfg, kl_coef=0.1, tokenizer=tok, device=torch.device("cpu"), chunk=4)
    return ac, tok, samples, batch


def test_advantages_follow_the_configured_gamma_and_lambda_and_rewards_stay_raw(tmp_path):
    cfg = cfg_for(tmp_path, "ppo.gamma=0.9", "ppo.lam=0.6")
    _, _, _, b = rollout(cfg)
    raw = ppo_rewards(b.kl, b.scores, b.mask, 0.1)
    torch.testing.assert_close(b.rewards, raw.rewards)  # not whitened by default
    ref = gae(raw.rewards, b.values, b.mask, gamma=0.9, lam=0.6)
    torch.testing.assert_close(b.returns, ref.returns, atol=1e-6, rtol=1e-5)  # returns before whitening
    torch.testing.assert_close(b.advantages, masked_whiten(ref.advantages, b.mask, shift_mean=True),
                               atol=1e-5, rtol=1e-4)
    swapped = gae(raw.rewards, b.values, b.mask, gamma=0.6, lam=0.9)
    assert not torch.allclose(swapped.returns, b.returns)

    cfg_w = cfg_for(tmp_path, "ppo.gamma=0.9", "ppo.lam=0.6", "ppo.whiten_rewards=true")
    _, _, _, bw = rollout(cfg_w)
    raw_w = ppo_rewards(bw.kl, bw.scores, bw.mask, 0.1).rewards
    torch.testing.assert_close(bw.rewards, masked_whiten(raw_w, bw.mask, shift_mean=False), atol=1e-5, rtol=1e-4)
    m = bw.mask.bool()
    assert float(bw.rewards[m].mean()) == pytest.approx(float(raw_w[m].mean()), abs=1e-5)  # mean kept
    assert float(bw.rewards[m].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)  # scaled


def _update(cfg, ac, batch, monkeypatch, **kw):
    optimizer = torch.optim.SGD([p for p in ac.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    from preflab import distributed

    return rl_update.ppo_update(ac, batch, optimizer=optimizer, scheduler=scheduler, cfg=cfg, device=torch.device("cpu"),
                          generator=torch.Generator().manual_seed(0), dist=distributed.Dist(), **kw)


def test_value_loss_is_centred_on_the_rollouts_old_values(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "ppo.epochs=1")
    ac, _, _, b = rollout(cfg)
    seen = []
    real = rl_update.value_loss

    def spy(values, old_values, returns, mask, clip):
        seen.append((old_values.clone(), returns.clone()))
        return real(values, old_values, returns, mask, clip)

    monkeypatch.setattr(rl_update, "value_loss", spy)
    _update(cfg, ac, b, monkeypatch, ptx_batches=None)
    assert seen
    old = torch.cat([o for o, _ in seen])
    ret = torch.cat([r for _, r in seen])
    assert sorted(old.sum(1).tolist()) == pytest.approx(sorted(b.values.sum(1).tolist()))
    assert sorted(ret.sum(1).tolist()) == pytest.approx(sorted(b.returns.sum(1).tolist()))
    assert not torch.allclose(b.values, b.returns)  # so swapping them would be seen


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_first_minibatch_ratio_is_one_at_any_sampling_temperature(tmp_path, monkeypatch, temperature):
    """Old log-probs, reference log-probs and the training forward all divide by the same T."""
    cfg = cfg_for(tmp_path, "ppo.epochs=1", f"rollout.temperature={temperature}")
    ac, tok, samples, b = rollout(cfg)
    first = []
    real = rl_update.policy_loss

    def spy(lp, old, adv, mask, clip):
        out = real(lp, old, adv, mask, clip)
        first.append(out)
        return out

    monkeypatch.setattr(rl_update, "policy_loss", spy)
    _update(cfg, ac, b, monkeypatch, ptx_batches=None)  # lr 0: every minibatch sees the rollout policy
    for out in first:
        assert float(out.ratio_mean) == pytest.approx(1.0, abs=1e-5)
        assert abs(float(out.approxkl)) < 1e-6
    # the reference log-probs use the same temperature: recompute them by hand
    ref = models.load_policy("tiny:1")
    with torch.no_grad():
        logits = scoring.response_logits(ref, samples, temperature)
    want = torch.log_softmax(logits, -1).gather(-1, samples.response.unsqueeze(-1)).squeeze(-1) * b.mask
    torch.testing.assert_close(b.ref_logprobs, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo", "reinforce_pp"])
def test_ptx_coefficient_scales_its_gradient_and_labels_cover_the_response(tmp_path, monkeypatch, estimator):
    """The pretraining mix reaches the policy gradient with its coefficient for every estimator
    (PPO-ptx, and RLOO/GRPO/REINFORCE++ with ptx)."""
    tok = models.load_tokenizer("tiny:")
    rows = read_lm_rows("builtin:examples", tok, 64)
    for e in rows[:5]:  # demonstrations: only the assistant turn is a target
        labelled = [i for i, lab in zip(e.input_ids, e.labels) if lab != IGNORE]
        text = tok.decode(labelled)
        assert labelled and "<|im_start|>user" not in text and "user\n" not in text[:10]
        assert len(labelled) < len(e.input_ids)

    grads = {}
    real = loop.clip_grad

    def run(coef):
        group = [] if estimator in ("gae", "reinforce_pp") else ["rollout.samples_per_prompt=2"]
        cfg = cfg_for(tmp_path, "ppo.epochs=1", f"ptx.coef={coef}", "ptx.batch_size=2",
                      f"algo.estimator={estimator}", *group)
        ac, _, _, b = rollout(cfg)
        batches = rl_update.PtxBatches(rows, 2, tok.pad_token_id, torch.Generator().manual_seed(3))
        captured = []

        def spy(params, max_norm, **kw):
            params = list(params)
            captured.append(torch.cat([p.grad.flatten() for p in ac.policy.parameters() if p.grad is not None]))
            return real(params, None, **kw)

        monkeypatch.setattr(loop, "clip_grad", spy)
        _update(cfg, ac, b, monkeypatch, ptx_batches=batches if coef else None)
        grads[coef] = captured[0]

    for coef in (0.0, 1.0, 2.0):
        run(coef)
    part = grads[1.0] - grads[0.0]
    assert float(part.abs().sum()) > 0
    torch.testing.assert_close(grads[2.0] - grads[0.0], 2 * part, atol=1e-6, rtol=1e-4)


def test_missing_eos_penalty_hits_exactly_the_rows_that_did_not_end(tmp_path):
    from preflab.rollout import Samples, response_mask_after_stop

    cfg = cfg_for(tmp_path, "rollout.missing_eos_penalty=-3.5")
    ac, tok, samples, _ = rollout(cfg, n=8)
    response = samples.response.clone()
    response[[0, 3, 5], 2] = tok.eos_token_id  # three rows end at their third token, the others are cut off
    mask, ended = response_mask_after_stop(response, tok.eos_token_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, tok.pad_token_id))
    s = Samples(samples.query, samples.query_mask, response, mask, ended, samples.texts)
    assert ended.tolist() == [i in (0, 3, 5) for i in range(8)]
    b = rl_update.score_rollout(s, ac=ac, reference=models.load_policy("tiny:1"), reward_fn=letter_reward, cfg=cfg,
                          kl_coef=0.1, tokenizer=tok, device=torch.device("cpu"), chunk=4)
    torch.testing.assert_close(b.scores[~ended], torch.full_like(b.scores[~ended], -3.5))
    torch.testing.assert_close(b.scores[ended], letter_reward(s)[ended].float())


def test_sft_train_uses_response_only_labels(tmp_path, monkeypatch):
    from preflab.config import SFTConfig
    from preflab.lm import TokenNLL
    from preflab.stages import sft

    seen = []
    real = TokenNLL.forward

    def spy(self, input_ids, attention_mask, labels):
        seen.append((input_ids.clone(), labels.clone()))
        return real(self, input_ids, attention_mask, labels)

    monkeypatch.setattr(TokenNLL, "forward", spy)
    cfg = load_config(SFTConfig, "configs/sft_tiny.yaml", [f"run.out={tmp_path}", "train.max_steps=1"])
    sft.train(cfg)
    tok = models.load_tokenizer("tiny:")
    assert seen
    ids, labels = seen[0]
    for row_ids, row_labels in zip(ids, labels):
        keep = row_labels != IGNORE
        assert bool(keep.any()) and not bool(keep.all())
        torch.testing.assert_close(row_labels[keep], row_ids[keep])  # targets are the tokens themselves
        text = tok.decode(row_ids[keep])
        assert "<|im_start|>" not in text  # no prompt or role header is trained on


def _critic_from_a_saved_rm(tmp_path, critic: str):
    """(critic, the saved RM reloaded, one sample): a tiny RM with gain 2 and bias -0.75 saved, and
    ``load_critic`` under ``models.critic=critic``; the critic's trunk must equal the saved RM's."""
    from preflab.rollout import Samples, left_pad

    tok = models.load_tokenizer("tiny:")
    torch.manual_seed(0)
    rm = models.load_scorer("tiny:")
    rm.config.preflab_reward_gain, rm.config.preflab_reward_bias = 2.0, -0.75
    rm.config.preflab_reward_model = True
    models.save_model(rm, tok, tmp_path / "rm")
    cfg = cfg_for(tmp_path / "run", f"models.critic={critic}", f"models.reward_model={tmp_path / 'rm'}")
    model = rl_update.load_critic(cfg)
    saved = models.load_scorer(str(tmp_path / "rm"))
    trunk = dict(saved.model.named_parameters())
    for name, a in model.model.named_parameters():
        torch.testing.assert_close(a, trunk[name], msg=name)
    q, qm = left_pad([tok("Hi there", add_special_tokens=False)["input_ids"]], tok.pad_token_id)
    r = torch.tensor([tok("Hello!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    return model, saved, Samples(q, qm, r, torch.ones_like(r), torch.tensor([True]), ["Hello!"])


def test_critic_from_the_rms_trunk_starts_at_zero_with_the_rms_features(tmp_path):
    """models.critic=reward_trunk: the RM's trunk, its head zeroed: every value is 0 (so the first
    advantages are the returns), and the head's gradient is the RM's features (it can learn)."""
    critic, _, s = _critic_from_a_saved_rm(tmp_path, "reward_trunk")
    values = scoring.critic_values(critic, s)
    assert values.shape == s.response.shape and not values.detach().any()
    values.sum().backward()
    head = scoring.score_module(critic)
    assert head.weight.grad.abs().sum() > 0 and float(head.bias.grad) == s.response.shape[1]


def test_critic_from_the_rm_starts_as_the_rms_normalised_score(tmp_path):
    """The critic is the RM's trunk with its normalisation applied: its head on a full sequence gives the
    RM's normalised score, so values and returns start in the same units."""
    critic, saved, s = _critic_from_a_saved_rm(tmp_path, "reward_model")
    with torch.no_grad():
        torch.testing.assert_close(scoring.reward_scores(critic, s, normalise=False),
                                   scoring.reward_scores(saved, s), atol=1e-5, rtol=1e-5)
