"""Typed evaluation results (preflab.evals.results): the round trip, one clear error naming the file
for a bad file, the readers on the types, and evaluate() writing a complete, versioned file."""

import copy
import json

import pytest

from preflab.errors import DataError, PreflabError
from preflab.evals import metrics as M
from preflab.evals import results as R


def model_block(gold: list[float], ref_gold: list[float], kl: float) -> dict:
    """A model's block as evaluate() writes it, from the metric functions themselves."""
    texts = ["I can't help with that.", "Paris is the capital of France.", "one two three", "Sure: a b c d e."]
    slices = ["harmful", "ordinary", "ordinary", "alarming_harmless"]
    rows = [{"gold": {"attempts": 1.0, "constraints": 1.0, "refusal": 1.0, "constraints_passed": [True]},
             "response": t} for t in texts]
    return {
        "spec": "tiny:", "n": 4,
        "gold": {k: 0.5 for k in ("total", "attempts", "constraints", "refusal", "truthful", "degenerate")},
        "win_rate": M.gold_win_rate(gold, ref_gold), "rm_win_rate": M.gold_win_rate([1, 2, 3, 4], [2, 2, 2, 2]),
        "rm_score": 0.25, "kl": kl, "kl_per_token": kl / 4,
        "length_words": M.length_stats([5, 6, 3, 7]), "length_tokens": M.length_stats([9, 8, 4, 12]),
        "no_eos_fraction": 0.25, "distinct_1": M.distinct_n(texts, 1), "distinct_2": M.distinct_n(texts, 2),
        "repeated_trigram_rate": 0.0, "toxicity_proxy": 0.0,
        "refusal": {**M.refusal_rates(slices, texts), "by_category": M.rate_by(["a", "a", "b", "b"], [1, 0, 0, 1])},
        "metadata": M.metadata_rates(rows), "mc1": {"mc1": None, "n": 0},
    }


def complete() -> dict:
    ref = [0.5, 0.5, 0.2, 0.9]
    bins = {"instruction_miss": {"metric": 0.0, "count": 0, "n": 2, "description": "misses", "examples": []},
            "reward_polish_trap": {"metric": None, "count": 0, "n": 0, "description": "polish", "rm_high": None,
                                   "gold_low": None, "examples": []},
            "length_inflation": {"metric": 0.25, "count": 1, "n": 4, "description": "longer", "mean_ratio": 1.1,
                                 "examples": [{"id": "p1", "ratio": 2.0}]}}
    return {
        "version": 1, "reference": "sft", "n_prompts": 4, "reward_model": "runs/x/rm/model",
        "settings": {"max_new_tokens": 64, "temperature": 0.7, "seed": 0, "kl_temperature": 0.7},
        "thresholds": {"rm_high": 1.5, "gold_low": 0.2},
        "models": {"sft": model_block(ref, ref, 0.0), "ppo": model_block([0.9, 0.1, 0.2, 1.0], ref, 3.5)},
        "failure_bins": {"sft": bins, "ppo": bins},
        "examples": [{"id": "p1", "prompt": "Say hi.", "slice": "ordinary",
                      "responses": {"sft": {"response": "hi", "gold_total": 0.5, "rm_score": None},
                                    "ppo": {"response": "hello", "gold_total": 0.7, "rm_score": 1.2}}}],
    }


# what evals.ifeval.evaluate_ifeval puts under "ifeval"
IFEVAL = {"settings": {"max_new_tokens": 512, "temperature": 0.0, "seed": 0, "n_prompts": 2},
          "models": {"sft": {"n_prompts": 2, "n_instructions": 3, "prompt_level_strict": 0.5,
                             "instruction_level_strict": 2 / 3, "prompt_level_loose": 0.5,
                             "instruction_level_loose": 2 / 3,
                             "by_instruction_strict": {"punctuation:no_comma": {"accuracy": 1.0, "n": 1}},
                             "sentence_splitter": "nupunkt"}}}


