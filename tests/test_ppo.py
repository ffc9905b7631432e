"""PPO-ptx on tiny random models with a programmatic reward: learning, KL control, invariances,
resume, NaN handling, LoRA reference, ptx."""


import pytest
import torch

from helpers import (
    end_rank,
    free_port,
    join_gloo_env,
    letter_reward,
    letter_tokens,
    max_param_diff,
    model_weights,
    ppo_cfg,
    run_metrics,
)
from preflab import models, rl_update, scoring
from preflab.data.chat import Example
from preflab.errors import ConfigError, TrainingError
from preflab.rl import masked_whiten
from preflab.stages import rl as rl_stage


@pytest.fixture(scope="module")
def good_tokens():
    return letter_tokens()


cfg_for, metrics = ppo_cfg, run_metrics


def test_ppo_raises_the_reward_and_beta_controls_kl(tmp_path, good_tokens):
    free = cfg_for(tmp_path / "free", "train.steps=25", "kl.coef=0")
    rl_stage.train(free, reward_fn=letter_reward(good_tokens))
    rows = metrics(free)
    first = sum(r["objective/score"] for r in rows[:3]) / 3
    last = sum(r["objective/score"] for r in rows[-3:]) / 3
    assert last > first + 0.3, (first, last)
    assert rows[-1]["objective/kl"] > 5.0  # beta = 0: nothing holds the policy near the reference
    for key in ("objective/kl_coef", "objective/rlhf_reward", "objective/entropy", "policy/approxkl",
                "policy/clipfrac", "value/clipfrac", "value/explained_variance", "loss/policy", "loss/value",
                "loss/ptx", "response/length_mean", "response/no_eos_fraction", "perf/step_s", "perf/gen_s",
                "perf/train_s", "perf/tokens_per_s", "perf/peak_rss_mb"):
        assert key in rows[-1], key

    leashed = cfg_for(tmp_path / "leashed", "train.steps=25", "kl.coef=2.0")
    rl_stage.train(leashed, reward_fn=letter_reward(good_tokens))
    assert max(r["objective/kl"] for r in metrics(leashed)) < 2.0
    # The saved policy loads in plain transformers.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "free/model")


def test_adaptive_controller_moves_beta(tmp_path, good_tokens):
    cfg = cfg_for(tmp_path, "train.steps=6", "kl.coef=0.1", "kl.adaptive=true", "kl.target=0.01", "kl.horizon=80")
    rl_stage.train(cfg, reward_fn=letter_reward(good_tokens))
    coefs = [r["objective/kl_coef"] for r in metrics(cfg)]
    assert coefs[0] == pytest.approx(0.1)
    assert coefs[-1] > coefs[0]  # KL above a tiny target: beta grows


