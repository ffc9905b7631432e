"""Per-token KL estimators and KL-coefficient controllers.

The estimators follow Schulman's note "Approximating KL divergence" (2020) as
summarised in docs/reference.md §6.1: tokens are sampled from q = the policy, p = the
reference, and r = p/q = exp(ref_logp - logp) per token. Each returns a per-token
estimate of KL(q || p) whose expectation over q-samples is (k1, k3) or approximates
(k2) the true KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "kl_k1",
    "kl_k2",
    "kl_k3",
]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = -log r = logp - ref_logp: unbiased, high variance, can be negative.

    This is the per-token KL of lm-human-preferences train_policy.py ``compute_rewards``
    (``kl = logprobs - ref_logprobs``) and TRL's default ``kl_estimator="k1"``.

    Args:
        logprobs: (B, T) log pi(token) of the sampled tokens.
        ref_logprobs: (B, T) log pi_ref(token) of the same tokens.

    Returns:
        (B, T) per-token estimates.
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log r)^2 / 2: biased, low variance, >= 0.

    Args:
        logprobs: (B, T) log pi of the sampled tokens.
        ref_logprobs: (B, T) log pi_ref of the same tokens.

    Returns:
        (B, T) per-token estimates.
    """
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = exp(ref_logp - logp): unbiased, >= 0, low variance.

    TRL's ``kl_estimator="k3"`` (``(logr.exp() - 1) - logr``) and the GRPO penalty
    ``pi_ref/pi - log(pi_ref/pi) - 1`` (docs/reference.md §6.1, §6.6). ``expm1`` keeps the
    small-difference case accurate.

    Args:
        logprobs: (B, T) log pi of the sampled tokens.
        ref_logprobs: (B, T) log pi_ref of the same tokens.

    Returns:
        (B, T) per-token estimates.
    """
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


class KLController(Protocol):
    """What a PPO loop needs from a KL coefficient: read ``value``, ``update`` once per batch."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class FixedKLController:
    """A constant KL coefficient (summarisation settings, TRL's ``kl_coef``; docs/reference.md §2.8)."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional controller steering the measured KL towards ``target``.

    lm-human-preferences train_policy.py ``AdaptiveKLController.update``
    (docs/reference.md §2.8)::

        proportional_error = clip(current / target - 1, -0.2, 0.2)
        value *= 1 + proportional_error * n_steps / horizon

    ``current_kl`` is ``objective/kl``: the batch mean of the per-sequence sum of k1.
    ``n_steps`` is the number of episodes in the batch, so the effective gain K_beta of
    the paper is batch / horizon (0.1 for 1024 / 10000). The clip bounds each update to
    a factor in [1 - 0.2 n/h, 1 + 0.2 n/h].

    Attributes:
        value: the current coefficient beta (starts at the initial coefficient).
        target: the KL (nats per sequence) to steer towards, > 0.
        horizon: episodes over which the error is corrected, > 0.
    """

    value: float
    target: float
    horizon: int

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"target KL must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiply ``value`` by ``1 + clip(current/target - 1, -0.2, 0.2) * n_steps / horizon``.

        A non-finite ``current_kl`` raises ValueError rather than turning beta into nan.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """The coefficient reached so far; target and horizon come from the config on resume."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
