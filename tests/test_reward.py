"""Reward-model stage on a tiny random model: the batched K-way loss, last-token scoring, learning,
saving for plain transformers, normalisation, invariances (accumulation, ranks, resume), bad input."""

import json
import math
import random

import pytest
import torch

from helpers import end_rank, free_port, join_gloo_env, max_param_diff, model_weights
from preflab import loop, models, scoring
from preflab.config import RMConfig, load_config
from preflab.data import rankings
from preflab.data.chat import render_prompt
from preflab.errors import ConfigError, DataError
from preflab.evals import rm_eval
from preflab.feedback import ranking_sources
from preflab.rl import ranking
from preflab.rl.ranking import bradley_terry_loss
from preflab.stages import reward


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads that
    wait on each other make a 10 ms step take seconds; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "sugar"]


def write_rankings(path, n, seed=0, k=4, marker="zebra"):
    """K-way rankings a tiny network can learn: the two responses containing ``marker`` win (tied)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        resps = [[rng.choice(WORDS) for _ in range(3)] for _ in range(k)]
        win = rng.sample(range(k), 2)
        for w in win:
            resps[w].insert(rng.randrange(4), marker)
        rows.append({"prompt": f"Describe item {i}.", "responses": [" ".join(r) for r in resps],
                     "order": [sorted(win), sorted(set(range(k)) - set(win))], "category": ["a", "b"][i % 2]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_mixed(path, n=16, seed=1):
    """Rankings of varying K (2..4) with ties, so per-prompt weights differ from per-pair ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = 2 + i % 3
        resps = [" ".join(rng.choice(WORDS) for _ in range(2 + rng.randrange(3))) for _ in range(k)]
        perm = rng.sample(range(k), k)
        order = [perm[:2], perm[2:]] if k == 4 and i % 2 else [[p] for p in perm]
        rows.append({"prompt": f"Rank {i}", "responses": resps, "order": order})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Invariance runs: Adam maps a gradient entry of ~1e-9 (pure rounding) to a step of ~lr, which
# turns float noise into visible parameter noise; eps = 1e-5 (lm-human-preferences' value) damps it.
EXACT = ["optim.lr=1e-3", "optim.eps=1e-5"]


def rm_cfg(tmp_path, data, *overrides):
    base = ["model.path=tiny:", f"data.train={data}", "data.val_fraction=0", "data.max_length=96",
            "optim.lr=3e-3", "optim.schedule=constant", "train.bf16=false", "run.progress=false",
            f"run.out={tmp_path / 'run'}"]
    return load_config(RMConfig, None, base + list(overrides))


# ---------------------------------------------------------------------------------------------
# The loss path
# ---------------------------------------------------------------------------------------------


def _stub_batch():
    """Three prompts of K = 3 (one tie), 2 and 4, collated into one padded batch."""
    enc = [rankings.Encoded([[5], [6, 7], [8]], [0, 1, 1]),
           rankings.Encoded([[9], [10]], [1, 0]),
           rankings.Encoded([[11], [12], [13], [14, 15]], [3, 2, 1, 0])]
    flat = torch.tensor([2.0, 0.5, 0.5, 0.3, 1.0, 0.0, 1.0, 2.0, 3.0], requires_grad=True)
    return enc, flat


