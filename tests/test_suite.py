"""The built-in task suite: determinism, size, slices, categories, constraints and disjoint splits."""

import json
from collections import Counter

import pytest

from preflab.cli import main
from preflab.data.suite import CATEGORIES, SPLITS, SuitePrompt, generate_suite, load_prompts, write_suite
from preflab.data.suite.generate import SLICE_FRACTIONS, SPLIT_FRACTIONS, template_splits, topic_splits
from preflab.errors import DataError


@pytest.fixture(scope="module")
def rows() -> list[SuitePrompt]:
    return generate_suite(seed=0, n=3200)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_suite(a, seed=3, n=3200)
    write_suite(b, seed=3, n=3200)
    write_suite(c, seed=4, n=3200)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_size_ids_and_fields(rows):
    assert len(rows) >= 3000
    assert len({p.id for p in rows}) == len(rows)
    assert len({p.prompt for p in rows}) == len(rows)
    for p in rows:
        assert p.template and p.topic and p.paraphrase_group and p.split in SPLITS
        assert len(p.constraints) <= 3


def test_prompts_are_short(rows):
    words = sorted(len(p.prompt.split()) for p in rows)
    assert words[len(words) // 2] <= 40  # median
    assert words[int(0.9 * len(words))] <= 75


def test_slice_fractions(rows):
    counts = Counter(p.slice for p in rows)
    for slice_, frac in SLICE_FRACTIONS.items():
        assert abs(counts[slice_] / len(rows) - frac) < 0.01, slice_
    assert counts["ordinary"] / len(rows) > 0.75


def test_split_fractions_and_eval_size(rows):
    counts = Counter(p.split for p in rows)
    for split, frac in SPLIT_FRACTIONS.items():
        assert abs(counts[split] / len(rows) - frac) < 0.01, split
    assert counts["eval"] >= 300


def test_categories_and_constraint_types(rows):
    assert set(p.category for p in rows) == set(CATEGORIES)
    for split in SPLITS:  # every category appears in every split
        assert {p.category for p in rows if p.split == split} == set(CATEGORIES)
    types = Counter(c["type"] for p in rows for c in p.constraints)
    assert len(types) >= 15
    assert Counter(len(p.constraints) for p in rows if p.slice == "ordinary").keys() == {0, 1, 2, 3}


def test_splits_disjoint_by_template_and_topic(rows):
    templates, topics = {}, {}
    for p in rows:
        assert templates.setdefault(p.template, p.split) == p.split, p.template
        assert topics.setdefault(p.topic, p.split) == p.split, p.topic
    # and the fixed assignment agrees with what was generated
    assert all(template_splits()[t] == s for t, s in templates.items() if t in template_splits())
    assert all(topic_splits()[t] == s for t, s in topics.items())


def test_eval_has_paraphrase_groups(rows):
    groups = Counter(p.paraphrase_group for p in rows)
    multi = {g for g, n in groups.items() if n > 1}
    assert len(multi) >= 50
    assert all(groups[g] <= 3 for g in multi)
    by_group: dict[str, list[SuitePrompt]] = {}
    for p in rows:
        if p.paraphrase_group in multi:
            assert p.split == "eval"
            by_group.setdefault(p.paraphrase_group, []).append(p)
    for members in by_group.values():
        assert len({p.prompt for p in members}) == len(members)
        assert len({(p.topic, p.category, json.dumps(p.constraints), p.source) for p in members}) == 1


def test_special_slices_carry_what_the_judge_needs(rows):
    for p in rows:
        if p.slice == "misconception":
            assert p.true_answers and p.false_answers
        if p.category in ("closed_qa", "classification", "extraction") and p.slice == "ordinary":
            assert p.answer is not None and p.answer_keywords and p.source and p.source in p.prompt


def test_load_prompts_round_trip(tmp_path, rows):
    path = tmp_path / "prompts.jsonl"
    write_suite(path, seed=0, n=200)
    loaded = load_prompts(path)
    assert [p.to_dict() for p in loaded] == [p.to_dict() for p in generate_suite(seed=0, n=200)]


def test_load_prompts_user_file_minimal_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "prompt": "Tell me about owls.", "my_field": 1}\n\n'
                    '{"id": "b", "prompt": "Hi", "constraints": [{"type": "lowercase"}]}\n')
    a, b = load_prompts(path)
    assert a.slice == "ordinary" and a.split is None and a.extra == {"my_field": 1}
    assert b.constraints == ({"type": "lowercase"},)
    bad_rows = {
        '{"id": "c"}': "missing key 'prompt'",
        '{"id": "c", "prompt": "x", "constraints": [{"type": "shout"}]}': "unknown constraint type",
        '{"id": "c", "prompt": "x", "split": "test"}': "unknown split",
        '{"id": "a", "prompt": "again"}': "duplicate id",
        "{not json": "invalid JSON",
    }
    for line, reason in bad_rows.items():
        path.write_text('{"id": "a", "prompt": "Tell me about owls."}\n\n' + line + "\n")
        with pytest.raises(DataError) as e:
            load_prompts(path)
        assert f"{path}:3:" in str(e.value) and reason in str(e.value)


