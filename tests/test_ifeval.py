"""IFEval-format scoring with if-verifiable's checkers (small fixture built here; the repo ships
no benchmark data) and `--id-field` for prompt files."""

import json

import pytest

from preflab.errors import DataError

pytest.importorskip("if_verifiable", reason="the ifeval extra (if-verifiable) is not installed")
pytest.importorskip("nupunkt", reason="the ifeval extra (nupunkt) is not installed")

from preflab.evals.ifeval import read_ifeval, score_ifeval  # noqa: E402

ROWS = [
    {"key": 1001, "prompt": "Write two sentences. Do not use commas.",
     "instruction_id_list": ["length_constraints:number_sentences", "punctuation:no_comma"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}, {}]},
    {"key": 1002, "prompt": "Answer in capitals.", "instruction_id_list": ["change_case:english_capital"],
     "kwargs": [{}]},
    {"key": 1003, "prompt": "At most one capitalised word.", "instruction_id_list": ["change_case:capital_word_frequency"],
     "kwargs": [{"capital_relation": "less than", "capital_frequency": 2}]},
    {"key": 1004, "prompt": "No commas at all.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
]
RESPONSES = [
    "Dr. Smith came home. He slept.",  # two sentences (a naive splitter sees three: "Dr." ends one)
    "HELLO THERE MY FRIEND",
    "I saw NASA and the UN.",  # I, NASA, UN: three capitalised words
    "Sure, here it is:\nno commas in this line",  # strict fails on the first line's comma; loose drops that line
]


def write(tmp_path, rows, name="if.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_scores_hand_computed(tmp_path):
    rows = read_ifeval(write(tmp_path, ROWS))
    assert [r.key for r in rows] == ["1001", "1002", "1003", "1004"]
    got = score_ifeval(rows, RESPONSES)
    assert got["sentence_splitter"] in ("nupunkt", "nltk-punkt")
    assert [r["strict"] for r in got["rows"]] == [[True, True], [True], [False], [False]]
    assert [r["loose"] for r in got["rows"]] == [[True, True], [True], [False], [True]]
    assert got["n_prompts"] == 4 and got["n_instructions"] == 5
    assert got["prompt_level_strict"] == 2 / 4 and got["instruction_level_strict"] == 3 / 5
    assert got["prompt_level_loose"] == 3 / 4 and got["instruction_level_loose"] == 4 / 5
    assert got["by_instruction_strict"]["punctuation:no_comma"] == {"accuracy": 0.5, "n": 2}
    # An empty response passes nothing.
    assert score_ifeval(rows[:1], [""])["instruction_level_strict"] == 0.0


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("kwargs"), r"if\.jsonl:2: missing key 'kwargs'"),
    (lambda r: r.update(kwargs=[]), r"if\.jsonl:2: 'kwargs' must be a list of objects, one per instruction \(1\)"),
    (lambda r: r.update(instruction_id_list=["no:such_check"]), r"if\.jsonl:2: unknown instruction id\(s\) 'no:such_check'"),
    (lambda r: r.update(key=1001), r"if\.jsonl:2: duplicate id 1001 \(first at line 1\)"),
])
def test_bad_rows_are_named_by_line(tmp_path, mutate, message):
    rows = json.loads(json.dumps(ROWS[:2]))
    mutate(rows[1])
    with pytest.raises(DataError, match=message):
        read_ifeval(write(tmp_path, rows))


def test_id_field(tmp_path):
    from preflab.data.suite.schema import load_prompts

    renamed = [{"uid": r["key"], **{k: v for k, v in r.items() if k != "key"}} for r in ROWS]
    path = write(tmp_path, renamed)
    with pytest.raises(DataError, match=r"if\.jsonl:1: missing key 'key' \(--id-field names the id key\)"):
        read_ifeval(path)
    assert [r.key for r in read_ifeval(path, id_field="uid")] == ["1001", "1002", "1003", "1004"]
    # Any prompt file may name its id field: `preflab eval --id-field key` on IFEval's own rows.
    prompts = load_prompts(write(tmp_path, ROWS, "plain.jsonl"), id_field="key")
    assert [p.id for p in prompts] == ["1001", "1002", "1003", "1004"]
    assert prompts[0].extra["instruction_id_list"] == ROWS[0]["instruction_id_list"]


