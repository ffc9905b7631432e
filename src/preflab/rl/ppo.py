"""PPO clipped policy and value losses, and the language-modelling loss of SFT and PPO-ptx.

Shapes: B = episodes, T = response positions, V = vocabulary. Masks are (B, T),
nonzero on real tokens. Losses are token-level means over the masked tokens of the
minibatch (lm-human-preferences ``reduce_mean`` over all tokens; TRL ``masked_mean``).
Diagnostics are detached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .logprobs import masked_mean, masked_var

__all__ = [
    "PolicyLoss",
    "ValueLoss",
    "explained_variance",
    "policy_loss",
    "value_loss",
]


class PolicyLoss(NamedTuple):
    """Clipped surrogate loss and its diagnostics.

    Attributes:
        loss: scalar, differentiable ``pg_loss``.
        clipfrac: scalar, fraction of tokens where the clipped term was chosen
            (``policy/clipfrac``).
        approxkl: scalar, 0.5 * mean((logp - old_logp)^2): KL between consecutive PPO
            iterates (``policy/approxkl``), *not* the KL to the reference.
        ratio_mean: scalar, mean of pi/pi_old over real tokens.
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    ratio_mean: torch.Tensor


class ValueLoss(NamedTuple):
    """Clipped value loss and its diagnostic.

    Attributes:
        loss: scalar, differentiable ``vf_loss`` (already includes the factor 0.5).
        clipfrac: scalar, fraction of tokens where the clipped error was larger
            (``value/clipfrac``).
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> PolicyLoss:
    """PPO's clipped surrogate objective, as a loss to minimise.

    lm-human-preferences train_policy.py ``PPOTrainer.loss`` (docs/reference.md §2.6)::

        ratio = exp(logp - old_logp)
        pg_loss = mean(max(-A*ratio, -A*clip(ratio, 1-eps, 1+eps)))
        pg_clipfrac = mean(-A*clip(...) > -A*ratio)
        approxkl = 0.5*mean((logp - old_logp)^2)

    Args:
        logprobs: (B, T) log pi_theta of the sampled tokens (differentiable).
        old_logprobs: (B, T) log pi_old from the rollout (no gradient needed).
        advantages: (B, T) whitened advantages.
        mask: (B, T) nonzero on real response tokens.
        clip_range: epsilon (0.2 in InstructGPT, lm-human-preferences and TRL).

    Returns:
        PolicyLoss(loss, clipfrac, approxkl, ratio_mean), all scalars.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approxkl=approxkl, ratio_mean=ratio_mean)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> ValueLoss:
    """Clipped squared error of the value head.

    lm-human-preferences train_policy.py ``PPOTrainer.loss`` (docs/reference.md §2.7)::

        vpredclipped = clip(vpred, values - 0.2, values + 0.2)
        vf_loss = 0.5*mean(max((vpred - R)^2, (vpredclipped - R)^2))

    Args:
        values: (B, T) current value predictions (differentiable).
        old_values: (B, T) value predictions from the rollout.
        returns: (B, T) targets from ``gae``.
        mask: (B, T) nonzero on real response tokens.
        clip_range: how far the prediction may move from ``old_values`` (0.2).

    Returns:
        ValueLoss(loss, clipfrac), scalars.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    error_unclipped = (values - returns) ** 2
    error_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error_unclipped, error_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((error_clipped > error_unclipped).to(values.dtype), mask)
    return ValueLoss(loss=loss, clipfrac=clipfrac)


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over real tokens (``value/explained_variance``).

    The usual definition (cleanrl's ``explained_var``), with biased variances. It differs
    from lm-human-preferences ``ppo/val/var_explained = 1 - error/returns_var``
    (docs/reference.md §2.9), whose ``error`` is the mean squared error: that one also
    counts a constant offset of the values against them, this one does not. 1 is
    perfect, 0 is no better than predicting the mean return, negative is worse; ``nan``
    when the returns are constant.

    Args:
        values: (B, T) value predictions.
        returns: (B, T) targets.
        mask: (B, T) nonzero on real tokens.

    Returns:
        scalar tensor.
    """
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)
