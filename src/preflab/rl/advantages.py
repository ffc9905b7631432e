"""Per-token rewards, GAE and whitening for PPO.

Shapes: B = episodes, T = response positions. ``mask`` / ``response_mask`` is (B, T),
nonzero on the real response tokens; it may have trailing zeros (right padding), leading
zeros (left padding) or both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .logprobs import masked_whiten

__all__ = [
    "GAE",
    "PPORewards",
    "gae",
    "last_token_index",
    "ppo_rewards",
    "whiten_advantages",
    "whiten_rewards",
]


class PPORewards(NamedTuple):
    """Per-token rewards of a rollout batch.

    Attributes:
        rewards: (B, T) ``non_score_reward`` plus the score on each row's last real token;
            0 at padding.
        non_score_reward: (B, T) ``-kl_coef * kl`` on every real token; 0 at padding.
            Its row sum is what ``objective/non_score_reward`` averages.
    """

    rewards: torch.Tensor
    non_score_reward: torch.Tensor


class GAE(NamedTuple):
    """Generalised advantage estimates.

    Attributes:
        advantages: (B, T) A_t, not whitened; 0 at padding.
        returns: (B, T) ``advantages + values``, the value-function target; 0 at padding.
    """

    advantages: torch.Tensor
    returns: torch.Tensor


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry of each row.

    Args:
        mask: (B, T); every row must have at least one nonzero entry.

    Returns:
        (B,) int64.
    """
    real = mask.bool()
    if not bool(real.any(dim=-1).all()):
        raise ValueError("every row of the mask needs at least one real token")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(real)
    return torch.where(real, positions, -1).amax(dim=-1)


def ppo_rewards(
    kl: torch.Tensor, scores: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> PPORewards:
    """Per-token KL penalty on every response token plus the RM score on the last one.

    lm-human-preferences train_policy.py ``compute_rewards`` (docs/reference.md §2.1)::

        non_score_reward = -kl_ctl.value * kl
        rewards = non_score_reward.copy(); rewards[:, -1] += scores

    Responses there have a fixed length, so ``-1`` is the last token. Here rows may be
    padded on either side, so the score goes on each row's *last real* token
    (docs/reference.md §2.1); padding gets 0 whatever ``kl`` holds there.

    The estimator is the caller's choice: pass ``kl_k1(logp, ref)`` (the reference's
    default) or ``kl_k3(logp, ref)`` from ``preflab.rl.kl``.

    Args:
        kl: (B, T) per-token KL estimate to the reference policy.
        scores: (B,) reward-model score of each response (after any EOS penalty).
        response_mask: (B, T) nonzero on response tokens; each row needs one.
        kl_coef: beta, the KL coefficient (``KLController.value``).

    Returns:
        PPORewards(rewards (B, T), non_score_reward (B, T)).
    """
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) for kl {tuple(kl.shape)}")
    real = response_mask.bool()
    non_score_reward = torch.where(real, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = last_token_index(response_mask)
    score_at_last = torch.zeros_like(non_score_reward)
    score_at_last[torch.arange(kl.shape[0], device=kl.device), last] = scores.to(kl.dtype)
    return PPORewards(rewards=non_score_reward + score_at_last, non_score_reward=non_score_reward)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> GAE:
    """Generalised advantage estimation over the real tokens of each row.

    lm-human-preferences train_policy.py ``PPOTrainer.loss`` (docs/reference.md §2.4)::

        for t in reversed(range(T)):
            nv = values[:, t+1] if t < T-1 else 0.0
            delta = rewards[:, t] + gamma*nv - values[:, t]
            lastgaelam = delta + gamma*lam*lastgaelam
        returns = advantages + values

    Positions outside ``mask`` are skipped: the "next value" of a real token is the
    value of the next *real* token, and 0 after the last one (the episode ends there).
    With trailing padding this is exactly the loop above with padded rewards and values
    set to 0 (TRL zeroes values beyond the end); leading padding does not change the
    real positions either. Returns are computed from the raw advantages, before any
    whitening (docs/reference.md §2.4).

    Args:
        rewards: (B, T) per-token rewards (``PPORewards.rewards``).
        values: (B, T) value estimates of the rollout policy.
        mask: (B, T) nonzero on real response tokens.
        gamma: discount (1.0 in InstructGPT and lm-human-preferences).
        lam: GAE lambda (0.95 in lm-human-preferences and TRL).

    Returns:
        GAE(advantages (B, T), returns (B, T)), both 0 at padding.
    """
    real = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    next_value = torch.zeros_like(values[:, 0])
    last_gae = torch.zeros_like(values[:, 0])
    columns = []
    for t in reversed(range(rewards.shape[1])):
        here = real[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * last_gae
        last_gae = torch.where(here, advantage, last_gae)
        next_value = torch.where(here, values[:, t], next_value)
        columns.append(torch.where(here, advantage, zero))
    advantages = torch.stack(columns[::-1], dim=1)
    returns = torch.where(real, advantages + values, zero)
    return GAE(advantages=advantages, returns=returns)


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance advantages over the real tokens of the (mini)batch.

    lm-human-preferences ``whiten(advantages)`` after ``returns`` are computed;
    TRL ``masked_whiten(advantages, ~padding_mask)`` then ``advantages[padding] = 0``
    (docs/reference.md §2.5) but with the biased variance of the original.

    Args:
        advantages: (B, T) from ``gae``.
        mask: (B, T) nonzero on real tokens.

    Returns:
        (B, T), 0 at padding.
    """
    return masked_whiten(advantages, mask, shift_mean=True)


def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit-variance rewards that keep their mean, applied before GAE.

    lm-human-preferences ``whiten(rewards, shift_mean=False)`` when ``whiten_rewards``
    is on (docs/reference.md §2.5): the variance is rescaled, the mean is kept. Off by
    default in the N+ TL;DR and TRL settings.

    Args:
        rewards: (B, T) from ``ppo_rewards``.
        mask: (B, T) nonzero on real tokens.

    Returns:
        (B, T), 0 at padding.
    """
    return masked_whiten(rewards, mask, shift_mean=False)
