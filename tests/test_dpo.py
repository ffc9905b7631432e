"""DPO stage on a tiny random model: log-probs with a shared prompt, the cached reference (initial
policy; LoRA: adapters disabled; never recomputed on resume), first-step losses that pin beta and
the reference, learning a marker preference, KL to the reference, invariances (1x8 == 8x1, two
gloo ranks == one, resume), the CLI and config."""

import json
import math
import random

import pytest
import torch

from helpers import end_rank, free_port, join_gloo_env, max_param_diff, model_weights
from preflab import dpo_update, lm, loop, models, scoring
from preflab.config import DPOConfig, load_config
from preflab.data import chat, rankings
from preflab.errors import ConfigError
from preflab.stages import dpo

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "sugar"]


def write_rankings(path, n, seed=0, k=3, marker="zebra"):
    """K-way rankings a tiny network can learn: the response with ``marker`` is ranked first, the
    others tied below it (so each prompt has K - 1 untied pairs)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        resps = [[rng.choice(WORDS) for _ in range(3)] for _ in range(k)]
        win = rng.randrange(k)
        resps[win].insert(rng.randrange(4), marker)
        rows.append({"prompt": f"Describe item {i}.", "responses": [" ".join(r) for r in resps],
                     "order": [[win], [j for j in range(k) if j != win]]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_mixed(path, n=16, seed=1):
    """Rankings of K = 2..4 with ties and prompts of different lengths (per-prompt weights differ
    from per-pair ones, and prefixes differ in length)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = 2 + i % 3
        resps = [" ".join(rng.choice(WORDS) for _ in range(2 + rng.randrange(3))) for _ in range(k)]
        perm = rng.sample(range(k), k)
        order = [perm[:2], perm[2:]] if k == 4 and i % 2 else [[p] for p in perm]
        rows.append({"prompt": "Rank " + "these " * (i % 4) + str(i), "responses": resps, "order": order})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXACT = ["optim.lr=1e-3", "optim.eps=1e-5"]


