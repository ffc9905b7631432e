"""A reward-model ensemble's disagreement where a user decides with it: `preflab rm-eval` with
several models (per response the members' mean and std of the normalised reward; accuracy of the
mean, on the most and least uncertain half of the pairs) and `preflab audit` on a run with
RUN/rm-2 (the most uncertain samples). Tiny random reward models saved with their own gain and bias."""

import json
import math
import shutil
import statistics

import pytest
import torch
from click.testing import CliRunner

from preflab import models, scoring
from preflab.data.rankings import Group
from preflab.evals import rm_eval


def save_rm(path, seed, gain=1.0, bias=0.0):
    """A tiny reward model with a fixed random head and a stored normalisation (gain, bias)."""
    torch.manual_seed(seed)
    rm = models.load_scorer(f"tiny:{seed}")
    rm.config.preflab_reward_gain, rm.config.preflab_reward_bias = gain, bias
    models.save_model(rm, models.load_tokenizer("tiny:"), path, reward_model=True)
    return str(path)


# ---------------------------------------------------------------------------------------------
# rm-eval
# ---------------------------------------------------------------------------------------------

# Four prompts, response 0 preferred to response 1 in each; two members' normalised scores.
GROUPS = [Group(f"p{i}", [f"good {i}", f"bad {i}"], [0, 1]) for i in range(4)]
M1 = [[1.0, 0.0], [0.5, 0.0], [0.0, 3.0], [2.0, 0.0]]
M2 = [[1.0, 0.0], [0.7, 0.0], [0.0, -1.0], [-2.0, 1.0]]


def test_ensemble_report_by_hand():
    """Means [1, 0], [.6, 0], [0, 1], [0, .5]: prompts 0 and 1 right, 2 and 3 wrong. Stds (over two
    members, divided by 2): [0, 0], [.1, 0], [0, 2], [2, .5]: pair uncertainties 0, .05, 1, 1.25, so
    the uncertain half is prompts 3 and 2 (both wrong), the certain half 0 and 1 (both right)."""
    rep = rm_eval.ensemble_report(GROUPS, [M1, M2], ["a", "b"], top_k=2)
    assert rep["n_members"] == 2 and rep["members"] == ["a", "b"]
    assert (rep["accuracy"], rep["n_pairs"]) == (0.5, 4)
    assert rep["member_accuracy"] == [0.75, 0.75]  # each member is right on 3 of 4: the mean is not their mean
    assert rep["mean_uncertainty"] == pytest.approx((0.1 + 2 + 2 + 0.5) / 8)
    assert (rep["most_uncertain_half"]["accuracy"], rep["most_uncertain_half"]["n_pairs"]) == (0.0, 2)
    assert (rep["least_uncertain_half"]["accuracy"], rep["least_uncertain_half"]["n_pairs"]) == (1.0, 2)
    by = {(s["group"], s["response"]): s for s in rep["samples"]}
    assert len(by) == 8 and by[(1, 0)]["mean"] == pytest.approx(0.6) and by[(1, 0)]["std"] == pytest.approx(0.1)
    assert by[(3, 0)]["scores"] == [2.0, -2.0]
    # the two std-2 responses, equal ones by position; with their prompt and text
    assert [(u["group"], u["response"], u["text"]) for u in rep["most_uncertain"]] == [(2, 1, "bad 2"), (3, 0, "good 3")]
    assert rep["most_uncertain"][0]["prompt"] == "p2"


def test_ensemble_report_odd_pairs_leave_the_middle_pair_out():
    rep = rm_eval.ensemble_report(GROUPS[:3], [M1[:3], M2[:3]], ["a", "b"])
    assert rep["most_uncertain_half"]["n_pairs"] == rep["least_uncertain_half"]["n_pairs"] == 1
    assert rep["most_uncertain_half"]["accuracy"] == 0.0 and rep["least_uncertain_half"]["accuracy"] == 1.0


