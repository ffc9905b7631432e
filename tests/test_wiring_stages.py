"""Each setting a stage passes to its maths changes the result, in the expected direction and by
the hand-computed amount: REINFORCE++'s and GAE's discount, cDPO's label smoothing, the DPO
reference model, rejection sampling's ``require_eos`` and best-of-N when no sample ended."""

import json
import math
import random

import pytest
import torch

from helpers import ppo_cfg
from preflab import models, rl_update

# ---------------------------------------------------------------------------------------------
# The RL stage: the discount reaches the estimator
# ---------------------------------------------------------------------------------------------


def _advantages(tmp_path, estimator, gamma, lam=None):
    over = [f"algo.estimator={estimator}", f"ppo.gamma={gamma}"] + ([f"ppo.lam={lam}"] if lam is not None else [])
    cfg = ppo_cfg(tmp_path, *over)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, -1.0, 2.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.0, 0.5, -0.5, 1.0]]) * mask
    return rl_update.estimate_advantages(cfg, rewards, values, mask, scores=torch.zeros(2), kl=torch.zeros_like(rewards),
                                   beta=0.0), mask


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_reinforce_pp_returns_use_the_configured_discount(tmp_path, gamma):
    (adv, g), mask = _advantages(tmp_path, "reinforce_pp", gamma)
    want = torch.tensor([[gamma ** 2, gamma, 1.0, 0.0],
                         [0.5 - gamma + 2 * gamma ** 2 + 4 * gamma ** 3, -1 + 2 * gamma + 4 * gamma ** 2,
                          2 + 4 * gamma, 4.0]])
    torch.testing.assert_close(g, want)
    # the advantages are the returns whitened over every real token (mean 0, biased variance 1)
    real = adv[mask.bool()]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(real.var(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    gr = g[mask.bool()]
    torch.testing.assert_close(real, (gr - gr.mean()) / (gr.var(unbiased=False) + 1e-8).sqrt(), atol=1e-5, rtol=1e-5)


def test_a_smaller_discount_shrinks_the_early_returns(tmp_path):
    (_, g1), _ = _advantages(tmp_path, "reinforce_pp", 1.0)
    (_, g9), _ = _advantages(tmp_path, "reinforce_pp", 0.9)
    assert g9[0, 0] == pytest.approx(0.81) and g1[0, 0] == 1.0
    assert g9[0, 2] == g1[0, 2] == 1.0  # the last real token: its own reward whatever gamma


def test_gae_uses_the_configured_gamma_and_lambda(tmp_path):
    (_, ret), _ = _advantages(tmp_path, "gae", 0.5, lam=0.0)
    # lam = 0: A_t = r_t + gamma V_{t+1} - V_t; returns = A + V = r_t + gamma V_{t+1} (0 after the last real token)
    want0 = torch.tensor([0.0 + 0.5 * 0.2, 0.0 + 0.5 * 0.3, 1.0, 0.0])
    torch.testing.assert_close(ret[0], want0)
    (_, ret1), _ = _advantages(tmp_path, "gae", 1.0, lam=1.0)
    torch.testing.assert_close(ret1[0], torch.tensor([1.0, 1.0, 1.0, 0.0]))  # Monte Carlo returns


# ---------------------------------------------------------------------------------------------
# DPO: label smoothing and the reference model
# ---------------------------------------------------------------------------------------------


def _dpo_cfg(tmp_path, *over):
    from preflab.config import DPOConfig, load_config

    return load_config(DPOConfig, None, ["model.path=tiny:", f"data.train={tmp_path / 'r.jsonl'}",
                                         "data.val_fraction=0", "data.max_length=96", "train.bf16=false",
                                         "eval.kl_prompts=0", "run.progress=false", f"run.out={tmp_path / 'run'}",
                                         *over])


def _one_pair_batch(ref):
    from preflab import dpo_update

    ex = dpo_update.Ranked(ids=[[1, 2, 3], [1, 2, 4, 5]], prompt_len=[2, 2], ranks=[0, 1], ref=list(ref))
    return dpo_update.collate_ranked([ex], pad_id=0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_loss_uses_the_configured_label_smoothing(tmp_path, eps):
    from preflab import dpo_update

    cfg = _dpo_cfg(tmp_path, "dpo.loss=cdpo", f"dpo.label_smoothing={eps}", "dpo.beta=0.5")
    batch = _one_pair_batch([-5.0, -6.0])
    flat = torch.tensor([-3.0, -7.0])  # chosen up by 2, rejected down by 1: margin 3, h = 0.5 * 3
    h = 0.5 * ((-3.0 + 5.0) - (-7.0 + 6.0))
    want = -(1 - eps) * math.log(1 / (1 + math.exp(-h))) - eps * math.log(1 / (1 + math.exp(h)))
    parts = dpo_update.batch_loss(flat, batch, cfg)
    assert float(parts.total) == pytest.approx(want, abs=1e-5)


def test_label_smoothing_raises_the_loss_of_a_correct_margin_and_only_for_cdpo(tmp_path):
    from preflab import dpo_update

    batch, flat = _one_pair_batch([-5.0, -6.0]), torch.tensor([-3.0, -7.0])
    loss = {(name, eps): float(dpo_update.batch_loss(flat, batch, _dpo_cfg(tmp_path, f"dpo.loss={name}",
                                                                   f"dpo.label_smoothing={eps}")).total)
            for name in ("dpo", "cdpo") for eps in (0.0, 0.2)}
    assert loss[("cdpo", 0.2)] > loss[("cdpo", 0.0)] == pytest.approx(loss[("dpo", 0.0)])
    assert loss[("dpo", 0.2)] == loss[("dpo", 0.0)]  # plain DPO ignores the setting
    # and the default beta (0.1) reaches the loss: h = 0.1 * 3
    assert loss[("dpo", 0.0)] == pytest.approx(math.log(1 + math.exp(-0.3)), abs=1e-6)


WORDS = ["apple", "river", "stone", "cloud", "green", "table"]


def _write_rankings(path, n=6):
    rng = random.Random(0)
    rows = [{"prompt": f"Describe item {i}.", "responses": [" ".join(rng.choice(WORDS) for _ in range(3))
                                                             for _ in range(2)], "order": [[0], [1]]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _naive_logps(model, seq, prompt_len):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    return float(lp[prompt_len - 1:].sum())


def test_a_configured_dpo_reference_model_gives_the_cached_reference_logps(tmp_path):
    """model.reference = tiny:3 (the policy is tiny:): the cached reference log-probs are tiny:3's,
    not the policy's, and the first loss is no longer log 2 (policy != reference)."""
    from preflab import dpo_update
    from preflab.data import rankings
    from preflab.stages import dpo

    _write_rankings(tmp_path / "r.jsonl")
    cfg = _dpo_cfg(tmp_path, "model.reference=tiny:3", "train.batch_prompts=6", "train.max_steps=1")
    assert dpo_update.reference_fingerprint(cfg, {}) != dpo_update.reference_fingerprint(_dpo_cfg(tmp_path), {})
    dpo.train(cfg)
    cache = json.loads((tmp_path / "run" / dpo.REFERENCE_CACHE).read_text())["logps"]["train"]
    tok = models.load_tokenizer("tiny:")
    ref, policy = models.load_policy("tiny:3"), models.load_policy("tiny:")
    ex = dpo_update.encode_ranked(tok, rankings.read_group_file(str(tmp_path / "r.jsonl")), 96)
    want = [[_naive_logps(ref, s, p) for s, p in zip(e.ids, e.prompt_len)] for e in ex]
    own = [[_naive_logps(policy, s, p) for s, p in zip(e.ids, e.prompt_len)] for e in ex]
    assert len(cache) == len(want) == 6
    for got, w, o in zip(cache, want, own):
        assert got == pytest.approx(w, abs=1e-4)
        assert all(abs(g - x) > 1e-2 for g, x in zip(got, o))
    first = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] != pytest.approx(math.log(2), abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Best-of-N and rejection sampling: require_eos, and no sample ended
# ---------------------------------------------------------------------------------------------

PROMPTS = ["first prompt", "second prompt", "third prompt"]
# per prompt: (texts, scores, ended) of its n = 3 samples
DESIGN = [
    (["a0", "b0", "c0"], [1.0, 3.0, 2.0], [True, False, True]),    # best (b0) cut off; best ended: c0
    (["a1", "b1", "c1"], [5.0, 4.0, 6.0], [False, False, False]),  # none ended
    (["a2", "b2", "c2"], [0.0, 9.0, 1.0], [True, True, True]),     # all ended
]


@pytest.fixture
def fake_sampling(monkeypatch):
    """best_of_n's generator and reward model replaced: sample j of prompt i is ``design[i]``'s j-th
    (``DESIGN`` unless a test sets ``calls.design``), laid out as n contiguous rows per prompt (as the
    Generator contract says); each row's reward is its own (two equal texts may score differently:
    the RM reads EOS too)."""
    import preflab.evals.best_of_n as bon
    from preflab.rollout import Samples, encode_prompts

    tok = models.load_tokenizer("tiny:")
    index = {tuple(ids): i for i, ids in enumerate(encode_prompts(tok, PROMPTS))}

    class Calls(list):
        design = DESIGN
        scores: list = []

    calls = Calls()

    class Gen:
        def __init__(self, *a, **k):
            pass

        def generate(self, ids, *, n, **kw):
            calls.append((len(ids), n, kw))
            rows = [index[tuple(p)] for p in ids for _ in range(n)]
            texts = [calls.design[i][0][j % n] for j, i in enumerate(rows)]
            ended = torch.tensor([calls.design[i][2][j % n] for j, i in enumerate(rows)])
            calls.scores = [calls.design[i][1][j % n] for j, i in enumerate(rows)]
            z = torch.zeros((len(rows), 1), dtype=torch.long)
            return Samples(z, z + 1, z, z + 1, ended, texts)

    monkeypatch.setattr(bon, "HFGenerator", Gen)
    monkeypatch.setattr(bon, "reward_scores", lambda rm, s: torch.tensor(calls.scores))
    return calls


def test_best_of_n_picks_by_reward_among_ended_and_falls_back_when_none_ended(fake_sampling):
    from preflab.evals.best_of_n import best_of_n

    net = torch.nn.Linear(1, 1)
    tok = models.load_tokenizer("tiny:")
    free = best_of_n(net, net, tok, PROMPTS, n=3, batch_prompts=2, bf16=False, require_eos=False)
    assert free.texts == ["b0", "c1", "b2"] and free.scores == [3.0, 6.0, 9.0] and free.ended == [False, False, True]
    eos = best_of_n(net, net, tok, PROMPTS, n=3, batch_prompts=2, bf16=False, require_eos=True)
    # prompt 0: the best ended sample; prompt 1: none ended, so the best of all, marked not ended
    assert eos.texts == ["c0", "c1", "b2"] and eos.scores == [2.0, 6.0, 9.0] and eos.ended == [True, False, True]
    assert eos.candidates == [d[0] for d in DESIGN] and eos.candidate_ended == [d[2] for d in DESIGN]
    assert eos.candidate_scores == [d[1] for d in DESIGN]
    assert (free.picks, eos.picks) == ([1, 2, 1], [2, 2, 1])
    assert [c[:2] for c in fake_sampling] == [(2, 3), (1, 3)] * 2  # batches of 2 prompts, n samples each


@pytest.mark.parametrize("require_eos", [True, False])
def test_rejection_sampling_passes_require_eos_and_keeps_only_ended_picks(tmp_path, fake_sampling, monkeypatch,
                                                                          require_eos):
    from preflab.config import RSConfig, load_config
    from preflab.stages import rs

    monkeypatch.setattr(rs.models, "load_policy", lambda *a, **k: torch.nn.Linear(1, 1))
    cfg = load_config(RSConfig, None, ["models.policy.path=tiny:", "models.reward_model=tiny:",
                                       "data.prompts=x.jsonl", "sampling.n=3", "sampling.bf16=false",
                                       f"sampling.require_eos={str(require_eos).lower()}", f"run.out={tmp_path}"])
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    samples, picks = rs.sample_and_pick(cfg, "tiny:", torch.nn.Linear(1, 1), models.load_tokenizer("tiny:"), rows, 1)
    assert [s["candidates"] for s in samples] == [d[0] for d in DESIGN]
    if require_eos:
        assert [s["pick"] for s in samples] == [2, 2, 1]
        assert [s["kept"] for s in samples] == [True, False, True]  # prompt 1: nothing ended, nothing kept
        assert [(p["id"], p["completion"], p["reward"]) for p in picks] == [("p0", "c0", 2.0), ("p2", "b2", 9.0)]
    else:
        assert [s["pick"] for s in samples] == [1, 2, 1]
        assert all(s["kept"] for s in samples)
        assert [p["completion"] for p in picks] == ["b0", "c1", "b2"]
    # the threshold: a pick below it is dropped
    cfg.sampling.threshold = 5.0
    _, picks = rs.sample_and_pick(cfg, "tiny:", torch.nn.Linear(1, 1), models.load_tokenizer("tiny:"), rows, 1)
    assert [p["completion"] for p in picks] == (["b2"] if require_eos else ["c1", "b2"])


def test_rejection_sampling_records_the_picked_sample_when_two_share_its_text(tmp_path, fake_sampling, monkeypatch):
    """Prompt 0's first two samples are the same text; only the second ended (and scored lower: the
    RM reads EOS). With require_eos the pick is sample 1: its index, reward and EOS flag, not sample 0's."""
    from preflab.config import RSConfig, load_config
    from preflab.stages import rs

    fake_sampling.design = [(["dup", "dup", "z"], [5.0, 4.0, 1.0], [False, True, True])] + DESIGN[1:]
    monkeypatch.setattr(rs.models, "load_policy", lambda *a, **k: torch.nn.Linear(1, 1))
    cfg = load_config(RSConfig, None, ["models.policy.path=tiny:", "models.reward_model=tiny:",
                                       "data.prompts=x.jsonl", "sampling.n=3", "sampling.bf16=false",
                                       f"run.out={tmp_path}"])
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    samples, picks = rs.sample_and_pick(cfg, "tiny:", torch.nn.Linear(1, 1), models.load_tokenizer("tiny:"), rows, 1)
    assert samples[0]["pick"] == 1 and samples[0]["ended"][samples[0]["pick"]] is True
    assert (picks[0]["completion"], picks[0]["reward"]) == ("dup", 4.0)
    assert rs.round_metrics(samples, picks, "r")["r/best_reward_mean"] == pytest.approx((4.0 + 6.0 + 9.0) / 3)