def write(tmp_path, data, name="results.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_round_trip_is_lossless(tmp_path):
    data = complete()
    res = R.load(write(tmp_path, data))
    assert isinstance(res.models["ppo"].win_rate, R.WinRate)
    assert res.models["ppo"].win_rate.wins == 2 and res.models["ppo"].kl == 3.5
    assert res.models["sft"].refusal.by_category["a"].rate == 0.5
    assert res.failure_bins["ppo"]["length_inflation"].mean_ratio == 1.1
    assert res.examples[0].responses["ppo"].rm_score == 1.2
    assert res.to_dict() == data
    assert list(res.to_dict()["models"]["ppo"]) == list(data["models"]["ppo"])  # the same key order
    again = R.load(res.save(tmp_path / "again.json"))
    assert again == res and (tmp_path / "again.json").read_text() == res.to_json()
    assert json.loads(res.to_json()) == data


def test_keys_this_version_does_not_know_are_kept(tmp_path):
    data = complete()
    data["release_gate"] = {"passed": True}
    data["models"]["ppo"]["new_metric"] = 0.3
    data["ifeval"] = IFEVAL
    res = R.load(write(tmp_path, data))
    assert res.ifeval.models["sft"].by_instruction_strict["punctuation:no_comma"].n == 1
    assert res.ifeval.settings.n_prompts == 2
    assert res.to_dict() == data


def test_a_file_without_version_reads_as_version_1(tmp_path):
    data = complete()
    del data["version"]
    res = R.load(write(tmp_path, data))
    assert res.version == 1 and res.to_dict()["version"] == 1


@pytest.mark.parametrize("mutate,expect", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: [1, 2], "must be a JSON object"),
    (lambda d: {**d, "version": 2}, "version 2, written by a newer preflab"),
    (lambda d: {**d, "version": "1"}, "'version' must be a positive integer"),
    (lambda d: {**d, "version": True}, "'version' must be a positive integer"),
    (lambda d: {**d, "models": {"ppo": {**d["models"]["ppo"], "win_rate": "oops"}}}, "models.ppo.win_rate"),
    (lambda d: {**d, "failure_bins": {"ppo": 3}}, "failure_bins.ppo"),
    (lambda d: {**d, "models": {"ppo": {k: v for k, v in d["models"]["ppo"].items() if k != "kl"}}},
     "missing models.ppo.kl"),
    (lambda d: {k: v for k, v in d.items() if k != "settings"}, "missing settings"),
])
def test_a_bad_file_is_one_error_naming_the_file(tmp_path, mutate, expect):
    data = mutate(copy.deepcopy(complete()))
    path = write(tmp_path, data if isinstance(data, str) else json.dumps(data), "bad.json")
    with pytest.raises(DataError) as e:
        R.load(path)
    assert isinstance(e.value, PreflabError)
    assert str(e.value).startswith(f"{path}: ") and expect in str(e.value), str(e.value)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(PreflabError, match="nope.json: no such file"):
        R.load(tmp_path / "nope.json")


def test_partial_files_read_with_absent_keys_as_none(tmp_path):
    path = write(tmp_path, {"reference": "sft", "models": {"ppo": {"kl": 1.0, "win_rate": {"rate": 0.6}}}})
    with pytest.raises(DataError, match="incomplete"):
        R.load(path)
    res = R.load(path, partial=True)
    m = res.models["ppo"]
    assert m.kl == 1.0 and m.win_rate.rate == 0.6 and m.win_rate.lo is None and m.gold is None
    assert res.settings is None and res.failure_bins == {}
    assert res.to_dict() == {"version": 1, "reference": "sft",
                             "models": {"ppo": {"kl": 1.0, "win_rate": {"rate": 0.6}}}}  # nothing invented
    with pytest.raises(DataError, match="malformed"):  # wrong types are still errors
        R.load(write(tmp_path, {"models": {"ppo": {"kl": "far"}}}), partial=True)


# ---------------------------------------------------------------------------------------------
# The readers
# ---------------------------------------------------------------------------------------------