def test_training_logits_are_divided_by_the_temperature():
    """ActorCritic's log-probs are log_softmax(logits / T); without the division the T = 2 and
    T = 1 results would coincide."""
    policy = models.load_policy("tiny:")
    ac = scoring.ActorCritic(policy, None)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    mask = torch.ones_like(ids)
    resp = ids[:, 3:]
    with torch.no_grad():
        lp1 = ac(ids[:, :3], mask[:, :3], resp, mask[:, 3:], temperature=1.0)[0]
        lp2 = ac(ids[:, :3], mask[:, :3], resp, mask[:, 3:], temperature=2.0)[0]
        logits = policy(input_ids=ids).logits[:, 2:-1]
    expect2 = torch.log_softmax(logits / 2.0, -1).gather(-1, resp[..., None]).squeeze(-1)
    torch.testing.assert_close(lp2, expect2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(lp1, lp2)


def test_global_whiten_equals_masked_whiten_on_one_rank():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for shift in (True, False):
        torch.testing.assert_close(rl_update.global_whiten(x, m, shift), masked_whiten(x, m, shift_mean=shift))


def _scored_batch(cfg, good):
    """One scored rollout of the tiny policy, plus the trainable module, for update tests."""
    torch.manual_seed(0)
    tok = models.load_tokenizer("tiny:")
    policy = models.load_policy("tiny:", dropout_off=True)
    ac = scoring.ActorCritic(policy, None)
    ref = models.load_policy("tiny:")
    from preflab.data.chat import read_prompts
    from preflab.rollout import HFGenerator, encode_prompts

    rows = read_prompts(cfg.data.prompts)[:8]
    samples = HFGenerator(policy, tok).generate(encode_prompts(tok, [r["prompt"] for r in rows]),
                                                max_new_tokens=6, temperature=1.0)
    batch = rl_update.score_rollout(samples, ac=ac, reference=ref, reward_fn=letter_reward(good), cfg=cfg,
                              kl_coef=0.05, tokenizer=tok, device=torch.device("cpu"), chunk=4)
    return ac, batch


def test_k_samples_of_a_prompt_run_it_once_with_the_same_numbers_and_gradients(tmp_path, monkeypatch):
    """Rows sharing a query (k samples per prompt) go through scoring.tail_hidden's shared-prefix
    path: log-probs, values, critic values, RM scores and gradients equal those of each row alone
    (full sequences, nothing shared)."""
    from preflab.data.chat import read_prompts
    from preflab.rollout import HFGenerator, encode_prompts

    cfg = cfg_for(tmp_path)
    torch.manual_seed(0)
    tok = models.load_tokenizer("tiny:")
    policy = models.load_policy("tiny:", dropout_off=True)
    ac = scoring.ActorCritic(policy, None)
    torch.nn.init.normal_(ac.value_head.weight, std=0.1)
    rm = models.load_scorer("tiny:")
    prompts = [r["prompt"] for r in read_prompts(cfg.data.prompts)[:2]]
    prompts[1] += " with a longer tail" * 3  # two prompt lengths: the shorter one is left-padded
    samples = HFGenerator(policy, tok).generate(encode_prompts(tok, [p for p in prompts for _ in range(3)]),
                                                max_new_tokens=6, temperature=1.0)
    assert len(set(map(tuple, samples.response.tolist()))) > 2  # different responses per prompt
    shared = []
    real_row_hidden = scoring.row_hidden
    monkeypatch.setattr(scoring, "row_hidden", lambda *a, **kw: shared.append(a[3].shape[0]) or real_row_hidden(*a, **kw))

    def terms(s):
        lp, v, _, _, _ = ac(**s.tensors(), temperature=0.7)
        return lp, v, scoring.critic_values(rm, s), scoring.reward_scores(rm, s)

    together = terms(samples)
    assert shared == [2, 2, 2]  # policy, critic, RM: two prompts each, run once for 6 rows
    shared.clear()
    alone = [terms(samples.select([i])) for i in range(6)]
    assert shared == []  # one row: the full sequence
    m = samples.response_mask.bool()
    for j, name in enumerate(("logprobs", "values", "critic", "rm")):
        rows = torch.cat([a[j] for a in alone])
        got = together[j][m] if together[j].dim() == 2 else together[j]
        want = rows[m] if rows.dim() == 2 else rows
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=name)
    # gradients of a loss on the shared pass equal those of the rows' full sequences
    weights = torch.randn(samples.response.shape)
    (together[0] * weights * m).sum().backward()
    grad_shared = {n: q.grad.clone() for n, q in policy.named_parameters() if q.grad is not None}
    policy.zero_grad()
    for i, a in enumerate(alone):
        (a[0] * weights[i:i + 1] * m[i:i + 1]).sum().backward()
    for n, q in policy.named_parameters():
        if n in grad_shared:
            torch.testing.assert_close(grad_shared[n], q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_scoring_in_sorted_trimmed_chunks_equals_scoring_each_row_alone(tmp_path, good_tokens):
    """score_rollout groups rows by prompt length and drops all-padding query columns; rows come
    back in rollout order with the values a one-row chunk gives (no padding at all)."""
    from preflab.data.chat import read_prompts
    from preflab.rollout import HFGenerator, encode_prompts

    cfg = cfg_for(tmp_path)
    torch.manual_seed(0)
    tok = models.load_tokenizer("tiny:")
    policy = models.load_policy("tiny:", dropout_off=True)
    ac = scoring.ActorCritic(policy, None)
    torch.nn.init.normal_(ac.value_head.weight, std=0.1)  # non-zero values, so their order is checked
    prompts = [r["prompt"] for r in read_prompts(cfg.data.prompts)[:6]]
    prompts[2] = prompts[2] + " and a much longer tail " * 6  # one long prompt pads all the others
    samples = HFGenerator(policy, tok).generate(encode_prompts(tok, prompts), max_new_tokens=6, temperature=1.0)
    lengths = samples.query_mask.sum(1)
    assert scoring.by_query_length(samples) == sorted(range(6), key=lambda i: int(lengths[i]))
    trimmed = samples.select([0, 1]).trim_query()
    assert trimmed.query.shape[1] == int(lengths[:2].max()) < samples.query.shape[1]
    kw = dict(ac=ac, reference=models.load_policy("tiny:"), reward_fn=letter_reward(good_tokens), cfg=cfg,
              kl_coef=0.05, tokenizer=tok, device=torch.device("cpu"))
    chunked = rl_update.score_rollout(samples, chunk=4, **kw)
    alone = rl_update.score_rollout(samples, chunk=1, **kw)
    for name in ("logprobs", "ref_logprobs", "values", "kl", "advantages", "returns"):
        torch.testing.assert_close(getattr(chunked, name), getattr(alone, name), atol=1e-5, rtol=1e-4, msg=name)
    # ... and in rollout order: the whole padded batch in one pass gives the same rows.
    with torch.no_grad():
        lp, v, _, _, _ = ac(**samples.tensors(), temperature=1.0)
    m = samples.response_mask.float()
    torch.testing.assert_close(chunked.logprobs, lp * m, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked.values, v * m, atol=1e-5, rtol=1e-4)
    assert chunked.values.abs().sum() > 0


def _update(ac, batch, cfg, dist=None, ptx_rows=None, train_policy=True):
    from preflab import distributed

    opt = torch.optim.AdamW([p for p in ac.parameters() if p.requires_grad], lr=1e-3, eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    module = torch.nn.parallel.DistributedDataParallel(ac) if dist and dist.enabled else ac
    ptx = rl_update.PtxBatches(ptx_rows, cfg.ptx.batch_size, 0, torch.Generator().manual_seed(3)) if ptx_rows else None
    return rl_update.ppo_update(module, batch, optimizer=opt, scheduler=sched, cfg=cfg, device=torch.device("cpu"),
                          ptx_batches=ptx, generator=torch.Generator().manual_seed(0),
                          dist=dist or distributed.Dist(), train_policy=train_policy)


def test_critic_warmup_update_leaves_the_policy_untouched(good_tokens, tmp_path):
    """train_policy=False: the value head moves, the policy does not (AdamW's weight decay of
    0.01 would move it too if its zero gradients reached the optimizer)."""
    cfg = cfg_for(tmp_path, "rollout.batch_size=8", "ppo.minibatch_size=4", "ppo.epochs=2")
    ac, batch = _scored_batch(cfg, good_tokens)
    before = {k: v.clone() for k, v in ac.state_dict().items()}
    _update(ac, batch, cfg, train_policy=False)
    after = ac.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("policy."))
    assert max(float((before[k] - after[k]).abs().max()) for k in before if k.startswith("value_head.")) > 1e-4


def test_critic_warmup_steps_hold_the_policy_and_its_schedule(good_tokens, tmp_path, monkeypatch):
    seen = []
    real = rl_update.ppo_update

    def spy(ac, batch, *, optimizer, **kw):
        seen.append((kw["train_policy"], kw["ptx_batches"] is not None, [g["lr"] for g in optimizer.param_groups]))
        return real(ac, batch, optimizer=optimizer, **kw)

    monkeypatch.setattr(rl_stage, "ppo_update", spy)
    cfg = cfg_for(tmp_path, "train.steps=3", "ppo.critic_warmup_steps=2", "ptx.coef=0.5",
                  "data.ptx=builtin:examples", "optim.lr=1e-3", "optim.warmup_steps=2",
                  "optim.warmup_start=0.1", "rollout.batch_size=4", "ppo.minibatch_size=4", "ppo.epochs=1")
    rl_stage.train(cfg, reward_fn=letter_reward(good_tokens))
    # Two warm-up rollouts (one update each): the critic's LR warms up, the policy's waits; then
    # the policy starts its own warm-up at 0.1 x lr, with the pretraining mix.
    assert [(t, x) for t, x, _ in seen] == [(False, False), (False, False), (True, True)]
    assert seen[0][2] == pytest.approx([1e-4, 1e-4])
    assert seen[1][2] == pytest.approx([1e-4, 5.5e-4])
    assert seen[2][2] == pytest.approx([1e-4, 1e-3])
    with pytest.raises(ConfigError, match="critic_warmup_steps"):
        rl_stage.train(cfg_for(tmp_path / "bad", "train.steps=2", "ppo.critic_warmup_steps=2"),
                  reward_fn=letter_reward(good_tokens))


@pytest.mark.parametrize("with_ptx", [False, True])
def test_gradient_accumulation_1x8_equals_8x1(good_tokens, tmp_path, with_ptx):
    base = ["rollout.batch_size=8", "ppo.minibatch_size=8", "ppo.epochs=2", "ptx.coef=0.5", "ptx.batch_size=4"]
    one = cfg_for(tmp_path, *base, "ppo.grad_accum=1")
    eight = cfg_for(tmp_path, *base, "ppo.grad_accum=8")
    ac1, batch = _scored_batch(one, good_tokens)
    ac8, _ = _scored_batch(one, good_tokens)
    # Pretraining rows of different lengths: 4 per minibatch, split over 8 micro-batches (4 get none).
    rows = [Example(list(range(5, 5 + n)), list(range(5, 5 + n))) for n in (3, 7, 4, 9, 5, 6)]
    s1 = _update(ac1, batch, one, ptx_rows=rows if with_ptx else None)
    s8 = _update(ac8, batch, eight, ptx_rows=rows if with_ptx else None)
    diff = max(float((a - b).abs().max()) for a, b in zip(ac1.state_dict().values(), ac8.state_dict().values()))
    assert diff < 1e-5
    assert s1["loss/policy"] == pytest.approx(s8["loss/policy"], abs=1e-6)
    if with_ptx:
        assert s1["loss/ptx"] > 0
        assert s1["loss/ptx"] == pytest.approx(s8["loss/ptx"], rel=1e-5)
    init = models.load_policy("tiny:").state_dict()
    assert max(float((ac1.policy.state_dict()[k] - v).abs().max()) for k, v in init.items()) > 1e-4



def _update_worker(rank, world, port, path):
    join_gloo_env(rank, world, port)
    from preflab import distributed

    d = distributed.init(torch.device("cpu"))
    blob = torch.load(path, weights_only=False)
    half = list(range(rank * 4, rank * 4 + 4))
    b = blob["batch"]
    part = rl_update.Scored(b.samples.select(half), *(getattr(b, f)[half] for f in (
        "mask", "logprobs", "ref_logprobs", "values", "scores", "kl", "rewards", "non_score_reward",
        "advantages", "returns")))
    ac = blob["ac"]
    _update(ac, part, blob["cfg"], d)
    if rank == 0:
        torch.save(ac.state_dict(), path + ".out")
    end_rank()


def test_two_gloo_ranks_equal_one_rank(good_tokens, tmp_path):
    """One rank updating on 8 rollouts == two ranks on 4 each (the same global minibatch)."""
    one = cfg_for(tmp_path, "rollout.batch_size=8", "ppo.minibatch_size=8", "ppo.epochs=2")
    two = cfg_for(tmp_path, "rollout.batch_size=4", "ppo.minibatch_size=4", "ppo.epochs=2")
    ac, batch = _scored_batch(one, good_tokens)
    import copy

    ac2 = copy.deepcopy(ac)
    _update(ac, batch, one)
    path = str(tmp_path / "blob.pt")
    torch.save({"ac": ac2, "batch": batch, "cfg": two}, path)
    torch.multiprocessing.spawn(_update_worker, args=(2, free_port(), path), nprocs=2)
    got = torch.load(path + ".out")
    diff = max(float((got[k] - v).abs().max()) for k, v in ac.state_dict().items())
    assert diff < 1e-5


def test_resume_equals_uninterrupted(tmp_path, good_tokens, monkeypatch):
    full = cfg_for(tmp_path / "full", "train.steps=4")
    w_full = model_weights(rl_stage.train(full, reward_fn=letter_reward(good_tokens)))
    cut = cfg_for(tmp_path / "cut", "train.steps=4", "train.save_every=2")
    real = rl_update.ppo_update
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rl_stage, "ppo_update", dying)
    with pytest.raises(KeyboardInterrupt):
        rl_stage.train(cut, reward_fn=letter_reward(good_tokens))
    monkeypatch.undo()
    w_cut = model_weights(rl_stage.train(cut, resume=True, reward_fn=letter_reward(good_tokens)))
    assert max_param_diff(w_full, w_cut) < 1e-6
    a = [r["objective/score"] for r in metrics(full)]
    b = [r["objective/score"] for r in metrics(cut)]
    assert a == pytest.approx(b, abs=1e-6)


