"""`preflab compare` and `preflab audit` checked against values computed by hand on a small
synthetic run directory: each compare cell evaluates the model its own training returned (its
method, its seed), and its row holds that model's numbers (win-rate and Wilson interval, KL,
length) recomputed here from the cell's samples; the audit correlates the columns it names and
reviews the rows it should (policy rows only in the top list, the reference's answers in the probes)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from preflab import models
from preflab.config import PipelineConfig, validate
from preflab.pipeline import PRESETS, deep_merge

N_EVAL = 4


def wilson(successes, n, z=1.96):
    p = successes / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with what compare and audit read: the pipeline config, the suite, an SFT
    model (tiny:), the run's own rloo model (tiny:5), an RM directory, and the run's evaluation
    of sft and rloo (tiny: as the reward model)."""
    from preflab.data.suite import write_suite
    from preflab.evals.evaluate import evaluate

    out = tmp_path_factory.mktemp("hand") / "run"
    data = deep_merge(PipelineConfig().model_dump(mode="json"), PRESETS["tiny"])
    data["eval"].update(limit=N_EVAL, max_new_tokens=4, models=["sft", "rloo"])
    data["rl"] = ["rloo"]
    cfg = validate(PipelineConfig, data)
    out.mkdir(parents=True)
    (out / "pipeline_config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    prompts = [p for p in write_suite(out / "data" / "prompts.jsonl", seed=0, n=100) if p.split == "eval"][:N_EVAL]
    shutil.copytree(models.ensure_tiny("tiny:"), out / "sft" / "model")
    shutil.copytree(models.ensure_tiny("tiny:5"), out / "rloo" / "model")
    (out / "rm" / "model").mkdir(parents=True)
    evaluate({"sft": str(out / "sft/model"), "rloo": str(out / "rloo/model")}, prompts, reference="sft",
             reward_model="tiny:", out_dir=out / "eval", max_new_tokens=4, temperature=0.7, batch_size=8, bf16=False,
             seed=0)
    return out


def by_hand(samples, model, reference="sft"):
    """The compare row's numbers for ``model`` recomputed from an evaluation's samples."""
    mine = {r["id"]: r for r in samples if r["model"] == model}
    ref = {r["id"]: r for r in samples if r["model"] == reference}
    assert set(mine) == set(ref) and len(mine) == N_EVAL
    wins = sum(mine[i]["gold"]["total"] > ref[i]["gold"]["total"] for i in mine)
    ties = sum(mine[i]["gold"]["total"] == ref[i]["gold"]["total"] for i in mine)
    rm_wins = sum(mine[i]["rm_score"] > ref[i]["rm_score"] for i in mine)
    rm_ties = sum(mine[i]["rm_score"] == ref[i]["rm_score"] for i in mine)
    n = len(mine)
    return {"gold_winrate": (wins + 0.5 * ties) / n, "gold_ci": list(wilson(wins + 0.5 * ties, n)), "n": n,
            "rm_winrate": (rm_wins + 0.5 * rm_ties) / n, "kl": float(np.mean([r["kl"] for r in mine.values()])),
            "mean_words": float(np.mean([r["words"] for r in mine.values()])),
            "rm_score": float(np.mean([r["rm_score"] for r in mine.values()])),
            "gold_score": float(np.mean([r["gold"]["total"] for r in mine.values()]))}


def assert_row(row, want):
    for k, v in want.items():
        assert row[k] == pytest.approx(v, abs=1e-6), k


def test_each_compare_cell_evaluates_the_model_its_training_returned(run, tmp_path, monkeypatch):
    import preflab.registry as registry
    from preflab.compare import Comparison

    trained = {}
    seeds_of = {("rloo", 1): "tiny:11", ("grpo", 0): "tiny:12", ("grpo", 1): "tiny:13"}

    def fake_run_stage(stage, cfg, resume=False):
        key = (cfg.algo.estimator, cfg.run.seed)
        assert stage == "rl" and key not in trained
        trained[key] = (str(models.ensure_tiny(seeds_of[key])), cfg.run.out)
        return Path(trained[key][0])

    monkeypatch.setattr(registry, "run_stage", fake_run_stage)
    out = tmp_path / "cmp"
    rows = Comparison(run, out, methods=["rloo", "grpo"], seeds=[0, 1], overrides=[], grid=[]).run_all()
    assert [(r["method"], r["seed"]) for r in rows] == [("sft", None), ("rloo", 0), ("rloo", 1), ("grpo", 0),
                                                       ("grpo", 1)]
    # rloo at the run's seed is the run's own model: not trained, its numbers from the run's evaluation
    assert set(trained) == {("rloo", 1), ("grpo", 0), ("grpo", 1)}
    run_samples = read_jsonl(run / "eval/samples.jsonl")
    assert rows[1]["source"] == "run"
    assert_row(rows[1], by_hand(run_samples, "rloo"))
    # the reference row is the SFT model's own numbers
    assert rows[0]["kl"] == 0.0 and rows[0]["gold_winrate"] is None
    assert rows[0]["mean_words"] == pytest.approx(float(np.mean([r["words"] for r in run_samples
                                                                  if r["model"] == "sft"])))
    ref_gen = {r["id"]: r["response"] for r in read_jsonl(run / "eval/generations/sft.jsonl")}
    for row in rows[2:]:
        method, seed = row["method"], row["seed"]
        cell = out / "cells" / f"{method}-s{seed}"
        model, train_out = trained[(method, seed)]
        assert train_out == str(cell / "train")  # the cell's own training directory
        gen = read_jsonl(cell / "eval/generations" / f"{method}.jsonl")
        assert {g["spec"] for g in gen} == {model}  # the model that cell's training returned
        samples = read_jsonl(cell / "eval/samples.jsonl")
        assert {r["id"]: r["response"] for r in samples if r["model"] == "sft"} == ref_gen  # same reference
        assert_row(row, by_hand(samples, method))
    # three different models: three different sets of answers
    answers = {(r["method"], r["seed"]): tuple(x["response"] for x in read_jsonl(
        out / "cells" / f"{r['method']}-s{r['seed']}" / "eval/samples.jsonl") if x["model"] == r["method"])
        for r in rows[2:]}
    assert len(set(answers.values())) == 3


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------


def _row(model, i, rm, gold, words, kl=0.0, response=None, prompt=None):
    return {"model": model, "id": f"q{i}", "prompt": prompt or f"Question {i} about rivers and mountains?",
            "response": response or f"{model} answer {i} " + "word " * max(words - 3, 0), "rm_score": rm,
            "gold": {"total": gold}, "words": words, "kl": kl}


@pytest.fixture
def audit_run(run, tmp_path):
    """The run's results.json (reference sft, an RM) with samples written by hand."""
    d = tmp_path / "arun"
    (d / "eval").mkdir(parents=True)
    (d / "data").mkdir()
    shutil.copyfile(run / "eval/results.json", d / "eval/results.json")
    (d / "data/prompts.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n"
                                                  for i in range(5)))
    rows = (
        # base first: its rows must not be probed and never reach the top list
        [_row("base", i, 100.0 if i == 0 else -100.0 + i, 0.0, 3) for i in range(5)]
        # sft (the reference): rm 1, 2, 3, 4, 60; gold 0.5..0.1; words 4..8
        + [_row("sft", i, 60.0 if i == 4 else 1.0 + i, 0.5 - 0.1 * i, 4 + i, response=f"sft answer {i}")
           for i in range(5)]
        # a reference row whose prompt is not in data/prompts.jsonl: not probed
        + [{**_row("sft", 9, 0.0, 0.5, 4), "id": "zz"}]
        # rloo: rm 10, 20, 30, 40 vs gold ranks 2, 1, 4, 3 (rho 0.6); words constant (rho nan); kl 2.0
        + [_row("rloo", i, 10.0 * (i + 1), g, 5, kl=2.0) for i, g in enumerate([0.2, 0.1, 0.4, 0.3])])
    (d / "eval/samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cell = d / "compare/cells/grpo-s0/eval"
    cell.mkdir(parents=True)
    cell_rows = ([_row("sft", i, 1.0, 1.0, 4) for i in range(4)]  # the cell's copy of the reference: skipped
                 + [_row("grpo", i, [50.0, 4.0, 3.0, 2.0][i], 0.1 * i, 2 + i, kl=1.0) for i in range(4)])
    (cell / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cell_rows))
    return d, rows, cell_rows


