"""Reward-model losses on rankings: InstructGPT's K-way pairwise loss, Bradley-Terry and
Plackett-Luce.

A ranking of K responses is given as a (K,) tensor of **ranks**: 0 is the best, larger
is worse, equal ranks are ties (tiers as lists of indices convert with
``ranks_from_tiers``). All three losses are invariant to adding a constant to every
reward, hence the reward normalisation after training (docs/reference.md §1.3, §5).

Batched versions take prompts padded to Kmax responses: rewards (P, Kmax), ranks
(P, Kmax) and a (P, Kmax) validity mask, nonzero on real responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "KWayRankingLoss",
    "LossParts",
    "batched_kway_ranking_loss",
    "batched_plackett_luce_loss",
    "bradley_terry_loss",
    "kway_ranking_loss",
    "pad_rewards",
    "plackett_luce_loss",
    "plackett_luce_per_prompt",
    "ranking_loss",
    "ranks_from_tiers",
]


class KWayRankingLoss(NamedTuple):
    """InstructGPT Eq. 1 over a batch of prompts.

    Attributes:
        loss: scalar, mean over prompts with at least one untied pair of the per-prompt
            loss (differentiable).
        per_prompt_loss: (P,) -1/C_eff * sum of log sigmoid(r_w - r_l) over the prompt's
            untied pairs; 0 for a prompt without one.
        n_pairs: (P,) int64, C_eff: untied pairs of each prompt (C(K,2) without ties).
        n_correct: (P,) int64, pairs with r_w > r_l strictly (a tie in reward is not
            correct, as TRL's reward accuracy). ``rm/accuracy`` = sum(n_correct) / sum(n_pairs).
    """

    loss: torch.Tensor
    per_prompt_loss: torch.Tensor
    n_pairs: torch.Tensor
    n_correct: torch.Tensor


def ranks_from_tiers(tiers: Sequence[Sequence[int]], k: int | None = None) -> torch.Tensor:
    """Convert tiers, best first, to a rank tensor: ``[[2], [0, 3], [1]] -> [1, 2, 0, 1]``.

    Args:
        tiers: lists of response indices; the items of one list are tied.
        k: number of responses; every index in 0..k-1 must appear exactly once.
            Defaults to the number of indices given.

    Returns:
        (K,) int64 ranks, 0 = best tier.
    """
    flat = [i for tier in tiers for i in tier]
    k = len(flat) if k is None else k
    if sorted(flat) != list(range(k)):
        raise ValueError(f"tiers must list each of the indices 0..{k - 1} exactly once, got {list(tiers)}")
    ranks = torch.empty(k, dtype=torch.long)
    for rank, tier in enumerate(tiers):
        for i in tier:
            ranks[i] = rank
    return ranks


def bradley_terry_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected) over N pairs.

    The TL;DR reward loss of the N+ work (docs/reference.md §5.1) and TRL's reward trainer.

    Args:
        rewards_chosen: (N,) rewards of the preferred responses.
        rewards_rejected: (N,) rewards of the other responses.

    Returns:
        scalar.
    """
    return -F.logsigmoid(rewards_chosen - rewards_rejected).mean()


def batched_kway_ranking_loss(
    rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor
) -> KWayRankingLoss:
    """InstructGPT Eq. 1, one batch element per prompt (docs/reference.md §1.2)::

        loss(prompt) = -1/C_eff * sum over pairs (w, l) with rank_w < rank_l of log sigmoid(r_w - r_l)

    Pairs with equal ranks are dropped ("ties are dropped"), so C_eff <= C(K,2) counts
    the untied pairs. Each prompt weighs the same whatever its K: the C(K,2) pairs of
    one prompt are one batch element, which is why the paper groups them (a shuffled
    pair dataset overfits). The batch loss is the mean over the prompts that have at
    least one untied pair; with none at all it is a 0 still attached to the graph.

    Args:
        rewards: (P, Kmax) scalar rewards; padding entries are ignored.
        ranks: (P, Kmax) int ranks, 0 = best, equal = tie.
        valid: (P, Kmax) nonzero on real responses.

    Returns:
        KWayRankingLoss(loss, per_prompt_loss (P,), n_pairs (P,), n_correct (P,)).
    """
    if not (rewards.shape == ranks.shape == valid.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, ranks {tuple(ranks.shape)} and valid "
            f"{tuple(valid.shape)} must all be (P, Kmax)"
        )
    real = valid.bool()
    # pair[p, w, l]: w is ranked strictly above l, both real.
    pair = (ranks[:, :, None] < ranks[:, None, :]) & real[:, :, None] & real[:, None, :]
    margin = rewards[:, :, None] - rewards[:, None, :]
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    pair_nll = torch.where(pair, -F.logsigmoid(margin), zero)
    n_pairs = pair.sum(dim=(1, 2))
    has_pairs = n_pairs > 0
    per_prompt = pair_nll.sum(dim=(1, 2)) / n_pairs.clamp(min=1).to(rewards.dtype)
    if bool(has_pairs.any()):
        loss = per_prompt[has_pairs].mean()
    else:
        loss = (rewards * 0).sum()
    with torch.no_grad():
        n_correct = (pair & (margin > 0)).sum(dim=(1, 2))
    return KWayRankingLoss(loss=loss, per_prompt_loss=per_prompt, n_pairs=n_pairs, n_correct=n_correct)


def kway_ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """InstructGPT Eq. 1 for one prompt: mean of -log sigmoid(r_w - r_l) over untied pairs.

    Args:
        rewards: (K,) rewards of the K responses.
        ranks: (K,) ranks, 0 = best, equal = tie.

    Returns:
        scalar. Raises ValueError when every response is tied (no pair to learn from).
    """
    out = batched_kway_ranking_loss(
        rewards.unsqueeze(0), ranks.unsqueeze(0), torch.ones_like(ranks, dtype=torch.bool).unsqueeze(0)
    )
    if int(out.n_pairs[0]) == 0:
        raise ValueError("all responses are tied: the ranking has no pair to learn from")
    return out.loss


def batched_plackett_luce_loss(
    rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``plackett_luce_per_prompt`` averaged over the prompts: a scalar."""
    return plackett_luce_per_prompt(rewards, ranks, valid).mean()


def plackett_luce_per_prompt(
    rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of each ranking: (P,).

    DPO App. A.3, Eq. 18 (docs/reference.md §5.2), for a strict order tau::

        NLL = -sum_{k=1}^{K-1} [ r_tau(k) - logsumexp_{j >= k} r_tau(j) ]

    i.e. K-1 "choose the best of the remaining" softmaxes; the first alone is Ziegler's
    ``PickBest`` loss, and K = 2 is Bradley-Terry.

    Ties use Breslow's convention (from the Cox partial likelihood): every item i that
    is not in the last tier contributes ``r_i - logsumexp_{j: rank_j >= rank_i} r_j``,
    the items tied with i staying in its choice set. Without ties this is Eq. 18
    exactly; the last tier contributes nothing (nothing is chosen among its items). The
    per-prompt NLL is a sum over choices, so prompts with more responses weigh more.

    Args:
        rewards: (P, Kmax) scalar rewards; padding entries are ignored.
        ranks: (P, Kmax) int ranks, 0 = best, equal = tie.
        valid: (P, Kmax) nonzero on real responses.

    Returns:
        (P,) the per-prompt NLL.
    """
    if not (rewards.shape == ranks.shape == valid.shape) or rewards.dim() != 2:
        raise ValueError("rewards, ranks and valid must all be (P, Kmax)")
    real = valid.bool()
    # choice_set[p, i, j]: j is still available when i is chosen.
    choice_set = (ranks[:, None, :] >= ranks[:, :, None]) & real[:, None, :]
    neg_inf = torch.full((), float("-inf"), dtype=rewards.dtype, device=rewards.device)
    log_denominator = torch.logsumexp(torch.where(choice_set, rewards[:, None, :], neg_inf), dim=-1)
    worst = torch.where(real, ranks, torch.full_like(ranks, torch.iinfo(ranks.dtype).min)).amax(dim=-1)
    chooses = real & (ranks < worst[:, None])
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    # For padded i the choice set may be empty (logsumexp = -inf); where() drops it.
    terms = torch.where(chooses, rewards - torch.where(chooses, log_denominator, zero), zero)
    return -terms.sum(dim=-1)


def plackett_luce_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce NLL of one ranking; see ``batched_plackett_luce_loss`` for ties.

    Args:
        rewards: (K,) rewards.
        ranks: (K,) ranks, 0 = best, equal = tie.

    Returns:
        scalar NLL (a sum over the K-1 choices, not a mean).
    """
    return batched_plackett_luce_loss(
        rewards.unsqueeze(0), ranks.unsqueeze(0), torch.ones_like(ranks, dtype=torch.bool).unsqueeze(0)
    )


# Flat rewards of a collated batch (rows of all prompts in group order) -> summed loss.


class LossParts(NamedTuple):
    """A micro-batch's ranking loss as a sum over prompts (the caller normalises by the step's
    global prompt count) and its pair counts."""

    total: torch.Tensor  # sum over prompts of the per-prompt loss (differentiable)
    n_prompts: int  # prompts with at least one untied pair
    n_pairs: int
    n_correct: int


def pad_rewards(flat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(sum K,) rewards in group order -> (P, Kmax), zeros where ``valid`` is False (differentiable)."""
    return flat.new_zeros(valid.shape).masked_scatter(valid, flat)


def _kway_per_prompt(rewards, ranks, valid) -> torch.Tensor:
    # InstructGPT Eq. 1: -1/C_eff sum log sigmoid(r_w - r_l) per prompt (0 for an all-tied prompt).
    return batched_kway_ranking_loss(rewards, ranks, valid).per_prompt_loss


LOSSES = {"kway": _kway_per_prompt, "plackett_luce": plackett_luce_per_prompt}  # (P,) per-prompt losses


def ranking_loss(flat_rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
                 loss: str = "kway", weights: torch.Tensor | None = None) -> LossParts:
    """The micro-batch's summed loss and pair counts from (sum K,) rewards of a ``collate_groups`` batch.

    (sum K, M) rewards are M reward heads on one trunk (``reward_heads``): each head's per-prompt
    loss weighed by ``weights`` (P, M), the prompts' bootstrap counts (all 1 when None), the heads
    averaged; pair counts and accuracy are those of the heads' mean reward."""
    if flat_rewards.dim() == 2:
        heads = flat_rewards.shape[1]
        w = weights if weights is not None else flat_rewards.new_ones((valid.shape[0], heads))
        total = sum((LOSSES[loss](pad_rewards(flat_rewards[:, m].float(), valid), ranks, valid) * w[:, m]).sum()
                    for m in range(heads)) / heads
        rewards = pad_rewards(flat_rewards.detach().float().mean(1), valid)
    else:
        rewards = pad_rewards(flat_rewards.float(), valid)
        total = LOSSES[loss](rewards, ranks, valid).sum()
    with torch.no_grad():
        counts = batched_kway_ranking_loss(rewards.detach(), ranks, valid)
    return LossParts(total, int((counts.n_pairs > 0).sum()), int(counts.n_pairs.sum()), int(counts.n_correct.sum()))