def test_kway_batch_equals_hand_computed_and_separate_prompts():
    """Eq. 1 per prompt: -1/C_eff sum over untied pairs log sigmoid(r_w - r_l); softplus(-m) = -log sigmoid(m).

    A: r = [2, .5, .5], ranks [0, 1, 1]: the tie (1, 2) is dropped; pairs (0,1), (0,2), margin 1.5 each:
       softplus(-1.5) = 0.2014132779827524.
    B: r = [.3, 1], ranks [1, 0]: pair (1, 0), margin 0.7: softplus(-0.7) = 0.4031860488854579.
    C: r = [0, 1, 2, 3], ranks [3, 2, 1, 0]: 6 pairs, margins 1, 1, 1, 2, 2, 3:
       (3 softplus(-1) + 2 softplus(-2) + softplus(-3)) / 6 = 0.2070380727023926.
    The step sums prompts (the caller divides by the global prompt count): 0.8116373995706029.
    """
    enc, flat = _stub_batch()
    batch = scoring.collate_groups(enc, pad_id=0)
    assert batch["input_ids"].shape == (9, 2) and batch["valid"].sum(1).tolist() == [3, 2, 4]
    parts = ranking.ranking_loss(flat, batch["ranks"], batch["valid"])
    assert parts.total.item() == pytest.approx(0.8116373995706029, abs=1e-6)
    assert (parts.n_prompts, parts.n_pairs, parts.n_correct) == (3, 9, 9)
    separate = []
    offset = 0
    for e in enc:
        b = scoring.collate_groups([e], pad_id=0)
        separate.append(ranking.ranking_loss(flat[offset:offset + len(e.ids)], b["ranks"], b["valid"]).total)
        offset += len(e.ids)
    assert separate[0].item() == pytest.approx(0.2014132779827524, abs=1e-6)
    assert separate[1].item() == pytest.approx(0.4031860488854579, abs=1e-6)
    torch.testing.assert_close(parts.total, sum(separate))
    # and the gradient flows back to the flat (sum K,) rewards, nothing to the padding
    parts.total.backward()
    assert flat.grad is not None and flat.grad[1] == flat.grad[2] and flat.grad[0] < 0


def test_plackett_luce_with_k2_is_bradley_terry():
    flat = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.1, 0.1])
    enc = [rankings.Encoded([[1], [2]], [0, 1]), rankings.Encoded([[3], [4]], [1, 0]), rankings.Encoded([[5], [6]], [0, 1])]
    b = scoring.collate_groups(enc, pad_id=0)
    pl = ranking.ranking_loss(flat, b["ranks"], b["valid"], "plackett_luce")
    kw = ranking.ranking_loss(flat, b["ranks"], b["valid"], "kway")
    bt = bradley_terry_loss(torch.tensor([0.3, 0.5, 0.1]), torch.tensor([-1.2, 2.0, 0.1])) * 3
    torch.testing.assert_close(pl.total, bt)
    torch.testing.assert_close(kw.total, bt)
    assert pl.n_correct == kw.n_correct == 1  # a reward tie (0.1, 0.1) is not correct


def test_score_reads_the_last_real_token_whatever_the_padding():
    from preflab.rollout import left_pad

    tok = models.load_tokenizer("tiny:")
    model = models.load_scorer("tiny:")
    seqs = [rankings.encode_pair(tok, p, r, 96) for p, r in [("Hi", "Hello there."), ("A longer prompt here", "No"),
                                                          ("x", "a much longer response, with commas")]]
    right = scoring.collate_groups([rankings.Encoded(seqs, [0, 1, 2])], tok.pad_token_id)
    left_ids, left_mask = left_pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        r_right = scoring.sequence_rewards(model, right["input_ids"], right["attention_mask"])
        r_left = scoring.sequence_rewards(model, left_ids, left_mask)
        alone = torch.cat([scoring.sequence_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for s in seqs])
    torch.testing.assert_close(r_right, r_left, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_right, alone, atol=1e-5, rtol=1e-5)
    # The sequence is the rollout's: chat-rendered prompt, response, EOS last.
    assert seqs[0][-1] == tok.eos_token_id
    assert tok.decode(seqs[0]).endswith("<|im_start|>assistant\nHello there.<|im_end|>")