def test_cli_writes_suite_and_prints_table(tmp_path, capsys):
    try:
        main(["data", "suite", "--out", str(tmp_path / "suite"), "--seed", "1", "--n", "400"])
    except SystemExit as e:
        assert e.code in (0, None)
    rows = load_prompts(tmp_path / "suite" / "prompts.jsonl")
    assert len(rows) == 400
    out = capsys.readouterr().out
    assert "extraction" in out and "harmful" in out and "eval" in out


def test_long_form_off_leaves_the_suite_as_it_was(rows):
    assert all(p.max_new_tokens is None for p in rows)
    assert [p.to_dict() for p in generate_suite(seed=0, n=400, long_form=0.0)] == \
        [p.to_dict() for p in generate_suite(seed=0, n=400)]


def test_long_form_tasks_ask_for_words_and_carry_their_budget():
    from preflab.constraints import check_all, count_words
    from preflab.data.suite.generate import LONG_FORM_CATEGORIES, LONG_WORDS, words_budget
    from preflab.data.suite.reference import reference_answer
    from preflab.feedback.rubric import judge

    suite = generate_suite(seed=0, n=1600, long_form=0.3)
    long = [p for p in suite if p.max_new_tokens is not None]
    assert len(long) > 40 and {p.split for p in long} == set(SPLITS)
    assert {p.category for p in long} <= set(LONG_FORM_CATEGORIES) and all(p.slice == "ordinary" for p in long)
    for p in long:
        n = [c["n"] for c in p.constraints if c["type"] == "min_words"]
        assert len(n) == 1 and n[0] in LONG_WORDS
        assert p.max_new_tokens == words_budget(n[0]) >= 1.5 * n[0]
        assert not any(c["type"] in ("max_words", "max_sentences") for c in p.constraints)  # one length slot
        ref = reference_answer(p)
        assert all(check_all(list(p.constraints), ref)) and n[0] <= count_words(ref) <= 200
        assert judge(p, ref).total > 0.9  # no long-answer penalty for the witness either
    assert words_budget(80) == 192 and words_budget(100) == 224 and words_budget(120) == 256
    with pytest.raises(ValueError, match="long_form"):
        generate_suite(seed=0, n=400, long_form=1.5)


def test_long_form_cli_and_pipeline_setting(tmp_path):
    from preflab.config import PipelineConfig, load_config

    try:
        main(["data", "suite", "--out", str(tmp_path), "--n", "400", "--long-form", "0.5"])
    except SystemExit as e:
        assert e.code in (0, None)
    rows = load_prompts(tmp_path / "prompts.jsonl")
    assert any(p.max_new_tokens for p in rows)
    cfg = load_config(PipelineConfig, None, ["suite.long_form=0.2"])
    assert cfg.suite.long_form == 0.2


def test_no_suite_prompt_copies_a_run_of_words_from_ifeval():
    """IFEval (shipped for evaluation only) stays outside what preflab trains on: no prompt of the
    suite, long-form tasks included, shares a run of 8 words with an IFEval prompt."""
    import re
    from importlib.resources import files

    def runs_of_words(text: str, n: int = 8) -> set[str]:
        words = re.findall(r"[a-z0-9']+", text.lower())
        return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}

    ifeval_file = files("preflab.evals") / "ifeval_data" / "input_data.jsonl"
    ifeval = set().union(*(runs_of_words(json.loads(line)["prompt"]) for line in ifeval_file.open()))
    assert len(ifeval) > 10_000  # the file was read
    assert runs_of_words("At the end of your response, please explicitly add a postscript") <= ifeval
    copied = {p.id: sorted(runs_of_words(p.prompt) & ifeval)
              for p in generate_suite(seed=0, n=3200, long_form=0.3) if runs_of_words(p.prompt) & ifeval}
    assert not copied, f"suite prompts sharing 8 words with IFEval: {dict(list(copied.items())[:5])}"
