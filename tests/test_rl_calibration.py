"""preflab.rl.calibration: ECE, reliability by margin and temperature scaling."""

import math

import numpy as np
import pytest

from preflab.rl.calibration import expected_calibration_error, fit_temperature, reliability_by_margin


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_ece_hand_made_input():
    """5 bins over the confidence range [0.5, 1]: [0.5, 0.6), [0.6, 0.7), ..., [0.9, 1.0].
    p      label  confidence  prediction  correct   bin
    0.95   1      0.95        1           1         4
    0.85   0      0.85        1           0         3
    0.25   0      0.75        0           1         2
    0.65   1      0.65        1           1         1
    0.55   0      0.55        1           0         0
    0.50   1      0.50        none        0.5       0
    bin 0: conf (0.55 + 0.5)/2 = 0.525, acc (0 + 0.5)/2 = 0.25, gap 0.275, 2 pairs
    bins 1..4: gaps |1 - 0.65| = 0.35, |1 - 0.75| = 0.25, |0 - 0.85| = 0.85, |1 - 0.95| = 0.05
    ECE = (2*0.275 + 0.35 + 0.25 + 0.85 + 0.05)/6 = 2.05/6 = 0.341667; MCE = 0.85."""
    probs = [0.95, 0.85, 0.25, 0.65, 0.55, 0.5]
    labels = [1, 0, 0, 1, 0, 1]
    out = expected_calibration_error(probs, labels, n_bins=5)
    assert out.ece == pytest.approx(2.05 / 6)
    assert out.mce == pytest.approx(0.85)
    assert [b.count for b in out.table] == [2, 1, 1, 1, 1]
    first = out.table[0]
    assert (first.lo, first.hi) == pytest.approx((0.5, 0.6))
    assert first.mean_confidence == pytest.approx(0.525) and first.accuracy == pytest.approx(0.25)


def test_ece_empty_bins_and_bad_input():
    out = expected_calibration_error([0.95, 0.05], [1, 0], n_bins=5)
    assert [b.count for b in out.table] == [0, 0, 0, 0, 2]
    assert math.isnan(out.table[0].accuracy)
    assert out.ece == pytest.approx(0.05) and out.mce == pytest.approx(0.05)
    with pytest.raises(ValueError):
        expected_calibration_error([0.5, 1.2], [1, 0])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [2])


def test_ece_of_calibrated_probabilities_is_small():
    """Labels drawn from the predicted probability: ECE near 0 (sampling noise only)."""
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20000)
    y = (rng.uniform(size=20000) < p).astype(int)
    assert expected_calibration_error(p, y).ece < 0.02


def test_reliability_by_margin_hand_computed():
    """margins (chosen - rejected) [0.2, -0.3, 0.7, 0.0, 1.2, -0.9, 0.4], max_quantile 1:
    top = max = 1.2, rounded to the nearest 0.5 -> 1.0, so 2 bins of |margin|:
    [0, 0.5]:   0.2, 0.3, 0.0, 0.4 -> correct 1, 0, 0.5, 1 -> accuracy 2.5/4 = 0.625
    (0.5, 1.0]: 0.7, 0.9           -> correct 1, 0         -> accuracy 0.5
    |1.2| lies beyond the last edge and is dropped.
    Perfect calibration: sigmoid(0.25) = 0.562177, sigmoid(0.75) = 0.679179."""
    bins = reliability_by_margin([0.2, -0.3, 0.7, 0.0, 1.2, -0.9, 0.4], bin_width=0.5, max_quantile=1.0)
    assert [(b.lo, b.hi, b.mid, b.count) for b in bins] == [(0.0, 0.5, 0.25, 4), (0.5, 1.0, 0.75, 2)]
    assert bins[0].accuracy == pytest.approx(0.625) and bins[1].accuracy == pytest.approx(0.5)
    assert bins[0].expected == pytest.approx(0.562177, abs=1e-6)
    assert bins[1].expected == pytest.approx(0.679179, abs=1e-6)


def test_reliability_of_a_calibrated_rm_follows_the_sigmoid():
    """Pairs whose label agrees with the RM with probability sigmoid(|margin|): per-bin
    accuracy within a few points of sigmoid(midpoint)."""
    rng = np.random.default_rng(1)
    raw = rng.normal(0.0, 2.0, size=40000)
    agree = rng.uniform(size=raw.size) < _sigmoid(np.abs(raw))
    margins = np.where(agree, np.abs(raw), -np.abs(raw))
    for b in reliability_by_margin(margins)[:6]:
        assert abs(b.accuracy - b.expected) < 0.03


def test_fit_temperature_recovers_a_known_temperature():
    """Soft labels sigmoid(m / 2): cross-entropy is minimised exactly at T = 2.
    Hard labels drawn from sigmoid(m / 2) with m ~ N(0, 3^2), N = 20000: T within 5% of 2."""
    rng = np.random.default_rng(0)
    m = rng.normal(0.0, 3.0, size=20000)
    assert fit_temperature(m, _sigmoid(m / 2.0)) == pytest.approx(2.0, rel=1e-6)
    y = (rng.uniform(size=m.size) < _sigmoid(m / 2.0)).astype(float)
    t = fit_temperature(m, y)
    assert t == pytest.approx(2.0, rel=0.05)
    assert fit_temperature(m, y) == t  # deterministic


def test_fit_temperature_hits_the_bound_when_separable():
    """Every margin has the label's sign: sharper is always better, so T = t_min."""
    assert fit_temperature([1.0, -2.0, 0.5], [1, 0, 1], t_min=0.05) == pytest.approx(0.05)