def test_compare_rows_from_typed_and_dict_results(tmp_path):
    from preflab.compare import _row_from_results

    data = complete()
    typed = R.EvalResults.from_dict(data)
    row = _row_from_results(typed, "ppo")
    assert row == _row_from_results(data, "ppo")
    w = data["models"]["ppo"]["win_rate"]
    assert row["gold_winrate"] == w["rate"] and row["gold_ci"] == [w["lo"], w["hi"]] and row["n"] == 4
    assert row["kl"] == 3.5 and row["refuses_harmful"] == 1.0 and row["mean_words"] == 5.25
    with pytest.raises(DataError, match="no model 'rloo'"):
        _row_from_results(typed, "rloo")
    with pytest.raises(DataError, match="cell.json: malformed"):
        _row_from_results({**data, "models": {"ppo": {"kl": []}}}, "ppo", "cell.json")


def test_eval_summary_rows_read_the_types():
    from preflab.evals.cli import SUMMARY_COLUMNS, summary_rows

    rows = summary_rows(R.EvalResults.from_dict(complete()))
    assert [r[0] for r in rows] == ["sft", "ppo"] and all(len(r) == len(SUMMARY_COLUMNS) for r in rows)
    ppo = dict(zip(SUMMARY_COLUMNS, rows[1]))
    assert ppo["gold win [95% CI]"].startswith("62.5% [") and ppo["RM win"] == "62.5%"
    assert ppo["KL"] == "3.500" and ppo["MC1"] == "-" and ppo["refuse harmful"] == "100.0%"


def test_report_draws_a_complete_file_and_explains_a_newer_one(tmp_path):
    from preflab.evals.report import render_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    write(run / "eval", complete())
    page = render_report(run)
    models = page.split('<section id="models">')[1].split("</section>")[0]
    assert "not available" not in models and "ppo" in models and "3.5" in models
    write(run / "eval", {**complete(), "version": 7})
    page = render_report(run)
    models = page.split('<section id="models">')[1].split("</section>")[0]
    assert "not available" in models and "version 7" in models and str(tmp_path) not in models


def test_audit_refuses_a_newer_results_file(tmp_path):
    from preflab.evals.audit import audit

    (tmp_path / "eval").mkdir()
    write(tmp_path / "eval", {**complete(), "version": 2})
    with pytest.raises(DataError, match="results.json: evaluation results of version 2"):
        audit(tmp_path)


# ---------------------------------------------------------------------------------------------
# evaluate() writes them
# ---------------------------------------------------------------------------------------------


def test_evaluate_writes_a_complete_versioned_file_and_keeps_an_ifeval_block(tmp_path):
    from preflab.data.suite import generate_suite
    from preflab.evals.evaluate import evaluate

    ev = [p for p in generate_suite(0, 200) if p.split == "eval"]
    prompts = [next(p for p in ev if p.slice == s) for s in ("ordinary", "harmful", "misconception")]
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"ifeval": IFEVAL}))  # an earlier `preflab eval --ifeval`
    returned = evaluate({"sft": "tiny:", "ppo": "tiny:1"}, prompts, out_dir=out, reward_model="tiny:2",
                        max_new_tokens=4, batch_size=4, progress=False, bf16=False)
    res = R.load(out / "results.json")  # complete: every key evaluate writes is there
    assert res.version == R.VERSION and returned["version"] == R.VERSION
    assert res.to_dict() == returned == json.loads((out / "results.json").read_text())
    assert res.settings.max_new_tokens == 4 and res.n_prompts == 3 and set(res.models) == {"sft", "ppo"}
    assert res.models["sft"].win_rate.rate == 0.5 and res.models["ppo"].rm_win_rate is not None
    assert set(res.failure_bins["ppo"]) == set(M.FAILURE_BINS)
    assert returned["ifeval"] == IFEVAL and res.ifeval.models["sft"].sentence_splitter == "nupunkt"  # kept beside the new evaluation