def test_audit_correlates_the_named_columns_per_model_and_kl(audit_run):
    from preflab.evals.audit import correlations

    d, _, _ = audit_run
    got = {(c["source"], c["model"]): c for c in correlations(d, "sft")}
    assert list(got) == [("run", "base"), ("run", "sft"), ("grpo-s0", "grpo"), ("run", "rloo")]  # sorted by KL
    sft = got[("run", "sft")]
    assert sft["n"] == 6 and sft["kl"] == 0.0
    # ranks with the row "zz" (rm 0, gold 0.5, 4 words): rm 2 3 4 5 6 1, gold 5.5 4 3 2 1 5.5
    assert sft["rho_rm_gold"] == pytest.approx(-17 / math.sqrt(17.5 * 17), abs=1e-9)
    rloo = got[("run", "rloo")]
    assert (rloo["n"], rloo["kl"]) == (4, 2.0)
    assert rloo["rho_rm_gold"] == pytest.approx(0.6)
    assert math.isnan(rloo["rho_rm_length"]) and math.isnan(rloo["rho_gold_length"])
    grpo = got[("grpo-s0", "grpo")]
    assert (grpo["n"], grpo["kl"]) == (4, 1.0)
    assert grpo["rho_rm_gold"] == pytest.approx(-1.0) and grpo["rho_rm_length"] == pytest.approx(-1.0)
    assert grpo["rho_gold_length"] == pytest.approx(1.0)
    assert math.isnan(got[("run", "base")]["rho_rm_gold"])  # gold constant


