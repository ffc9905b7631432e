"""Simulated labelers: determinism, ties, biases, and the panel's calibration to InstructGPT's ~73%."""

from __future__ import annotations

import pytest

from preflab.data.schema import validate_order
from preflab.data.suite import SuitePrompt, generate_suite
from preflab.feedback.labelers import (
    Labeler,
    Panel,
    agreement_summary,
    default_panel,
    panel_groups,
    synthetic_agreement,
    synthetic_candidates,
    tiers_from_scores,
)
from preflab.feedback.rubric import judge


@pytest.fixture(scope="module")
def rm_prompts() -> list[SuitePrompt]:
    return [p for p in generate_suite(seed=0, n=3200) if p.split == "rm"][:200]


def _prompt(i: int = 0) -> SuitePrompt:
    return SuitePrompt(id=f"t{i}", prompt="Tell me about coffee.", keywords=("coffee", "beans"))


CANDS = ["Coffee is made from roasted beans.", "Coffee beans are roasted and ground to brew coffee.",
         "I like tea.", "Coffee coffee coffee coffee coffee coffee coffee coffee"]


def test_tiers_from_scores_ties_within_threshold_of_tier_top():
    # sorted: 0.9 (2), 0.52 (1), 0.5 (0), 0.45 (3). From the top 0.52: 0.5 is within 0.05,
    # 0.45 is 0.07 away, so it starts a new tier (no chaining through 0.5).
    assert tiers_from_scores([0.5, 0.52, 0.9, 0.45], 0.05) == [[2], [0, 1], [3]]
    assert tiers_from_scores([0.5, 0.52, 0.9, 0.45], 0.0) == [[2], [1], [0], [3]]
    assert tiers_from_scores([0.3, 0.3], 0.0) == [[0, 1]]


def test_labeler_is_deterministic_and_independent_of_call_order():
    lab = default_panel()[0]
    a1 = lab.rank(_prompt(1), CANDS, seed=3)
    b1 = lab.rank(_prompt(2), CANDS, seed=3)
    b2 = lab.rank(_prompt(2), CANDS, seed=3)
    a2 = lab.rank(_prompt(1), CANDS, seed=3)
    assert a1 == a2 and b1 == b2
    validate_order(a1.order, len(CANDS))
    assert a1.time_s > 0
    # another seed or another labeler draws other noise
    assert lab.rank(_prompt(1), CANDS, seed=4).perceived != a1.perceived
    assert default_panel()[1].rank(_prompt(1), CANDS, seed=3).perceived != a1.perceived


def test_ties_declared_for_close_candidates():
    lab = Labeler("exact", noise=0.0, tie_threshold=0.05)
    res = lab.rank(_prompt(), ["a.", "b.", "c."], gold=[0.5, 0.52, 0.9])
    assert res.order == [[2], [0, 1]]
    # identical texts get identical noise, so a noisy labeler ties them too
    noisy = Labeler("noisy", noise=0.3, tie_threshold=0.0)
    res = noisy.rank(_prompt(), ["same answer.", "other answer.", "same answer."], gold=[0.6, 0.6, 0.6])
    assert any(sorted(t) == [0, 2] for t in res.order)


def _prefers(lab: Labeler, n: int, cands: list[str], gold: list[float], winner: int) -> int:
    return sum(lab.rank(_prompt(i), cands, gold=gold).order[0] == [winner] for i in range(n))


def test_length_bias_prefers_the_longer_of_equal_gold_candidates():
    short, long_ = "Coffee is nice.", " ".join(["Coffee is made from roasted beans."] * 15)
    cands, gold = [short, long_], [0.6, 0.6]
    unbiased = Labeler("u", noise=0.16, tie_threshold=0.0)
    biased = Labeler("v", noise=0.16, length_bias=0.04, tie_threshold=0.0)
    n = 400
    assert _prefers(biased, n, cands, gold, 1) > _prefers(unbiased, n, cands, gold, 1) + 0.08 * n


