"""One iteration of online RL after sampling, as functions the RL stage (``stages/rl.py``) calls:
score a rollout (old log-probs, values, the reference, the reward) and turn it into advantages
for the configured estimator (4-5), then update the policy and critic over minibatches (6): the
clipped surrogate and value loss, GRPO's k3 KL term, online DPO's pair loss, the pretraining mix.
Global statistics over every rank's rollout (``global_whiten``, ``global_mean``, ``token_stats``)
and the reward of one reward model or an ensemble (``ensemble_reward``) live here too. The maths
is in ``preflab.rl`` (pure functions); this module wires it to modules, ranks and micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from preflab import distributed, loop, models
from preflab.config import RLConfig
from preflab.data.chat import IGNORE, Example, collate
from preflab.optim import non_finite_error
from preflab.reward_heads import head_mode
from preflab.rl import (
    ValueLoss,
    gae,
    kl_k1,
    kl_k3,
    masked_mean,
    policy_loss,
    ppo_rewards,
    value_loss,
)
from preflab.rl.estimators import (
    ESTIMATORS,
    grpo_advantages,
    online_dpo_pairs,
    reinforce_pp_returns,
    rloo_advantages,
    sequence_rewards,
)
from preflab.rl.preference import dpo_loss
from preflab.rl.stats import centred_lengths, conservative_reward, length_slope, length_slope_sums
from preflab.rollout import Samples, response_mask_after_stop
from preflab.scoring import ActorCritic, by_query_length, policy_terms, reward_scores, score_module

RewardFn = Callable[[Samples], torch.Tensor]  # (B,) scores, or an ensemble's (members, B)
PromptRewards = Callable[[list[dict], list[str]], list[float]]  # rewards.weighted_sum over the configured funcs


# ---------------------------------------------------------------------------------------------
# Scored rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """A rollout batch after scoring. (B, Tr) unless noted."""

    samples: Samples
    mask: torch.Tensor  # float response mask
    logprobs: torch.Tensor  # log pi_old of the sampled tokens
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (B,) RM score (normalised, penalised without EOS)
    kl: torch.Tensor
    rewards: torch.Tensor
    non_score_reward: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    member_std: torch.Tensor | None = None  # (B,) the RM ensemble's spread (population std), if any
    length_slope: float | None = None  # k >= 2: the score's slope on response length within prompts (per token)


def global_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    """``rl.masked_whiten`` with moments over every rank's rollouts (identical on one rank)."""
    m = mask.to(x.dtype)
    stats = distributed.all_reduce_sum(torch.stack([(x * m).sum(), m.sum()]).double())
    mean = (stats[0] / stats[1]).to(x.dtype)
    sq = distributed.all_reduce_sum(((x - mean) ** 2 * m).sum().double())
    var = (sq / stats[1]).to(x.dtype)  # biased, as lm-human-preferences' tf.nn.moments
    w = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        w = w + mean
    return torch.where(mask.bool(), w, torch.zeros((), dtype=w.dtype))


def global_mean(x: torch.Tensor) -> float:
    s = distributed.all_reduce_sum(torch.stack([x.double().sum(), torch.tensor(float(x.numel()), dtype=torch.float64)]))
    return float(s[0] / s[1])