def dpo_cfg(tmp_path, data, *overrides):
    base = ["model.path=tiny:", f"data.train={data}", "data.val_fraction=0", "data.max_length=96",
            "optim.lr=3e-3", "optim.schedule=constant", "optim.warmup_steps=0", "train.bf16=false",
            "eval.kl_prompts=0", "run.progress=false", f"run.out={tmp_path / 'run'}"]
    return load_config(DPOConfig, None, base + list(overrides))


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def naive_logps(model, seq, prompt_len):
    """Sum of log_softmax(model(seq).logits)[t - 1, seq[t]] over response positions t >= prompt_len."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    return float(lp[prompt_len - 1:].sum())


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------


def test_encode_ranked_marks_the_response_including_a_truncated_prompt(tiny):
    _, tok = tiny
    g = rankings.Group("word " * 60, ["a short answer", "x " * 40], [0, 1])
    for max_length in (384, 48):
        ex = dpo_update.encode_ranked(tok, [g], max_length)[0]
        for seq, p, r in zip(ex.ids, ex.prompt_len, g.responses):
            assert seq == rankings.encode_pair(tok, g.prompt, r, max_length)
            resp = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert seq[p:] == resp[:len(seq) - p] and len(seq) - p >= 1
    assert ex.prompt_len[0] < ex.prompt_len[1] or ex.ids[1][ex.prompt_len[1]:] != ex.ids[0][ex.prompt_len[0]:]


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_logps_equal_full_sequences_and_the_naive_sum(tiny, lora):
    """A prompt run once with its K responses on its cached keys and values gives the same summed
    response log-probs and gradients as K full sequences, and both equal the naive sum of
    log_softmax over each response token (EOS included, prompt tokens excluded)."""
    _, tok = tiny
    groups = [rankings.Group("Hi", ["Hello there.", "Hello", "Go away"], [0, 1, 2]),
              rankings.Group("A much longer prompt, with several clauses, to force left padding",
                             ["No.", "Yes, surely."], [1, 0]),
              rankings.Group("x", ["The cat sat.", "The cat ran off.", "The dog.", "A bird flew"], [3, 2, 1, 0])]
    ex = dpo_update.encode_ranked(tok, groups, 256)

    def run(share):
        torch.manual_seed(0)
        model = models.load_policy("tiny:")
        if lora:
            model = models.wrap_lora(model, models.LoraOptions(r=4))
            with torch.no_grad():  # non-zero adapters, so they matter
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
        batch = dpo_update.collate_ranked(ex, tok.pad_token_id, share_prefix=share)
        flat = dpo_update.SequenceLogps(model)(**dpo_update.model_inputs(batch, torch.device("cpu")))
        flat.sum().backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        return flat.detach(), grads, batch, model

    full, g_full, b_full, model = run(False)
    shared, g_shared, b_shared, _ = run(True)
    naive = torch.tensor([naive_logps(model, s, p) for e in ex for s, p in zip(e.ids, e.prompt_len)])
    torch.testing.assert_close(full, naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-5)
    assert g_full.keys() == g_shared.keys() and len(g_full) > 2
    for name in g_full:
        torch.testing.assert_close(g_shared[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)
    assert scoring.batch_tokens(b_shared) < 0.7 * scoring.batch_tokens(b_full)
    assert b_full["lengths"].tolist() == [e_len for e in ex for e_len in e.lengths]


DEMOS = [{"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
                       {"role": "user", "content": "And a colour?"}, {"role": "assistant", "content": "Green."}]},
         {"prompt": "Describe a river.", "response": "A river of stone and cloud, green in the light."},
         {"text": "paper music sugar table"}]


def write_demos(path, rows=DEMOS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_nll(model, example):
    """The SFT loss of one demonstration under ``model``, summed and per token (``lm.TokenNLL``)."""
    with torch.no_grad():
        total, n = lm.TokenNLL(model)(torch.tensor([example.input_ids]), torch.ones(1, len(example.input_ids),
                                                                                      dtype=torch.long),
                                      torch.tensor([example.labels]))
    return float(total), int(n)


@pytest.mark.parametrize("share", [False, True])
def test_demonstrations_ride_the_rankings_forward_pass_as_their_sft_loss(tmp_path, tiny, share):
    """Each ranking's paired demonstration is one more row of the same batch: its summed log-prob is
    minus its SFT loss (every assistant turn of a multi-turn chat, every token of a {text} row), the
    rankings' rows score as without demonstrations, and ranks, lengths and the reference describe the
    rankings alone."""
    _, tok = tiny
    rows = chat.read_lm_rows(str(write_demos(tmp_path / "d.jsonl")), tok, 96)
    demos = dpo_update.encode_demos(rows)
    groups = [rankings.Group("Hi", ["Hello there.", "Hello", "Go away"], [0, 1, 2]),
              rankings.Group("A longer prompt, with clauses", ["No.", "Yes, surely."], [1, 0]),
              rankings.Group("x", ["The cat sat.", "The dog."], [0, 1])]
    ex = dpo_update.encode_ranked(tok, groups, 96)
    for e, d, ref in zip(ex, demos, ([-1.0, -2.0, -3.0], [-4.0, -5.0], [-6.0, -7.0])):
        e.demo, e.ref = d, ref
    torch.manual_seed(0)
    model = models.load_policy("tiny:")
    plain = dpo_update.collate_ranked(ex, tok.pad_token_id, share_prefix=share)
    mixed = dpo_update.collate_ranked(ex, tok.pad_token_id, share_prefix=share, demos=True)
    fn = dpo_update.SequenceLogps(model)
    with torch.no_grad():
        flat_plain = fn(**dpo_update.model_inputs(plain, torch.device("cpu")))
        flat = fn(**dpo_update.model_inputs(mixed, torch.device("cpu")))
    n = sum(len(e.ids) for e in ex)
    assert flat.shape == (n + 3,)
    torch.testing.assert_close(flat[:n], flat_plain, atol=1e-4, rtol=1e-5)
    for k in ("ranks", "valid", "lengths", "ref"):
        assert torch.equal(mixed[k], plain[k]), k
    for i, row in enumerate(rows):
        total, count = sft_nll(model, row)
        assert float(flat[n + i]) == pytest.approx(-total, abs=1e-3)
        assert int(mixed["demo_tokens"][i]) == count
    pos = [i for i, label in enumerate(rows[0].labels) if label != chat.IGNORE]
    assert pos[-1] - pos[0] + 1 > len(pos)  # the chat's targets are two turns, not one run


def test_pair_demos_cycles_a_seeded_permutation():
    demos = [dpo_update.Ranked([[i, i]], [1], [0]) for i in range(3)]
    a = [dpo_update.Ranked([[9, 9]], [1], [0]) for _ in range(7)]
    b = [dpo_update.Ranked([[9, 9]], [1], [0]) for _ in range(7)]
    dpo_update.pair_demos(a, demos, seed=5)
    dpo_update.pair_demos(b, demos, seed=5)
    used = [demos.index(e.demo) for e in a]
    assert used == [demos.index(e.demo) for e in b]
    assert sorted(used[:3]) == [0, 1, 2] and used[3:6] == used[:3] and used[6] == used[0]
    others = []
    for seed in range(6):
        dpo_update.pair_demos(b, demos, seed=seed)
        others.append(tuple(demos.index(e.demo) for e in b[:3]))
    assert len(set(others)) > 1  # the seed matters


# ---------------------------------------------------------------------------------------------
# The reference and the first step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss,beta,first", [
    ("dpo", None, math.log(2)),  # policy == reference: h = 0, -log sigmoid(0) = log 2
    ("cdpo", None, math.log(2)),  # (1 - eps) log 2 + eps log 2
    ("ipo", None, 25.0),  # (0 - 1 / (2 * 0.1))^2 = 5^2: the default beta 0.1 and the reference both pinned
    ("ipo", 0.25, 4.0),  # (0 - 1 / (2 * 0.25))^2 = 2^2: the configured beta reaches the loss
])
def test_first_step_loss_pins_the_reference_and_beta(tmp_path, loss, beta, first):
    data = write_mixed(tmp_path / "m.jsonl")
    cfg = dpo_cfg(tmp_path, data, f"dpo.loss={loss}", "train.batch_prompts=8", "train.max_steps=2",
                  *([f"dpo.beta={beta}"] if beta else []))
    dpo.train(cfg)
    rows = [r for r in metrics(tmp_path / "run") if "train/loss" in r]
    assert rows[0]["train/loss"] == pytest.approx(first, abs=1e-5)
    assert rows[0]["train/rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1]["train/loss"] != pytest.approx(first, abs=1e-4)  # it trained


def test_nll_coef_adds_the_best_responses_nll_to_the_first_loss(tmp_path):
    """dpo.nll_coef reaches the loss: the first step (all 8 prompts, policy == reference) is log 2
    plus alpha x the mean over prompts of the best response's per-token NLL under the initial policy."""
    data = write_mixed(tmp_path / "m.jsonl", n=8)
    cfg = dpo_cfg(tmp_path, data, "train.batch_prompts=8", "train.max_steps=1", "dpo.nll_coef=0.5")
    dpo.train(cfg)
    first = [r for r in metrics(tmp_path / "run") if "train/loss" in r][0]["train/loss"]
    cache = json.loads((tmp_path / "run" / dpo.REFERENCE_CACHE).read_text())["logps"]["train"]
    ex = dpo_update.encode_ranked(models.load_tokenizer("tiny:"), rankings.read_group_file(str(data)), 96)
    nll = []
    for e, lps in zip(ex, cache):
        top = [i for i, r in enumerate(e.ranks) if r == min(e.ranks)]
        nll.append(sum(-lps[i] / e.lengths[i] for i in top) / len(top))
    assert first == pytest.approx(math.log(2) + 0.5 * sum(nll) / len(nll), abs=1e-4)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_ptx_coef_adds_the_paired_demonstrations_sft_loss_to_the_first_loss(tmp_path, gamma):
    """dpo.ptx_coef reaches the loss and the gradient: with one demonstration (every ranking's pair),
    the first step (policy == reference) is log 2 plus gamma x its per-token SFT loss under the
    initial policy, train/ptx_nll is that loss, and the trained weights differ from DPO's without it."""
    data = write_mixed(tmp_path / "m.jsonl", n=8)
    demo = write_demos(tmp_path / "d.jsonl", DEMOS[1:2])
    args = ["train.batch_prompts=8", "train.max_steps=2"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    w_ptx = model_weights(dpo.train(dpo_cfg(tmp_path / "a", data, *args, f"data.ptx={demo}", f"dpo.ptx_coef={gamma}")))
    w_dpo = model_weights(dpo.train(dpo_cfg(tmp_path / "b", data, *args, f"data.ptx={demo}")))
    total, n = sft_nll(models.load_policy("tiny:"), chat.read_lm_rows(str(demo), models.load_tokenizer("tiny:"), 96)[0])
    first = [r for r in metrics(tmp_path / "a/run") if "train/loss" in r][0]
    assert first["train/ptx_nll"] == pytest.approx(total / n, abs=1e-4)
    assert first["train/loss"] == pytest.approx(math.log(2) + gamma * total / n, abs=1e-4)
    assert "train/ptx_nll" not in metrics(tmp_path / "b/run")[0]  # gamma 0: the demonstrations are not read
    assert max_param_diff(w_ptx, w_dpo) > 1e-4


def test_ptx_coef_without_demonstrations_names_the_keys(tmp_path):
    with pytest.raises(ConfigError, match="dpo.ptx_coef > 0 needs data.ptx"):
        dpo_cfg(tmp_path, tmp_path / "m.jsonl", "dpo.ptx_coef=1")


def test_simpo_needs_no_reference_and_its_first_loss_matches_the_formula(tmp_path, tiny):
    """SimPO at step 1: per prompt, the mean over untied pairs of
    -log sigmoid(beta * (avg logp_w - avg logp_l) - gamma), averaged over prompts, from the
    initial model's own log-probs; no reference cache is written."""
    from preflab.rl.preference import simpo_loss

    data = write_mixed(tmp_path / "m.jsonl", n=8)
    cfg = dpo_cfg(tmp_path, data, "dpo.loss=simpo", "train.batch_prompts=8", "train.max_steps=1")
    dpo.train(cfg)
    assert not (tmp_path / "run" / dpo.REFERENCE_CACHE).exists()
    tok = models.load_tokenizer("tiny:")
    model = models.load_policy("tiny:")
    want = []
    for g, e in zip(rankings.read_group_file(str(data)), dpo_update.encode_ranked(tok, rankings.read_group_file(str(data)), 96)):
        avg = [naive_logps(model, s, p) / n for s, p, n in zip(e.ids, e.prompt_len, e.lengths)]
        pairs = [simpo_loss(torch.tensor(avg[w]), torch.tensor(avg[v]), 2.0, 0.5).item() for w, v in g.pairs()]
        want.append(sum(pairs) / len(pairs))
    assert metrics(tmp_path / "run")[0]["train/loss"] == pytest.approx(sum(want) / len(want), abs=1e-4)


def test_reference_cache_holds_the_initial_policys_logps(tmp_path):
    data = write_mixed(tmp_path / "m.jsonl", n=8)
    cfg = dpo_cfg(tmp_path, data, "train.batch_prompts=4", "train.max_steps=2", "data.val_fraction=0.25")
    dpo.train(cfg)
    cache = json.loads((tmp_path / "run" / dpo.REFERENCE_CACHE).read_text())
    tok = models.load_tokenizer("tiny:")
    model = models.load_policy("tiny:")
    train_g, val_g = rankings.split_val(rankings.read_group_file(str(data)), 0.25, 0)
    for name, groups in (("train", train_g), ("val", val_g)):
        ex = dpo_update.encode_ranked(tok, groups, 96)
        want = [[naive_logps(model, s, p) for s, p in zip(e.ids, e.prompt_len)] for e in ex]
        got = cache["logps"][name]
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            assert a == pytest.approx(b, abs=1e-4)
    # a different reference model would give different numbers
    other = models.load_policy(str(tmp_path / "run/model"))  # the trained policy
    e = dpo_update.encode_ranked(tok, train_g[:1], 96)[0]
    assert naive_logps(other, e.ids[0], e.prompt_len[0]) != pytest.approx(cache["logps"]["train"][0][0], abs=1e-3)


def test_learns_a_marker_preference_and_kl_grows_from_zero(tmp_path):
    data = write_rankings(tmp_path / "r.jsonl", 48)
    cfg = dpo_cfg(tmp_path, data, "data.val_fraction=0.25", "train.batch_prompts=6", "train.max_steps=12",
                  "dpo.beta=0.5", "eval.kl_prompts=4", "eval.max_new_tokens=8", "train.eval_every=100")
    dpo.train(cfg)
    rows = metrics(tmp_path / "run")
    train_rows = [r for r in rows if "train/loss" in r]
    final = rows[-1]
    assert train_rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train_rows[-1]["train/loss"] < 0.4
    # held-out prompts: the marker response wins by the implicit reward
    assert final["val/rewards/accuracy"] >= 0.9 and final["val/rewards/margin"] > 0
    assert final["val/rewards/chosen"] > final["val/rewards/rejected"]
    assert final["val/kl"] > 0.01 and final["val/kl_samples"] == 4
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margin", "train/rewards/accuracy",
                "train/logps/chosen", "train/logps/rejected", "train/grad_norm", "perf/tokens_per_s"):
        assert key in train_rows[-1], key
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["stage"] == "dpo"
    # Read from outside the stage: the saved model raised the log-ratio to the reference of the
    # response the data ranks first (the marker) above the others' on held-out prompts.
    tok, trained = models.load_tokenizer("tiny:"), models.load_policy(str(tmp_path / "run/model"))
    ref = json.loads((tmp_path / "run" / dpo.REFERENCE_CACHE).read_text())["logps"]["val"]
    _, val_g = rankings.split_val(rankings.read_group_file(str(data)), 0.25, 0)
    wins = 0
    for g, e, r in zip(val_g, dpo_update.encode_ranked(tok, val_g, 96), ref):
        ratio = [naive_logps(trained, s, p) - x for s, p, x in zip(e.ids, e.prompt_len, r)]
        wins += max(range(len(ratio)), key=ratio.__getitem__) == g.ranks.index(0)
        assert "zebra" in g.responses[g.ranks.index(0)]
    assert wins >= 0.9 * len(val_g)


