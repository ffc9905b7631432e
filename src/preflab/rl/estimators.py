"""Advantage estimators beside GAE: RLOO, GRPO (and Dr. GRPO) and REINFORCE++.

One online RL stage serves them all (as veRL's ``adv_estimator`` and OpenRLHF's
``advantage.estimator`` do); ``ESTIMATORS`` names them and says which need a critic and which
need k >= 2 samples per prompt. docs/reference.md §6 has the formulas and their sources.

Shapes: B = episodes, T = response positions, k = samples per prompt. The k samples of a prompt
are **contiguous rows** (prompt p owns rows p*k .. p*k + k - 1), so a (B,) vector views as
(B / k, k). ``mask`` is (B, T), nonzero on real response tokens (padding on either side).
Sequence-level estimators give every real token of a row the row's advantage; 0 at padding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "GroupAdvantages",
    "grpo_advantages",
    "online_dpo_pairs",
    "reinforce_pp_returns",
    "rloo_advantages",
    "sequence_rewards",
]


class Estimator(NamedTuple):
    """What the RL stage needs to know about an estimator."""

    needs_critic: bool  # a value model is built and trained (GAE only)
    group: bool  # needs k >= 2 samples per prompt
    whiten: bool  # the stage whitens the advantages over the global batch afterwards


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(needs_critic=True, group=False, whiten=True),
    "rloo": Estimator(needs_critic=False, group=True, whiten=True),
    "grpo": Estimator(needs_critic=False, group=True, whiten=False),
    "reinforce_pp": Estimator(needs_critic=False, group=False, whiten=True),
    "online_dpo": Estimator(needs_critic=False, group=True, whiten=False),
}


class GroupAdvantages(NamedTuple):
    """Attributes:
    advantages: (B, T) the row's advantage on each real token, 0 at padding.
    per_sequence: (B,) the advantage of each row.
    """

    advantages: torch.Tensor
    per_sequence: torch.Tensor


def _groups(x: torch.Tensor, k: int) -> torch.Tensor:
    if k < 2:
        raise ValueError(f"group estimators need k >= 2 samples per prompt, got k = {k}")
    if x.dim() != 1 or x.shape[0] % k:
        raise ValueError(f"expected (B,) with B a multiple of k = {k}, got {tuple(x.shape)}")
    return x.view(-1, k)


def _broadcast(per_sequence: torch.Tensor, mask: torch.Tensor) -> GroupAdvantages:
    real = mask.bool()
    adv = torch.where(real, per_sequence[:, None].to(torch.float32), torch.zeros((), device=mask.device))
    return GroupAdvantages(adv, per_sequence)


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B,) R_i = score_i - beta * sum_t kl_t over the real tokens: RLOO's reward with the KL folded
    in at the sequence level (no gradient through it). ``kl_coef`` 0 gives the scores."""
    return scores - kl_coef * (kl * mask.to(kl.dtype)).sum(1)


def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, k: int) -> GroupAdvantages:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = R_i - mean_{j != i} R_j.

    Equals k/(k-1) (R_i - mean_j R_j): unbiased, and the baseline never sees the row itself.

    Args:
        rewards: (B,) sequence rewards, k contiguous rows per prompt.
        mask: (B, T) response mask.
        k: samples per prompt (>= 2).
    """
    r = _groups(rewards, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return _broadcast((r - baseline).reshape(-1), mask)


def grpo_advantages(rewards: torch.Tensor, mask: torch.Tensor, k: int, scale: bool = True,
                    eps: float = 1e-4) -> GroupAdvantages:
    """GRPO's outcome advantage (DeepSeekMath §4.1.2): A_i = (R_i - mean(R)) / (std(R) + eps) within
    the prompt's group. ``scale=False`` is Dr. GRPO (Liu et al. 2025): R_i - mean(R), no division,
    which does not up-weight prompts whose samples barely differ.

    std is the sample standard deviation (Bessel-corrected, ``torch.std``'s default, as TRL);
    ``eps`` as TRL's 1e-4. A group whose rewards are all equal gets advantage 0.
    """
    r = _groups(rewards, k)
    centred = r - r.mean(1, keepdim=True)
    if scale:
        centred = centred / (r.std(1, keepdim=True) + eps)
    return _broadcast(centred.reshape(-1), mask)


def online_dpo_pairs(scores: torch.Tensor, mask: torch.Tensor, k: int) -> GroupAdvantages:
    """Online DPO's pair of each prompt (Guo et al. 2024; TRL's OnlineDPOTrainer with k samples):
    +1 on the best-scored of the prompt's k samples (chosen), -1 on the worst (rejected), 0 on the
    others; the first of tied samples is taken, and a prompt whose k scores are all equal has no
    pair (all 0). The stage's update reads the tags, not a magnitude."""
    s = _groups(scores, k)
    rows = torch.arange(s.shape[0], device=s.device)
    tags = torch.zeros_like(s, dtype=torch.float32)
    tags[rows, s.argmax(1)] = 1.0
    tags[rows, s.argmin(1)] = -1.0
    tags[s.max(1).values == s.min(1).values] = 0.0
    return _broadcast(tags.reshape(-1), mask)


def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the return G_t = sum_{s >= t} gamma^(s-t) r_s over each row's real
    tokens, from per-token rewards (KL penalty on every token, score on the last real one, as in
    PPO). No critic; the stage then whitens G over every real token of the global batch.

    Args:
        rewards: (B, T) per-token rewards (``ppo_rewards(...).rewards``), 0 at padding.
        mask: (B, T) response mask.
        gamma: discount (1.0 in the paper and OpenRLHF).

    Returns:
        (B, T), 0 at padding.
    """
    real = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    running = torch.zeros_like(rewards[:, 0])
    columns = []
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(real[:, t], rewards[:, t] + gamma * running, running)
        columns.append(torch.where(real[:, t], running, zero))
    return torch.stack(columns[::-1], dim=1)
