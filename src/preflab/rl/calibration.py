"""Calibration of pairwise preference probabilities (reward-model evaluation).

An RM gives p(a > b) = sigmoid(r_a - r_b): the reward difference is the log-odds of
preference (InstructGPT §3.5; docs/reference.md §3). These functions take numpy
arrays (or anything ``np.asarray`` accepts: lists, CPU tensors) and return floats.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "Calibration",
    "CalibrationBin",
    "MarginBin",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_by_margin",
]


class CalibrationBin(NamedTuple):
    """One confidence bin of ``expected_calibration_error``.

    Attributes:
        lo, hi: bin edges on the confidence axis; [lo, hi), the last bin includes hi.
        count: pairs whose confidence falls in the bin.
        mean_confidence: mean of max(p, 1-p) in the bin (nan when empty).
        accuracy: fraction of correct predictions in the bin (nan when empty).
    """

    lo: float
    hi: float
    count: int
    mean_confidence: float
    accuracy: float


class Calibration(NamedTuple):
    """Result of ``expected_calibration_error``.

    Attributes:
        ece: sum over bins of count/N * |accuracy - mean_confidence|.
        mce: largest |accuracy - mean_confidence| over non-empty bins.
        table: the n_bins bins, empty ones included.
    """

    ece: float
    mce: float
    table: list[CalibrationBin]


class MarginBin(NamedTuple):
    """One bin of the reliability diagram by reward margin.

    Attributes:
        lo, hi: edges on |r_chosen - r_rejected|; (lo, hi], the first bin includes 0.
        mid: (lo + hi) / 2, the x-coordinate of the diagram.
        count: pairs in the bin.
        accuracy: fraction with r_chosen > r_rejected, a margin of 0 counting half
            (nan when empty).
        expected: sigmoid(mid), the accuracy of a perfectly calibrated RM.
    """

    lo: float
    hi: float
    mid: float
    count: int
    accuracy: float
    expected: float


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def expected_calibration_error(probs, labels, n_bins: int = 10) -> Calibration:
    """Binned expected and maximum calibration error of binary predictions (Guo et al. 2017).

    Convention (one of the two in docs/reference.md §3.2): the predicted label is 1 when
    p > 0.5, the confidence is max(p, 1 - p) in [0.5, 1], and a prediction is correct
    when it matches the label. p = 0.5 exactly predicts neither and counts as half
    correct. Since confidence never falls below 0.5, the ``n_bins`` equal-width bins
    span [0.5, 1], not [0, 1] (which would leave the lower half empty by construction).

    Args:
        probs: (N,) predicted P(label = 1), e.g. sigmoid(r_a - r_b) for "a preferred".
        labels: (N,) in {0, 1}.
        n_bins: number of confidence bins.

    Returns:
        Calibration(ece, mce, table).
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"probs and labels must be non-empty and the same length, got {p.size} and {y.size}")
    if np.any((p < 0) | (p > 1)) or not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError("probs must lie in [0, 1] and labels in {0, 1}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = np.maximum(p, 1.0 - p)
    correct = np.where(p == 0.5, 0.5, ((p > 0.5) == (y == 1.0)).astype(np.float64))
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    table: list[CalibrationBin] = []
    ece = 0.0
    mce = 0.0
    for b in range(n_bins):
        in_bin = which == b
        count = int(in_bin.sum())
        if count == 0:
            table.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), 0, math.nan, math.nan))
            continue
        conf = float(confidence[in_bin].mean())
        acc = float(correct[in_bin].mean())
        gap = abs(acc - conf)
        ece += count / p.size * gap
        mce = max(mce, gap)
        table.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), count, conf, acc))
    return Calibration(ece=ece, mce=mce, table=table)


def reliability_by_margin(margins, bin_width: float = 0.5, max_quantile: float = 0.995) -> list[MarginBin]:
    """Accuracy per bin of |reward margin|, against sigmoid(bin midpoint).

    summarize_from_feedback_details eval/rm_eval_calibration.py ``score_calibration``
    (docs/reference.md §3.3): bins of width 0.5 on |r_c - r_r| from 0 up to the 99.5%
    quantile of the (signed) margin rounded to the nearest bin edge; a pair is correct
    when r_c > r_r; perfect calibration is sigmoid(midpoint). Two deliberate
    differences: a margin of exactly 0 goes into the first bin and counts half correct
    (pandas' ``cut`` drops it), and empty bins are kept (accuracy nan).

    Args:
        margins: (N,) r_chosen - r_rejected, i.e. oriented with the preferred response first.
        bin_width: width of a bin on the |margin| axis.
        max_quantile: quantile of the margins that sets the last bin edge.

    Returns:
        list of MarginBin, in increasing |margin|; empty when the quantile rounds to 0.
    """
    m = np.asarray(margins, dtype=np.float64).ravel()
    if m.size == 0:
        raise ValueError("margins must be non-empty")
    if bin_width <= 0:
        raise ValueError(f"bin_width must be > 0, got {bin_width}")
    top = float(np.round(np.quantile(m, max_quantile) / bin_width) * bin_width)
    n_bins = max(int(round(top / bin_width)), 0)
    size = np.abs(m)
    correct = np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))
    bins = []
    for b in range(n_bins):
        lo, hi = b * bin_width, (b + 1) * bin_width
        in_bin = (size > lo) & (size <= hi) if b > 0 else (size <= hi)
        count = int(in_bin.sum())
        accuracy = float(correct[in_bin].mean()) if count else math.nan
        mid = (lo + hi) / 2
        bins.append(MarginBin(lo, hi, mid, count, accuracy, float(_sigmoid(np.float64(mid)))))
    return bins


def _bce_at_inverse_temperature(inv_t: float, m: np.ndarray, y: np.ndarray) -> float:
    # -[y log sigmoid(s m) + (1 - y) log sigmoid(-s m)] = softplus(s m) - y s m, stably.
    z = inv_t * m
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(margins, labels, t_min: float = 1e-2, t_max: float = 1e2, iterations: int = 100) -> float:
    """Temperature T minimising the cross-entropy of sigmoid(margin / T) against labels.

    Temperature scaling (Guo et al. 2017), as Gao et al. §2.2 recalibrate their RMs:
    "rescale the logits to minimize cross-entropy loss using a validation set"
    (docs/reference.md §3.4). In s = 1/T the loss is a logistic regression without
    intercept, hence convex, so it is unimodal in log T too and a golden-section search
    on log T in [t_min, t_max] finds the minimum deterministically. When the minimum
    lies outside the interval (perfectly separated hard labels want T -> 0; margins
    that anti-correlate with the labels want T -> inf or negative) the nearer bound is
    returned.

    Args:
        margins: (N,) reward differences r_a - r_b (logits of p(a > b)).
        labels: (N,) P(a preferred) in [0, 1]: hard {0, 1} or soft labels.
        t_min, t_max: search interval, 0 < t_min < t_max.
        iterations: golden-section steps; each shrinks the interval by 0.618
            (100 steps reach float precision).

    Returns:
        T as a float; calibrated probabilities are sigmoid(margin / T).
    """
    m = np.asarray(margins, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if m.shape != y.shape or m.size == 0:
        raise ValueError(
            f"margins and labels must be non-empty and the same length, got {m.size} and {y.size}"
        )
    if np.any((y < 0) | (y > 1)):
        raise ValueError("labels must lie in [0, 1]")
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max, got {t_min}, {t_max}")

    def loss(log_t: float) -> float:
        return _bce_at_inverse_temperature(math.exp(-log_t), m, y)

    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(t_min), math.log(t_max)
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2.0)