def test_nan_stops_with_a_clear_error_and_checkpoint_intact(tmp_path, good_tokens):
    cfg = cfg_for(tmp_path, "train.steps=4", "train.save_every=1")
    good = letter_reward(good_tokens)
    calls = {"n": 0}

    def reward(s):
        calls["n"] += 1
        out = good(s)
        return out * float("nan") if calls["n"] == 3 else out

    with pytest.raises(TrainingError, match="non-finite"):
        rl_stage.train(cfg, reward_fn=reward)
    state = torch.load(tmp_path / "checkpoints/step-000002/state.pt", weights_only=False)
    assert state["step"] == 2


def test_lora_reference_is_the_adapter_free_policy_and_ptx_runs(tmp_path, good_tokens):
    """With LoRA the reference is the policy with adapters off: the first rollout's KL is 0
    exactly (B = 0 at init). The ptx term is computed on the built-in demonstrations."""
    cfg = cfg_for(tmp_path, "train.steps=2", "models.policy.lora.enabled=true", "models.policy.lora.r=4",
                  "ptx.coef=1.0", "data.ptx=builtin:examples", "ptx.batch_size=2")
    rl_stage.train(cfg, reward_fn=letter_reward(good_tokens))
    rows = metrics(cfg)
    assert rows[0]["objective/kl"] == 0.0
    assert rows[1]["objective/kl"] != 0.0
    assert all(r["loss/ptx"] > 0 for r in rows)


def test_critic_from_the_rms_trunk_explains_nothing_before_its_first_update(tmp_path):
    """models.critic=reward_trunk: the first rollout's values are all 0, so its explained variance
    is exactly 0; the critic then learns (the second rollout's is not 0)."""
    cfg = cfg_for(tmp_path, "train.steps=2", "models.critic=reward_trunk", "ppo.critic_lr=1e-2")
    rl_stage.train(cfg)
    assert (tmp_path / "critic/config.json").is_file()  # a separate critic, not the policy's head
    ev = [r["value/explained_variance"] for r in metrics(cfg)]
    assert ev[0] == pytest.approx(0.0, abs=1e-6) and abs(ev[1]) > 1e-4


def test_critic_initialised_from_the_reward_model(tmp_path):
    cfg = cfg_for(tmp_path, "train.steps=2", "models.critic=reward_model")
    rl_stage.train(cfg)  # the tiny scorer is the reward model too
    assert (tmp_path / "critic/config.json").is_file()
    rows = metrics(cfg)
    assert len(rows) == 2 and all(r["value/clipfrac"] >= 0 for r in rows)
