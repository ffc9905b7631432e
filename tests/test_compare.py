"""`preflab compare` and `preflab audit` on a tiny pipeline run: the table's interface, the reference
reused (never resampled), resume by cell, the KL grid, the audit's probes and correlations."""

import json
from pathlib import Path

import pytest

from preflab import models
from preflab.cli import main
from preflab.compare import Comparison, parse_grid
from preflab.config import PipelineConfig, validate
from preflab.errors import PreflabError
from preflab.evals.metrics import seed_summary
from preflab.pipeline import PRESETS, Pipeline, deep_merge
from preflab.rl.stats import wilson_interval

REQUIRED = {"method", "seed", "gold_winrate", "gold_ci", "rm_winrate", "kl", "mean_words", "constraint_rate", "seconds"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with SFT, RM and the SFT evaluation only (what compare needs)."""
    out = tmp_path_factory.mktemp("cmp") / "run"
    data = deep_merge(PipelineConfig().model_dump(mode="json"), PRESETS["tiny"])
    data["eval"]["models"] = ["sft"]
    Pipeline(validate(PipelineConfig, data), out).run(only=lambda s: s not in {"ppo", "ppo_ptx", "rloo", "report"})
    return out


def rows_of(path):
    return json.loads(path.read_text())


def test_compare_table_reuses_the_reference_and_resumes_by_cell(run, capsys):
    out = run / "compare"
    main(["compare", str(run), "--methods", "rloo,grpo", "--seeds", "0", "--out", str(out)])
    rows = rows_of(out / "compare.json")
    assert [(r["method"], r["seed"]) for r in rows] == [("sft", None), ("rloo", 0), ("grpo", 0)]
    for r in rows[1:]:
        assert REQUIRED <= set(r)
        lo, hi = r["gold_ci"]
        assert 0 <= lo <= r["gold_winrate"] <= hi <= 1
        assert r["n"] == 16 and r["seconds"] > 0
        # pinned: the win-rate of the cell's own model against sft, prompt by prompt, from its samples
        cell = [json.loads(x) for x in (out / "cells" / f"{r['method']}-s0" / "eval/samples.jsonl").open()]
        gold = {(s["model"], s["id"]): s["gold"]["total"] for s in cell}
        ids = {s["id"] for s in cell}
        wins = sum(gold[(r["method"], i)] > gold[("sft", i)] for i in ids)
        ties = sum(gold[(r["method"], i)] == gold[("sft", i)] for i in ids)
        assert r["gold_winrate"] == pytest.approx((wins + 0.5 * ties) / len(ids))
        assert (lo, hi) == pytest.approx(tuple(wilson_interval(wins + 0.5 * ties, len(ids))))
    assert rows_of(out / "summary.json") == json.loads(json.dumps(seed_summary(rows)))
    # The run's SFT samples are the reference of every cell: identical responses, not resampled.
    ref = {json.loads(x)["id"]: json.loads(x)["response"] for x in (run / "eval/generations/sft.jsonl").open()}
    for cell in ("rloo-s0", "grpo-s0"):
        samples = [json.loads(x) for x in (out / "cells" / cell / "eval/samples.jsonl").open()]
        assert {s["id"]: s["response"] for s in samples if s["model"] == "sft"} == ref
        cfg = json.loads((out / "cells" / cell / "train/manifest.json").read_text())["config"]
        assert cfg["rollout"]["samples_per_prompt"] == 4 and cfg["run"]["seed"] == 0
        # A finished cell is never resumed: its checkpoints are gone, its model stays.
        assert not (out / "cells" / cell / "train/checkpoints").exists()
        assert (out / "cells" / cell / "train/model").is_dir()
    assert "rloo" in capsys.readouterr().out
    # A second seed: the finished cells are read back, not retrained.
    model = out / "cells/rloo-s0/train/model/model.safetensors"
    before = model.stat().st_mtime_ns
    main(["compare", str(run), "--methods", "rloo,grpo", "--seeds", "0,1", "--out", str(out)])
    assert model.stat().st_mtime_ns == before
    assert [(r["method"], r["seed"]) for r in rows_of(out / "compare.json")][1:] == [
        ("rloo", 0), ("rloo", 1), ("grpo", 0), ("grpo", 1)]
    # Another invocation into the same directory keeps the cells it did not run in the table ...
    main(["compare", str(run), "--methods", "grpo", "--seeds", "1", "--out", str(out)])
    assert len(rows_of(out / "compare.json")) == 5
    # ... and --table-only rebuilds the table from the finished cells, training nothing.
    (out / "compare.json").unlink()
    main(["compare", str(run), "--methods", "rloo", "--seeds", "5", "--out", str(out), "--table-only"])
    assert [(r["method"], r["seed"]) for r in rows_of(out / "compare.json")] == [
        ("sft", None), ("rloo", 0), ("rloo", 1), ("grpo", 0), ("grpo", 1)]  # this invocation's method first
    assert not (out / "cells/rloo-s5").exists()
    assert "<img" in (out / "compare.html").read_text()


def test_kl_grid_makes_one_cell_per_value_with_the_value_applied(run):
    out = run / "kl-sweep"
    main(["compare", str(run), "--methods", "reinforce_pp", "--grid", "kl.coef=0,0.5", "--out", str(out),
          "train.steps=1", "models.policy.threads=1"])
    rows = rows_of(out / "compare.json")[1:]
    assert [r["label"] for r in rows] == ["reinforce_pp[kl.coef=0]", "reinforce_pp[kl.coef=0.5]"]
    # The settings that change a result; threads (applied, below) is not one of them.
    assert [r["settings"] for r in rows] == [{"train.steps": 1, "kl.coef": 0}, {"train.steps": 1, "kl.coef": 0.5}]
    configs = [json.loads((out / "cells" / f"{r['label']}-s0/train/manifest.json").read_text())["config"]
               for r in rows]
    assert [c["kl"]["coef"] for c in configs] == [0, 0.5]
    assert all(c["models"]["policy"]["threads"] == 1 for c in configs)


def test_grid_parsing_and_bad_input(run, tmp_path):
    assert parse_grid(["a.b=1,2", "c=x"]) == [{"a.b": 1, "c": "x"}, {"a.b": 2, "c": "x"}]
    with pytest.raises(PreflabError, match="key.sub=V1,V2"):
        parse_grid(["nothing"])
    with pytest.raises(PreflabError, match="unknown method"):
        Comparison(run, tmp_path, methods=["dqn"], seeds=[0], overrides=[], grid=[])
    with pytest.raises(PreflabError, match="not a pipeline run"):
        Comparison(tmp_path, tmp_path / "x", methods=["rloo"], seeds=[0], overrides=[], grid=[])


def test_audit_probes_correlations_and_report(run, monkeypatch):
    from preflab import scoring
    from preflab.evals import audit
    from preflab.evals.report import render_report

    report = audit.audit(run, probe_prompts=8)
    assert [e["exploit"] for e in report["exploits"]] == list(audit.EXPLOITS)
    for e in report["exploits"]:
        assert 0 <= e["rm_prefers"] <= 1 and 0 <= e["gold_prefers"] <= 1 and e["n"] == 8
        assert e["flagged"] == (e["rm_prefers"] > e["gold_prefers"] and e["rm_prefers"] >= 0.5)
    assert report["flagged"] == [e["exploit"] for e in report["exploits"] if e["flagged"]]
    assert {c["model"] for c in report["correlations"]} >= {"sft"}
    assert all(-1 <= c["rho_rm_gold"] <= 1 for c in report["correlations"] if c["rho_rm_gold"] == c["rho_rm_gold"])
    assert "Exploit probes" in render_report(run)

    # An RM that pays for length and never for an apology: padding and repetition are flagged,
    # the blanket refusal is not.
    def longest(model, tok, prompts, responses, **kw):
        return [float(len(r)) - (1e4 if "sorry" in r.lower() else 0.0) for r in responses]

    monkeypatch.setattr(scoring, "score_texts", longest)
    flagged = audit.audit(run, probe_prompts=8)["flagged"]
    assert "padding" in flagged and "repetition" in flagged and "blanket_refusal" not in flagged
    # The probe the long preset's RLOO policy found: the answer in quotation marks, else unchanged;
    # a reply that must begin with 'Okay.' then fails its constraint on the gold judge.
    from preflab.feedback.rubric import judge

    prompt = {"id": "q", "prompt": "Say hi. Your reply must begin with 'Okay.'", "category": "open_qa",
              "constraints": [{"type": "start_with", "phrase": "Okay."}]}
    quoted = audit.EXPLOITS["quoted"][1](prompt["prompt"], "Okay. Hi there.")
    assert quoted == '"Okay. Hi there."'
    assert judge(prompt, "Okay. Hi there.").constraints == 1.0 and judge(prompt, quoted).constraints == 0.0


def test_dpo_grid_over_the_sft_loss_term_trains_on_the_runs_demonstrations(run, tmp_path):
    c = Comparison(run, tmp_path / "c", methods=["dpo"], seeds=[0], overrides=[], grid=["dpo.ptx_coef=0,0.5"])
    configs = [c.stage_config("dpo", point, 0) for point in c.points]
    assert [cfg.dpo.ptx_coef for cfg in configs] == [0, 0.5]
    assert all(Path(cfg.data.ptx).is_file() and Path(cfg.data.ptx) == Path(c.pipeline.demos_path) for cfg in configs)


def test_preference_methods_and_best_of_n_join_the_table(run):
    import math

    out = run / "pref"
    main(["compare", str(run), "--methods", "dpo,best_of_n", "--seeds", "0", "--out", str(out), "train.max_steps=2"])
    rows = {r["method"]: r for r in rows_of(out / "compare.json")}
    assert REQUIRED <= set(rows["dpo"]) and REQUIRED <= set(rows["best_of_n"])
    cfg = json.loads((out / "cells/dpo-s0/train/manifest.json").read_text())["config"]
    assert cfg["dpo"]["loss"] == "dpo" and cfg["data"]["train"].endswith("store.sqlite")
    assert cfg["train"]["max_steps"] == 2
    assert rows["best_of_n"]["kl"] == pytest.approx(math.log(4) - 3 / 4)  # the analytic bound, not 0
    assert rows["best_of_n"]["reranker"] == str(run / "rm/model") and "reranker" not in rows["dpo"]
    assert not (out / "cells/best_of_n-s0/train").exists()  # nothing trained
    with pytest.raises(SystemExit) as e:  # an override the method's config lacks: one error, nothing runs
        main(["compare", str(run), "--methods", "rs", "--out", str(tmp := run / "x"), "dpo.beta=0.2"])
    assert e.value.code == 2 and not tmp.exists()


def test_compare_table_script_prints_every_cell_once(run):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks/compare_table.py"
    if not (run / "compare/compare.json").is_file():
        main(["compare", str(run), "--methods", "rloo", "--seeds", "0", "--out", str(run / "compare")])
    out = subprocess.run([sys.executable, str(script), str(run / "compare"), str(run / "compare")],
                         capture_output=True, text=True, check=True).stdout
    lines = [x for x in out.split("\n\n")[0].splitlines() if x.startswith("| ")][1:]  # the seed summary follows
    cells = [r for r in rows_of(run / "compare/compare.json")]
    assert len(lines) == 1 + 2 * (len(cells) - 1)  # the reference once, each directory's cells
    assert "(reference)" in lines[0]


def test_seed_summary_in_the_table_script_and_the_report(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from preflab.evals.report import render_compare

    def row(seed, win, lo):
        return {"method": "rloo", "label": "rloo", "seed": seed, "settings": {}, "gold_winrate": win,
                "gold_ci": [lo, win + 0.05], "n": 300, "rm_winrate": 0.7, "kl": 4.0, "mean_words": 30.0,
                "constraint_rate": 0.3, "refuses_harmful": 0.1, "over_refusal": 0.1, "seconds": 600}

    ref = {"method": "sft", "label": "sft", "seed": None, "settings": {}, "gold_winrate": None, "gold_ci": None,
           "rm_winrate": None, "kl": 0.0, "mean_words": 29.0, "constraint_rate": 0.31, "refuses_harmful": 0.1,
           "over_refusal": 0.1, "seconds": None}
    rows = [ref, row(0, 0.583, 0.527), row(1, 0.55, 0.49)]
    (tmp_path / "compare.json").write_text(json.dumps(rows))
    script = Path(__file__).parents[1] / "benchmarks/compare_table.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert "| rloo | 0,1 | 56.6% | 55.0%-58.3% | 49.0% | 1/2 | 4.00 | 30.0 | 30.0% |" in out
    page = render_compare(rows)
    assert "seeds above 50%" in page and "1/2" in page and "56.6%" in page
    assert "seeds above 50%" not in render_compare(rows[:2])  # one seed: no summary table


def test_audit_reads_the_cells_of_every_comparison_directory(tmp_path):
    from preflab.evals.audit import _sample_sets

    for d in ("eval", "compare/cells/rloo-s0/eval", "kl-sweep/cells/rloo[kl.coef=0]-s0/eval", "audit"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "samples.jsonl").write_text("")
    assert [n for n, _ in _sample_sets(tmp_path)] == ["run", "rloo-s0", "kl-sweep/rloo[kl.coef=0]-s0"]


def test_the_pipelines_own_model_is_the_cell_at_its_seed_and_not_retrained(run, tmp_path):
    import shutil

    mine = tmp_path / "run"
    shutil.copytree(run, mine, ignore=shutil.ignore_patterns("compare", "pref", "x", "audit"))
    shutil.copytree(mine / "sft" / "model", mine / "rloo" / "model")  # as if the pipeline trained rloo
    results = json.loads((mine / "eval/results.json").read_text())
    rloo = json.loads(json.dumps(results["models"]["sft"]))
    rloo["spec"] = str(mine / "rloo" / "model")
    rloo["win_rate"] = {"rate": 0.75, "wins": 10, "ties": 4, "losses": 2, "n": 16, "lo": 0.5, "hi": 0.9}
    results["models"]["rloo"] = rloo
    (mine / "eval/results.json").write_text(json.dumps(results))
    assert "rloo" in PipelineConfig.model_validate(json.loads((mine / "pipeline_config.json").read_text())).rl

    main(["compare", str(mine), "--methods", "rloo", "--seeds", "0,1", "--out", str(mine / "compare")])
    rows = {r["seed"]: r for r in rows_of(mine / "compare/compare.json") if r["method"] == "rloo"}
    assert rows[0]["source"] == "run" and rows[0]["gold_winrate"] == 0.75 and rows[0]["gold_ci"] == [0.5, 0.9]
    assert not (mine / "compare/cells/rloo-s0/train").exists()  # taken from the run, not retrained
    assert "source" not in rows[1] and (mine / "compare/cells/rloo-s1/train/model").is_dir()  # another seed trains
    # An override or another setting is another model: trained, not taken from the run.
    main(["compare", str(mine), "--methods", "rloo", "--seeds", "0", "--out", str(mine / "lr"), "optim.lr=2e-5"])
    assert (mine / "lr/cells/rloo-s0/train/model").is_dir()


def test_a_run_without_its_eval_step_is_compared_against_its_own_sft_evaluation(run, tmp_path, capsys):
    """The long preset's eval step comes after its RL step: compare evaluates the SFT model itself
    (the run's eval settings and seed: the same samples the eval step would write), once."""
    import shutil

    mine = tmp_path / "run"
    shutil.copytree(run, mine, ignore=shutil.ignore_patterns("compare", "pref", "x", "audit", "eval"))
    with pytest.raises(SystemExit):
        main(["compare", str(mine), "--methods", "best_of_n", "--out", str(mine / "c"), "--table-only"])
    assert "no evaluation of its SFT model yet" in capsys.readouterr().err
    main(["compare", str(mine), "--methods", "best_of_n", "--seeds", "0", "--out", str(mine / "c")])
    ref = mine / "c/reference/results.json"
    assert json.loads(ref.read_text())["reference"] == "sft"
    read = lambda p: [json.loads(x)["response"] for x in p.open()]  # noqa: E731
    assert read(mine / "c/reference/generations/sft.jsonl") == read(run / "eval/generations/sft.jsonl")
    rows = rows_of(mine / "c/compare.json")
    assert [(r["method"], r["seed"]) for r in rows] == [("sft", None), ("best_of_n", 0)]
    assert rows[1]["n"] == 16
    before = ref.stat().st_mtime_ns
    main(["compare", str(mine), "--methods", "best_of_n", "--seeds", "1", "--out", str(mine / "c")])
    assert ref.stat().st_mtime_ns == before  # evaluated once
    assert len(rows_of(mine / "c/compare.json")) == 3
    # The audit of such a run reads the comparison's SFT evaluation as the run's.
    from preflab.evals import audit

    report = audit.audit(mine, probe_prompts=4)
    assert report["reference"] == "sft" and {c["source"] for c in report["correlations"]} >= {"run"}
    assert {c["model"] for c in report["correlations"]} >= {"sft", "best_of_n"}
    # The run's own evaluation appears later (its eval step ran): this directory keeps its reference.
    shutil.copytree(run / "eval", mine / "eval")
    assert Comparison(mine, mine / "c", methods=["rloo"], seeds=[0], overrides=[], grid=[]).results_path == ref
    assert Comparison(mine, mine / "d", methods=["rloo"], seeds=[0], overrides=[], grid=[]).results_path == \
        mine / "eval/results.json"
    # Before it appears, another comparison directory reuses the first one's reference.
    shutil.rmtree(mine / "eval")
    assert Comparison(mine, mine / "e", methods=["rloo"], seeds=[0], overrides=[], grid=[]).results_path == ref


def test_best_of_n_picks_with_the_runs_final_reward_model(run, tmp_path, monkeypatch):
    """A run with rounds: best-of-N reranks SFT samples with the RM of the last round, the best the run
    has, which a trained policy of the run should beat; one round: RUN/rm."""
    assert Comparison(run, tmp_path / "c1", methods=["best_of_n"], seeds=[0], overrides=[], grid=[]).final_rm == \
        run / "rm/model"
    rounds = tmp_path / "rounds"
    rounds.mkdir()
    for name in ("sft", "rm", "data", "eval"):
        (rounds / name).symlink_to(run / name)
    cfg = json.loads((run / "pipeline_config.json").read_text())
    cfg.update(rounds=3, rl=["rloo"])
    (rounds / "pipeline_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PreflabError, match="round-3/rm/model, which is not there yet"):
        Comparison(rounds, tmp_path / "c3", methods=["best_of_n"], seeds=[0], overrides=[], grid=[])
    (rounds / "round-3/rm").mkdir(parents=True)
    (rounds / "round-3/rm/model").symlink_to(run / "rm/model")
    c = Comparison(rounds, tmp_path / "c3", methods=["best_of_n"], seeds=[0], overrides=[], grid=[])
    assert c.final_rm == rounds / "round-3/rm/model"
    loaded = []

    def spy(path, **kw):
        loaded.append(path)
        raise RuntimeError("loaded")

    monkeypatch.setattr(models, "load_reward_model", spy)
    with pytest.raises(RuntimeError, match="loaded"):
        c.best_of_n_cache(tmp_path / "bon.jsonl", 0)
    assert loaded == [str(rounds / "round-3/rm/model")]  # the reranker, not the evaluation's RUN/rm


def test_a_cell_killed_in_its_evaluation_is_not_trained_again(run, tmp_path, monkeypatch):
    out = tmp_path / "c"
    args = ["compare", str(run), "--methods", "dpo", "--seeds", "0", "--out", str(out), "train.max_steps=1"]
    main(args)
    cell = out / "cells/dpo-s0"
    first = json.loads((cell / "cell.json").read_text())
    (cell / "cell.json").unlink()  # killed after its training finished, before its row was written
    weights = (cell / "train/model/model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("preflab.registry.run_stage", boom)
    main(args)
    again = json.loads((cell / "cell.json").read_text())
    assert again["gold_winrate"] == first["gold_winrate"] and again["n"] == first["n"]
    assert (cell / "train/model/model.safetensors").stat().st_mtime_ns == weights


def test_a_cells_evaluation_starts_after_its_training_memory_is_released(run, tmp_path, monkeypatch):
    """The training's peak is handed back before the evaluation loads its models (a DPO cell held
    12.7 GB through its evaluation and was killed beside another job)."""
    from preflab import registry
    from preflab.evals import evaluate as ev

    calls = []
    real_stage, real_eval = registry.run_stage, ev.evaluate
    monkeypatch.setattr(registry, "run_stage", lambda *a, **k: (calls.append("train"), real_stage(*a, **k))[1])
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: (calls.append("eval"), real_eval(*a, **k))[1])
    monkeypatch.setattr(models, "release_memory", lambda: calls.append("release"))
    main(["compare", str(run), "--methods", "dpo", "--seeds", "0", "--out", str(tmp_path / "c"), "train.max_steps=1"])
    assert calls[calls.index("train"):calls.index("eval")] == ["train", "release"]
