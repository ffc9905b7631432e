"""The HTML report from a synthetic run directory: every section, self-contained, and tolerant of
missing or malformed files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from preflab.evals.report import SECTIONS, render_report, write_report


def _model(rate: float, kl: float, gold: float, words: float) -> dict:
    win = {"rate": rate, "wins": 5, "ties": 2, "losses": 3, "n": 10, "lo": rate - 0.2, "hi": rate + 0.2}
    return {
        "spec": "x", "n": 10, "gold": {"total": gold}, "win_rate": win, "rm_win_rate": {**win, "rate": 0.7},
        "rm_score": 0.3, "kl": kl, "length_words": {"mean": words, "q10": 5, "q50": words, "q90": 2 * words,
                                                      "hist": {"edges": [0, 10, 20], "counts": [4, 6]}},
        "length_tokens": {"mean": 1.3 * words, "q90": 3 * words}, "no_eos_fraction": 0.1, "distinct_2": 0.8,
        "toxicity_proxy": 0.0, "mc1": {"mc1": 0.5, "n": 2},
        "refusal": {"by_slice": {"harmful": {"rate": 0.8, "n": 5}, "alarming_harmless": {"rate": 0.2, "n": 5}},
                    "by_category": {"open_qa": {"rate": 0.3, "n": 10}}, "harmful": 0.8, "over_refusal": 0.2,
                    "ordinary": 0.0},
        "metadata": {"attempts": 0.9, "follows_constraints": 0.5, "appropriate": 0.8},
    }


def make_run(root: Path, complete: bool = True) -> Path:
    """A run directory with small fake files of every kind the report reads."""
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    bins = {"instruction_miss": {"metric": 0.4, "count": 2, "n": 5, "description": "misses a constraint",
                                 "examples": [{"id": "p1", "prompt": "Write <b>3</b> words.",
                                               "response": "one two three four", "gold_total": 0.2}]},
            "length_inflation": {"metric": 0.1, "count": 1, "n": 10, "mean_ratio": 1.2, "description": "longer",
                                 "examples": []},
            "policy_inconsistency": {"metric": 0.5, "count": 1, "n": 2, "description": "paraphrases differ",
                                     "examples": [{"group": "g", "differs_in": "refusal", "members": [
                                         {"id": "a", "prompt": "p", "response": "I can't.", "refused": True}]}]}}
    results = {"reference": "sft", "n_prompts": 10, "settings": {"temperature": 0.7, "max_new_tokens": 32},
               "models": {"sft": _model(0.5, 0.0, 0.4, 12), "ppo": _model(0.65, 2.1, 0.5, 20),
                          "ppo_ptx": _model(0.6, 1.5, 0.48, 15)},
               "failure_bins": {"sft": bins, "ppo": bins, "ppo_ptx": bins}, "examples": []}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    samples = [{"model": m, "id": f"p{i}", "prompt": f"prompt {i} <script>alert(1)</script>",
                "response": f"answer {i} " * (i + 1), "words": 2 * (i + 1), "rm_score": i * (2 if m == "ppo" else 1),
                "slice": ("ordinary", "harmful", "alarming_harmless")[i % 3],
                "gold": {"total": 0.1 * (i % 10), "attempts": 1.0, "constraints": 1.0, "refusal": 1.0,
                         "truthful": 1.0, "degenerate": 0.0, "constraints_passed": i % 2 == 0}}
               for m in ("sft", "ppo", "ppo_ptx") for i in range(12)]
    (run / "eval" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    if not complete:
        return run
    for name in ("ppo", "ppo_ptx"):
        (run / name).mkdir()
        rows = [{"step": s, "objective/score": 0.1 * s, "objective/kl": 0.2 * s, "objective/kl_coef": 0.05 - 0.001 * s,
                 "response/length_mean": 20 + s, "response/no_eos_fraction": 0.1} for s in range(1, 6)]
        (run / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{torn")
    (run / "rm" / "eval").mkdir(parents=True)
    rel = [{"lo": 0.5 * b, "hi": 0.5 * (b + 1), "mid": 0.5 * b + 0.25, "count": 10 - b, "accuracy": 0.55 + 0.1 * b,
            "expected": 0.6} for b in range(4)] + [{"lo": 2, "hi": 2.5, "mid": 2.25, "count": 0, "accuracy": None}]
    (run / "rm" / "eval" / "rm_eval.json").write_text(json.dumps(
        {"accuracy": 0.7, "n_pairs": 120, "ece": {"ece": 0.04, "mce": 0.1}, "reliability": rel,
         "temperature": {"T": 1.3, "ece_before": 0.05, "ece_after": 0.02}}))
    (run / "agreement.json").write_text('{"groups": 8, "pairwise": 0.74, "kendalls_w": 0.8, "fleiss_kappa": NaN, '
                                        '"pairwise_by_labeler_pair": {"a|b": 0.7, "a|c": 0.78}}')
    (run / "pipeline.json").write_text(json.dumps({"steps": [{"step": "sft", "seconds": 12.5},
                                                             {"step": "rm", "seconds": 4.0}]}))
    (run / "sft").mkdir(exist_ok=True)
    (run / "sft" / "manifest.json").write_text(json.dumps({
        "stage": "sft", "status": "finished", "seed": 3, "git_commit": "0123456789abcdef", "host": "box",
        "versions": {"torch": "2.13.0", "transformers": "5.24"}, "started_at": "t0", "finished_at": "t1"}))
    (run / "pipeline_config.json").write_text(json.dumps({"seed": 3, "rl": ["ppo", "ppo_ptx"]}))
    (run / "compare").mkdir()
    cell = {"gold_ci": [0.45, 0.62], "n": 300, "mean_words": 30.0, "constraint_rate": 0.3, "refuses_harmful": 0.2,
            "over_refusal": 0.05, "gold_score": 0.6, "rm_score": 0.4, "settings": {}}
    (run / "compare" / "compare.json").write_text(json.dumps([
        {**cell, "method": "sft", "label": "sft", "seed": None, "gold_winrate": None, "gold_ci": None,
         "rm_winrate": None, "kl": 0.0, "seconds": None},
        {**cell, "method": "rloo", "label": "rloo", "seed": 0, "gold_winrate": 0.537, "rm_winrate": 0.6, "kl": 1.2,
         "seconds": 400.0},
        {**cell, "method": "rloo", "label": "rloo", "seed": 1, "gold_winrate": 0.512, "rm_winrate": 0.58, "kl": 1.0,
         "seconds": 410.0}]))
    (run / "audit").mkdir()
    (run / "audit" / "audit.json").write_text(json.dumps({
        "flagged": ["padding"], "top_responses": [],
        "correlations": [{"source": "run", "model": "ppo", "n": 12, "kl": 2.1, "rho_rm_gold": 0.3,
                          "rho_rm_length": 0.6, "rho_gold_length": 0.1}],
        "exploits": [{"exploit": "padding", "description": "filler", "n": 60, "rm_prefers": 0.8,
                      "rm_prefers_ci": [0.68, 0.88], "gold_prefers": 0.1, "rm_score_delta": 0.5, "gold_delta": -0.1,
                      "flagged": True}]}))
    return run


def _section(page: str, anchor: str) -> str:
    m = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert m, anchor
    return m.group(1)


def test_full_report_has_every_section_and_is_self_contained(tmp_path):
    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    for anchor, title, _ in SECTIONS:
        body = _section(page, anchor)
        assert f"<h2>{title}</h2>" in page
        assert "not available" not in body, (anchor, body[:300])
    # win-rate, PPO, gold-KL, lengths, refusals, RM reliability, agreement, compare
    assert page.count('src="data:image/png;base64,') == 8
    assert "53.7%" in _section(page, "compare") and "padding" in _section(page, "audit")
    prov = _section(page, "provenance")
    assert "0123456789ab" in prov and "2.13.0" in prov and "box" in prov and "pipeline config" in prov
    assert "<script" not in page and "http://" not in page and "https://" not in page  # offline, escaped
    assert "&lt;script&gt;" in page
    top = _section(page, "top-reward")
    assert top.count("<tr>") == 1 + 10  # header + the 10 highest RM scores
    assert "ppo" in top and ">22<" in top  # 2 * 11, the best ppo sample
    assert "sft</td>" not in top  # only PPO models
    timings = _section(page, "timings")
    assert "sft" in timings and "16.5" in timings


def test_every_comparison_directory_of_the_run_joins_the_compare_section(tmp_path):
    run = make_run(tmp_path)
    rows = json.loads((run / "compare" / "compare.json").read_text())
    sweep = [rows[0], {**rows[1], "label": "rloo[kl.coef=0]", "settings": {"kl.coef": 0}, "gold_winrate": 0.471,
                       "kl": 9.5}]
    (run / "kl-sweep").mkdir()
    (run / "kl-sweep" / "compare.json").write_text(json.dumps(sweep))
    body = _section(render_report(run), "compare")
    assert ">comparison</th>" in body and "kl-sweep" in body and "rloo[kl.coef=0]" in body
    assert body.count("(reference)") == 1  # the SFT row once
    assert "47.1%" in body and "53.7%" in body
    assert "seeds above 50%" in body and "0/2" in body  # compare/'s two rloo seeds, both intervals contain 50%


def test_missing_files_give_not_available_sections(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty).read_text()
    for anchor, _, _ in SECTIONS:
        assert "not available" in _section(page, anchor), anchor
    partial = make_run(tmp_path, complete=False)
    page = render_report(partial)
    for anchor in ("ppo-curves", "rm-reliability", "agreement", "timings"):
        assert "not available" in _section(page, anchor), anchor
    for anchor in ("models", "win-rate", "gold-vs-kl", "lengths", "refusals", "failure-bins", "top-reward"):
        assert "not available" not in _section(page, anchor), anchor


def test_malformed_files_do_not_crash(tmp_path):
    run = tmp_path / "bad"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps(
        {"reference": "sft", "models": {"ppo": {"win_rate": "oops", "refusal": []}}, "failure_bins": {"ppo": 3}}))
    (run / "eval" / "samples.jsonl").write_text("not json\n[1, 2]\n")
    (run / "rm" / "eval").mkdir(parents=True)
    (run / "rm" / "eval" / "rm_eval.json").write_text('{"reliability": "nope"}')
    (run / "pipeline.json").write_text("[1, 2")
    page = write_report(run).read_text()
    assert page.count("<section") == len(SECTIONS)
    assert "not available" in page


def test_report_command(tmp_path):
    from preflab.cli import app

    run = make_run(tmp_path)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "report.html").is_file() and "report.html" in r.output


def test_ifeval_block_is_rendered_under_the_models_table(tmp_path):
    run = make_run(tmp_path)
    results = json.loads((run / "eval" / "results.json").read_text())
    results["ifeval"] = {"settings": {"n_prompts": 3}, "models": {"sft": {
        "n_prompts": 3, "n_instructions": 5, "prompt_level_strict": 1 / 3, "instruction_level_strict": 0.6,
        "prompt_level_loose": 2 / 3, "instruction_level_loose": 0.8, "sentence_splitter": "nupunkt"}}}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    body = _section(render_report(run), "models")
    assert "IFEval" in body and "33.3%" in body and "60.0%" in body and "nupunkt" in body


def test_alignment_tax_against_hand_counts(tmp_path):
    """4 constrained prompts (SFT follows 3, the model 1), 4 harmful (SFT refuses 4, the model 2),
    2 alarming-but-harmless (SFT refuses 0, the model 1): rates, differences and Newcombe intervals."""
    from preflab.evals.metrics import alignment_tax
    from preflab.rl.stats import difference_interval

    no, yes = "I can't help with that.", "Sure, here it is."

    def row(model, i, slice_, response, constraints=None):
        gold = {"constraints": constraints if constraints is not None else 1.0,
                "constraints_passed": constraints is not None}
        return {"model": model, "id": f"p{i}", "slice": slice_, "response": response, "gold": gold}

    samples = [row("sft", i, "ordinary", yes, c) for i, c in enumerate([1.0, 1.0, 1.0, 0.5])]
    samples += [row("rl", i, "ordinary", yes, c) for i, c in enumerate([1.0, 0.5, 0.0, 0.5])]
    samples += [row("sft", 10 + i, "harmful", no) for i in range(4)]
    samples += [row("rl", 10 + i, "harmful", no if i < 2 else yes) for i in range(4)]
    samples += [row("sft", 20 + i, "alarming_harmless", yes) for i in range(2)]
    samples += [row("rl", 20 + i, "alarming_harmless", no if i == 0 else yes) for i in range(2)]
    tax = alignment_tax(samples, "sft")["rl"]
    assert {k: (v["model"], v["reference"], v["diff"], v["n"]) for k, v in tax.items()} == {
        "follows_constraints": (0.25, 0.75, -0.5, 4), "refuses_harmful": (0.5, 1.0, -0.5, 4),
        "over_refusal": (0.5, 0.0, 0.5, 2)}
    assert (tax["refuses_harmful"]["lo"], tax["refuses_harmful"]["hi"]) == tuple(difference_interval(2, 4, 4, 4))
    run = make_run(tmp_path)
    (run / "eval" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    results = json.loads((run / "eval" / "results.json").read_text())
    results["models"] = {"sft": results["models"]["sft"], "rl": results["models"]["ppo"]}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    section = _section(render_report(run), "alignment-tax")
    assert "75.0% vs 25.0%" not in section and "25.0% vs 75.0%: -50.0 pts" in section
    assert "50.0% vs 0.0%: +50.0 pts" in section


def test_rl_curves_name_only_trained_methods_without_metrics(tmp_path):
    """A run that trained rloo alone: its curves are drawn and no untrained method is 'not available'."""
    run = make_run(tmp_path)
    (run / "pipeline_config.json").write_text(json.dumps({"seed": 3, "rl": ["rloo", "grpo"]}))
    (run / "rloo").mkdir()
    (run / "rloo" / "metrics.jsonl").write_text((run / "ppo" / "metrics.jsonl").read_text())
    section = _section(render_report(run), "ppo-curves")
    assert "<img" in section and "not available" not in section
    assert "grpo: no metrics.jsonl" in section and "ppo_ptx" not in section and "ppo:" not in section
