"""Evaluation: metrics against hand-computed values, log-likelihoods against the naive formula,
and ``evaluate`` end to end on tiny random models (schema, self-comparison, resumable cache)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from preflab.data.suite import generate_suite
from preflab.evals import metrics as M
from preflab.rl.stats import wilson_interval

# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def row(id_, response="Fine.", slice_="ordinary", *, total=0.5, attempts=1.0, constraints=1.0, refusal=1.0,
        truthful=1.0, passed=(), rm=None, words=None, group=None, category="other"):
    """A samples.jsonl-style row with hand-set gold criteria."""
    return {"id": id_, "prompt": f"prompt {id_}", "response": response, "slice": slice_, "category": category,
            "paraphrase_group": group, "rm_score": rm, "words": M.count_words(response) if words is None else words,
            "gold": {"attempts": attempts, "constraints": constraints, "refusal": refusal, "truthful": truthful,
                     "degenerate": 0.0, "total": total, "is_refusal": False, "constraints_passed": list(passed)}}


def test_length_stats_by_hand():
    """[1, 2, 3, 4]: mean 2.5; linear quantiles q10 = 1 + 0.1*3 = 1.3, q50 = 2.5, q90 = 1 + 0.9*3 = 3.7;
    3 bins over [1, 4] with edges 1, 2, 3, 4 hold {1}, {2}, {3, 4} (the last bin is closed)."""
    s = M.length_stats([1, 2, 3, 4], bins=3)
    assert s["n"] == 4 and s["mean"] == 2.5 and s["max"] == 4.0
    assert s["q10"] == pytest.approx(1.3) and s["q50"] == pytest.approx(2.5) and s["q90"] == pytest.approx(3.7)
    assert s["hist"] == {"edges": [1.0, 2.0, 3.0, 4.0], "counts": [1, 1, 2]}
    assert M.length_stats([])["mean"] is None


def test_distinct_and_repetition_by_hand():
    # words a b a | b c: 5 unigrams, 3 distinct -> 0.6; bigrams (a b), (b a), (b c): all distinct -> 1.0
    assert M.distinct_n(["a b a", "b c"], 1) == pytest.approx(0.6)
    assert M.distinct_n(["a b a", "b c"], 2) == pytest.approx(1.0)
    assert M.distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)  # (a a) x3, one distinct
    assert M.distinct_n(["", "x"], 2) == 0.0
    # "a b c a b c": trigrams abc bca cab abc -> 4, 3 distinct -> 0.25; "x y" has no trigram (left out)
    assert M.repeated_ngram_rate(["a b c a b c", "x y"], 3) == pytest.approx(0.25)
    assert M.repeated_ngram_rate(["x y"], 3) == 0.0


def test_toxicity_proxy_uses_whole_words_of_the_list():
    texts = ["What the SHIT.", "a classic assessment", "fine", "that was a blow job joke"]
    assert [M.is_profane(t) for t in texts] == [True, False, False, True]  # "ass" inside words does not count
    assert M.toxicity_proxy(texts) == pytest.approx(0.5)
    assert M.toxicity_proxy([]) == 0.0


def test_refusal_rates_per_slice():
    slices = ["harmful", "harmful", "alarming_harmless", "ordinary", "ordinary"]
    responses = ["I can't help with that.", "Sure, here is how.", "I'm sorry, but no.", "Paris.", "As an AI, I won't."]
    r = M.refusal_rates(slices, responses)
    assert r["harmful"] == 0.5 and r["over_refusal"] == 1.0 and r["ordinary"] == 0.5
    assert r["by_slice"]["harmful"] == {"rate": 0.5, "n": 2}
    assert M.refusal_rates(["ordinary"], ["ok"])["harmful"] is None
    assert "i cannot" in M.REFUSAL_PHRASES


def test_metadata_rates_by_hand():
    rows = [
        row("a", attempts=0.0, refusal=0.0),                                 # refused a harmless prompt
        row("b", constraints=0.5, passed=(True, False)),                     # misses one of two constraints
        row("c", constraints=1.0, passed=(True,)),                           # meets its constraint
        row("d", response="What the shit.", refusal=1.0),                    # right decision, but profane
    ]
    m = M.metadata_rates(rows)
    assert m["attempts"] == pytest.approx(3 / 4)
    assert m["follows_constraints"] == pytest.approx(1 / 2)  # of the two prompts with constraints
    assert m["appropriate"] == pytest.approx(2 / 4)  # b and c
    assert M.metadata_rates([row("x")])["follows_constraints"] is None


def test_gold_win_rate_ties_count_half():
    """A beats B on prompts 1 and 4, ties on 2, loses on 3: (2 + 0.5) / 4 = 0.625, Wilson on 2.5 of 4."""
    w = M.gold_win_rate([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.1])
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["rate"] == pytest.approx(0.625)
    lo, hi = wilson_interval(2.5, 4)
    assert (w["lo"], w["hi"]) == (pytest.approx(lo), pytest.approx(hi))


def test_seed_summary_by_hand():
    def row(label, seed, win, lo, kl, words=30.0, constraints=0.3):
        return {"method": label.split("[")[0], "label": label, "seed": seed, "gold_winrate": win,
                "gold_ci": [lo, win + 0.05], "rm_winrate": win + 0.1, "kl": kl, "mean_words": words,
                "constraint_rate": constraints}

    rows = [{"method": "sft", "label": "sft", "seed": None, "gold_winrate": None, "gold_ci": None, "kl": 0.0},
            row("rloo", 2, 0.60, 0.54, 4.0), row("rloo", 0, 0.58, 0.52, 5.0, words=40.0, constraints=0.2),
            row("rloo", 1, 0.53, 0.47, 3.0), row("rloo[kl.coef=0]", 0, 0.55, 0.51, 9.0)]
    by = {s["label"]: s for s in M.seed_summary(rows)}
    assert set(by) == {"rloo", "rloo[kl.coef=0]"}  # the reference row is skipped
    s = by["rloo"]
    assert s["seeds"] == [0, 1, 2] and s["method"] == "rloo"
    assert s["gold_winrate_mean"] == pytest.approx((0.60 + 0.58 + 0.53) / 3)
    assert (s["gold_winrate_min"], s["gold_winrate_max"]) == (0.53, 0.60)
    assert s["lowest_ci_low"] == 0.47 and s["seeds_above_half"] == 2  # seed 1's interval contains 50%
    assert s["kl_mean"] == pytest.approx(4.0) and s["mean_words_mean"] == pytest.approx(100 / 3)
    assert s["constraint_rate_mean"] == pytest.approx(0.8 / 3) and s["rm_winrate_mean"] == pytest.approx(0.67)
    assert by["rloo[kl.coef=0]"]["seeds"] == [0] and by["rloo[kl.coef=0]"]["seeds_above_half"] == 1


def test_instruction_miss_and_refusal_overreach():
    rows = [row("a", constraints=0.5, passed=(True, False)), row("b", constraints=1.0, passed=(True,)), row("c")]
    b = M.instruction_miss(rows)
    assert (b["metric"], b["count"], b["n"]) == (0.5, 1, 2) and [e["id"] for e in b["examples"]] == ["a"]
    rows = [row("h", "I can't do that.", "harmful"), row("x", "I cannot answer that.", "alarming_harmless"),
            row("o", "Sure: here it is.")]
    b = M.refusal_overreach(rows)
    assert (b["metric"], b["n"]) == (0.5, 2) and b["examples"][0]["id"] == "x"


def test_reward_polish_trap_by_hand():
    """RM [4, 3, 2, 1], gold [0.1, 0.9, 0.5, 0.2]. Default thresholds: RM q75 = 1 + 0.75*3 = 3.25, gold
    q25 = 0.1 + 0.75*0.1 = 0.175 -> only the RM-4 response (gold 0.1). With rm_high 1.5, gold_low 0.5: RM 4
    (0.1) and RM 2 (0.5) but not RM 3 (0.9)."""
    rows = [row(str(i), rm=r, total=g) for i, (r, g) in enumerate(zip([4, 3, 2, 1], [0.1, 0.9, 0.5, 0.2]))]
    b = M.reward_polish_trap(rows)
    assert b["rm_high"] == pytest.approx(3.25) and b["gold_low"] == pytest.approx(0.175)
    assert (b["metric"], b["count"]) == (0.25, 1)
    b = M.reward_polish_trap(rows, rm_high=1.5, gold_low=0.5)
    assert b["count"] == 2 and [e["rm_score"] for e in b["examples"]] == [4, 2]  # highest RM first
    assert M.reward_polish_trap([row("a")])["metric"] is None  # no RM scores


def test_hallucinated_certainty_needs_false_and_unhedged():
    rows = [row("a", "Yes, it does.", "misconception", truthful=0.0),
            row("b", "It might, yes.", "misconception", truthful=0.0),
            row("c", "No, that is a myth.", "misconception", truthful=1.0),
            row("d", "Yes.", "ordinary", truthful=0.0)]
    b = M.hallucinated_certainty(rows)
    assert (b["count"], b["n"]) == (1, 3) and b["examples"][0]["id"] == "a"


def test_length_inflation_by_hand():
    """ratios 10/10 = 1, 30/10 = 3, 16/max(0, 1) = 16: two above 1.5; mean ratio 20/3."""
    rows = [row("a", words=10), row("b", words=30), row("c", words=16), row("z", words=5)]
    b = M.length_inflation(rows, {"a": 10, "b": 10, "c": 0})
    assert (b["count"], b["n"]) == (2, 3)
    assert b["mean_ratio"] == pytest.approx(20 / 3)
    assert [e["id"] for e in b["examples"]] == ["c", "b"]
    assert M.length_inflation(rows, None)["metric"] is None


def test_policy_inconsistency_by_hand():
    rows = [
        row("1a", "I can't help.", group="g1"), row("1b", "Sure.", group="g1"),  # refusal differs
        row("2a", constraints=1.0, passed=(True,), group="g2"), row("2b", constraints=1.0, passed=(True,), group="g2"),
        row("3a", constraints=1.0, passed=(True,), group="g3"),
        row("3b", constraints=0.0, passed=(False,), group="g3"),  # compliance differs
        row("4a", group="g4"),  # a single prompt is no group
    ]
    b = M.policy_inconsistency(rows)
    assert (b["count"], b["n"]) == (2, 3) and b["metric"] == pytest.approx(2 / 3)
    assert [(e["group"], e["differs_in"]) for e in b["examples"]] == [("g1", "refusal"), ("g3", "constraints")]
    assert len(M.failure_bins(rows)) == 6 and set(M.failure_bins(rows)) == set(M.FAILURE_BINS)


# ---------------------------------------------------------------------------------------------
# log-likelihoods
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU
    yield
    torch.set_num_threads(before)


def naive_logprob(model, tok, prompt, response, eos=True, temperature=1.0):
    """log p(response | rendered prompt) from one unpadded forward pass and a full log_softmax."""
    from preflab.rollout import encode_prompts

    q = encode_prompts(tok, [prompt])[0]
    r = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    ids = torch.tensor([q + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(q) - 1 + t, tok_id]) for t, tok_id in enumerate(r))


def test_response_logprobs_match_naive_formula_with_padding(tiny):
    from preflab.evals.truthfulness import response_logprobs

    model, tok = tiny
    prompts = ["hi", "a much longer prompt than the first one", "mid"]
    responses = ["Hello there.", "ok", ""]
    for eos, t in ((True, 1.0), (False, 0.7)):
        got = response_logprobs(model, tok, prompts, responses, batch_size=2, eos=eos, temperature=t)
        want = [naive_logprob(model, tok, p, r, eos, t) for p, r in zip(prompts, responses)]
        assert got == pytest.approx(want, abs=1e-4)
    assert response_logprobs(model, tok, ["x"], [""], eos=False) == [0.0]


def test_mc1_compares_best_true_with_every_false(tiny):
    from preflab.evals.truthfulness import mc1, response_logprobs

    model, tok = tiny
    prompts = [p for p in generate_suite(0, 200) if p.slice == "misconception"][:3]
    out = mc1(model, tok, prompts, batch_size=4)
    assert out["n"] == 3 and 0.0 <= out["mc1"] <= 1.0
    assert out["mc1"] == sum(r["correct"] for r in out["per_prompt"]) / 3  # pinned: the share of correct prompts
    for p, r in zip(prompts, out["per_prompt"]):
        t = response_logprobs(model, tok, [p.prompt] * len(p.true_answers), list(p.true_answers), eos=False)
        f = response_logprobs(model, tok, [p.prompt] * len(p.false_answers), list(p.false_answers), eos=False)
        assert r["best_true"] == pytest.approx(max(t), abs=1e-4) and r["correct"] == (max(t) > max(f))
    assert mc1(model, tok, [p for p in generate_suite(0, 200) if p.slice == "ordinary"][:2])["mc1"] is None


# ---------------------------------------------------------------------------------------------
# evaluate end to end
# ---------------------------------------------------------------------------------------------

MODELS = {"sft": "tiny:", "ppo": "tiny:1", "copy": "tiny:"}
SETTINGS = dict(reference="sft", reward_model="tiny:2", max_new_tokens=8, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def suite_prompts():
    """About 12 eval prompts: three of each slice (two alarming-but-harmless exist), with paraphrases."""
    ev = [p for p in generate_suite(0, 200) if p.split == "eval"]
    picked = [p for s in ("ordinary", "harmful", "alarming_harmless", "misconception")
              for p in [q for q in ev if q.slice == s][:3]]
    group = next(p.paraphrase_group for p in ev if sum(q.paraphrase_group == p.paraphrase_group for q in ev) > 1)
    picked += [p for p in ev if p.paraphrase_group == group and p not in picked]
    return picked


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, suite_prompts, one_thread):
    from preflab.evals.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval")
    return out, evaluate(MODELS, suite_prompts, out_dir=out, **SETTINGS)


def test_results_schema(evaluated, suite_prompts):
    out, res = evaluated
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert res["reference"] == "sft" and res["n_prompts"] == len(suite_prompts)
    assert set(res["models"]) == set(MODELS) == set(res["failure_bins"])
    for m in res["models"].values():
        for key in ("gold", "win_rate", "rm_win_rate", "rm_score", "kl", "length_words", "length_tokens",
                    "no_eos_fraction", "distinct_1", "distinct_2", "repeated_trigram_rate", "toxicity_proxy",
                    "refusal", "metadata", "mc1"):
            assert key in m, key
        assert set(m["refusal"]) >= {"by_slice", "by_category", "harmful", "over_refusal", "ordinary"}
        assert m["mc1"]["n"] == 3 and m["length_tokens"]["max"] <= 8
    for bins in res["failure_bins"].values():
        assert set(bins) == set(M.FAILURE_BINS)
        assert all(len(b["examples"]) <= 3 for b in bins.values())
    assert res["failure_bins"]["ppo"]["reward_polish_trap"]["metric"] is not None
    assert res["examples"] and set(res["examples"][0]["responses"]) == set(MODELS)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(MODELS) * len(suite_prompts)
    assert {"model", "id", "prompt", "response", "gold", "rm_score"} <= set(samples[0])
    assert {"attempts", "constraints", "refusal", "truthful", "total"} <= set(samples[0]["gold"])


def test_self_comparison_is_a_tie_and_kl_zero(evaluated, suite_prompts):
    """The reference against itself, and an identical copy (same weights, same seed, same samples):
    every comparison a tie, win-rate exactly 0.5 with an interval around it, and KL 0."""
    _, res = evaluated
    n = len(suite_prompts)
    for name in ("sft", "copy"):
        w = res["models"][name]["win_rate"]
        assert (w["rate"], w["ties"], w["n"]) == (0.5, n, n) and w["lo"] < 0.5 < w["hi"]
        assert res["models"][name]["rm_win_rate"]["rate"] == 0.5
        assert res["models"][name]["kl"] == pytest.approx(0.0, abs=1e-4)
    w = res["models"]["ppo"]["win_rate"]
    assert 0.0 <= w["lo"] <= w["rate"] <= w["hi"] <= 1.0 and w["wins"] + w["ties"] + w["losses"] == n
    # pinned: the counts from the samples' gold totals, prompt by prompt, and the Wilson interval by hand
    out, _ = evaluated
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    gold = {(r["model"], r["id"]): r["gold"]["total"] for r in rows}
    wins = sum(gold[("ppo", p.id)] > gold[("sft", p.id)] for p in suite_prompts)
    ties = sum(gold[("ppo", p.id)] == gold[("sft", p.id)] for p in suite_prompts)
    rate, z = (wins + 0.5 * ties) / n, 1.96
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (w["wins"], w["ties"], w["n"]) == (wins, ties, n)
    assert (w["rate"], w["lo"], w["hi"]) == pytest.approx((rate, centre - half, centre + half), abs=1e-9)
    assert res["models"]["ppo"]["kl"] != 0.0


def test_rerun_reuses_and_resumes_cached_generations(evaluated, suite_prompts, tmp_path, monkeypatch):
    from preflab import rollout
    from preflab.evals.evaluate import evaluate

    src, res = evaluated
    out = tmp_path / "eval"
    shutil.copytree(src, out)
    calls: list[int] = []
    real = rollout.HFGenerator.generate

    def counting(self, prompts, **kw):
        calls.append(len(prompts))
        return real(self, prompts, **kw)

    monkeypatch.setattr(rollout.HFGenerator, "generate", counting)
    again = evaluate(MODELS, suite_prompts, out_dir=out, **SETTINGS)
    assert calls == []  # complete caches: nothing generated
    for name in MODELS:
        for key in ("gold", "win_rate", "rm_win_rate", "kl", "rm_score", "no_eos_fraction", "mc1"):
            assert again["models"][name][key] == pytest.approx(res["models"][name][key]), (name, key)
    # A killed run: the ppo cache lost its last 3 rows and has a torn line; only those 3 are redone.
    cache = out / "generations" / "ppo.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-3]) + '\n{"id": "torn')
    evaluate(MODELS, suite_prompts, out_dir=out, **SETTINGS)
    assert sum(calls) == 3
    assert len(cache.read_text().splitlines()) == len(suite_prompts)
    # Other settings invalidate the cache.
    calls.clear()
    evaluate({"sft": "tiny:"}, suite_prompts[:2], out_dir=out, **{**SETTINGS, "max_new_tokens": 4,
                                                                   "reward_model": None})
    assert sum(calls) == 2


def test_eval_cli_prints_the_table(evaluated, suite_prompts, tmp_path):
    from preflab.evals.cli import eval_cli

    src, _ = evaluated
    out = tmp_path / "eval"
    shutil.copytree(src, out)  # cached generations: the command only re-scores
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in suite_prompts))
    args = ["--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8", "--rm", "tiny:2",
            "--batch-size", "8", "--threads", "1"]
    for name, spec in MODELS.items():
        args += ["--models", f"{name}={spec}"]
    r = CliRunner().invoke(eval_cli, args)
    assert r.exit_code == 0, r.output
    assert "copy" in r.output and "ppo" in r.output and "results.json" in r.output
    r = CliRunner().invoke(eval_cli, ["--prompts", str(prompts), "--models", "nonsense"])
    assert r.exit_code != 0 and "NAME=PATH" in str(r.exception)
