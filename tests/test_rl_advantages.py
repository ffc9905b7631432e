"""preflab.rl.advantages: reward placement, GAE and whitening against hand-computed values."""

import math

import pytest
import torch

from preflab.rl.advantages import (
    gae,
    last_token_index,
    ppo_rewards,
    whiten_advantages,
    whiten_rewards,
)
from preflab.rl.logprobs import masked_mean, masked_var


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_score_on_last_real_token_right_padded():
    """kl_coef 0.5, scores [1, 2]. Row 0 is full length, row 1 has one padded position
    (whose kl 9.9 must be ignored).
    non_score_reward = -0.5 * kl = [[-0.05, -0.10, -0.15], [-0.20, -0.25, 0]].
    Row 0's last real token is t=2: -0.15 + 1 = 0.85. Row 1's is t=1: -0.25 + 2 = 1.75."""
    kl = _t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = ppo_rewards(kl, _t([1.0, 2.0]), mask, kl_coef=0.5)
    torch.testing.assert_close(out.non_score_reward, _t([[-0.05, -0.10, -0.15], [-0.20, -0.25, 0.0]]))
    torch.testing.assert_close(out.rewards, _t([[-0.05, -0.10, 0.85], [-0.20, 1.75, 0.0]]))


def test_score_on_last_real_token_left_padded_and_both_sides():
    """kl_coef 0.5, scores [1, 2, 3]; the 9.9 entries sit on padding and must be ignored.
    Row 0, left-padded (mask [0, 0, 1, 1]):  [0, 0, -0.10, -0.15 + 1]       = [0, 0, -0.10, 0.85]
    Row 1, full (mask [1, 1, 1, 1]):         [-0.20, -0.25, -0.30, -0.10 + 2] = [-0.20, -0.25, -0.30, 1.90]
    Row 2, padded both sides ([0, 1, 1, 0]): [0, -0.05, -0.05 + 3, 0]        = [0, -0.05, 2.95, 0]"""
    kl = _t([[9.9, 9.9, 0.2, 0.3], [0.4, 0.5, 0.6, 0.2], [9.9, 0.1, 0.1, 9.9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])
    out = ppo_rewards(kl, _t([1.0, 2.0, 3.0]), mask, kl_coef=0.5)
    expected = _t([[0.0, 0.0, -0.10, 0.85], [-0.20, -0.25, -0.30, 1.90], [0.0, -0.05, 2.95, 0.0]])
    torch.testing.assert_close(out.rewards, expected)
    torch.testing.assert_close(
        out.non_score_reward,
        _t([[0.0, 0.0, -0.10, -0.15], [-0.20, -0.25, -0.30, -0.10], [0.0, -0.05, -0.05, 0.0]]),
    )


def test_last_token_index_and_empty_row():
    assert last_token_index(torch.tensor([[1, 1, 0], [0, 1, 1], [0, 1, 0]])).tolist() == [1, 2, 1]
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError):
        ppo_rewards(_t([[0.1]]), _t([1.0, 2.0]), torch.tensor([[1]]), kl_coef=0.1)


