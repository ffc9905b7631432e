"""Demonstration writer: best of N under the gold judge, with the templated fallback."""

from __future__ import annotations

import json

import pytest

from preflab import models
from preflab.data.suite import SuitePrompt, generate_suite, reference_answer, templated_refusal
from preflab.errors import PreflabError
from preflab.feedback.demos import pick_demonstration, source_counts, write_demonstrations
from preflab.feedback.rubric import judge


@pytest.fixture(scope="module")
def sft_prompts() -> list[SuitePrompt]:
    ps = [p for p in generate_suite(seed=0, n=3200) if p.split == "sft"]
    harmful = [p for p in ps if p.slice == "harmful"][:2]
    ordinary = [p for p in ps if p.slice == "ordinary"][:3]
    return ordinary + harmful


def test_best_of_n_picks_the_highest_gold(sft_prompts):
    p = sft_prompts[0]
    ref = reference_answer(p)
    samples = ["I'm sorry, but I can't help with that.", ref[: len(ref) // 2], ref, "ok"]
    row = pick_demonstration(p, samples, mode="best_of_n")
    golds = [judge(p, s).total for s in samples]
    assert row["response"] == samples[golds.index(max(golds))] == ref
    assert row["source"] == "sample" and row["gold"] == max(golds)
    # best_of_n keeps a poor best sample; mixed falls back to the reference below the threshold
    bad = ["ok", "no"]
    assert pick_demonstration(p, bad, mode="best_of_n")["source"] == "sample"
    fb = pick_demonstration(p, bad, mode="mixed", threshold=0.6)
    assert fb["source"] == "reference" and fb["response"] == ref


def test_reference_mode_needs_no_model(sft_prompts, tmp_path):
    rows = write_demonstrations(sft_prompts, mode="reference", out=tmp_path / "d.jsonl")
    assert len(rows) == len(sft_prompts)
    for p, r in zip(sft_prompts, rows):
        assert set(r) == {"id", "prompt", "response", "source", "gold"}
        assert r["source"] == ("refusal" if p.slice == "harmful" else "reference")
        if p.slice == "harmful":
            assert r["response"] == templated_refusal(p)
        assert r["gold"] >= 0.6
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert lines == rows
    with pytest.raises(PreflabError):
        write_demonstrations(sft_prompts, mode="mixed")


def test_tiny_model_samples_are_garbage_so_mixed_falls_back(sft_prompts):
    import torch

    torch.manual_seed(0)
    tok, model = models.load_tokenizer("tiny:"), models.load_policy("tiny:", device="cpu")
    rows = write_demonstrations(sft_prompts, model, tok, n=2, max_new_tokens=8, mode="mixed")
    assert len(rows) == len(sft_prompts)
    counts = source_counts(rows)
    assert counts["sample"] == 0 and counts["refusal"] == 2 and counts["reference"] == 3
    rows = write_demonstrations(sft_prompts[:2], model, tok, n=2, max_new_tokens=8, mode="best_of_n")
    assert all(r["source"] in ("sample", "reference") for r in rows)
