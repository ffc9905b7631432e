"""preflab.rl.stats: Wilson interval, win rate, bootstrap interval."""

import math

import numpy as np
import pytest
import torch

from preflab.rl.stats import (
    between_prompt_share,
    bootstrap_ci,
    centred_lengths,
    difference_interval,
    length_slope,
    length_slope_sums,
    prompt_variance_sums,
    wilson_interval,
    win_rate,
)


def test_wilson_60_of_100():
    """p = 0.6, z = 1.96, z^2/n = 0.038416, denominator 1.038416.
    centre = (0.6 + 0.019208)/1.038416 = 0.596300
    half   = 1.96 * sqrt(0.24/100 + 3.8416/40000)/1.038416 = 1.96 * 0.0499604/1.038416 = 0.094300
    -> (0.5020, 0.6906)."""
    lo, hi = wilson_interval(60, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.5020, 0.6906)


def test_wilson_zero_successes_does_not_collapse():
    """0 of 10: centre = half = (3.8416/20)/1.38416 = 0.138770, so (0, 0.277540)."""
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.277540, abs=1e-6)


def test_wilson_fractional_successes_and_bad_input():
    """Ties count half: 59.5 of 100 sits between 59 and 60."""
    assert wilson_interval(59, 100).lo < wilson_interval(59.5, 100).lo < wilson_interval(60, 100).lo
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_win_rate_counts_ties_half():
    """A = [3, 2, 1, 5], B = [1, 2, 2, 4]: wins (3>1, 5>4) = 2, ties 1, losses 1;
    rate = (2 + 0.5)/4 = 0.625, interval = wilson_interval(2.5, 4)."""
    out = win_rate([3, 2, 1, 5], [1, 2, 2, 4])
    assert (out.wins, out.ties, out.losses, out.n) == (2, 1, 1, 4)
    assert out.rate == 0.625
    assert (out.lo, out.hi) == wilson_interval(2.5, 4)
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, size=200)
    lo, hi = bootstrap_ci(x, n_resamples=500, seed=3)
    assert (lo, hi) == bootstrap_ci(x, n_resamples=500, seed=3)
    assert lo < x.mean() < hi
    assert 0.15 < hi - lo < 0.4  # about 2 * 1.96 / sqrt(200) = 0.277
    assert bootstrap_ci(np.full(10, 2.5)) == (2.5, 2.5)


