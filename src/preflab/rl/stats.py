"""Confidence intervals for win rates and other means (evaluation maths).

InstructGPT reports win rates against the SFT baseline with an interval (e.g.
85 +/- 3%; docs/reference.md §1.5, §7). Ties count half a win throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "average_ranks",
    "spearman", "Interval", "WinRate", "between_prompt_share", "paired_difference", "bootstrap_ci", "centred_lengths", "ensemble_spread",
    "length_slope", "length_slope_sums", "most_uncertain", "prompt_variance_sums", "win_rate",
    "wilson_interval"]


class Interval(NamedTuple):
    """A confidence interval [lo, hi]."""

    lo: float
    hi: float


class WinRate(NamedTuple):
    """Outcome of comparing A against B on the same prompts.

    Attributes:
        rate: (wins + ties / 2) / n.
        wins, ties, losses: counts for A.
        n: number of comparisons.
        lo, hi: Wilson interval of ``rate`` at the requested z.
    """

    rate: float
    wins: int
    ties: int
    losses: int
    n: int
    lo: float
    hi: float


def wilson_interval(successes: float, n: int, z: float = 1.96) -> Interval:
    """Wilson score interval for a proportion successes / n.

    centre = (p + z^2/(2n)) / (1 + z^2/n)
    half   = z * sqrt(p(1-p)/n + z^2/(4n^2)) / (1 + z^2/n)

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse
    to a point at p = 0 or 1. ``successes`` may be fractional (a tie counts 0.5).

    Args:
        successes: number of successes, 0 <= successes <= n.
        n: number of trials, > 0.
        z: standard-normal quantile (1.96 for 95%).

    Returns:
        Interval(lo, hi).
    """
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def difference_interval(x1: float, n1: int, x2: float, n2: int, z: float = 1.96) -> Interval:
    """Newcombe's hybrid score interval for p1 - p2 (Newcombe 1998, method 10), from the two
    proportions' Wilson intervals (l_i, u_i):

    lo = d - sqrt((p1 - l1)^2 + (u2 - p2)^2),  hi = d + sqrt((u1 - p1)^2 + (p2 - l2)^2),  d = p1 - p2.

    For two models judged on the same prompts it ignores the pairing, which can only widen it.
    """
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, z)
    l2, u2 = wilson_interval(x2, n2, z)
    d = p1 - p2
    return Interval(d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def paired_difference(diffs: list[float], weights: list[float], z: float = 1.96) -> tuple[float, Interval]:
    """The difference of two models scored on the same units (prompts), with a normal interval
    that keeps the pairing: ``diffs[i]`` is model A's score minus model B's on unit i (a prompt
    passed: 1, 0 or -1; instructions passed: a count), ``weights[i]`` what the unit counts for (1 a
    prompt; its number of instructions). The difference is sum(d) / sum(w), a ratio estimate whose
    standard error comes from the residuals e_i = d_i - difference x w_i:

    se = sqrt(n / (n - 1) x sum(e_i^2)) / sum(w)

    (with every weight 1: the sample standard deviation of the d_i over sqrt(n)). Paired, it is
    narrower than an interval for two independent proportions where the models agree on most
    units. n < 2: the interval is the point."""
    n, total = len(diffs), float(sum(weights))
    if n != len(weights) or total <= 0:
        raise ValueError(f"paired_difference: {n} differences, {len(weights)} weights summing to {total}")
    d = sum(diffs) / total
    if n < 2:
        return d, Interval(d, d)
    se = math.sqrt(n / (n - 1) * sum((x - d * w) ** 2 for x, w in zip(diffs, weights))) / total
    return d, Interval(d - z * se, d + z * se)


def conservative_reward(scores: torch.Tensor, how: str = "mean_minus_std", lam: float = 1.0) -> torch.Tensor:
    """One reward per sample from an ensemble's (M, B) scores (Coste et al. 2024): ``mean``;
    ``mean_minus_std``: mean - lam * std over the members (population std, so one member gives
    its own score); ``min``: the worst case. Where the members disagree, the reward is lower, so
    the policy is not paid for going where the reward models are unsure."""
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"expected (members, samples) scores, got {tuple(scores.shape)}")
    if how == "mean":
        return scores.mean(0)
    if how == "mean_minus_std":
        return scores.mean(0) - lam * scores.std(0, unbiased=False)
    if how == "min":
        return scores.min(0).values
    raise ValueError(f"unknown ensemble combination {how!r} (mean, mean_minus_std, min)")


def prompt_variance_sums(seq: torch.Tensor, k: int) -> torch.Tensor:
    """[n, sum, sum of squares, within-prompt sum of squares] of ``seq``, k contiguous samples per
    prompt, in float64: sums that add over ranks before ``between_prompt_share``."""
    x = seq.detach().double()
    groups = x.view(-1, k)
    within = ((groups - groups.mean(1, keepdim=True)) ** 2).sum()
    return torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), (x * x).sum(), within])


def between_prompt_share(sums: torch.Tensor, k: int) -> float:
    """The share of a rollout's reward variance that lies between prompts (one-way ANOVA from
    ``prompt_variance_sums``, k samples per prompt, both variances unbiased): the most of the
    variance a value that sees only the prompt can explain; the rest differs between samples of
    one prompt. An estimate: noise can push it slightly below 0. NaN for k < 2, one prompt or no spread."""
    n, s1, s2, within = (float(v) for v in sums)
    groups = n / k
    if k < 2 or groups < 2:  # one prompt: nothing between prompts to measure
        return float("nan")
    total = (s2 - s1 * s1 / n) / (n - 1)
    return 1.0 - (within / (n - groups)) / total if total > 0 else float("nan")


def centred_lengths(lengths: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """Each sample's value (here its length) minus the mean over its prompt's kept samples (k
    contiguous samples per prompt), in float64; 0 for the samples not kept (and for a prompt with
    none kept)."""
    x, keep = lengths.detach().double().view(-1, k), kept.double().view(-1, k)
    mean = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
    return ((x - mean) * keep).view(-1)


def length_slope_sums(scores: torch.Tensor, lengths: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """[sum of s_c x L_c, sum of L_c^2] over the kept samples, score and length each centred on its
    prompt's kept samples, in float64: sums that add over ranks before ``length_slope``."""
    s_c, length_c = centred_lengths(scores, kept, k), centred_lengths(lengths, kept, k)
    return torch.stack([(s_c * length_c).sum(), (length_c * length_c).sum()])