def test_rm_eval_cli_reports_each_responses_mean_and_std_of_the_normalised_rewards(tmp_path):
    a = save_rm(tmp_path / "a", 1, gain=2.0, bias=-0.5)
    b = save_rm(tmp_path / "b", 2, gain=0.5, bias=1.0)
    rows = [{"prompt": f"Describe item {i}.", "responses": [f"zebra {i} apple", f"river {i}", "stone green"],
             "order": [[0], [1], [2]]} for i in range(5)]
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(rm_eval.cli, ["--model", a, "--model", b, "--data", str(data), "--max-length", "96",
                                           "--out", str(tmp_path / "e.json"), "--worst-k", "3"])
    assert res.exit_code == 0, res.output
    assert "ensemble" in res.output and "most uncertain responses" in res.output
    report = json.loads((tmp_path / "e.json").read_text())
    ens = report["ensemble"]
    assert ens["members"] == [a, b] and len(ens["samples"]) == 15 and len(ens["most_uncertain"]) == 3
    # each member's score is its own normalised reward of (prompt, response)
    flat = [(r["prompt"], t) for r in rows for t in r["responses"]]
    want = [scoring.score_texts(models.load_reward_model(m), models.load_tokenizer(m), [p for p, _ in flat],
                                [t for _, t in flat], max_length=96, normalise=True) for m in (a, b)]
    for j, s in enumerate(ens["samples"]):
        assert s["scores"] == pytest.approx([want[0][j], want[1][j]], abs=1e-4)
        assert s["mean"] == pytest.approx(statistics.fmean(s["scores"]))
        assert s["std"] == pytest.approx(statistics.pstdev(s["scores"]))
    # the report's accuracy is the mean's: the pair (0 > 1) is right when the mean ranks it so
    mean = [s["mean"] for s in ens["samples"]]
    right = [mean[3 * g + w] > mean[3 * g + v] for g in range(5) for w, v in ((0, 1), (0, 2), (1, 2))]
    assert report["n_pairs"] == ens["n_pairs"] == 15 and report["accuracy"] == pytest.approx(sum(right) / 15)
    assert ens["most_uncertain_half"]["n_pairs"] == ens["least_uncertain_half"]["n_pairs"] == 7
    stds = sorted((s["std"] for s in ens["samples"]), reverse=True)
    assert [u["std"] for u in ens["most_uncertain"]] == pytest.approx(stds[:3])
    # one model: no ensemble section, raw scores as before
    res = CliRunner().invoke(rm_eval.cli, ["--model", a, "--data", str(data), "--max-length", "96",
                                           "--out", str(tmp_path / "one.json")])
    assert res.exit_code == 0, res.output
    assert "ensemble" not in json.loads((tmp_path / "one.json").read_text())


# ---------------------------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A run directory with the suite, an evaluation of sft (tiny:) and rloo (tiny:5) on 4 prompts
    scored by tiny: as the RM, and RUN/rm/model."""
    from preflab.data.suite import write_suite
    from preflab.evals.evaluate import evaluate

    out = tmp_path_factory.mktemp("ens") / "run"
    prompts = [p for p in write_suite(out / "data" / "prompts.jsonl", seed=0, n=100) if p.split == "eval"][:4]
    evaluate({"sft": "tiny:", "rloo": "tiny:5"}, prompts, reference="sft", reward_model="tiny:",
             out_dir=out / "eval", max_new_tokens=4, temperature=0.7, batch_size=8, bf16=False, seed=0)
    save_rm(out / "rm" / "model", 1)
    return out


def test_audit_lists_the_most_uncertain_samples_where_the_run_has_an_ensemble(evaluated_run, tmp_path):
    from preflab.evals import audit
    from preflab.evals.report import render_audit

    one = audit.audit(evaluated_run, probe_prompts=2, bf16=False)
    assert "uncertainty" not in one and scoring.run_reward_ensemble(evaluated_run) == []  # RUN/rm alone
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    save_rm(run / "rm-2" / "model", 2, gain=3.0)
    members = [str(run / "rm/model"), str(run / "rm-2/model")]
    assert scoring.run_reward_ensemble(run) == members
    report = audit.audit(run, probe_prompts=2, bf16=False)
    u = report["uncertainty"]
    assert u["members"] == members
    assert json.loads((run / "audit/audit.json").read_text())["uncertainty"] == json.loads(json.dumps(u))
    samples = [json.loads(x) for x in (run / "eval/samples.jsonl").read_text().splitlines()]
    # every evaluated sample scored by each member (normalised); the list is the highest std first
    want = [scoring.score_texts(models.load_reward_model(m), models.load_tokenizer(m), [r["prompt"] for r in samples],
                                [r["response"] for r in samples], normalise=True) for m in members]
    std = {(r["model"], r["id"]): statistics.pstdev([want[0][j], want[1][j]]) for j, r in enumerate(samples)}
    top = u["most_uncertain"]
    assert len(top) == len(samples) == 8  # fewer samples than the list's length: all of them
    assert [(t["model"], t["id"]) for t in top] == sorted(std, key=lambda k: -std[k])
    for t in top:
        assert t["std"] == pytest.approx(std[(t["model"], t["id"])], abs=1e-4)
        assert t["std"] == pytest.approx(statistics.pstdev(t["scores"])) and t["mean"] == pytest.approx(
            statistics.fmean(t["scores"]))
    by = {m["model"]: m for m in u["by_model"]}
    assert set(by) == {"sft", "rloo"} and by["rloo"]["n"] == 4
    assert by["rloo"]["mean_std"] == pytest.approx(statistics.fmean(v for k, v in std.items() if k[0] == "rloo"),
                                                   abs=1e-4)
    assert not math.isnan(by["sft"]["max_std"])
    html = render_audit(report)
    assert "Reward-model ensemble: uncertainty" in html and "Most uncertain samples" in html
