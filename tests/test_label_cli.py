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


def test_label_then_agreement_then_export(prompts, tmp_path, capsys):
    db = tmp_path / "prefs.sqlite"
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