def test_scalar_heads_run_in_fp32_under_bf16_autocast():
    """A bf16 head output keeps 8 significant bits, so nearby rewards tie. The RM's head and the
    policy's value head compute in their fp32 weights whatever the autocast."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1)
    hidden = torch.randn(32, 64)
    scorer = models.load_scorer("tiny:")
    h = torch.randn(4, scorer.config.hidden_size)
    with torch.no_grad():
        exact, exact_rm = head(hidden).squeeze(-1), scorer.score(h).squeeze(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, rm = scoring.scalar_head(head, hidden), scoring.score_head(scorer, h)
            bf16 = head(hidden).squeeze(-1).float()
    assert out.dtype == rm.dtype == torch.float32
    torch.testing.assert_close(out, exact, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rm, exact_rm, atol=1e-6, rtol=1e-6)
    assert (bf16 - exact).abs().max() > 1e-3  # what a bf16 head would have returned


def test_shared_prefix_is_the_common_start_keeping_one_token_each():
    assert scoring.shared_prefix([[1, 2, 3, 9], [1, 2, 4], [1, 2, 3]]) == 2
    assert scoring.shared_prefix([[1, 2], [1, 2, 3]]) == 1  # [1, 2] keeps its last token for the head
    assert scoring.shared_prefix([[5, 1], [6, 1]]) == 0
    assert scoring.shared_prefix([[7, 7, 7]]) == 2


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_pass_gives_the_same_scores_and_gradients(lora):
    """A prompt run once with its K responses on the cached keys and values equals K full
    sequences: same scores, same loss gradient (groups of K = 2, 3, 4, prompts of different
    lengths, a response that is a prefix of another, responses that share their first words)."""
    tok = models.load_tokenizer("tiny:")
    groups = [("Hi", ["Hello there.", "Hello", "Go away"]),
              ("A much longer prompt, with several clauses, to force left padding", ["No.", "Yes, surely."]),
              ("x", ["The cat sat.", "The cat ran off.", "The dog.", "A bird flew over the house"])]
    enc = [rankings.Encoded([rankings.encode_pair(tok, p, r, 256) for r in rs], list(range(len(rs)))) for p, rs in groups]

    def run(share):
        torch.manual_seed(0)
        model = models.load_scorer("tiny:")
        if lora:
            model = models.wrap_lora(model, models.LoraOptions(r=4), task_type="SEQ_CLS", modules_to_save=["score"])
        batch = scoring.collate_groups(enc, tok.pad_token_id, share_prefix=share)
        flat = scoring.Scorer(model)(**scoring.scorer_inputs(batch))
        ranking.ranking_loss(flat, batch["ranks"], batch["valid"]).total.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        return flat.detach(), grads, batch

    full, g_full, b_full = run(False)
    shared, g_shared, b_shared = run(True)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    assert g_full.keys() == g_shared.keys() and len(g_full) > 2
    for name in g_full:
        torch.testing.assert_close(g_shared[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)
    # The shared layout really is smaller: each prompt once, K short continuations.
    assert b_shared["prefix_ids"].shape[0] == 3 and b_shared["group"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert b_shared["input_ids"].numel() + b_shared["prefix_ids"].numel() < 0.6 * b_full["input_ids"].numel()
    assert scoring.batch_tokens(b_shared) < 0.6 * scoring.batch_tokens(b_full)


# ---------------------------------------------------------------------------------------------
# Learning, saving, normalisation, evaluation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    data = write_rankings(tmp / "rank.jsonl", 80)
    demos = tmp / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "response": f"zebra {WORDS[i]} stone"}) + "\n"
                             for i in range(6)))
    cfg = rm_cfg(tmp, data, "data.val_fraction=0.2", "train.batch_prompts=8", "train.max_steps=16",
                 f"data.demos={demos}", "eval.worst_k=3")
    return cfg, reward.train(cfg), demos


def test_learns_a_marker_preference_to_95_percent(trained):
    cfg, out, _ = trained
    report = json.loads((out.parent / "eval" / "rm_eval.json").read_text())
    assert report["accuracy"] >= 0.95, report["accuracy"]
    assert report["n_pairs"] == 16 * 4  # 16 held-out prompts x 4 untied pairs (2 winners x 2 losers)
    assert set(report["by_category"]) == {"a", "b"} and report["reliability"] and report["ece"]["table"]
    assert "temperature" in report
    rows = [json.loads(line) for line in open(out.parent / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[0] > 0.5 and losses[-1] < 0.2
    final = rows[-1]
    assert final["rm/accuracy"] == report["accuracy"] and "rm/ece" in final and "rm/accuracy/category/a" in final


def test_saved_rm_loads_in_plain_transformers_with_the_same_scores(trained):
    from transformers import AutoModelForSequenceClassification

    from preflab.rollout import Samples, left_pad
    from preflab.scoring import reward_scores

    _, out, demos = trained
    tok = models.load_tokenizer(str(out))
    ours = models.load_scorer(str(out))
    hf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    assert hf.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    prompts, responses = ["Describe item 3.", "Describe item 99."], ["zebra apple river", "green table"]
    raw = scoring.score_texts(ours, tok, prompts, responses, max_length=96)
    seqs = [rankings.encode_pair(tok, p, r, 96) for p, r in zip(prompts, responses)]
    batch = scoring.collate_groups([rankings.Encoded(seqs, [0, 1])], tok.pad_token_id)
    with torch.no_grad():
        hf_scores = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(hf_scores, torch.tensor(raw), atol=1e-5, rtol=1e-5)
    # rollout.reward_scores (query left-padded, response right-padded) applies the stored bias.
    gain, bias = hf.config.preflab_reward_gain, hf.config.preflab_reward_bias
    assert gain == 1.0 and bias != 0.0
    q = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    r = [s[len(qq):] for s, qq in zip(seqs, q)]
    query, query_mask = left_pad(q, tok.pad_token_id)
    resp = scoring.collate_groups([rankings.Encoded(r, [0, 1])], tok.pad_token_id)
    samples = Samples(query, query_mask, resp["input_ids"], resp["attention_mask"], torch.ones(2, dtype=torch.bool),
                      responses)
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(ours, samples), torch.tensor(raw) * gain + bias, atol=1e-5, rtol=1e-5)
    # The demonstrations' mean normalised score is 0.
    rows = [json.loads(line) for line in open(demos)]
    normed = scoring.score_texts(ours, tok, [d["prompt"] for d in rows], [d["response"] for d in rows],
                                max_length=96, normalise=True)
    assert abs(sum(normed) / len(normed)) < 1e-4


def test_rm_eval_cli_prints_tables_and_writes_json(trained, tmp_path):
    from click.testing import CliRunner

    _, out, _ = trained
    data = write_rankings(tmp_path / "held.jsonl", 6, seed=7)
    res = CliRunner().invoke(rm_eval.cli, ["--model", str(out), "--data", str(data), "--max-length", "96",
                                               "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "reliability" in res.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["n_pairs"] == 24 and report["accuracy"] >= 0.9


def test_rm_eval_reads_a_suite_store_against_the_gold_judge(trained, tmp_path):
    """Responses with the prompt's keywords (and the RM's marker) score higher with the gold judge; ann
    ranks them first, bob last: the labelers agree with the judge on half the pairs, the RM on all."""
    from click.testing import CliRunner

    from preflab.feedback.store import PreferenceStore

    _, out, _ = trained
    path = tmp_path / "s.sqlite"
    with PreferenceStore(path) as store:
        for i in range(3):
            text = f"Describe item {i}."
            suite = {"id": f"rm-{i}", "prompt": text, "category": "open_qa", "slice": "ordinary", "split": "rm",
                     "constraints": [], "keywords": ["zebra", "apple"]}
            (pid,) = store.add_prompts([{"text": text, "category": "open_qa", "slice": "ordinary",
                                         "meta": {"suite": suite}}], split="held")
            cids = store.add_candidates(pid, ["zebra apple river.", "stone cloud green."])
            store.add_ranking(pid, cids, [[0], [1]], "ann")
            store.add_ranking(pid, cids, [[1], [0]], "bob")
    res = CliRunner().invoke(rm_eval.cli, ["--model", str(out), "--data", f"store:{path}", "--split", "held",
                                           "--max-length", "96", "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "against the gold judge" in res.output
    gold = json.loads((tmp_path / "e.json").read_text())["gold"]
    assert gold["decided"] == 1.0 and gold["labelers"]["n_pairs"] == 6 and gold["labelers"]["accuracy"] == 0.5
    assert gold["models"][str(out)]["n_pairs"] == 3 and gold["models"][str(out)]["accuracy"] == 1.0


def test_normalisation_gain_and_bias():
    policy = [1.0, 3.0, 5.0, 7.0]  # mean 4, biased std sqrt(5)
    gain, bias = reward.normalisation([], policy, demos_mean_zero=False, policy_gain_bias=True)
    assert gain == pytest.approx(1 / math.sqrt(5)) and bias == pytest.approx(-4 / math.sqrt(5))
    gain, bias = reward.normalisation([2.0, 4.0], policy, demos_mean_zero=True, policy_gain_bias=True)
    assert gain * 3.0 + bias == pytest.approx(0.0)  # demos' mean 3 maps to 0, gain from the policy
    assert reward.normalisation([2.0, 4.0], [], demos_mean_zero=True, policy_gain_bias=False) == (1.0, -3.0)


def test_labeler_agreement_and_store_source(tmp_path):
    """Two labelers rank the same 3 responses: 3 pairs; they disagree on one -> 2/3."""
    from preflab.feedback.store import PreferenceStore

    path = tmp_path / "s.sqlite"
    with PreferenceStore(path) as store:
        for i in range(10):
            split = "eval" if i < 2 else "rm"
            (pid,) = store.add_prompts([{"text": f"Describe item {i}.", "category": "c", "slice": "s1"}], split=split)
            cids = store.add_candidates(pid, ["zebra apple", "green stone", "river light"])
            store.add_ranking(pid, cids, [[0], [1], [2]], "ann")
            if split == "eval":
                store.add_ranking(pid, cids, [[0], [2], [1]], "bob")
    held = ranking_sources.read_groups(f"store:{path}", split="eval")
    assert len(held) == 4 and {g.labeler for g in held} == {"ann", "bob"} and held[0].category == "c"
    agreement = rm_eval.labeler_agreement(held)
    assert agreement["agreement"] == pytest.approx(2 / 3) and agreement["n_prompts"] == 2
    cfg = rm_cfg(tmp_path, f"store:{path}", f"data.val=store:{path}", "train.batch_prompts=4", "train.max_steps=1")
    reward.train(cfg)
    report = json.loads((tmp_path / "run/eval/rm_eval.json").read_text())
    assert report["labelers"]["agreement"] == pytest.approx(2 / 3) and report["n_groups"] == 4
    assert report["by_slice"]["s1"]["n_pairs"] == 12
    with pytest.raises(DataError, match="not found"):
        ranking_sources.read_groups(f"store:{tmp_path / 'none.sqlite'}")


def test_consensus_ranks_by_the_labelers_mean_tier_and_trains_one_group_per_prompt(tmp_path):
    G = rankings.Group
    three = [G("p", ["a", "b", "c", "d"], r, category="c", labeler=n)
             for r, n in [([0, 1, 2, 3], "ann"), ([0, 2, 1, 3], "bob"), ([1, 0, 2, 3], "cy")]]
    two = [G("q", ["x", "y", "z"], [0, 1, 2], labeler="ann"), G("q", ["x", "y", "z"], [1, 0, 2], labeler="bob")]
    once = G("r", ["u", "v"], [1, 0], labeler="ann")
    out = rankings.consensus([*three, *two, once])
    # means: p 1/3, 1, 5/3, 3 (a total order); q 1/2, 1/2, 2 (x and y split evenly: a tie)
    assert [(g.prompt, g.ranks, g.labeler) for g in out] == [("p", [0, 1, 2, 3], "consensus"),
                                                             ("q", [0, 0, 1], "consensus"), ("r", [1, 0], "ann")]
    assert out[0].category == "c" and out[1].pairs() == [(0, 2), (1, 2)]
    # the same responses in another order are another response set: not merged
    assert len(rankings.consensus([two[0], G("q", ["y", "x", "z"], [0, 1, 2], labeler="bob")])) == 2

    # in the stage: 8 prompts ranked by two labelers each train as 8 groups, held-out ones stay per labeler
    from preflab.feedback.store import PreferenceStore

    path = tmp_path / "s.sqlite"
    with PreferenceStore(path) as store:
        for i in range(10):
            (pid,) = store.add_prompts([{"text": f"Describe item {i}.", "category": "c"}], split="rm")
            cids = store.add_candidates(pid, ["zebra apple", "green stone", "river light"])
            store.add_ranking(pid, cids, [[0], [1], [2]], "ann")
            store.add_ranking(pid, cids, [[1], [0], [2]], "bob")
    for labels, n_train in [("each", 16), ("consensus", 8)]:
        cfg = rm_cfg(tmp_path / labels, f"store:{path}", "data.val_fraction=0.2", f"data.labels={labels}")
        train, val, _ = ranking_sources.read_train_val(cfg.data, cfg.run.seed)
        assert len(train) == n_train and len(val) == 4 and {g.labeler for g in val} == {"ann", "bob"}
    assert all(g.ranks == [0, 0, 1] for g in train)


def test_gold_agreement_against_hand_counts():
    """Two labelers rank the same 3 responses (gold 0.9, 0.5, 0.5); a second prompt, one labeler.
    Prompt 1: ann orders a > b > c, bob c > a > b: 6 strict pairs; gold ties b-c, so 4 are decided,
    of which ann gets 2 (a>b, a>c) and bob 1 (a>b) right. Prompt 2 (gold 0.2, 0.8): ann orders x > y,
    wrong. Labelers: 3 of 5 decided pairs. Distinct gold-decided pairs: a-b, a-c, y-x (3); a model
    scoring a 3, b 2, c 0 and x 1, y 1 gets a-b and a-c right and ties y-x (a tie is wrong): 2/3."""
    G = rankings.Group
    groups = [G("p1", ["a", "b", "c"], [0, 1, 2], labeler="ann"), G("p1", ["a", "b", "c"], [1, 2, 0], labeler="bob"),
              G("p2", ["x", "y"], [0, 1], labeler="ann")]
    gold = [[0.9, 0.5, 0.5], [0.9, 0.5, 0.5], [0.2, 0.8]]
    scores = [[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [1.0, 1.0]]
    out = rm_eval.gold_agreement(groups, gold, {"rm": scores, "flipped": [[-v for v in s] for s in scores]})
    assert out["n_strict_pairs"] == 7 and out["decided"] == pytest.approx(5 / 7)
    assert out["labelers"]["n_pairs"] == 5 and out["labelers"]["accuracy"] == pytest.approx(3 / 5)
    assert out["models"]["rm"]["n_pairs"] == 3 and out["models"]["rm"]["accuracy"] == pytest.approx(2 / 3)
    assert out["models"]["flipped"]["accuracy"] == pytest.approx(0.0)  # the tie stays wrong either way


def test_lora_trains_the_head_and_saves_merged(tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = write_rankings(tmp_path / "r.jsonl", 8)
    out = reward.train(rm_cfg(tmp_path, data, "model.lora.enabled=true", "model.lora.r=4",
                              "train.batch_prompts=4", "train.max_steps=2"))
    w = model_weights(out)
    assert "score.weight" in w and not any("lora" in k for k in w)
    init = models.load_scorer("tiny:")
    assert not torch.allclose(w["model.layers.0.self_attn.q_proj.weight"],
                              init.state_dict()["model.layers.0.self_attn.q_proj.weight"])  # merged adapters
    hf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    assert torch.equal(hf.score.weight, w["score.weight"])


def test_frozen_layers_keep_the_embeddings_and_lower_layers_and_train_the_rest(tmp_path):
    data = write_rankings(tmp_path / "r.jsonl", 8)
    out = reward.train(rm_cfg(tmp_path, data, "train.frozen_layers=1", "train.batch_prompts=4", "train.max_steps=2"))
    w, init = model_weights(out), models.load_scorer("tiny:").state_dict()
    frozen = [k for k in init if k.startswith(("model.embed_tokens.", "model.layers.0."))]
    trained = [k for k in init if k.startswith("model.layers.1.")]
    assert frozen and trained
    assert all(torch.equal(w[k], init[k]) for k in frozen)
    assert all(not torch.equal(w[k], init[k]) for k in trained if k.endswith("proj.weight"))
    assert not torch.equal(w["score.weight"], init["score.weight"])
    with pytest.raises(ConfigError, match="train.frozen_layers: 9 is more than the model's 2 decoder layers"):
        reward.train(rm_cfg(tmp_path / "too-many", data, "train.frozen_layers=9", "train.max_steps=1"))


# ---------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------


def test_gradient_accumulation_1x8_equals_8x1(tmp_path):
    data = write_mixed(tmp_path / "m.jsonl")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    wa = model_weights(reward.train(rm_cfg(tmp_path / "a", data, *EXACT, "train.batch_prompts=8",
                                           "train.max_steps=2")))
    wb = model_weights(reward.train(rm_cfg(tmp_path / "b", data, *EXACT, "train.batch_prompts=1",
                                           "train.grad_accum=8", "train.max_steps=2")))
    init = models.load_scorer("tiny:").state_dict()
    assert max(float((wa[k] - init[k]).abs().max()) for k in wa if k != "score.weight") > 1e-4  # it trained
    assert max_param_diff(wa, wb) < 2e-6


def test_a_steps_micro_batches_are_cut_from_its_examples_sorted_by_length(tmp_path, monkeypatch):
    """Global batch 8 as 4 micro-batches of 2: the step's 8 rankings, shortest first, so each
    micro-batch pads to its own longest; the weights equal one micro-batch of 8 (test above)."""
    from preflab.data.order import step_indices

    data = write_mixed(tmp_path / "m.jsonl")
    seen, real = [], reward.collate_groups
    monkeypatch.setattr(reward, "collate_groups", lambda part, *a, **k: seen.append(part) or real(part, *a, **k))
    reward.train(rm_cfg(tmp_path, data, "train.batch_prompts=2", "train.grad_accum=4", "train.max_steps=1"))
    assert [len(part) for part in seen] == [2, 2, 2, 2]
    widths = [max(map(len, e.ids)) for part in seen for e in part]
    assert widths == sorted(widths) and len(set(widths)) > 1
    tokenizer = models.load_tokenizer("tiny:")
    groups = ranking_sources.read_groups(str(data))
    encoded = rankings.encode_groups(tokenizer, groups, 96)
    step = [encoded[i] for i in step_indices(0, len(encoded), 8, 0)]
    assert sorted(map(str, step)) == sorted(str(e) for part in seen for e in part)


def test_shared_prompt_training_equals_full_sequences_and_checkpointing_falls_back(tmp_path):
    """Two steps with the prompt run once (the default), with it run K times, and under gradient
    checkpointing (which drops the cache, so the stage uses full sequences) reach the same weights."""
    data = write_mixed(tmp_path / "m.jsonl")
    weights = {}
    for name, extra in [("shared", []), ("full", ["train.share_prompt=false"]),
                        ("ckpt", ["train.gradient_checkpointing=true"])]:
        (tmp_path / name).mkdir()
        weights[name] = model_weights(reward.train(rm_cfg(tmp_path / name, data, *EXACT, "train.batch_prompts=8",
                                                          "train.max_steps=2", *extra)))
    init = models.load_scorer("tiny:").state_dict()
    assert max(float((weights["shared"][k] - init[k]).abs().max()) for k in init if k != "score.weight") > 1e-4
    assert max_param_diff(weights["shared"], weights["full"]) < 2e-6
    assert max_param_diff(weights["full"], weights["ckpt"]) < 2e-6


@pytest.mark.parametrize("heads", [1, 3])
def test_resume_reaches_the_same_parameters_and_metrics(tmp_path, monkeypatch, heads):
    data = write_mixed(tmp_path / "m.jsonl")
    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    args = ["train.batch_prompts=4", "train.max_steps=4", "optim.schedule=cosine", "optim.warmup_steps=1",
            f"train.heads={heads}"]
    w_full = model_weights(reward.train(rm_cfg(tmp_path / "full", data, *args)))
    cut = rm_cfg(tmp_path / "cut", data, *args, "run.save_every=2")
    calls = {"n": 0}
    real = loop.clip_grad

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(loop, "clip_grad", boom)
    with pytest.raises(KeyboardInterrupt):
        reward.train(cut)
    monkeypatch.undo()
    w_cut = model_weights(reward.train(cut, resume=True))
    assert max_param_diff(w_full, w_cut) < 1e-6

    def losses(d):
        return [(r["step"], r["train/loss"]) for r in map(json.loads, open(d / "run/metrics.jsonl")) if "train/loss" in r]

    full_rows, cut_rows = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [s for s, _ in full_rows] == [s for s, _ in cut_rows] == [1, 2, 3, 4]
    assert [v for _, v in full_rows] == pytest.approx([v for _, v in cut_rows], abs=1e-6)



def test_select_best_exports_the_weights_with_the_lowest_held_out_loss(tmp_path, monkeypatch):
    """Held-out loss 3.0 at step 2, 1.0 at step 4, 2.0 at step 6 (the end): step 4's weights are
    exported, and normalised and evaluated as the model; without select_best the last step is."""
    data = write_mixed(tmp_path / "m.jsonl", n=24)
    common = ["data.val_fraction=0.25", "train.batch_prompts=4"]
    scripted = iter([3.0, 1.0, 2.0])
    real = reward.evaluate

    def scripted_loss(*a, **k):
        out = real(*a, **k)
        return {**out, "loss": next(scripted, out["loss"])}  # the final report keeps its real loss

    monkeypatch.setattr(reward, "evaluate", scripted_loss)
    for name in ("best", "step4", "last"):
        (tmp_path / name).mkdir()
    best = reward.train(rm_cfg(tmp_path / "best", data, *common, "train.max_steps=6", "train.eval_every=2",
                               "train.select_best=true"))
    assert next(scripted, None) is None  # evaluated at steps 2, 4 and at the end
    monkeypatch.undo()
    step4 = reward.train(rm_cfg(tmp_path / "step4", data, *common, "train.max_steps=4"))
    last = reward.train(rm_cfg(tmp_path / "last", data, *common, "train.max_steps=6", "train.eval_every=2"))
    assert max_param_diff(model_weights(best), model_weights(step4)) < 1e-6
    assert max_param_diff(model_weights(last), model_weights(step4)) > 1e-4
    final = json.loads((tmp_path / "best/run/manifest.json").read_text())["final_metrics"]
    assert final["best/step"] == 4 and final["best/val_loss"] == 1.0
    report = json.loads((tmp_path / "best/run/eval/rm_eval.json").read_text())
    step4_report = json.loads((tmp_path / "step4/run/eval/rm_eval.json").read_text())
    assert report["accuracy"] == step4_report["accuracy"]
    assert report["normalisation"]["bias"] == pytest.approx(step4_report["normalisation"]["bias"], abs=1e-5)



def _ddp_worker(rank, world, port, cfg_json):
    join_gloo_env(rank, world, port)
    reward.train(RMConfig.model_validate_json(cfg_json))
    end_rank()


@pytest.mark.parametrize("select_best", [False, True])
def test_two_gloo_ranks_equal_one_rank(tmp_path, select_best):
    """Also with select_best: the ranks score the held-out set together, the main rank keeps the
    best weights and every rank loads them before the normalisation pass they share."""
    data = write_mixed(tmp_path / "m.jsonl", n=20)
    extra = ["data.val_fraction=0.2", "train.eval_every=1", "train.select_best=true"] if select_best else []
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    w_one = model_weights(reward.train(rm_cfg(tmp_path / "one", data, *EXACT, *extra, "train.batch_prompts=8",
                                              "train.max_steps=2")))
    two = rm_cfg(tmp_path / "two", data, *EXACT, *extra, "train.batch_prompts=4", "train.max_steps=2")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), two.model_dump_json()), nprocs=2)
    assert max_param_diff(w_one, model_weights(tmp_path / "two/run/model")) < 1e-5
    if select_best:
        finals = [json.loads((tmp_path / d / "run/manifest.json").read_text())["final_metrics"] for d in ("one", "two")]
        assert finals[0]["best/step"] == finals[1]["best/step"]
        assert finals[0]["rm/norm_bias"] == pytest.approx(finals[1]["rm/norm_bias"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_malformed_rows_name_file_and_line(tmp_path):
    f = tmp_path / "r.jsonl"
    good = '{"prompt": "p", "responses": ["a", "b"], "order": [[1], [0]]}\n'
    f.write_text(good + '{"prompt": "p", "responses": ["a", "b"], "order": [[0], [0]]}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:2: .*ranked twice"):
        rankings.read_group_file(str(f))
    f.write_text(good + good + '{"prompt": "p", "responses": ["a", "b"]}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:3: missing key 'order'"):
        rankings.read_group_file(str(f))
    f.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:1: missing key 'rejected'"):
        rankings.read_group_file(str(f), "pairs")
    f.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:1: .*data\.format is kway"):
        rankings.read_group_file(str(f), "kway")
    assert rankings.read_group_file(str(f))[0].ranks == [0, 1]
    f.write_text(good + "{not json\n")
    with pytest.raises(DataError, match=r"r\.jsonl:2: invalid JSON"):
        reward.train(rm_cfg(tmp_path, f))
