"""preflab.rl.ppo: clipped losses at and beyond the clip range, explained variance, LM loss."""

import math

import torch

from preflab.rl.ppo import explained_variance, policy_loss, value_loss

F64 = torch.float64


def test_policy_loss_inside_at_and_beyond_the_clip_range():
    """clip 0.2, old logp 0, so ratio = exp(logp). Per token, loss = max(-A r, -A clip(r, 0.8, 1.2)):
      A=+1, r=1.1 (inside):          max(-1.1, -1.1) = -1.1   not clipped, d/dlogp = -1.1
      A=+1, r=1.2 (at the edge):     max(-1.2, -1.2) = -1.2   not clipped (equal), d/dlogp = -1.2
      A=+1, r=1.5 (beyond):          max(-1.5, -1.2) = -1.2   clipped, no gradient
      A=-1, r=0.5 (beyond, below):   max( 0.5,  0.8) =  0.8   clipped, no gradient
      A=-1, r=1.5 (beyond, but bad): max( 1.5,  1.2) =  1.5   not clipped, d/dlogp = +1.5
      (6th token is padding with absurd values.)
    loss = (-1.1 - 1.2 - 1.2 + 0.8 + 1.5)/5 = -1.2/5 = -0.24;  clipfrac = 2/5 = 0.4.
    approxkl = 0.5 * mean(ln(r)^2) = 0.5 * (0.0090840 + 0.0332412 + 0.1644020 + 0.4804530
               + 0.1644020)/5 = 0.5 * 0.8515821/5 = 0.0851582.
    ratio_mean = (1.1 + 1.2 + 1.5 + 0.5 + 1.5)/5 = 1.16.
    Gradients are the d/dlogp above divided by the 5 counted tokens."""
    ratios = torch.tensor([[1.1, 1.2, 1.5, 0.5, 1.5, 9.0]], dtype=F64)
    logp = ratios.log().requires_grad_(True)
    assert torch.exp(logp)[0, 1].item() == 1.2  # the "at the edge" case really is at the edge
    old = torch.zeros(1, 6, dtype=F64)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 50.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out = policy_loss(logp, old, adv, mask, clip_range=0.2)
    torch.testing.assert_close(out.loss, torch.tensor(-0.24, dtype=F64))
    torch.testing.assert_close(out.clipfrac, torch.tensor(0.4, dtype=F64))
    logs = [math.log(r) for r in (1.1, 1.2, 1.5, 0.5, 1.5)]
    torch.testing.assert_close(out.approxkl, torch.tensor(0.5 * sum(x * x for x in logs) / 5, dtype=F64))
    torch.testing.assert_close(out.approxkl, torch.tensor(0.0851582, dtype=F64), atol=1e-7, rtol=0)
    torch.testing.assert_close(out.ratio_mean, torch.tensor(1.16, dtype=F64))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1, -1.2, 0.0, 0.0, 1.5, 0.0]], dtype=F64) / 5)
    assert not out.clipfrac.requires_grad and not out.approxkl.requires_grad


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    """On the first minibatch pi = pi_old, so ratio = 1 and loss = -mean(A) = -(1 - 3)/2 = 1."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64)
    out = policy_loss(logp, logp.clone(), torch.tensor([[1.0, -3.0]], dtype=F64), torch.ones(1, 2))
    torch.testing.assert_close(out.loss, torch.tensor(1.0, dtype=F64))
    assert out.clipfrac.item() == 0.0 and out.approxkl.item() == 0.0


def test_value_loss_inside_at_and_beyond_the_clip_range():
    """clip 0.2, old values 0, so v_clipped = clip(v, -0.2, 0.2). Per token max((v-R)^2, (vc-R)^2):
      v=0.1, R=1   (inside):               0.81 vs 0.81 -> 0.81  not clipped
      v=0.2, R=1   (at the edge):          0.64 vs 0.64 -> 0.64  not clipped
      v=0.5, R=1   (beyond):               0.25 vs 0.64 -> 0.64  clipped
      v=0.5, R=0.4 (beyond, overshoot):    0.01 vs 0.04 -> 0.04  clipped
      v=0.5, R=0   (beyond, wrong way):    0.25 vs 0.04 -> 0.25  not clipped
    loss = 0.5 * (0.81 + 0.64 + 0.64 + 0.04 + 0.25)/5 = 0.5 * 0.476 = 0.238; clipfrac = 2/5.
    d loss/dv = 0.5/5 * 2(v - R) on the unclipped tokens: [-0.18, -0.16, 0, 0, 0.1]."""
    values = torch.tensor([[0.1, 0.2, 0.5, 0.5, 0.5, 3.0]], dtype=F64, requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.4, 0.0, -9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out = value_loss(values, torch.zeros(1, 6, dtype=F64), returns, mask, clip_range=0.2)
    torch.testing.assert_close(out.loss, torch.tensor(0.238, dtype=F64))
    torch.testing.assert_close(out.clipfrac, torch.tensor(0.4, dtype=F64))
    out.loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-0.18, -0.16, 0.0, 0.0, 0.1, 0.0]], dtype=F64))


def test_explained_variance_hand_computed():
    """R = [1, 2, 3, 4], var(R) = 1.25 (biased).
    V = R            -> 1 - 0/1.25 = 1;   V = R + 5 -> 1 (a constant offset is not penalised);
    V = 2.5          -> 1 - 1.25/1.25 = 0;
    V = [1, 3, 3, 4] -> R - V = [0, -1, 0, 0], mean -0.25, var = (3*0.0625 + 0.5625)/4 = 0.1875,
                        1 - 0.1875/1.25 = 0.85."""
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == 1.0
    assert explained_variance(returns + 5, returns, mask).item() == 1.0
    assert abs(explained_variance(torch.full_like(returns, 2.5), returns, mask).item()) < 1e-12
    values = torch.tensor([[1.0, 3.0, 3.0, 4.0, -7.0]], dtype=F64)
    assert abs(explained_variance(values, returns, mask).item() - 0.85) < 1e-12