def test_gae_three_tokens_with_padding():
    """gamma 0.9, lambda 0.5 (so both matter). Row: rewards [1, 0, 2, pad], values
    [0.5, 1.0, 1.5, 7 (pad)], mask [1, 1, 1, 0]. The episode ends at t=2: next value 0.
    t=2: delta = 2 + 0.9*0   - 1.5 = 0.5;   A2 = 0.5
    t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35;  A1 = 0.35 + 0.45*0.5   = 0.575
    t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;   A0 = 1.4  + 0.45*0.575 = 1.65875
    returns = A + V = [2.15875, 1.575, 2.0], and 0 at the padded position."""
    rewards = _t([[1.0, 0.0, 2.0, 5.0]])
    values = _t([[0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(out.advantages, _t([[1.65875, 0.575, 0.5, 0.0]]))
    torch.testing.assert_close(out.returns, _t([[2.15875, 1.575, 2.0, 0.0]]))


def test_gae_defaults_gamma_one_lambda_095():
    """gamma 1, lambda 0.95 (lm-human-preferences). rewards [0, 0, 1], values [0.2, 0.4, 0.6].
    t=2: delta = 1 - 0.6 = 0.4;           A2 = 0.4
    t=1: delta = 0 + 0.6 - 0.4 = 0.2;     A1 = 0.2 + 0.95*0.4  = 0.58
    t=0: delta = 0 + 0.4 - 0.2 = 0.2;     A0 = 0.2 + 0.95*0.58 = 0.751
    returns = [0.951, 0.98, 1.0]."""
    out = gae(_t([[0.0, 0.0, 1.0]]), _t([[0.2, 0.4, 0.6]]), torch.ones(1, 3))
    torch.testing.assert_close(out.advantages, _t([[0.751, 0.58, 0.4]]))
    torch.testing.assert_close(out.returns, _t([[0.951, 0.98, 1.0]]))


def _reference_gae(rewards, values, gamma, lam):
    """lm-human-preferences train_policy.py PPOTrainer.loss, verbatim in torch."""
    last, out = 0.0, []
    n = rewards.shape[1]
    for t in reversed(range(n)):
        nv = values[:, t + 1] if t < n - 1 else 0.0
        delta = rewards[:, t] + gamma * nv - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    return torch.stack(out[::-1], dim=1)


def test_gae_matches_reference_loop_on_right_padded_batch():
    """Right padding with padded rewards and values set to 0 is the reference loop exactly."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 8, generator=g, dtype=torch.float64)
    values = torch.randn(5, 8, generator=g, dtype=torch.float64)
    lengths = torch.tensor([8, 5, 1, 7, 3])
    mask = torch.arange(8)[None, :] < lengths[:, None]
    expected = _reference_gae(rewards * mask, values * mask, 0.99, 0.95) * mask
    out = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(out.returns, (expected + values) * mask)


def test_gae_left_padding_does_not_change_real_positions():
    """The same episode, left-padded by two positions, gets the same advantages there."""
    rewards, values = _t([[1.0, 0.0, 2.0]]), _t([[0.5, 1.0, 1.5]])
    plain = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    padded = gae(
        torch.cat([_t([[3.0, 3.0]]), rewards], 1),
        torch.cat([_t([[9.0, 9.0]]), values], 1),
        torch.tensor([[0, 0, 1, 1, 1]]),
        gamma=0.9,
        lam=0.5,
    )
    torch.testing.assert_close(padded.advantages, torch.cat([_t([[0.0, 0.0]]), plain.advantages], 1))
    torch.testing.assert_close(padded.returns, torch.cat([_t([[0.0, 0.0]]), plain.returns], 1))


def test_whiten_advantages_and_rewards():
    """Real values [1, 2, 3] and one pad. mean 2, biased var 2/3, 1/sqrt(2/3) = 1.224745.
    Advantages: [-1.224745, 0, 1.224745, 0]. Rewards (mean kept): [0.775255, 2, 3.224745, 0]."""
    x = _t([[1.0, 2.0, 3.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    s = 1.0 / math.sqrt(2.0 / 3.0 + 1e-8)
    torch.testing.assert_close(whiten_advantages(x, mask), _t([[-s, 0.0, s, 0.0]]))
    torch.testing.assert_close(whiten_rewards(x, mask), _t([[2 - s, 2.0, 2 + s, 0.0]]))


def test_returns_are_computed_before_whitening():
    """Whitening the advantages afterwards leaves GAE's returns (A + V) untouched."""
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.ones(3, 4)
    out = gae(rewards, values, mask)
    white = whiten_advantages(out.advantages, mask)
    torch.testing.assert_close(out.returns, out.advantages + values)
    assert abs(float(masked_mean(white, mask))) < 1e-6
    assert abs(float(masked_var(white, mask)) - 1.0) < 1e-5