def length_slope(sums: torch.Tensor) -> float:
    """The least-squares slope of the score on the response length within prompts (score per token),
    from ``length_slope_sums``: below 0, the reward prefers a prompt's shorter answers. 0 when no
    prompt has two kept samples of different lengths."""
    cross, square = (float(v) for v in sums)
    return cross / square if square > 0 else 0.0


def ensemble_spread(scores) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (mean, std) over an ensemble's (M, N) scores. The std over the members (population
    std, as in ``conservative_reward``: one member gives 0) is the ensemble's uncertainty about a sample:
    how far reward models trained on the same rankings disagree on it."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1:
        raise ValueError(f"expected (members, samples) scores, got shape {s.shape}")
    return s.mean(0), s.std(0)


def most_uncertain(uncertainty, n: int) -> list[int]:
    """Indices of the ``n`` largest values of ``uncertainty``, largest first (equal values by position)."""
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    return [int(i) for i in np.argsort(-u, kind="stable")[:max(n, 0)]]


def win_rate(scores_a, scores_b, z: float = 1.96) -> WinRate:
    """How often A scores higher than B on paired comparisons, ties counting half.

    Args:
        scores_a: (N,) a score per comparison for A (e.g. the gold judge's).
        scores_b: (N,) the score of B on the same prompt.
        z: standard-normal quantile of the Wilson interval.

    Returns:
        WinRate(rate, wins, ties, losses, n, lo, hi).
    """
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"scores must be non-empty and the same length, got {a.size} and {b.size}")
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = a.size
    successes = wins + 0.5 * ties
    lo, hi = wilson_interval(successes, n, z)
    return WinRate(successes / n, wins, ties, n - wins - ties, n, lo, hi)


def bootstrap_ci(
    values,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over the rows of ``values``.

    Rows are resampled with replacement, so keep the items that belong together (a
    prompt's outcomes for both models) in one row. Deterministic for a given seed.

    Args:
        values: (N, ...) samples; the statistic sees an array of the same shape.
        statistic: maps a resampled array to a float; the mean by default.
        n_resamples: bootstrap replicates.
        confidence: coverage of the interval, e.g. 0.95.
        seed: seed of the resampling generator.

    Returns:
        Interval(lo, hi): the (1-c)/2 and (1+c)/2 quantiles of the replicates.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("values must have at least one row")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, x.shape[0], size=(n_resamples, x.shape[0]))
    replicates = np.array([statistic(x[r]) for r in rows], dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    return Interval(float(np.quantile(replicates, alpha)), float(np.quantile(replicates, 1.0 - alpha)))


def average_ranks(x) -> np.ndarray:
    """1-based ranks of ``x`` with ties sharing their average rank (``scipy.stats.rankdata``'s default)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks. ``nan`` when fewer
    than two points or when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")
