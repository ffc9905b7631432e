import json
import sys
import types
from pathlib import Path

import pytest

from helpers import run_cli
from preflab.data.io import (
    export_hf,
    load_into_store,
    parse_hh_transcript,
    read_hh_rlhf,
    read_label_studio,
    read_preferences,
    read_rankings,
    read_trl,
    read_trl_conversational,
    read_ultrafeedback,
    split_hh,
    write_pairs,
    write_rankings,
)
from preflab.data.jsonl import read_jsonl
from preflab.errors import DataError, PreflabError
from preflab.feedback.pairs import flatten_pairs, rankings_to_pairs, read_kway, write_kway
from preflab.feedback.store import PreferenceStore

FIX = Path(__file__).parent / "fixtures"




# -- readers ---------------------------------------------------------------------------------


def test_hh_rlhf_split_prompt_and_responses():
    got = read_hh_rlhf(FIX / "hh_rlhf.jsonl")
    assert len(got.rankings) == 4 and got.skipped == []
    r = got.rankings[1]
    assert r.prompt == "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?\n\nAssistant:"
    assert r.candidates == ["Rome is the capital of Italy.", "I am not sure."] and r.order == [[0], [1]]
    assert r.meta["prompt_meta"]["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    # the transcript is rebuilt exactly from prompt + " " + response
    raw = [json.loads(line) for line in (FIX / "hh_rlhf.jsonl").read_text().splitlines()]
    for row, rk in zip(raw, got.rankings):
        assert rk.prompt + " " + rk.candidates[0] == row["chosen"]
        assert rk.prompt + " " + rk.candidates[1] == row["rejected"]


def test_split_hh_errors():
    with pytest.raises(ValueError, match="share no prefix"):
        split_hh("\n\nHuman: a", "\n\nHuman: b")
    assert parse_hh_transcript("\n\nHuman: hi\n\nAssistant:") == [{"role": "user", "content": "hi"}]


def test_ultrafeedback_scores_to_tiered_rankings():
    got = read_ultrafeedback(FIX / "ultrafeedback.jsonl")
    r0, r1 = got.rankings
    assert r0.order == [[0, 2], [1], [3]]  # overall 7.5, 3.0, 7.5, 1.0: the two 7.5s tie
    assert r0.models == ["m1", "m2", "m3", "m4"] and r0.meta["category"] == "evol_instruct"
    assert r1.order == [[0], [2], [1]]
    assert len(got.skipped) == 1 and "ultrafeedback.jsonl:3" in got.skipped[0]
    fine = read_ultrafeedback(FIX / "ultrafeedback.jsonl", score="fine-grained_score").rankings[0]
    assert fine.order == [[2], [0], [1], [3]]
    helpful = read_ultrafeedback(FIX / "ultrafeedback.jsonl", score="helpfulness")
    assert helpful.rankings[0].order == [[0, 2], [1], [3]] and len(helpful.skipped) == 2


def test_trl_standard_and_conversational():
    std = read_trl(FIX / "trl_pref.jsonl").rankings
    assert (std[0].prompt, std[0].candidates) == ("The sky is", [" blue.", " green."])
    conv = read_trl_conversational(FIX / "trl_conv.jsonl").rankings
    assert [(r.prompt, r.candidates) for r in conv] == [
        ("What color is the sky?", ["It is blue.", "It is green."]),
        ("What is 2+2?", ["4", "5"]),  # implicit prompt
        ("Say hi.", ["Hi!", "Goodbye."]),  # prompt repeated at the head of chosen/rejected
        ("System: Be brief.\n\nUser: Best fruit?",
         ["Mango.", "There are many fruits, and choosing one is hard because..."]),
    ]
    assert conv[3].meta["prompt_meta"]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_label_studio_pairwise_and_ranker():
    got = read_label_studio(FIX / "label_studio.json")
    rs = got.rankings
    assert len(rs) == 4  # 2 pairwise annotations (1 cancelled is ignored), 2 ranker tasks
    assert rs[0].order == [[0], [1]] and rs[0].labeler == "ls:3" and rs[0].time_s == 12.5
    assert rs[1].order == [[1], [0]] and rs[1].labeler == "ls:4"
    assert rs[0].candidates[0].startswith("Gravity pulls")
    assert rs[2].order == [[2], [0], [1]] and rs[2].labeler == "ls:ann@example.org"
    assert rs[2].candidates == ["Use descriptive names.", "Write everything in one function.",
                                "Keep functions small and focused."]
    assert rs[3].order == [[0, 2], [1], [3]]  # buckets best / ok / bad are tiers
    assert got.skipped == [f"{FIX / 'label_studio.json'}:task 3 (id 104): no annotations"]


# -- bad rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, lines, match",
    [
        ("hh-rlhf", ['{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}',
                     '{"chosen": "x"}'], r":2: missing key 'rejected'"),
        ("hh-rlhf", ['{"chosen": ', ""], r":1: invalid JSON"),
        ("ultrafeedback", ['{"instruction": "x", "completions": 3}'], r":1: 'completions' must be a list"),
        ("ultrafeedback", ['{"instruction": "x", "completions": [{"overall_score": 1}]}'], r":1: completion 0 has no"),
        ("trl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "chosen": "a"}'],
         r":2: missing key 'rejected'"),
        ("trl", ['{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}'],
         r":1: 'chosen' is a list of messages: use the trl-conversational"),
        ("trl-conversational", ['{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": []}'],
         r":1: chosen\[0\] must be an object"),
        ("trl-conversational", ['{"chosen": [{"role": "user", "content": "a"}], '
                                '"rejected": [{"role": "user", "content": "b"}]}'], r":1: no 'prompt'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, fmt, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="bad.jsonl" + match):
        read_preferences(path, fmt)


def test_bad_label_studio_task_names_task_index(tmp_path):
    tasks = json.loads((FIX / "label_studio.json").read_text())
    tasks[1]["annotations"][0]["result"][0]["value"]["ranker"]["rank"].append("r9")
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(tasks))
    with pytest.raises(DataError, match=r"ls\.json:task 1 \(id 102\): ranker names item 'r9'"):
        read_label_studio(path)
    tasks[1] = {"id": 5, "annotations": []}
    path.write_text(json.dumps(tasks))
    with pytest.raises(DataError, match=r"ls\.json:task 1 \(id 5\): missing key 'data'"):
        read_label_studio(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"ls\.json:1: invalid JSON"):
        read_label_studio(path)


# -- into the store and out again ----------------------------------------------------------------


@pytest.fixture
def store(store_spec):
    """A SQLite store, then a PostgreSQL one (skipped where PostgreSQL cannot run)."""
    with PreferenceStore(store_spec) as s:
        yield s


def test_load_scrubs_pii_and_drops_exact_duplicates(store):
    got = read_hh_rlhf(FIX / "hh_rlhf.jsonl")
    rep = load_into_store(store, got.rankings, split="rm")
    assert (rep.rows, rep.imported, rep.exact_duplicates, rep.new_prompts) == (4, 3, 1, 3)
    assert rep.pii["email"] == 2  # once in the prompt text, once in its parsed messages
    p = store.prompts()[2]
    assert "jane.roe@example.com" not in p.text and "[EMAIL]" in p.text and p.split == "rm"
    assert "[EMAIL]" in p.meta["messages"][0]["content"]
    kway = store.grouped_kway()
    assert kway[1]["meta"]["messages"][-1] == {"role": "user", "content": "And of Italy?"}
    again = load_into_store(store, got.rankings)  # re-import: everything is a duplicate
    assert (again.imported, again.exact_duplicates, store.counts()["rankings"]) == (0, 4, 3)


@pytest.mark.parametrize("fmt, fixture", [("hh-rlhf", "hh_rlhf.jsonl"), ("trl", "trl_pref.jsonl"),
                                          ("trl-conversational", "trl_conv.jsonl")])
def test_pairwise_round_trip_through_store(store, tmp_path, fmt, fixture):
    got = read_preferences(FIX / fixture, fmt)
    load_into_store(store, got.rankings, scrub=False)
    out = tmp_path / "pairs.jsonl"
    write_pairs(out, flatten_pairs(rankings_to_pairs(store.rankings())))
    expected = {(r.prompt, r.candidates[0], r.candidates[1]) for r in got.rankings}
    back = read_trl(out).rankings
    assert {(r.prompt, r.candidates[0], r.candidates[1]) for r in back} == expected
    assert len(back) == len(expected)


def test_kway_and_rankings_round_trip(store, tmp_path):
    for fmt, fixture in (("ultrafeedback", "ultrafeedback.jsonl"), ("label-studio", "label_studio.json")):
        load_into_store(store, read_preferences(FIX / fixture, fmt).rankings, split="rm")
    src = read_preferences(FIX / "ultrafeedback.jsonl", "ultrafeedback").rankings + \
        read_label_studio(FIX / "label_studio.json").rankings
    kout = tmp_path / "k.jsonl"
    write_kway(kout, store.grouped_kway(split="rm"))
    back = read_kway(kout)
    assert [(g.prompt, g.responses, g.order) for g in back] == [(r.prompt, r.candidates, r.order) for r in src]
    rout = tmp_path / "r.jsonl"
    write_rankings(rout, store.rankings())
    again = read_rankings(rout)
    assert [(r.labeler, r.order, r.candidate_ids, r.time_s) for r in again] == \
        [(r.labeler, r.order, r.candidate_ids, r.time_s) for r in store.rankings()]


def test_export_hf_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(PreflabError, match=r"pip install 'preflab\[hf\]'"):
        export_hf(tmp_path / "hf", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert not (tmp_path / "hf").exists()


def test_export_hf_with_datasets(tmp_path, monkeypatch):
    saved = {}

    class FakeDataset:
        def __init__(self, rows):
            self.rows = rows

        @classmethod
        def from_list(cls, rows):
            return cls(rows)

        def __len__(self):
            return len(self.rows)

        def save_to_disk(self, path):
            saved[path] = self.rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(Dataset=FakeDataset))
    assert export_hf(tmp_path / "hf", [{"prompt": "p", "chosen": "a", "rejected": "b"}]) == 1
    assert saved == {str(tmp_path / "hf"): [{"prompt": "p", "chosen": "a", "rejected": "b"}]}


# -- CLI -------------------------------------------------------------------------------------


def test_cli_import_export_stats(tmp_path, capsys, store_spec):
    db = str(store_spec)  # a SQLite file, then a postgresql:// URL
    assert run_cli(["data", "import", "--format", "hh-rlhf", "--store", db, str(FIX / "hh_rlhf.jsonl")]) == 0
    assert run_cli(["data", "import", "--format", "ultrafeedback", "--store", db, "--split", "eval",
                    str(FIX / "ultrafeedback.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "exact duplicates dropped" in out and "PII scrubbed: email" in out and "fewer than 2" in out
    kway = tmp_path / "k.jsonl"
    assert run_cli(["data", "export", "--store", db, "--format", "kway", "--out", str(kway), "--split", "eval"]) == 0
    assert [g.order for g in read_kway(kway)] == [[[0, 2], [1], [3]], [[0], [2], [1]]]
    pairs = tmp_path / "p.jsonl"
    assert run_cli(["data", "export", "--store", db, "--format", "pairs", "--out", str(pairs)]) == 0
    assert len(read_jsonl(pairs)) == 3 + 5 + 3  # HH 3 pairs; UF C(4,2)-1 tie = 5, C(3,2) = 3
    ranks = tmp_path / "r.jsonl"
    assert run_cli(["data", "export", "--store", db, "--format", "rankings", "--out", str(ranks)]) == 0
    assert len(read_rankings(ranks)) == 5
    capsys.readouterr()
    assert run_cli(["data", "stats", "--store", db]) == 0
    out = capsys.readouterr().out
    assert "rankings by labeler" in out and "ultrafeedback" in out and "already scrubbed" in out
    assert run_cli(["data", "stats", "--file", str(FIX / "trl_pref.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "pairs" in out and "phone" in out


def test_trainers_read_the_same_groups_from_a_postgres_store(tmp_path, postgres_url):
    """`store:postgresql://...` as data.train (read_groups): the groups of a SQLite store with the same imports."""
    from preflab.feedback.ranking_sources import read_groups

    for spec in (tmp_path / "s.db", postgres_url):
        with PreferenceStore(spec) as s:
            for fmt, fixture in (("ultrafeedback", "ultrafeedback.jsonl"), ("hh-rlhf", "hh_rlhf.jsonl")):
                load_into_store(s, read_preferences(FIX / fixture, fmt).rankings, split="rm")
    want = read_groups(f"store:{tmp_path / 's.db'}", None, "rm")
    assert len(want) == 5 and read_groups(f"store:{postgres_url}", None, "rm") == want


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    db = str(tmp_path / "s.db")
    assert run_cli(["data", "import", "--format", "trl", "--store", db, str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: missing key 'chosen'" in err and "Traceback" not in err
    assert run_cli(["data", "stats"]) == 2
    assert "exactly one of --store or --file" in capsys.readouterr().err
    with PreferenceStore(db) as s:  # the failed import wrote nothing
        assert s.counts()["rankings"] == 0
    assert run_cli(["data", "export", "--store", db, "--format", "hf", "--out", str(tmp_path / "hf")]) in (0, 2)


# -- issue 27: cyclic pairs (item 14) and cut-off lines (item 15) ---------------------------------


def _pairs_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pair(chosen, rejected, prompt="Which is best?", **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def test_cyclic_pairs_of_one_prompt_are_one_error_naming_the_lines(tmp_path):
    from preflab.feedback.ranking_sources import read_groups

    cyclic = _pairs_file(tmp_path / "pairs.jsonl", [_pair("A", "B"), _pair("B", "C"), _pair("x", "y", prompt="other"),
                                                    _pair("C", "A")])
    want = r"pairs\.jsonl: lines 1, 2, 4: cyclic preferences for one prompt \('A' > 'B' > 'C' > 'A'\)"
    with pytest.raises(DataError, match=want):
        read_groups(cyclic)
    with pytest.raises(DataError, match=r"pairs\.jsonl: lines 1, 2, 4: cyclic preferences for one prompt by "
                                        r"labeler 'trl' \('A' > 'B' > 'C' > 'A'\)"):  # an import: the same check
        read_preferences(cyclic, "trl")
    contradiction = _pairs_file(tmp_path / "two.jsonl", [_pair("A", "B", labeler="ann"), _pair("B", "A", labeler="ann")])
    with pytest.raises(DataError, match=r"two\.jsonl: lines 1, 2: cyclic preferences for one prompt by labeler 'ann' "
                                        r"\('A' > 'B' > 'A'\)"):
        read_groups(contradiction)
    with pytest.raises(DataError, match=r"self\.jsonl: line 1: cyclic preferences .*\('A' > 'A'\)"):
        read_groups(_pairs_file(tmp_path / "self.jsonl", [_pair("A", "A")]))


def test_pairs_that_order_their_responses_are_read(tmp_path):
    from preflab.feedback.ranking_sources import read_groups

    consistent = [_pair("A", "B"), _pair("B", "C"), _pair("A", "C"), _pair("C", "A", prompt="another prompt")]
    assert len(read_groups(_pairs_file(tmp_path / "ok.jsonl", consistent))) == 4
    two_labelers = [_pair("A", "B", labeler="ann"), _pair("B", "A", labeler="bob")]  # people disagree: no cycle
    assert len(read_groups(_pairs_file(tmp_path / "people.jsonl", two_labelers))) == 2


def test_preflab_rm_refuses_cyclic_pairs_before_training(tmp_path, capsys):
    cyclic = _pairs_file(tmp_path / "pairs.jsonl", [_pair("A", "B"), _pair("B", "C"), _pair("C", "A")])
    assert run_cli(["rm", "model.path=tiny:", f"data.train={cyclic}", "data.format=pairs", "data.val_fraction=0",
                    "train.max_steps=1",
                    "train.bf16=false", "run.progress=false", f"run.out={tmp_path / 'rm'}"]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl: lines 1, 2, 3: cyclic preferences for one prompt" in err and "Traceback" not in err
    assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize("tail, reason", [
    ('{"prompt": "a", ', "the line is truncated: it ends at column 15 before the JSON value does"),
    ('{"prompt": "a", "resp', "the line is truncated: it ends at column 21, inside a string that starts at column 17"),
    ('{"prompt": "a",}', "Expecting property name enclosed in double quotes at column 16"),
])
@pytest.mark.parametrize("newline", ["\n", ""])
def test_a_cut_off_line_is_reported_where_it_ends(tmp_path, tail, reason, newline):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "whole"}\n' + tail + newline)
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value) == f"{path}:2: invalid JSON ({reason})"


def test_exported_pairs_keep_their_labelers_so_people_may_disagree(store, tmp_path):
    pid = store.add_prompts(["Which is best?"])[0]
    a, b = store.add_candidates(pid, ["A", "B"])
    store.add_ranking(pid, [a, b], [[0], [1]], "ann")
    store.add_ranking(pid, [a, b], [[1], [0]], "bob")
    out = tmp_path / "pairs.jsonl"
    write_pairs(out, flatten_pairs(rankings_to_pairs(store.rankings())))
    assert [(r["chosen"], r["labeler"]) for r in read_jsonl(out)] == [("A", "ann"), ("B", "bob")]
    from preflab.feedback.ranking_sources import read_groups

    assert [g.labeler for g in read_groups(str(out))] == ["ann", "bob"]  # a disagreement, not a cycle
    assert [r.labeler for r in read_preferences(out, "trl").rankings] == ["ann", "bob"]