def test_eval_command_writes_ifeval_results(tmp_path, capsys):
    from preflab.cli import main

    out = tmp_path / "out"
    (out).mkdir()
    (out / "results.json").write_text(json.dumps({"models": {"kept": 1}}))  # an earlier `preflab eval` run
    try:
        main(["eval", "--ifeval", "--models", "tiny=tiny:", "--prompts", str(write(tmp_path, ROWS)), "--out", str(out),
              "--max-new-tokens", "4", "--temperature", "0", "--limit", "3"])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["models"] == {"kept": 1}
    m = results["ifeval"]["models"]["tiny"]
    assert results["ifeval"]["settings"]["n_prompts"] == 3 and m["n_instructions"] == 4
    samples = [json.loads(x) for x in (out / "ifeval/tiny.jsonl").read_text().splitlines()]
    assert [s["key"] for s in samples] == ["1001", "1002", "1003"]
    strict = [all(s["strict"]) for s in samples]
    assert m["prompt_level_strict"] == sum(strict) / 3
    assert "IFEval: 3 prompts" in capsys.readouterr().out


def test_ifeval_reports_answer_length_and_a_rerun_samples_nothing(tmp_path, monkeypatch):
    from preflab import rollout
    from preflab.constraints import count_words
    from preflab.evals.ifeval import evaluate_ifeval

    rows = read_ifeval(write(tmp_path, ROWS))
    answers = ["one two three", "a b", "x", "four words right here"]
    monkeypatch.setattr(rollout, "generate_texts", lambda *a, **k: answers)
    entry = evaluate_ifeval({"m": "tiny:"}, rows, tmp_path / "out", max_new_tokens=4, progress=False)
    assert entry["models"]["m"]["mean_words"] == pytest.approx(sum(count_words(t) for t in answers) / 4) == 2.5
    assert entry["models"]["m"]["spec"] == "tiny:"

    def boom(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(rollout, "generate_texts", boom)
    again = evaluate_ifeval({"m": "tiny:"}, rows, tmp_path / "out", max_new_tokens=4, progress=False)
    assert again["models"]["m"] == entry["models"]["m"]
    with pytest.raises(AssertionError, match="sampled again"):  # other settings: sampled
        evaluate_ifeval({"m": "tiny:"}, rows, tmp_path / "out", max_new_tokens=5, progress=False)


def test_pipeline_eval_scores_every_model_on_the_ifeval_file(tmp_path):
    from preflab.cli import main

    path = write(tmp_path, ROWS)
    out = tmp_path / "run"
    main(["pipeline", "--preset", "tiny", "--out", str(out), "rl=[rloo]", f"eval.ifeval={path}",
          "eval.ifeval_max_new_tokens=4", "eval.ifeval_limit=3", "eval.models=[sft,rloo]"])
    block = json.loads((out / "eval/results.json").read_text())["ifeval"]
    assert set(block["models"]) == {"sft", "rloo"}
    assert block["models"]["rloo"]["spec"] == str(out / "rloo/model")
    assert block["settings"]["max_new_tokens"] == 4 and block["settings"]["temperature"] == 0.0
    assert block["settings"]["n_prompts"] == 3  # eval.ifeval_limit: the file's first 3 of 4
    vs = block["models"]["rloo"]["vs_reference"]
    assert vs["reference"] == "sft" and "vs_reference" not in block["models"]["sft"]
    assert vs["prompt_level_strict"]["difference"] == pytest.approx(
        block["models"]["rloo"]["prompt_level_strict"] - block["models"]["sft"]["prompt_level_strict"])
    report = (out / "report.html").read_text()
    assert "mean words" in report and "prompt-level strict vs sft [95%]" in report


def test_builtin_ifeval_is_the_public_file_and_limit_takes_the_first_rows():
    import hashlib
    from importlib.resources import files

    from preflab.evals.ifeval import ifeval_path

    path = ifeval_path("builtin:ifeval")
    assert path == str(files("preflab.evals") / "ifeval_data" / "input_data.jsonl")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert digest == "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
    rows = read_ifeval("builtin:ifeval")
    assert len(rows) == 541 and len({r.key for r in rows}) == 541
    assert [r.key for r in read_ifeval("builtin:ifeval", limit=3)] == [r.key for r in rows[:3]]


def test_pipeline_refuses_a_missing_ifeval_file_before_any_step(tmp_path, capsys):
    from preflab.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--preset", "tiny", "--out", str(out), f"eval.ifeval={tmp_path / 'nope.jsonl'}"])
    assert e.value.code != 0 and "nope.jsonl: file not found" in capsys.readouterr().err
    assert not (out / "data").exists()  # nothing ran


def test_a_models_ifeval_scores_are_reused_from_another_evaluation_only_when_spec_and_settings_match(
        tmp_path, monkeypatch):
    """A round's evaluation takes the run's SFT scores (same model, same settings) instead of sampling
    SFT again; another model, another spec or other settings are sampled."""
    from preflab import rollout
    from preflab.evals.ifeval import evaluate_ifeval

    rows = read_ifeval(write(tmp_path, ROWS))
    calls = []

    def fake(model, tokenizer, prompts, **k):
        calls.append(k["max_new_tokens"])
        return [f"answer number {len(calls)}"] * len(prompts)

    monkeypatch.setattr(rollout, "generate_texts", fake)
    run = evaluate_ifeval({"sft": "tiny:"}, rows, tmp_path / "run", max_new_tokens=4, progress=False)
    assert len(calls) == 1
    got = evaluate_ifeval({"sft": "tiny:", "new": "tiny:3"}, rows, tmp_path / "round", max_new_tokens=4,
                          progress=False, reuse=tmp_path / "run")
    assert len(calls) == 2  # the new model alone
    assert got["models"]["sft"] == run["models"]["sft"]
    assert (tmp_path / "round/ifeval/sft.jsonl").read_text() == (tmp_path / "run/ifeval/sft.jsonl").read_text()
    evaluate_ifeval({"sft": "tiny:2"}, rows, tmp_path / "other", max_new_tokens=4, progress=False,
                    reuse=tmp_path / "run")  # another spec under the same name
    evaluate_ifeval({"sft": "tiny:"}, rows, tmp_path / "longer", max_new_tokens=5, progress=False,
                    reuse=tmp_path / "run")  # other settings
    assert calls == [4, 4, 4, 5]
    (tmp_path / "run/ifeval/sft.jsonl").unlink()  # the scores without their samples: sampled again
    evaluate_ifeval({"sft": "tiny:"}, rows, tmp_path / "lost", max_new_tokens=4, progress=False, reuse=tmp_path / "run")
    assert calls == [4, 4, 4, 5, 4] and (tmp_path / "lost/ifeval/sft.jsonl").is_file()


def test_eval_command_reuse_copies_the_reference_scores_of_another_evaluation(tmp_path, monkeypatch, capsys):
    """`preflab eval --ifeval --reuse DIR`: the model already scored in DIR is not sampled again;
    the new one is, and gets its difference to it."""
    from preflab import rollout
    from preflab.cli import main

    calls = []

    def fake(model, tokenizer, prompts, **k):
        calls.append(len(prompts))
        return [f"answer {len(calls)}"] * len(prompts)

    monkeypatch.setattr(rollout, "generate_texts", fake)
    prompts = str(write(tmp_path, ROWS))
    common = ["--prompts", prompts, "--max-new-tokens", "4", "--temperature", "0"]

    def run(*args):
        try:
            main(["eval", *args, *common])
        except SystemExit as e:
            assert e.code in (0, None), capsys.readouterr().err

    run("--ifeval", "--models", "sft=tiny:", "--out", str(tmp_path / "first"))
    run("--ifeval", "--models", "sft=tiny:", "--models", "new=tiny:3", "--reuse", str(tmp_path / "first"),
        "--out", str(tmp_path / "second"))
    assert calls == [4, 4]  # sft once, then the new model alone
    first = json.loads((tmp_path / "first/results.json").read_text())["ifeval"]["models"]["sft"]
    second = json.loads((tmp_path / "second/results.json").read_text())["ifeval"]["models"]
    assert second["sft"] == first and "vs_reference" in second["new"]
    with pytest.raises(SystemExit) as e:  # the suite's evaluation has no such cache
        main(["eval", "--models", "sft=tiny:", "--reuse", str(tmp_path / "first"), *common])
    assert e.value.code == 2 and "--reuse applies to --ifeval only" in capsys.readouterr().err


def test_paired_difference_by_hand():
    from preflab.rl.stats import paired_difference

    # prompts passed by A minus B: 1, 0, -1, 1 -> 0.25; sd 0.957427 / sqrt(4) = 0.478714; +- 1.96 x that
    d, (lo, hi) = paired_difference([1, 0, -1, 1], [1, 1, 1, 1])
    assert d == 0.25 and lo == pytest.approx(0.25 - 0.938279, abs=1e-6) and hi == pytest.approx(0.25 + 0.938279, abs=1e-6)
    # instructions: differences 2, -1, 0 over prompts of 2, 1, 3 instructions -> 1/6; residuals 5/3, -7/6, -1/2,
    # sqrt(3/2 x 4.388889) / 6 = 0.427633
    d, (lo, hi) = paired_difference([2, -1, 0], [2, 1, 3])
    assert d == pytest.approx(1 / 6) and hi - d == pytest.approx(1.96 * 0.427633, abs=1e-6) and d - lo == pytest.approx(hi - d)
    assert paired_difference([0, 0, 0], [1, 1, 1]) == (0.0, (0.0, 0.0))  # the same answers: no doubt about 0
    assert paired_difference([1], [1]) == (1.0, (1.0, 1.0))
    with pytest.raises(ValueError, match="2 differences, 1 weights"):
        paired_difference([1, 0], [1])


def test_against_reference_pairs_prompts_by_key():
    from preflab.evals.ifeval import against_reference
    from preflab.rl.stats import paired_difference

    ref = [{"key": "1", "strict": [True, True]}, {"key": "2", "strict": [False]}, {"key": "3", "strict": [True]}]
    model = [{"key": "3", "strict": [False]}, {"key": "1", "strict": [True, False]}, {"key": "2", "strict": [True]}]
    got = against_reference({"sft": ref, "m": model}, "sft")
    assert set(got) == {"m"} and got["m"]["reference"] == "sft"
    # prompts (keys 1, 2, 3): m passes 0, 1, 0 where sft passes 1, 0, 1 -> -1, +1, -1
    d, (lo, hi) = paired_difference([-1, 1, -1], [1, 1, 1])
    assert got["m"]["prompt_level_strict"] == {"difference": d, "lo": lo, "hi": hi} and d == pytest.approx(-1 / 3)
    # instructions: 1 - 2, 1 - 0, 0 - 1 over 2, 1, 1 instructions -> -1/4
    d, (lo, hi) = paired_difference([-1, 1, -1], [2, 1, 1])
    assert got["m"]["instruction_level_strict"] == {"difference": d, "lo": lo, "hi": hi} and d == pytest.approx(-0.25)


def test_evaluate_ifeval_gives_every_other_model_its_difference_to_the_reference(tmp_path, monkeypatch, capsys):
    from preflab import rollout
    from preflab.evals.cli import print_ifeval
    from preflab.evals.ifeval import evaluate_ifeval
    from preflab.evals.results import IFEvalResults

    rows = read_ifeval(write(tmp_path, ROWS))
    answers = iter([RESPONSES, ["Sure, one, two.", "hello", "I saw NASA and the UN.", "no, commas"]])
    monkeypatch.setattr(rollout, "generate_texts", lambda *a, **k: next(answers))
    entry = evaluate_ifeval({"a": "tiny:", "b": "tiny:1"}, rows, tmp_path / "out", max_new_tokens=4, progress=False,
                            reference="a")
    a, b = entry["models"]["a"], entry["models"]["b"]
    assert "vs_reference" not in a and b["vs_reference"]["reference"] == "a"
    for level in ("prompt_level_strict", "instruction_level_strict"):
        assert b["vs_reference"][level]["difference"] == pytest.approx(b[level] - a[level])
        assert b["vs_reference"][level]["lo"] < b["vs_reference"][level]["difference"] < b["vs_reference"][level]["hi"]
    assert json.loads((tmp_path / "out/results.json").read_text())["ifeval"]["models"]["b"]["vs_reference"]
    print_ifeval(IFEvalResults.model_validate(entry))
    assert f"{100 * (b['prompt_level_strict'] - a['prompt_level_strict']):+.1f} [" in capsys.readouterr().out
