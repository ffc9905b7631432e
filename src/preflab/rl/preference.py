"""Offline preference losses on K-way rankings: DPO, conservative DPO, IPO and SimPO.

Pure torch. Every loss is a function of the per-sequence log-probabilities of the policy (and,
except SimPO, of the frozen reference) of the responses to one prompt; docs/preference.md has
the formulas and where each comes from.

A K-way ranking gives all its untied ordered pairs (winner w, loser l), C(K, 2) without ties.
The pairs of one prompt are one element of the batch: the per-prompt loss is the mean over its
pairs (as InstructGPT's Eq. 1 for the reward model), and a step's loss is the mean over prompts.
Batched functions take prompts padded to Kmax responses: (P, Kmax) tensors with a (P, Kmax)
``valid`` mask and (P, Kmax) ``ranks`` (0 best, equal ranks tied).

Notation: for a sequence y, ``logp(y) = sum_t log pi(y_t | x, y_<t)`` over response tokens,
``n(y)`` its token count, ``logratio(y) = logp(y) - logp_ref(y)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "PreferenceParts",
    "dpo_loss",
    "implicit_rewards",
    "ipo_loss",
    "pair_mask",
    "preference_loss",
    "simpo_loss",
]

LOSSES = ("dpo", "cdpo", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7), elementwise; with ``label_smoothing`` eps > 0 the
    conservative DPO of Mitchell (2023): the label is flipped with probability eps.

    h = beta * (logratio(y_w) - logratio(y_l));
    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h).

    Args:
        chosen_logratios, rejected_logratios: (N,) summed log-ratios of winner and loser.
    Returns:
        (N,) per-pair losses.
    """
    h = beta * (chosen_logratios - rejected_logratios)
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17), elementwise: (h - 1 / (2 beta))^2 with
    h = logratio(y_w) - logratio(y_l) (no beta inside: beta sets the target margin 1/(2 beta)).

    The callers pass per-token *average* log-ratios (as TRL does), so the target margin does not
    depend on response length.

    Returns:
        (N,) per-pair losses.
    """
    return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float,
               gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, Eq. 6), elementwise, reference-free:
    -log sigmoid(beta * logp(y_w)/n(y_w) - beta * logp(y_l)/n(y_l) - gamma).

    Args:
        chosen_avg_logps, rejected_avg_logps: (N,) per-token average policy log-probs.
        gamma: the target reward margin (the paper's gamma, not TRL's gamma/beta ratio).
    Returns:
        (N,) per-pair losses.
    """
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


def pair_mask(ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(P, K, K) bool: entry [p, w, l] is True when response w of prompt p is ranked strictly
    above response l and both are real (ties and padding give no pair)."""
    v = valid.bool()
    return v[:, :, None] & v[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor | None, lengths: torch.Tensor,
                     loss: str, beta: float) -> torch.Tensor:
    """The quantity each loss compares between winner and loser, as a reward (any shape):

    - dpo, cdpo: beta * logratio(y) (DPO's implicit reward);
    - ipo: beta * logratio(y) / n(y) (per-token, as its loss reads it);
    - simpo: beta * logp(y) / n(y) (reference-free).

    ``lengths`` (same shape) are token counts, at least 1 where it matters.
    """
    n = lengths.clamp(min=1).to(logps.dtype)
    if loss in ("dpo", "cdpo"):
        return beta * (logps - ref_logps)
    if loss == "ipo":
        return beta * (logps - ref_logps) / n
    if loss == "simpo":
        return beta * logps / n
    raise ValueError(f"unknown preference loss {loss!r}; one of {LOSSES}")


class PreferenceParts(NamedTuple):
    """A micro-batch's preference loss as a sum over prompts (the caller divides by the step's
    global prompt count) and pair statistics summed over pairs."""

    total: torch.Tensor  # scalar: sum over prompts of the per-prompt mean pair loss (differentiable)
    n_prompts: int  # prompts with at least one untied pair
    n_pairs: int
    n_correct: int  # pairs whose winner's implicit reward is strictly higher
    chosen_reward: float  # sums over pairs of the winner's / loser's implicit reward
    rejected_reward: float
    chosen_logps: float  # sums over pairs of the winner's / loser's summed policy log-prob
    rejected_logps: float


def preference_loss(logps: torch.Tensor, ref_logps: torch.Tensor | None, lengths: torch.Tensor,
                    ranks: torch.Tensor, valid: torch.Tensor, *, loss: str, beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.0, nll_coef: float = 0.0) -> PreferenceParts:
    """All untied pairs of each prompt, one batch element per prompt.

    Args:
        logps: (P, K) summed policy log-probs of each response (differentiable).
        ref_logps: (P, K) summed reference log-probs (None only for reference-free losses).
        lengths: (P, K) response token counts.
        ranks, valid: (P, K) ranks (0 best) and the mask of real responses.
        loss: one of ``LOSSES``; ``label_smoothing`` is cDPO's eps; ``simpo_gamma`` SimPO's margin.
        nll_coef: alpha of "DPO + NLL" (RPO, Pang et al. 2024): each prompt's loss gains alpha times the
            per-token negative log-likelihood of its best-ranked response (the mean over a tied top),
            which keeps the likelihood of preferred answers from falling as the margin grows.
    Returns:
        ``PreferenceParts``; ``total`` sums, over prompts, the mean loss of the prompt's pairs.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown preference loss {loss!r}; one of {LOSSES}")
    if ref_logps is None and loss not in REFERENCE_FREE:
        raise ValueError(f"loss {loss!r} needs reference log-probs")
    mask = pair_mask(ranks, valid)  # (P, K, K)
    logps = logps.float()
    n = lengths.clamp(min=1).to(logps.dtype)
    if loss == "simpo":
        x = logps / n
        per_pair = simpo_loss(x[:, :, None], x[:, None, :], beta, simpo_gamma)
    else:
        ratio = logps - ref_logps.float()
        if loss == "ipo":
            ratio = ratio / n
            per_pair = ipo_loss(ratio[:, :, None], ratio[:, None, :], beta)
        else:
            eps = label_smoothing if loss == "cdpo" else 0.0
            per_pair = dpo_loss(ratio[:, :, None], ratio[:, None, :], beta, eps)
    n_pairs = mask.sum((1, 2))  # (P,)
    per_prompt = torch.where(mask, per_pair, per_pair.new_zeros(())).sum((1, 2)) / n_pairs.clamp(min=1)
    if nll_coef:
        v = valid.bool()
        top = v & (ranks == ranks.masked_fill(~v, torch.iinfo(ranks.dtype).max).min(1, keepdim=True).values)
        nll = -(torch.where(top, logps / n, logps.new_zeros(())).sum(1) / top.sum(1).clamp(min=1))
        per_prompt = per_prompt + nll_coef * torch.where(n_pairs > 0, nll, nll.new_zeros(()))
    with torch.no_grad():
        r = implicit_rewards(logps.detach(), None if ref_logps is None else ref_logps.float(), lengths, loss, beta)
        p, w, lo = mask.nonzero(as_tuple=True)
        rw, rl = r[p, w], r[p, lo]
        stats = (int((n_pairs > 0).sum()), int(mask.sum()), int((rw > rl).sum()), float(rw.sum()),
                 float(rl.sum()), float(logps[p, w].sum()), float(logps[p, lo].sum()))
    return PreferenceParts(per_prompt.sum(), *stats)
