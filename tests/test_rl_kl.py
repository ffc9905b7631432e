"""preflab.rl.kl: estimators and controllers against hand-computed values."""

import math

import pytest
import torch

from preflab.rl.kl import AdaptiveKLController, FixedKLController, KLController, kl_k1, kl_k2, kl_k3

LN2 = math.log(2.0)


def test_k1_k2_k3_hand_computed():
    """Token 1: pi = 0.5, pi_ref = 0.25. Token 2: pi = 0.25, pi_ref = 0.5.
    k1 = ln pi - ln pi_ref = [ln 2, -ln 2] = [0.693147, -0.693147].
    r = pi_ref / pi = [0.5, 2];  k3 = (r - 1) - ln r = [-0.5 + ln 2, 1 - ln 2] = [0.193147, 0.306853].
    k2 = (ln r)^2 / 2 = (ln 2)^2 / 2 = 0.240227 for both."""
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.25, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([[LN2, -LN2]], dtype=torch.float64))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([[LN2 - 0.5, 1.0 - LN2]], dtype=torch.float64))
    torch.testing.assert_close(kl_k2(logp, ref), torch.full((1, 2), 0.5 * LN2**2, dtype=torch.float64))


def test_k1_and_k3_are_unbiased_in_exact_expectation():
    """q = pi = [1/2, 1/4, 1/4], p = pi_ref = [1/4, 1/4, 1/2] over a 3-token vocabulary.
    KL(q||p) = 1/2 ln 2 + 1/4 ln 1 + 1/4 ln(1/2) = 1/4 ln 2 = 0.173287.
    E_q[k1] = sum q (ln q - ln p) = KL.
    E_q[k3] = sum q (p/q - 1) - sum q ln(p/q) = (sum p - 1) + KL = KL."""
    q = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    p = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    kl = torch.tensor(0.25 * LN2, dtype=torch.float64)
    torch.testing.assert_close((q * kl_k1(q.log(), p.log())).sum(), kl)
    torch.testing.assert_close((q * kl_k3(q.log(), p.log())).sum(), kl)


def test_k3_is_non_negative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    assert bool((kl_k3(logp, ref) >= 0).all())
    assert bool((kl_k3(logp, logp) == 0).all())


def test_adaptive_controller_update_inside_and_at_the_clip():
    """init 0.15, target 6, horizon 10000, batch n = 512 (n/horizon = 0.0512).
    KL 7:  error = 7/6 - 1 = 1/6 (inside the clip); beta = 0.15 * (1 + 0.0512/6) = 0.15128.
    KL 12: error = 12/6 - 1 = 1, clipped to 0.2;   beta = 0.15128 * (1 + 0.2*0.0512) = 0.15128 * 1.01024
           = 0.152829.
    KL 0:  error = -1, clipped to -0.2;            beta = 0.152829 * (1 - 0.01024) = 0.151264."""
    ctl = AdaptiveKLController(value=0.15, target=6.0, horizon=10000)
    ctl.update(7.0, n_steps=512)
    assert ctl.value == pytest.approx(0.15 * (1 + 0.0512 / 6))
    assert ctl.value == pytest.approx(0.15128, abs=1e-6)
    ctl.update(12.0, n_steps=512)
    assert ctl.value == pytest.approx(0.15128 * 1.01024, abs=1e-9)
    ctl.update(0.0, n_steps=512)
    assert ctl.value == pytest.approx(0.15128 * 1.01024 * 0.98976, abs=1e-9)


def test_adaptive_controller_at_target_does_not_move_and_rejects_nan():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(6.0, n_steps=1024)
    assert ctl.value == 0.1
    with pytest.raises(ValueError):
        ctl.update(float("nan"), n_steps=1024)
    with pytest.raises(ValueError):
        AdaptiveKLController(value=0.1, target=0.0, horizon=10000)


def test_controllers_state_dict_round_trip_and_protocol():
    """A resumed controller continues from the saved beta, not the initial one."""
    ctl = AdaptiveKLController(value=0.15, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=1024)
    resumed = AdaptiveKLController(value=0.15, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value != 0.15

    fixed = FixedKLController(value=0.05)
    fixed.update(100.0, n_steps=512)
    assert fixed.value == 0.05
    other = FixedKLController(value=0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05

    controllers: list[KLController] = [ctl, fixed]
    assert all(isinstance(c.value, float) for c in controllers)
