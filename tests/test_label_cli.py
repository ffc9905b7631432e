"""`preflab data label | agreement | demos` end to end with a tiny random model."""

from __future__ import annotations

import json

import pytest

from preflab.cli import main
from preflab.data.suite import write_suite
from preflab.feedback.store import PreferenceStore


def run(argv: list[str]) -> None:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), f"preflab {' '.join(argv)} exited with {e.code}"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "prompts.jsonl"
    write_suite(path, seed=0, n=400)
    return path


def test_label_then_agreement_then_export(prompts, tmp_path, capsys, store_spec):
    db = store_spec  # a SQLite file, then a postgresql:// URL (skipped where PostgreSQL cannot run)
    run(["data", "label", "--model", "tiny:", "--prompts", str(prompts), "--store", str(db), "--split", "rm",
         "--k", "4", "--limit", "6", "--max-new-tokens", "8", "--overlap", "0.34", "--seed", "1"])
    out = capsys.readouterr().out
    assert "6 prompts x 4 candidates" in out
    with PreferenceStore(db) as store:
        counts = store.counts()
        rankings = store.rankings()
        assert counts["prompts"] == 6 and counts["candidates"] == 24
        assert counts["queue_pending"] == 0 and counts["queue_assigned"] == 0
        # 2 of 6 prompts (round(0.34 * 6)) ranked by three labelers, the rest by one
        assert counts["rankings"] == 4 + 2 * 3 == counts["queue_done"]
        assert {r.split for r in rankings} == {"rm"}
        assert all(r.models == ["tiny:"] * 4 and r.time_s > 0 for r in rankings)
        per_prompt = {}
        for r in rankings:
            per_prompt.setdefault(r.prompt_id, set()).add(r.labeler)
        assert sorted(len(v) for v in per_prompt.values()) == [1, 1, 1, 1, 3, 3]
        assert len({r.labeler for r in rankings}) >= 3

    report = tmp_path / "agreement.json"
    run(["data", "agreement", "--store", str(db), "--json", str(report)])
    s = json.loads(report.read_text())
    assert s["groups"] == 2 and s["rankings"] == 10 and s["labelers"] >= 3
    assert "pairwise agreement" in capsys.readouterr().out

    kway = tmp_path / "kway.jsonl"
    run(["data", "export", "--store", str(db), "--format", "kway", "--out", str(kway)])
    rows = [json.loads(x) for x in kway.read_text().splitlines()]
    assert rows and all(len(r["responses"]) == 4 for r in rows)


def test_agreement_panel_on_synthetic_candidates(prompts, tmp_path):
    out = tmp_path / "panel.json"
    run(["data", "agreement", "--panel", "--prompts", str(prompts), "--limit", "40", "--json", str(out)])
    s = json.loads(out.read_text())
    assert s["groups"] == 40 and s["labelers"] == 5 and 0.5 < s["pairwise"] < 0.95


def test_demos_reference_mode(prompts, tmp_path):
    out = tmp_path / "demos.jsonl"
    run(["data", "demos", "--prompts", str(prompts), "--out", str(out), "--mode", "reference", "--limit", "10"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 10 and all(r["response"] and r["source"] in ("reference", "refusal") for r in rows)


def test_errors_are_one_line(prompts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "demos", "--prompts", str(prompts), "--out", str(tmp_path / "x.jsonl"), "--mode", "mixed"])
    assert e.value.code == 2
    assert "give --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "agreement", "--panel"])
    assert e.value.code == 2


def test_killed_labeling_resumes_its_samples_and_equals_an_uninterrupted_run(prompts, tmp_path, monkeypatch):
    """The pipeline's labeling appends each generated batch to a samples cache; after a kill the
    rerun samples only the missing batches, and the store ends up as an uninterrupted run's."""
    from preflab.data.chat import read_prompts
    from preflab.data.suite.schema import SuitePrompt
    from preflab.feedback.label_cli import collect_rankings
    from preflab.rollout import HFGenerator

    rows = [SuitePrompt.from_dict(r) for r in read_prompts(prompts)[:6]]
    kw = dict(model_spec="tiny:", prompts=rows, k=2, max_new_tokens=8, batch_size=4, seed=3)

    def texts(db):
        with PreferenceStore(db) as store:
            return [t for pid in range(1, 7) for _, t, _ in store.candidates(pid)]

    collect_rankings(store_path=tmp_path / "a.sqlite", samples_cache=tmp_path / "a.jsonl", **kw)
    calls, kill_at = [], [2]
    real = HFGenerator.generate

    def generate(self, *a, **k):
        if len(calls) == kill_at[0]:
            raise RuntimeError("killed")  # after two of the three batches of 4
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(HFGenerator, "generate", generate)
    with pytest.raises(RuntimeError, match="killed"):
        collect_rankings(store_path=tmp_path / "b.partial", samples_cache=tmp_path / "b.jsonl", **kw)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 1 + 2  # key line and two batches
    calls.clear()
    kill_at[0] = None
    collect_rankings(store_path=tmp_path / "b.sqlite", samples_cache=tmp_path / "b.jsonl", **kw)
    assert len(calls) == 1  # only the missing batch
    assert texts(tmp_path / "b.sqlite") == texts(tmp_path / "a.sqlite")
    assert len(set(texts(tmp_path / "a.sqlite"))) > 6  # sampled text, not one repeated string
    calls.clear()  # another seed: the cache's key differs and everything is sampled afresh
    collect_rankings(store_path=tmp_path / "c.sqlite", samples_cache=tmp_path / "b.jsonl", **{**kw, "seed": 4})
    assert len(calls) == 3