def test_kl_is_zero_before_training_and_uses_the_reference(tmp_path, tiny):
    """The sampled KL of the initial policy to itself is 0; with LoRA adapters switched on and non-zero
    it is positive only because the reference is the policy with its adapters disabled."""
    _, tok = tiny
    cfg = dpo_cfg(tmp_path, "unused", "model.lora.enabled=true", "model.lora.r=4")
    model = models.load_policy("tiny:", lora=models.LoraOptions(r=4))
    ref = dpo_update.Reference(model, cfg)
    kl0, n = dpo_update.sampled_kl(model, ref, tok, ["Hi", "Tell me"], max_new_tokens=6, batch_size=2, bf16=False, seed=0)
    assert n == 2 and kl0 == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    kl1, _ = dpo_update.sampled_kl(model, ref, tok, ["Hi", "Tell me"], max_new_tokens=6, batch_size=2, bf16=False, seed=0)
    assert kl1 > 1e-3


def test_lora_reference_is_the_policy_with_adapters_disabled(tmp_path):
    """With LoRA, the cache holds the base model's log-probs (adapters disabled), KL after training
    is positive, and the saved model is merged."""
    data = write_rankings(tmp_path / "r.jsonl", 16)
    cfg = dpo_cfg(tmp_path, data, "model.lora.enabled=true", "model.lora.r=4", "train.batch_prompts=4",
                  "train.max_steps=3", "optim.lr=1e-2", "data.val_fraction=0.25", "eval.kl_prompts=2",
                  "eval.max_new_tokens=6")
    calls = []
    real = dpo_update.compute_reference_logps

    def spy(policy, cfg_, sets, pad_id, share):
        calls.append(sum(1 for n, _ in policy.named_modules() if "lora_A" in n))
        # adapters made non-zero first: a reference that forgot to disable them would differ
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        out = real(policy, cfg_, sets, pad_id, share)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        return out

    dpo_update.compute_reference_logps, saved = spy, dpo_update.compute_reference_logps
    try:
        out = dpo.train(cfg)
    finally:
        dpo_update.compute_reference_logps = saved
    assert calls and calls[0] > 0  # it was handed the LoRA-wrapped policy
    cache = json.loads((tmp_path / "run" / dpo.REFERENCE_CACHE).read_text())
    tok, base = models.load_tokenizer("tiny:"), models.load_policy("tiny:")
    train_g, _ = rankings.split_val(rankings.read_group_file(str(data)), 0.25, 0)
    e = dpo_update.encode_ranked(tok, train_g[:1], 96)[0]
    assert cache["logps"]["train"][0] == pytest.approx([naive_logps(base, s, p) for s, p in zip(e.ids, e.prompt_len)],
                                                       abs=1e-4)
    assert metrics(tmp_path / "run")[-1]["val/kl"] > 0
    assert not any("lora" in k for k in model_weights(out))