def test_position_and_refusal_biases_act():
    n = 400
    cands, gold = ["Answer one.", "Answer two."], [0.6, 0.6]
    first = Labeler("f", noise=0.16, position_bias=0.1, tie_threshold=0.0)
    plain = Labeler("p", noise=0.16, tie_threshold=0.0)
    assert _prefers(first, n, cands, gold, 0) > _prefers(plain, n, cands, gold, 0) + 0.08 * n
    cands = ["I'm sorry, but I can't help with that.", "Here is an answer."]
    strict = Labeler("s", noise=0.16, refusal_penalty=0.15, tie_threshold=0.0)
    assert _prefers(strict, n, cands, gold, 1) > _prefers(plain, n, cands, gold, 1) + 0.08 * n


def test_gumbel_labeler_and_panel():
    lab = Labeler("g", noise=0.1, noise_kind="gumbel")
    validate_order(lab.rank(_prompt(), CANDS).order, 4)
    panel = default_panel()
    assert len(panel) == 5 and len(set(panel.names)) == 5
    assert panel.at(7).name == panel.names[2] and panel["careful"] is panel[0]
    res = panel.rank_all(_prompt(), CANDS)
    assert set(res) == set(panel.names)
    with pytest.raises(ValueError):
        Panel((Labeler("x"), Labeler("x")))


def test_synthetic_candidates_are_fixed_and_spread(rm_prompts):
    p = rm_prompts[0]
    assert synthetic_candidates(p) == synthetic_candidates(p)
    golds = [[judge(q, c).total for c in synthetic_candidates(q)] for q in rm_prompts[:100]]
    spread = sum(max(g) - min(g) for g in golds) / len(golds)
    assert 0.3 < spread < 0.9
    assert all(len(g) == 4 for g in golds)


def test_default_panel_agreement_matches_instructgpt():
    """InstructGPT's training labelers agree on 72.6 +/- 1.5% of pairs of model samples
    (docs/reference.md §1.5); the default panel is calibrated to ~73% on a fixed set of real
    SmolLM2-135M-Instruct samples (60 rm prompts x K=4, tests/fixtures/smollm2_rm_samples.jsonl)."""
    import json
    from pathlib import Path

    by_id = {p.id: p for p in generate_suite(seed=0, n=3200) if p.split == "rm"}
    rows = [json.loads(line) for line in (Path(__file__).parent / "fixtures/smollm2_rm_samples.jsonl").open()]
    s = agreement_summary(panel_groups(default_panel(), [by_id[r["id"]] for r in rows],
                                       [r["responses"] for r in rows]))
    assert 0.68 <= s["pairwise"] <= 0.78, s["pairwise"]
    assert s["pairs"] > 1000
    assert s["gold"] > s["pairwise"]  # each labeler is closer to gold than to a colleague
    assert s["pairwise_ties"] < s["pairwise"]
    for key in ("loo_majority", "fleiss_kappa", "krippendorff_alpha", "kendalls_w"):
        assert 0.0 < s[key] < 1.0, key


def test_synthetic_candidates_are_easier_to_agree_on(rm_prompts):
    """The synthetic set's candidates are further apart under the gold judge, so the same panel
    agrees more there than on real samples (a sanity check of the noise model, not a target)."""
    s = synthetic_agreement(rm_prompts, k=4, seed=0)
    assert 0.78 <= s["pairwise"] <= 0.95, s["pairwise"]
    assert 0.0 < s["tie_rate"] < 0.2


def test_agreement_summary_of_identical_labelers_is_perfect(rm_prompts):
    panel = Panel((Labeler("a", noise=0.0), Labeler("b", noise=0.0)))
    ps = rm_prompts[:20]
    s = agreement_summary(panel_groups(panel, ps, [synthetic_candidates(p) for p in ps]))
    assert s["pairwise"] == 1.0 and s["loo_majority"] == 1.0