def test_average_ranks_and_spearman_hand_computed():
    from preflab.rl.stats import average_ranks, spearman

    assert average_ranks([10, 30, 20, 20]).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1 2 3 4, y: 2 1 4 3 -> d^2 = 1+1+1+1 = 4 -> 1 - 6*4/(4*15) = 0.6
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_difference_interval_matches_newcombe_1998_example():
    """Newcombe (1998), Table II, 56/70 - 48/80: method 10 gives 0.0524 to 0.3339."""
    lo, hi = difference_interval(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    lo2, hi2 = difference_interval(48, 80, 56, 70)  # the other way round: mirrored
    assert (lo2, hi2) == pytest.approx((-hi, -lo))


def test_conservative_reward_against_hand_values():
    import torch

    from preflab.rl.stats import conservative_reward

    s = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # two members, three samples
    assert conservative_reward(s, "mean").tolist() == [2.0, 2.0, 2.0]
    assert conservative_reward(s, "mean_minus_std", 0.5).tolist() == [1.5, 2.0, 1.5]  # std (population) 1, 0, 1
    assert conservative_reward(s, "min").tolist() == [1.0, 2.0, 1.0]
    assert conservative_reward(s[:1], "mean_minus_std").tolist() == [1.0, 2.0, 3.0]  # one member: its score
    with pytest.raises(ValueError, match="unknown ensemble"):
        conservative_reward(s, "max")


def test_ensemble_spread_is_the_members_mean_and_population_std_as_conservative_reward_uses():
    import torch

    from preflab.rl.stats import conservative_reward, ensemble_spread

    s = [[1.0, 2.0, 0.0], [3.0, 2.0, 4.0], [2.0, 2.0, -1.0]]  # three members, three samples
    mean, std = ensemble_spread(s)
    assert mean.tolist() == pytest.approx([2.0, 2.0, 1.0])
    assert std.tolist() == pytest.approx([math.sqrt(2 / 3), 0.0, math.sqrt(14 / 3)])  # divided by M, not M - 1
    # mean_minus_std with lambda 1 is exactly mean - this std
    cons = conservative_reward(torch.tensor(s, dtype=torch.float64), "mean_minus_std", 1.0)
    assert cons.tolist() == pytest.approx((mean - std).tolist())
    assert ensemble_spread([[5.0, 6.0]])[1].tolist() == [0.0, 0.0]  # one member: no disagreement
    with pytest.raises(ValueError, match="members, samples"):
        ensemble_spread([1.0, 2.0])


def test_most_uncertain_is_the_largest_first_ties_by_position():
    from preflab.rl.stats import most_uncertain

    u = [0.3, 0.9, 0.1, 0.9, 0.5]
    assert most_uncertain(u, 3) == [1, 3, 4]
    assert most_uncertain(u, 10) == [1, 3, 4, 0, 2] and most_uncertain(u, 0) == []


def test_between_prompt_share_by_hand_and_summed_over_ranks():
    # prompts (1, 3) and (5, 7): within-prompt variance 4 / (4 - 2) = 2, total 20 / 3, share 1 - 2 / (20 / 3) = 0.7
    seq = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert between_prompt_share(prompt_variance_sums(seq, 2), 2) == pytest.approx(0.7)
    halves = prompt_variance_sums(seq[:2], 2) + prompt_variance_sums(seq[2:], 2)  # two ranks, one prompt each
    assert between_prompt_share(halves, 2) == pytest.approx(0.7)
    # equal prompt means: the unbiased estimate falls below 0 (1 - 2 / (4 / 3))
    assert between_prompt_share(prompt_variance_sums(torch.tensor([1.0, 3.0, 1.0, 3.0]), 2), 2) == pytest.approx(-0.5)
    # the same four numbers as one prompt of k = 4: nothing between prompts to measure
    assert math.isnan(between_prompt_share(prompt_variance_sums(seq, 4), 4))
    assert math.isnan(between_prompt_share(prompt_variance_sums(torch.ones(4), 2), 2))


def test_length_slope_by_hand_over_kept_samples_and_summed_over_ranks():
    """Prompt A: scores (1, 2, 6) at lengths (10, 20, 30): centred (-2, -1, 3) and (-10, 0, 10), cross 50,
    square 200. Prompt B: (5, 0, 9) at (4, 8, 100) with the third not kept: centred over the first two,
    (2.5, -2.5) and (-2, 2), cross -10, square 8. Slope 40 / 208 = 5 / 26."""
    scores = torch.tensor([1.0, 2.0, 6.0, 5.0, 0.0, 9.0])
    lengths = torch.tensor([10, 20, 30, 4, 8, 100])
    kept = torch.tensor([True, True, True, True, True, False])
    sums = length_slope_sums(scores, lengths, kept, 3)
    assert sums.tolist() == pytest.approx([40.0, 208.0])
    assert length_slope(sums) == pytest.approx(5 / 26)
    assert centred_lengths(lengths, kept, 3).tolist() == [-10.0, 0.0, 10.0, -2.0, 2.0, 0.0]
    halves = length_slope_sums(scores[:3], lengths[:3], kept[:3], 3) + length_slope_sums(scores[3:], lengths[3:], kept[3:], 3)
    assert length_slope(halves) == pytest.approx(5 / 26)  # two ranks, one prompt each
    # the same six as two prompts of k = 3 in the other order: the slope is within prompts, not across them
    assert length_slope(length_slope_sums(scores.flip(0), lengths.flip(0), kept.flip(0), 3)) == pytest.approx(5 / 26)
    # equal lengths within every prompt, or nothing kept: no slope to fit
    assert length_slope(length_slope_sums(scores, torch.tensor([5, 5, 5, 7, 7, 7]), kept, 3)) == 0.0
    assert length_slope(length_slope_sums(scores, lengths, torch.zeros(6, dtype=torch.bool), 3)) == 0.0
    # across prompts of different lengths and scores the slope would be 1 here; within them it is 0
    assert length_slope(length_slope_sums(torch.tensor([1.0, 1.0, 9.0, 9.0]), torch.tensor([1, 1, 9, 9]),
                                          torch.ones(4, dtype=torch.bool), 2)) == 0.0