@torch.no_grad()
def score_rollout(samples: Samples, *, ac: ActorCritic, reference: nn.Module | None, reward_fn: RewardFn | None,
                  cfg: RLConfig, kl_coef: float, tokenizer, device: torch.device, chunk: int,
                  prompt_rewards: PromptRewards | None = None, rows: list[dict] | None = None) -> Scored:
    """4. score (old log-probs and values in one pass, reference, reward) and 5. advantages.

    The score is ``rewards.rm_weight`` x the RM (``reward_fn``; an ensemble's member scores are
    combined by ``rewards.ensemble``, their spread kept as ``member_std``) plus the configured reward
    functions (``prompt_rewards`` of each episode's prompt row in ``rows``), less its linear
    dependence on length within prompts where ``rewards.length_debias`` says; then the EOS penalty.
    """
    r = cfg.rollout
    mask = samples.response_mask.float()
    logprobs, ref_logprobs, values = policy_terms(samples, ac=ac, reference=reference, temperature=r.temperature,
                                                  chunk=chunk, bf16=r.bf16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=r.bf16)

    # The RM reads the response up to the truncation token when one is configured (the policy
    # terms above still use the whole response, as lm-human-preferences does).
    scored, ended = samples, samples.ended
    if r.truncate_token is not None:
        trunc_id = tokenizer.convert_tokens_to_ids(r.truncate_token)
        tmask, hit = response_mask_after_stop(samples.response, trunc_id, start=r.truncate_after)
        scored = Samples(samples.query, samples.query_mask, samples.response,
                         samples.response_mask * tmask, samples.ended | hit, samples.texts)
        ended = scored.ended
    scores, member_std = torch.zeros(len(samples.texts), device=device), None
    if reward_fn is not None and cfg.rewards.rm_weight:
        with autocast:
            rm = reward_fn(scored).float()
        if rm.dim() not in (1, 2) or rm.shape[-1] != len(samples.texts):
            raise ValueError(f"the reward function gave scores of shape {tuple(rm.shape)} for {len(samples.texts)} "
                             "samples; expected (samples,) or, from an ensemble, (members, samples)")
        if rm.dim() == 2:  # an ensemble's (members, B) scores: combined as rewards.ensemble says
            member_std = rm.std(0, unbiased=False)
            rm = conservative_reward(rm, cfg.rewards.ensemble, cfg.rewards.ensemble_lambda)
        scores = cfg.rewards.rm_weight * rm
    if prompt_rewards is not None:
        scores = scores + torch.tensor(prompt_rewards(rows, scored.texts), dtype=torch.float32, device=device)
    slope, k = None, r.samples_per_prompt
    if k > 1:  # the slope on the answers whose score stands (the EOS penalty replaces the others')
        kept = ended if r.missing_eos_penalty is not None else torch.ones_like(ended)
        lengths = scored.response_mask.sum(1)
        slope = length_slope(distributed.all_reduce_sum(length_slope_sums(scores, lengths, kept, k)))
        if cfg.rewards.length_debias:
            scores = scores - (slope * centred_lengths(lengths, kept, k)).to(scores.dtype)
    if r.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, r.missing_eos_penalty))

    # 5. rewards: -beta * KL on every response token (unless the KL is a loss term), the score on
    # the last real one; then the configured estimator (docs/reference.md §2, §6).
    kl = (kl_k1 if cfg.kl.estimator == "k1" else kl_k3)(logprobs, ref_logprobs) * mask
    beta = kl_coef if cfg.algo.kl_in == "reward" else 0.0
    rw = ppo_rewards(kl, scores, mask, beta)
    rewards = global_whiten(rw.rewards, mask, shift_mean=False) if cfg.ppo.whiten_rewards else rw.rewards
    values = values * mask
    advantages, returns = estimate_advantages(cfg, rewards, values, mask, scores=scores, kl=kl, beta=beta)
    return Scored(samples, mask, logprobs * mask, ref_logprobs * mask, values, scores, kl, rewards,
                  rw.non_score_reward, advantages, returns, member_std, slope)