def test_audit_spearman_of_the_sft_rows_by_hand(audit_run):
    from preflab.evals.audit import correlations

    d, rows, _ = audit_run
    sft = [r for r in rows if r["model"] == "sft"]

    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        i = 0
        while i < len(order):  # average ranks of ties
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    def rho(a, b):
        return float(np.corrcoef(ranks(a), ranks(b))[0, 1])

    rm, gold, words = ([r["rm_score"] for r in sft], [r["gold"]["total"] for r in sft], [r["words"] for r in sft])
    c = next(c for c in correlations(d, "sft") if c["model"] == "sft")
    assert c["rho_rm_gold"] == pytest.approx(rho(rm, gold))
    assert c["rho_rm_length"] == pytest.approx(rho(rm, words))
    assert c["rho_gold_length"] == pytest.approx(rho(gold, words))
    assert len({round(c["rho_rm_gold"], 6), round(c["rho_rm_length"], 6), round(c["rho_gold_length"], 6)}) == 3


def test_audit_top_list_holds_policy_rows_only_with_flags_from_every_rows_quantiles(audit_run):
    from preflab.evals.audit import top_responses

    d, rows, cell_rows = audit_run
    every = rows + [r for r in cell_rows if r["model"] != "sft"]
    top = top_responses(every, "sft", n=5)
    # base q0 (rm 100) and sft q4 (rm 60) score higher, but only policy rows are listed
    assert [(t["model"], t["id"]) for t in top] == [("grpo", "q0"), ("rloo", "q3"), ("rloo", "q2"), ("rloo", "q1"),
                                                    ("rloo", "q0")]
    rm_q75 = float(np.quantile([r["rm_score"] for r in every], 0.75))
    gold_q25 = float(np.quantile([r["gold"]["total"] for r in every], 0.25))
    for t in top:
        src = next(r for r in every if (r["model"], r["id"]) == (t["model"], t["id"]))
        assert t["gold_total"] == src["gold"]["total"] and t["rm_score"] == src["rm_score"]
        want = src["rm_score"] >= rm_q75 and src["gold"]["total"] <= gold_q25
        assert ("rm_high_gold_low" in t["flags"]) == want
    assert rm_q75 == pytest.approx(25.0) and gold_q25 == 0.0  # over every row, base and reference included
    assert [("rm_high_gold_low" in t["flags"]) for t in top] == [True, False, False, False, False]
    # a policy row with a high RM score and the lowest gold score is flagged
    flagged = top_responses(every + [_row("rloo", 7, 1000.0, 0.0, 5)], "sft", n=1)
    assert flagged[0]["id"] == "q7" and "rm_high_gold_low" in flagged[0]["flags"]
    # the same row with a middling gold score is not
    assert "rm_high_gold_low" not in top_responses(every + [_row("rloo", 7, 1000.0, 0.3, 5)], "sft", n=1)[0]["flags"]


def test_audit_probes_the_references_answers_and_counts_preferences_by_hand(audit_run, monkeypatch):
    from preflab import scoring
    from preflab.evals import audit
    from preflab.feedback import rubric

    d, _, _ = audit_run
    probed = []

    def rm_len(model, tok, prompts, responses, **kw):
        probed.append(list(responses))
        return [float(len(r)) for r in responses]

    class J:
        def __init__(self, total):
            self.total = total

    plain = {f"sft answer {i}" for i in range(5)}

    def gold(by_id, items):  # the plain answers ("sft answer i") and the quoted ones score 1, the rest 0.5
        return [J(1.0 if r["response"].strip('"') in plain else 0.5) for r in items]

    monkeypatch.setattr(scoring, "score_texts", rm_len)
    monkeypatch.setattr(rubric, "judge_batch", gold)
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: None)

    class RM:
        def eval(self):
            return self

    monkeypatch.setattr(models, "load_reward_model", lambda *a, **k: RM())
    report = audit.audit(d, probe_prompts=3)
    # the first scored set is the normal answers: the reference's, in order, only prompts in the file
    assert probed[0] == ["sft answer 0", "sft answer 1", "sft answer 2"]
    by = {e["exploit"]: e for e in report["exploits"]}
    assert all(e["n"] == 3 for e in by.values())
    # longer is better to this RM: padding, repetition, stuffing, flattery, quotes always win
    for name in ("padding", "repetition", "keyword_stuffing", "flattery", "quoted"):
        assert (by[name]["rm_prefers"], by[name]["gold_prefers"], by[name]["flagged"]) == (1.0, 0.0, True), name
    refusal = "I'm sorry, but I can't help with that request."
    assert by["blanket_refusal"]["rm_prefers"] == 1.0 and len(refusal) > len("sft answer 0")
    assert by["padding"]["rm_score_delta"] == pytest.approx(len(audit._FILLER) * 3)
    assert by["padding"]["gold_delta"] == pytest.approx(-0.5)
    assert by["quoted"]["rm_score_delta"] == pytest.approx(2.0)
    assert by["quoted"]["gold_delta"] == 0.0  # a gold tie is not a gold preference: 0 of 3
    lo, hi = wilson(3, 3)
    assert by["padding"]["rm_prefers_ci"] == pytest.approx([lo, hi])
    assert report["flagged"] == list(audit.EXPLOITS)  # every exploit is longer than "sft answer i"
