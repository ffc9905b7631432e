"""Inter-labeler agreement, in numpy. Pure functions: arrays in, numbers out.

Conventions. A ranking of K candidates is a **rank vector** of shape (K,): ``ranks[i]`` is
the tier of candidate i, lower = better, equal = tied (``preflab.data.schema.ranks_from_order``
turns ``[[2],[0,3],[1]]`` into ``[1,2,0,1]``). A **pair label** for candidates i < j is +1 if
i is preferred, -1 if j is preferred, 0 if tied. InstructGPT reports labeler-labeler
agreement on pairs (72.6 +/- 1.5% among training labelers; Ouyang et al. 2022, sec. 5.1);
``ties="exclude"`` compares only pairs both labelers ordered strictly, ``ties="label"``
treats a tie as a third label that must also match.

Missing values (a labeler who did not rank a prompt) are NaN in float arrays.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Ties = Literal["exclude", "label"]


def pair_labels(ranks: np.ndarray) -> np.ndarray:
    """Pair labels of rank vectors: (..., K) -> (..., K*(K-1)/2) in {-1, 0, +1}, NaN where a rank is NaN.

    Pairs in ``np.triu_indices(K, 1)`` order: (0,1), (0,2), ..., (K-2,K-1). Label = sign(r_j - r_i).
    """
    r = np.asarray(ranks, dtype=float)
    i, j = np.triu_indices(r.shape[-1], 1)
    return np.sign(r[..., j] - r[..., i])


def _check_ties(ties: str) -> None:
    if ties not in ("exclude", "label"):
        raise ValueError(f"ties must be 'exclude' or 'label', got {ties!r}")


def agreement_from_labels(la: np.ndarray, lb: np.ndarray, ties: Ties = "exclude") -> tuple[float, int]:
    """Fraction of comparable pairs with equal labels, and how many were comparable.

    la, lb: same shape, labels in {-1, 0, +1} or NaN (missing). Comparable: both present, and
    with ``ties="exclude"`` both nonzero. Returns (nan, 0) if nothing is comparable.
    """
    _check_ties(ties)
    la, lb = np.asarray(la, dtype=float), np.asarray(lb, dtype=float)
    if la.shape != lb.shape:
        raise ValueError(f"label shapes differ: {la.shape} vs {lb.shape}")
    ok = ~np.isnan(la) & ~np.isnan(lb)
    if ties == "exclude":
        ok &= (la != 0) & (lb != 0)
    n = int(ok.sum())
    if n == 0:
        return float("nan"), 0
    return float((la[ok] == lb[ok]).mean()), n


def pairwise_agreement(ranks_a: np.ndarray, ranks_b: np.ndarray, ties: Ties = "exclude") -> float:
    """Agreement of two labelers on the pairs of the same candidates.

    ranks_a, ranks_b: (K,) for one prompt or (N, K) for N prompts with the same K (for ragged K,
    concatenate ``pair_labels`` per prompt and call ``agreement_from_labels``).
    Returns the fraction of comparable pairs (see module doc) on which they agree; NaN if none.
    """
    return agreement_from_labels(pair_labels(ranks_a), pair_labels(ranks_b), ties)[0]


def loo_majority_agreement(ranks: np.ndarray, ties: Ties = "exclude") -> np.ndarray:
    """Each labeler's agreement with the majority of the *other* labelers (leave-one-out).

    ranks: (R, K) - R labelers ranking one prompt's K candidates - or (N, R, K) for N prompts;
    NaN rows mark labelers who did not rank that prompt. For every pair, the majority label of
    the other labelers is the most common one among {-1, +1} (``ties="exclude"``; ties and
    missing do not vote) or among {-1, 0, +1} (``ties="label"``); no majority (a tie in votes,
    or no votes) leaves the pair out, as does a labeler's own tie under "exclude".
    Returns (R,) agreement per labeler (NaN where nothing was comparable).
    """
    _check_ties(ties)
    r = np.asarray(ranks, dtype=float)
    if r.ndim == 2:
        r = r[None]
    if r.ndim != 3:
        raise ValueError(f"ranks must be (R, K) or (N, R, K), got shape {np.asarray(ranks).shape}")
    lab = pair_labels(r)  # (N, R, P)
    labels = (-1.0, 1.0) if ties == "exclude" else (-1.0, 0.0, 1.0)
    votes = np.stack([(lab == v).sum(axis=1) for v in labels], axis=-1)  # (N, P, L) over all labelers
    R = r.shape[1]
    out = np.full(R, np.nan)
    for k in range(R):
        own = lab[:, k, :]  # (N, P)
        others = votes - np.stack([(own == v) for v in labels], axis=-1)  # remove own vote
        top = others.max(axis=-1)
        winner = np.asarray(labels)[others.argmax(axis=-1)]
        unique = (others == top[..., None]).sum(axis=-1) == 1
        ok = ~np.isnan(own) & unique & (top > 0)
        if ties == "exclude":
            ok &= own != 0
        if ok.any():
            out[k] = float((own[ok] == winner[ok]).mean())
    return out


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a subjects-by-categories count table.

    counts: (N, C) integers; counts[s, c] = raters who put subject s in category c; every row
    sums to the same number of raters n >= 2. kappa = (P_bar - P_e) / (1 - P_e) with
    P_s = (sum_c n_sc^2 - n) / (n (n-1)), P_bar = mean_s P_s, p_c = sum_s n_sc / (N n),
    P_e = sum_c p_c^2 (Fleiss 1971). NaN when P_e = 1 (everyone used one category).
    """
    t = np.asarray(counts, dtype=float)
    if t.ndim != 2:
        raise ValueError(f"counts must be (subjects, categories), got shape {t.shape}")
    n = t.sum(axis=1)
    if not np.allclose(n, n[0]) or n[0] < 2:
        raise ValueError("every subject needs the same number (>= 2) of ratings")
    n = n[0]
    N = t.shape[0]
    p_s = ((t**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar = p_s.mean()
    p_c = t.sum(axis=0) / (N * n)
    p_e = (p_c**2).sum()
    if np.isclose(p_e, 1.0):
        return float("nan")
    return float((p_bar - p_e) / (1 - p_e))


def pair_category_counts(ranks: np.ndarray) -> np.ndarray:
    """Fleiss table for rankings: each (prompt, pair) is a subject, categories (i better, tie, j better).

    ranks: (N, R, K) with no missing values (Fleiss needs the same raters per subject) or (R, K).
    Returns (N * K(K-1)/2, 3) counts.
    """
    r = np.asarray(ranks, dtype=float)
    if r.ndim == 2:
        r = r[None]
    if np.isnan(r).any():
        raise ValueError("Fleiss' kappa needs every labeler on every subject (no NaN)")
    lab = pair_labels(r)  # (N, R, P)
    t = np.stack([(lab == v).sum(axis=1) for v in (1.0, 0.0, -1.0)], axis=-1)  # (N, P, 3)
    return t.reshape(-1, 3)


def krippendorff_alpha_ordinal(data: np.ndarray) -> float:
    """Krippendorff's alpha with the ordinal metric.

    data: (R raters, U units), values ordinal (e.g. ranks), NaN = missing. Only units with >= 2
    values are pairable. Built from the coincidence matrix o_ck (each unit with m_u values
    adds 1/(m_u - 1) for every ordered pair of its values from different raters), marginals
    n_c and n = sum n_c; ordinal distance d(c,k) = (sum_{g=c..k} n_g - (n_c + n_k)/2)^2;
    alpha = 1 - (n - 1) * sum o_ck d_ck / sum_{c,k} n_c n_k d_ck (Krippendorff 2011).
    NaN when fewer than two values occur.
    """
    x = np.asarray(data, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"data must be (raters, units), got shape {x.shape}")
    values = np.unique(x[~np.isnan(x)])
    V = len(values)
    if V < 2:
        return float("nan")
    idx = np.searchsorted(values, x)  # garbage where NaN, masked below
    o = np.zeros((V, V))
    for u in range(x.shape[1]):
        present = ~np.isnan(x[:, u])
        m = int(present.sum())
        if m < 2:
            continue
        cnt = np.bincount(idx[present, u], minlength=V).astype(float)
        # ordered pairs of different raters: cnt_c * cnt_k, minus same-rater pairs on the diagonal
        o += (np.outer(cnt, cnt) - np.diag(cnt)) / (m - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n <= 1:
        return float("nan")
    cum = np.cumsum(n_c)
    lo, hi = np.minimum.outer(np.arange(V), np.arange(V)), np.maximum.outer(np.arange(V), np.arange(V))
    between = cum[hi] - np.where(lo > 0, cum[lo - 1], 0.0)  # sum_{g=lo..hi} n_g
    d = (between - (n_c[:, None] + n_c[None, :]) / 2) ** 2
    d_obs = (o * d).sum()
    d_exp = (np.outer(n_c, n_c) * d).sum()
    if d_exp == 0:
        return float("nan")
    return float(1 - (n - 1) * d_obs / d_exp)


def _midranks(row: np.ndarray) -> tuple[np.ndarray, float]:
    """Ranks 1..n with ties given their average rank, and the tie term sum(t^3 - t)."""
    order = np.argsort(row, kind="stable")
    sorted_vals = row[order]
    out = np.empty(len(row))
    tie_term = 0.0
    start = 0
    while start < len(row):
        end = start
        while end + 1 < len(row) and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2 + 1
        t = end - start + 1
        tie_term += t**3 - t
        start = end + 1
    return out, tie_term


def kendalls_w(ranks: np.ndarray) -> float:
    """Kendall's coefficient of concordance W of m raters ranking the same n items, tie-corrected.

    ranks: (m, n); any ordinal scores, lower = better (each row is turned into midranks 1..n).
    W = 12 S / (m^2 (n^3 - n) - m sum_j T_j), S = sum_i (R_i - mean R)^2 with R_i the rank sum of
    item i, T_j = sum over tie groups of rater j of (t^3 - t). 1 = full agreement, 0 = none.
    """
    x = np.asarray(ranks, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"ranks must be (m>=2 raters, n>=2 items), got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("Kendall's W needs complete rankings (no NaN)")
    m, n = x.shape
    rows = [_midranks(row) for row in x]
    R = np.sum([r for r, _ in rows], axis=0)
    S = ((R - R.mean()) ** 2).sum()
    T = sum(t for _, t in rows)
    denom = m**2 * (n**3 - n) - m * T
    if denom == 0:
        return float("nan")
    return float(12 * S / denom)


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """Dense tier ranks implied by scores (higher score = better = rank 0; equal scores tie). (..., K) -> (..., K)."""
    s = np.asarray(scores, dtype=float)
    out = np.empty_like(s)
    flat_s, flat_o = s.reshape(-1, s.shape[-1]), out.reshape(-1, s.shape[-1])
    for row, dst in zip(flat_s, flat_o):
        levels = np.unique(-row)
        dst[:] = np.searchsorted(levels, -row)
    return out


def gold_agreement(ranks: np.ndarray, gold_scores: np.ndarray, ties: Ties = "exclude") -> float:
    """Agreement of a labeler's rankings with the order implied by gold scores.

    ranks: (K,) or (N, K) rank vectors; gold_scores: same shape, higher = better, equal = tie.
    Same pair semantics as ``pairwise_agreement``.
    """
    return pairwise_agreement(ranks, ranks_from_scores(gold_scores), ties)