def estimate_advantages(cfg: RLConfig, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                        scores: torch.Tensor, kl: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, Tr), 0 at padding, for ``algo.estimator``.

    gae: returns before whitening, advantages whitened (the critic's targets are the returns).
    reinforce_pp: reward-to-go of the per-token rewards, whitened over the global batch.
    rloo / grpo: one advantage per sequence from R = score - beta * sum(kl) within each prompt's k
    contiguous samples (k rows per prompt); rloo's are then whitened over the global batch (so
    one learning rate serves every estimator), grpo's keep their own per-group scale. The
    critic-free estimators have no value target: ``returns`` holds the raw advantages (logged only).
    online_dpo: +1 / -1 tags on each prompt's best and worst scored sample (``online_dpo_pairs``).
    """
    name, k = cfg.algo.estimator, cfg.rollout.samples_per_prompt

    def raw_and_returns() -> tuple[torch.Tensor, torch.Tensor]:
        if name == "gae":
            adv = gae(rewards, values, mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam)
            return adv.advantages, adv.returns
        if name == "reinforce_pp":
            g = reinforce_pp_returns(rewards, mask, gamma=cfg.ppo.gamma)
            return g, g
        if name == "online_dpo":  # pair tags from the scores alone: the KL lives in the DPO loss's log-ratios
            tags = online_dpo_pairs(scores, mask, k).advantages
            return tags, tags
        seq = sequence_rewards(scores, kl, mask, beta)
        group = (rloo_advantages(seq, mask, k) if name == "rloo"
                 else grpo_advantages(seq, mask, k, scale=cfg.algo.grpo_scale)).advantages
        return group, group

    raw, returns = raw_and_returns()
    return (global_whiten(raw, mask, shift_mean=True) if ESTIMATORS[name].whiten else raw), returns


# ---------------------------------------------------------------------------------------------
# 6. the update
# ---------------------------------------------------------------------------------------------


class PtxBatches:
    """Draws ``batch_size`` random pretraining rows per minibatch and collates them into one
    micro-batch per PPO micro-batch (None where a part gets no row), so ``ppo.grad_accum``
    changes the peak memory and not the update."""

    def __init__(self, rows: list[Example], batch_size: int, pad_id: int, generator: torch.Generator):
        self.rows, self.batch_size, self.pad_id, self.generator = rows, batch_size, pad_id, generator

    def __call__(self, n_parts: int) -> list[dict[str, torch.Tensor] | None]:
        idx = torch.randint(len(self.rows), (self.batch_size,), generator=self.generator)
        return [collate([self.rows[i] for i in chunk.tolist()], self.pad_id) if len(chunk) else None
                for chunk in torch.tensor_split(idx, n_parts)]


def ppo_update(ac: nn.Module, batch: Scored, *, optimizer, scheduler, cfg: RLConfig, device: torch.device,
               ptx_batches: Callable[[int], list[dict[str, torch.Tensor] | None]] | None, generator: torch.Generator,
               dist: distributed.Dist, train_policy: bool = True, kl_coef: float = 0.0, step: int | None = None,
               last_good: str | None = None) -> dict[str, float]:
    """PPO epochs over minibatches of one rollout; returns minibatch-averaged statistics.

    Every term is normalised by its global count over the minibatch (tokens for PPO, tokens of
    the pretraining rows for ptx), so gradient accumulation and ranks give the same update.
    With ptx, the pretraining gradient (times gamma) is accumulated into the same buffers as the
    PPO gradient of each minibatch (InstructGPT App. C.4). ``train_policy=False`` (critic
    warm-up) steps only the critic: the policy loss enters with weight 0 (so DDP still sees
    every parameter) and the policy's gradients are dropped before the optimizer step.
    The value loss enters only for ``gae``; with ``algo.kl_in=loss`` the policy loss gains
    ``kl_coef`` x the k3 KL to the reference (GRPO; its gradient flows through the policy).
    """
    p = cfg.ppo
    module = getattr(ac, "module", ac)
    params = [q for q in module.parameters() if q.requires_grad]
    policy_params = [q for q in module.policy.parameters() if q.requires_grad]
    policy_weight = 1.0 if train_policy else 0.0
    b = len(batch.samples.texts)
    micro = max(1, p.minibatch_size // p.grad_accum)
    keys = ("loss/policy", "loss/value", "loss/ptx", "loss/kl", "policy/approxkl", "policy/clipfrac", "value/clipfrac",
            "policy/entropy", "policy/ratio")
    vf_coef = p.vf_coef if ESTIMATORS[cfg.algo.estimator].needs_critic else 0.0
    kl_loss_coef = kl_coef if cfg.algo.kl_in == "loss" else 0.0
    totals = dict.fromkeys(keys, 0.0)
    n_updates = 0
    spp = cfg.rollout.samples_per_prompt if b % cfg.rollout.samples_per_prompt == 0 else 1
    for _ in range(p.epochs):
        # Prompts are shuffled, each with its k samples (contiguous in the rollout), so a
        # micro-batch holds whole groups and runs each prompt once (scoring.tail_hidden).
        # With k = 1 this is a plain row permutation.
        perm = (torch.randperm(b // spp, generator=generator)[:, None] * spp + torch.arange(spp)).flatten().tolist()
        for start in range(0, b - p.minibatch_size + 1, p.minibatch_size):
            # Micro-batches of similar prompt length (their gradients are summed, so grouping does
            # not change the update), each without its all-padding query columns.
            mb = by_query_length(batch.samples, perm[start:start + p.minibatch_size])
            parts = [mb[i:i + micro] for i in range(0, len(mb), micro)]
            n_tok = distributed.all_reduce_sum(batch.mask[mb].sum().double())
            dpo_pairs = (float(distributed.all_reduce_sum((batch.advantages[mb].amax(1) > 0).sum().double()))
                         if cfg.algo.estimator == "online_dpo" else 0.0)
            # One draw of ptx.batch_size pretraining rows per minibatch, split over its micro-batches
            # (so grad_accum changes the memory, not the update).
            ptx = ptx_batches(len(parts)) if ptx_batches else [None] * len(parts)
            n_ptx = distributed.all_reduce_sum(
                torch.tensor(sum(int((x["labels"][:, 1:] != IGNORE).sum()) for x in ptx if x), dtype=torch.float64))
            stats = dict.fromkeys(keys, 0.0)
            for j, idx in enumerate(parts):
                s = batch.samples.select(idx).trim_query()
                m = batch.mask[idx]
                weight = float(m.sum()) / float(n_tok) * dist.world_size  # DDP averages over ranks
                ptx_in = {k: v.to(device) for k, v in ptx[j].items()} if ptx[j] else None
                with loop.micro_step(ac, device, j, len(parts), cfg.train.bf16):
                    lp, v, ent, ptx_sum, _ = ac(**s.tensors(), temperature=cfg.rollout.temperature, ptx=ptx_in)
                    pg = policy_loss(lp, batch.logprobs[idx], batch.advantages[idx], m, p.clip_range)
                    if cfg.algo.estimator == "online_dpo":  # its loss replaces the surrogate (diagnostics stay)
                        pair_sum = online_dpo_term(lp, batch, idx, m, cfg) if dpo_pairs else lp.sum() * 0.0
                        pg = pg._replace(loss=pair_sum * float(n_tok) / float(m.sum()) / max(dpo_pairs, 1.0))
                    vf = (value_loss(v, batch.values[idx], batch.returns[idx], m, p.value_clip_range) if vf_coef
                          else ValueLoss(lp.new_zeros(()), lp.new_zeros(())))  # no critic: nothing to fit
                    kl_term = masked_mean(kl_k3(lp, batch.ref_logprobs[idx]), m) if kl_loss_coef else lp.new_zeros(())
                    loss = (policy_weight * (pg.loss + kl_loss_coef * kl_term) + vf_coef * vf.loss) * weight
                    if ptx_in is not None and n_ptx > 0:
                        loss = loss + cfg.ptx.coef * ptx_sum * dist.world_size / float(n_ptx)
                    if not torch.isfinite(loss):
                        raise non_finite_error("PPO loss", step=step, last_good=last_good)
                    loss.backward()
                w = float(m.sum()) / float(n_tok)
                stats["loss/policy"] += float(pg.loss.detach()) * w
                stats["loss/value"] += float(vf.loss.detach()) * w
                stats["loss/kl"] += float(kl_term.detach()) * w
                stats["policy/approxkl"] += float(pg.approxkl) * w
                stats["policy/clipfrac"] += float(pg.clipfrac) * w
                stats["value/clipfrac"] += float(vf.clipfrac) * w
                stats["policy/ratio"] += float(pg.ratio_mean) * w
                stats["policy/entropy"] += float(masked_mean(ent, m)) * w
                if ptx_in is not None and n_ptx > 0:
                    stats["loss/ptx"] += float(ptx_sum.detach()) / float(n_ptx) * dist.world_size
            if not train_policy:
                for q in policy_params:
                    q.grad = None  # AdamW skips them: no step, no weight decay, no moment update
            loop.optimizer_step(params, optimizer, scheduler, cfg.optim.max_grad_norm, step=step, last_good=last_good)
            for k in keys:
                totals[k] += float(distributed.all_reduce_mean(torch.tensor(stats[k])))
            n_updates += 1
    return {k: v / max(1, n_updates) for k, v in totals.items()}


def token_stats(prefix: str, x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``prefix/mean`` and ``prefix/std`` of ``x`` over the real tokens of every rank's rollout."""
    m = mask.to(torch.float64)
    n, s1, s2 = (distributed.all_reduce_sum(t) for t in (m.sum(), (x * m).sum().double(), (x * x * m).sum().double()))
    mean = float(s1 / n.clamp(min=1))
    return {f"{prefix}/mean": mean, f"{prefix}/std": math.sqrt(max(0.0, float(s2 / n.clamp(min=1)) - mean * mean))}