# ---------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ptx", [False, True])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, ptx):
    data = write_mixed(tmp_path / "m.jsonl")
    extra = [f"data.ptx={write_demos(tmp_path / 'd.jsonl')}", "dpo.ptx_coef=1.0"] if ptx else []
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    wa = model_weights(dpo.train(dpo_cfg(tmp_path / "a", data, *EXACT, *extra, "train.batch_prompts=8",
                                         "train.max_steps=2")))
    wb = model_weights(dpo.train(dpo_cfg(tmp_path / "b", data, *EXACT, *extra, "train.batch_prompts=1",
                                         "train.grad_accum=8", "train.max_steps=2")))
    init = models.load_policy("tiny:").state_dict()
    assert max(float((wa[k] - init[k]).abs().max()) for k in wa) > 1e-4  # it trained
    assert max_param_diff(wa, wb) < 2e-6


def test_shared_prompt_training_equals_full_sequences(tmp_path):
    data = write_mixed(tmp_path / "m.jsonl")
    weights = {}
    for name, extra in [("shared", []), ("full", ["train.share_prompt=false"]),
                        ("ckpt", ["train.gradient_checkpointing=true"])]:
        (tmp_path / name).mkdir()
        weights[name] = model_weights(dpo.train(dpo_cfg(tmp_path / name, data, *EXACT, "train.batch_prompts=8",
                                                        "train.max_steps=2", *extra)))
    assert max_param_diff(weights["shared"], weights["full"]) < 2e-6
    assert max_param_diff(weights["full"], weights["ckpt"]) < 2e-6


