import krippendorff
import numpy as np
import pytest
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa

from preflab.data.schema import ranks_from_order
from preflab.feedback.agreement import (
    agreement_from_labels,
    fleiss_kappa,
    gold_agreement,
    kendalls_w,
    krippendorff_alpha_ordinal,
    loo_majority_agreement,
    pair_category_counts,
    pair_labels,
    pairwise_agreement,
    ranks_from_scores,
)


def test_pair_labels_order_and_signs():
    # ranks [1, 2, 0, 1] = order [[2], [0, 3], [1]]; pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    r = ranks_from_order([[2], [0, 3], [1]])
    assert r == [1, 2, 0, 1]
    assert pair_labels(r).tolist() == [1, -1, 0, -1, -1, 1]


def test_pairwise_agreement_hand_computed():
    """A = [[2],[0,3],[1]] -> ranks [1,2,0,1] -> labels (01,02,03,12,13,23) = [+1,-1, 0,-1,-1,+1]
    B = [[0],[2],[1],[3]] -> ranks [0,2,1,3] -> labels                    = [+1,+1,+1,-1,+1,+1]

    ties excluded: A's tie (0,3) drops; of the other 5, equal at 01, 12, 23 -> 3/5 = 0.6.
    ties as a label: all 6 pairs; equal at 01, 12, 23 -> 3/6 = 0.5.
    """
    a, b = ranks_from_order([[2], [0, 3], [1]]), ranks_from_order([[0], [2], [1], [3]])
    assert pairwise_agreement(a, b, "exclude") == pytest.approx(3 / 5)
    assert pairwise_agreement(a, b, "label") == pytest.approx(3 / 6)
    assert pairwise_agreement(a, a) == 1.0
    # batches of prompts pool their pairs: A vs A has 5 untied pairs, all equal -> (3 + 5) / (5 + 5)
    assert pairwise_agreement([a, a], [b, a]) == pytest.approx(8 / 10)
    assert np.isnan(pairwise_agreement([0, 0], [0, 1]))  # nothing comparable
    assert agreement_from_labels([1, 0, np.nan], [1, 0, 1], "label") == (1.0, 2)
    with pytest.raises(ValueError):
        pairwise_agreement(a, b, "sometimes")


def test_loo_majority_hand_computed():
    """Three labelers, K=3; pairs (0,1) (0,2) (1,2).
    L0 ranks [0,1,2] -> labels [+1,+1,+1]
    L1 ranks [0,2,1] -> labels [+1,+1,-1]
    L2 ranks [1,0,2] -> labels [-1,+1,+1]

    ties excluded. L0 vs majority of {L1, L2}: (0,1) votes +1,-1: no majority, left out;
    (0,2) +1,+1 -> +1 agree; (1,2) -1,+1: none. -> 1/1.
    L1 vs {L0, L2}: (0,1) +1,-1 none; (0,2) +1 agree; (1,2) +1,+1 -> +1, L1 says -1: disagree -> 1/2.
    L2 vs {L0, L1}: (0,1) +1,+1 -> +1, L2 says -1: disagree; (0,2) agree; (1,2) none -> 1/2.
    """
    ranks = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2]])
    assert loo_majority_agreement(ranks).tolist() == [1.0, 0.5, 0.5]
    # a missing labeler (NaN row) is skipped on that prompt
    both = np.stack([ranks, np.array([[0, 1, 2], [0, 1, 2], [np.nan] * 3])])
    got = loo_majority_agreement(both)
    # prompt 2: L0 vs L1 alone -> 3 agreeing pairs; L1 vs L0 -> 3; L2 absent
    assert got.tolist() == [pytest.approx(4 / 4), pytest.approx(4 / 5), 0.5]


def test_fleiss_kappa_matches_statsmodels():
    rng = np.random.default_rng(0)
    for _ in range(5):
        table = rng.multinomial(5, [0.5, 0.3, 0.2], size=40)
        assert fleiss_kappa(table) == pytest.approx(sm_fleiss_kappa(table), abs=1e-12)
    # Fleiss (1971)-style tiny case: perfect agreement -> 1
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)


def test_fleiss_on_rankings_via_pair_table():
    rng = np.random.default_rng(1)
    ranks = rng.integers(0, 3, size=(10, 4, 5)).astype(float)  # 10 prompts, 4 labelers, K=5
    t = pair_category_counts(ranks)
    assert t.shape == (10 * 10, 3) and (t.sum(axis=1) == 4).all()
    assert fleiss_kappa(t) == pytest.approx(sm_fleiss_kappa(t), abs=1e-12)


def test_krippendorff_ordinal_matches_package():
    rng = np.random.default_rng(2)
    for _ in range(5):
        data = rng.integers(0, 6, size=(4, 25)).astype(float)
        data[rng.random(data.shape) < 0.2] = np.nan
        ref = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal")
        assert krippendorff_alpha_ordinal(data) == pytest.approx(ref, abs=1e-10)
    # Krippendorff's own example data (2011, "Computing Krippendorff's alpha", ordinal section values)
    ex = np.array([
        [1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
        [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan],
    ])
    assert krippendorff_alpha_ordinal(ex) == pytest.approx(
        krippendorff.alpha(reliability_data=ex, level_of_measurement="ordinal"), abs=1e-10)


def test_kendalls_w_hand_computed():
    """m=3 raters, n=3 items, ranks r1=[1,2,3], r2=[1,3,2], r3=[2,1,3].
    Rank sums R = [4, 6, 8], mean 6, S = 4 + 0 + 4 = 8.
    W = 12 S / (m^2 (n^3 - n)) = 96 / (9 * 24) = 4/9.

    With ties: r1=[1,1,2] (tier ranks) -> midranks [1.5,1.5,3], T1 = 2^3-2 = 6; r2=[1,2,3].
    R = [2.5, 3.5, 6], mean 4, S = 2.25 + 0.25 + 4 = 6.5.
    W = 12 * 6.5 / (4 * 24 - 2 * 6) = 78 / 84 = 13/14.
    """
    assert kendalls_w([[1, 2, 3], [1, 3, 2], [2, 1, 3]]) == pytest.approx(4 / 9)
    assert kendalls_w([[0, 0, 1], [1, 2, 3]]) == pytest.approx(13 / 14)
    assert kendalls_w([[0, 1, 2, 3]] * 4) == pytest.approx(1.0)
    assert kendalls_w([[1, 2], [2, 1]]) == pytest.approx(0.0)


def test_gold_agreement():
    """Gold scores [0.9, 0.1, 0.5, 0.5] imply order [[0],[2,3],[1]] (ranks [0,2,1,1]).
    Labeler ranks [0,1,2,3] -> labels (01,02,03,12,13,23) = [+1,+1,+1,+1,+1,+1]
    gold labels                                           = [+1,+1,+1,-1,-1, 0]
    ties excluded (gold tie at 23): agree on 01,02,03 of 5 -> 0.6.
    """
    assert ranks_from_scores([0.9, 0.1, 0.5, 0.5]).tolist() == [0, 2, 1, 1]
    assert gold_agreement([0, 1, 2, 3], [0.9, 0.1, 0.5, 0.5]) == pytest.approx(0.6)
    assert gold_agreement([[0, 1, 2, 3]], [[4.0, 3.0, 2.0, 1.0]]) == 1.0