def online_dpo_term(lp: torch.Tensor, batch: Scored, idx: list[int], m: torch.Tensor, cfg: RLConfig) -> torch.Tensor:
    """The sum over this micro-batch's prompts of DPO's loss on their (chosen, rejected) pair:
    -log sigmoid(beta * ((log pi - log pi_ref)(y_w) - (log pi - log pi_ref)(y_l))), sequence log-probs
    at the sampling temperature, from the tags ``estimate_advantages`` put in ``batch.advantages``.
    A micro-batch holds whole prompts (``ppo_update`` keeps each prompt's k rows together)."""
    ratio = ((lp - batch.ref_logprobs[idx]) * m).sum(1)
    tag = batch.advantages[idx].amax(1) + batch.advantages[idx].amin(1)  # +1 chosen, -1 rejected, 0 neither
    group = torch.tensor(idx, device=lp.device) // cfg.rollout.samples_per_prompt
    chosen, rejected = (tag > 0).nonzero(as_tuple=True)[0], (tag < 0).nonzero(as_tuple=True)[0]
    # pair each chosen row with the rejected row of its prompt
    if chosen.numel() == 0:
        return lp.sum() * 0.0
    match = group[chosen][:, None] == group[rejected][None, :]
    rejected = rejected[match.float().argmax(1)]
    return dpo_loss(ratio[chosen], ratio[rejected], cfg.algo.dpo_beta, 0.0).sum()


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def ensemble_reward(rms: list[nn.Module]) -> RewardFn:
    """The (B,) scores of one RM, or the (M, B) scores of an ensemble: several RMs, or the heads of
    RMs that have several (``rm.train.heads``), each normalised by its own stored gain and bias
    (``score_rollout`` combines them: ``rl.stats.conservative_reward``)."""
    def members(rm: nn.Module, s: Samples) -> torch.Tensor:
        with head_mode(rm, "members") as heads:
            r = reward_scores(rm, s).float()
        return r.T if heads > 1 else r[None]

    def score(s: Samples) -> torch.Tensor:
        out = torch.cat([members(rm, s) for rm in rms])
        return out[0] if len(out) == 1 else out

    return score


def load_critic(cfg: RLConfig) -> nn.Module:
    """The critic initialised from the reward model (InstructGPT), its normalisation folded into the
    head: on a whole sequence it starts out giving the RM's normalised score, the units of the returns.
    ``models.critic=reward_trunk`` zeroes that head: every value starts at 0, so the first advantages
    are the returns themselves rather than the returns minus the RM's scores of unfinished answers."""
    critic = models.apply_reward_norm(models.load_reward_model(cfg.models.reward_model,
                                                               device=cfg.models.policy.device))
    if cfg.models.critic == "reward_trunk":
        with torch.no_grad():
            for p in score_module(critic).parameters():
                p.zero_()
    return critic