def test_resume_reuses_the_cached_reference_and_reaches_the_same_parameters(tmp_path, monkeypatch):
    data = write_mixed(tmp_path / "m.jsonl")
    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    args = ["train.batch_prompts=4", "train.max_steps=4", "optim.schedule=cosine", "optim.warmup_steps=1"]
    w_full = model_weights(dpo.train(dpo_cfg(tmp_path / "full", data, *args)))
    cut = dpo_cfg(tmp_path / "cut", data, *args, "run.save_every=2")
    calls = {"n": 0}
    real = loop.clip_grad

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(loop, "clip_grad", boom)
    with pytest.raises(KeyboardInterrupt):
        dpo.train(cut)
    monkeypatch.undo()
    cache = tmp_path / "cut/run" / dpo.REFERENCE_CACHE
    before = cache.read_text()

    def no_recompute(*a, **k):
        raise AssertionError("resume recomputed the reference log-probs")

    monkeypatch.setattr(dpo_update, "compute_reference_logps", no_recompute)
    w_cut = model_weights(dpo.train(cut, resume=True))
    assert cache.read_text() == before
    assert max_param_diff(w_full, w_cut) < 1e-6

    def losses(d):
        return [(r["step"], r["train/loss"]) for r in metrics(d / "run") if "train/loss" in r]

    assert [s for s, _ in losses(tmp_path / "full")] == [s for s, _ in losses(tmp_path / "cut")] == [1, 2, 3, 4]
    assert [v for _, v in losses(tmp_path / "full")] == pytest.approx([v for _, v in losses(tmp_path / "cut")],
                                                                      abs=1e-6)


def test_a_cache_for_other_data_is_recomputed(tmp_path):
    data = write_mixed(tmp_path / "m.jsonl", n=8)
    cfg = dpo_cfg(tmp_path, data, "train.batch_prompts=4", "train.max_steps=1")
    path = tmp_path / "run" / dpo.REFERENCE_CACHE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fingerprint": "stale", "logps": {"train": [[0.0] * 4] * 8, "val": []}}))
    dpo.train(cfg)
    assert json.loads(path.read_text())["fingerprint"] != "stale"
    assert metrics(tmp_path / "run")[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


def _ddp_worker(rank, world, port, cfg_json):
    join_gloo_env(rank, world, port)
    dpo.train(DPOConfig.model_validate_json(cfg_json))
    end_rank()


@pytest.mark.parametrize("ptx", [False, True])
def test_two_gloo_ranks_equal_one_rank(tmp_path, ptx):
    data = write_mixed(tmp_path / "m.jsonl")
    extra = [f"data.ptx={write_demos(tmp_path / 'd.jsonl')}", "dpo.ptx_coef=1.0"] if ptx else []
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    w_one = model_weights(dpo.train(dpo_cfg(tmp_path / "one", data, *EXACT, *extra, "train.batch_prompts=8",
                                            "train.max_steps=2")))
    two = dpo_cfg(tmp_path / "two", data, *EXACT, *extra, "train.batch_prompts=4", "train.max_steps=2")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), two.model_dump_json()), nprocs=2)
    assert max_param_diff(w_one, model_weights(tmp_path / "two/run/model")) < 1e-5

    def losses(d):
        return [r["train/loss"] for r in metrics(d / "run") if "train/loss" in r]

    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# CLI and config
# ---------------------------------------------------------------------------------------------


def test_cli_runs_dpo_from_the_shipped_config(tmp_path):
    from preflab.cli import main

    data = write_mixed(tmp_path / "m.jsonl", n=8)
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--config", "configs/dpo_tiny.yaml", f"data.train={data}", f"run.out={tmp_path / 'o'}",
              "data.format=kway", "train.max_steps=1", "run.progress=false", "nonsense.key=1"])
    assert e.value.code == 2
    main(["dpo", "--config", "configs/dpo_tiny.yaml", f"data.train={data}", f"run.out={tmp_path / 'o'}",
          "data.format=kway", "train.max_steps=1", "run.progress=false"])
    assert (tmp_path / "o/model/config.json").is_file()
    assert load_config(DPOConfig, "configs/dpo_tiny.yaml", [f"data.train={data}"]).dpo.resolved_beta() == 0.1
    assert load_config(DPOConfig, None, ["data.train=x", "dpo.loss=simpo"]).dpo.resolved_beta() == 2.0
