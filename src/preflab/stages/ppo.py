"""Stage C: online RL against a reward model with a KL leash to the SFT model: PPO(-ptx) with a
critic (GAE), or the critic-free estimators RLOO, GRPO (Dr. GRPO) and REINFORCE++ (``algo.estimator``).

Read top to bottom: 0. set-up, 1. data, 2. models, then per iteration 3. generate (k samples per
prompt), 4. score, 5. rewards and advantages, 6. update (clipped surrogate + value loss for GAE,
+ k3 KL loss when ``algo.kl_in=loss``, + pretraining mix), 7. KL control, logs and checkpoints;
8. save. The maths lives in ``preflab.rl`` (pure functions, tested against hand-computed values),
the forward passes in ``preflab.scoring``; this file wires them to models, ranks and the run.

Defaults follow docs/reference.md: score on the last
real token, k1 KL on every response token, training logits divided by the sampling temperature,
rewards whitened without shifting the mean (option), advantages fully whitened with biased
variance after returns are computed, dropout off, a penalty score without EOS, and both
``objective/kl`` (to the reference) and ``policy/approxkl`` (between PPO iterates) logged.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from preflab import distributed, loop, models, rewards
from preflab.config import PPOConfig
from preflab.data.chat import IGNORE, Example, collate, read_lm_rows, read_prompts
from preflab.data.order import rank_slice, step_indices
from preflab.errors import ConfigError, DataError, TrainingError
from preflab.optim import adamw, clip_grad, non_finite_error, schedule
from preflab.rl import (
    AdaptiveKLController,
    FixedKLController,
    ValueLoss,
    explained_variance,
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
from preflab.rl.stats import conservative_reward
from preflab.rollout import HFGenerator, Samples, encode_prompts, response_mask_after_stop
from preflab.run import GeneratorState, Progress, peak_rss_mb
from preflab.scoring import ActorCritic, by_query_length, policy_terms, reward_scores
from preflab.selection import Selection

RewardFn = Callable[[Samples], torch.Tensor]
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
                  cfg: PPOConfig, kl_coef: float, tokenizer, device: torch.device, chunk: int,
                  prompt_rewards: PromptRewards | None = None, rows: list[dict] | None = None) -> Scored:
    """4. score (old log-probs and values in one pass, reference, reward) and 5. advantages.

    The score is ``rewards.rm_weight`` x the RM (``reward_fn``) plus the configured reward
    functions (``prompt_rewards`` of each episode's prompt row in ``rows``); then the EOS penalty.
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
    scores = torch.zeros(len(samples.texts), device=device)
    if reward_fn is not None and cfg.rewards.rm_weight:
        with autocast:
            scores = cfg.rewards.rm_weight * reward_fn(scored).float()
    if prompt_rewards is not None:
        scores = scores + torch.tensor(prompt_rewards(rows, scored.texts), dtype=torch.float32, device=device)
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
                  rw.non_score_reward, advantages, returns)


def estimate_advantages(cfg: PPOConfig, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
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


def ppo_update(ac: nn.Module, batch: Scored, *, optimizer, scheduler, cfg: PPOConfig, device: torch.device,
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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
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
                sync = not dist.enabled or j == len(parts) - 1
                with (contextlib.nullcontext() if sync else ac.no_sync()), autocast:
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
            clip_grad(params, cfg.optim.max_grad_norm, step=step, last_good=last_good)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
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


def online_dpo_term(lp: torch.Tensor, batch: Scored, idx: list[int], m: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
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


def ensemble_reward(rms: list[nn.Module], how: str, lam: float) -> RewardFn:
    """The reward of one RM, or ``rl.stats.conservative_reward`` over several (each normalised by
    its own stored gain and bias first)."""
    if len(rms) == 1:
        return lambda s: reward_scores(rms[0], s)
    return lambda s: conservative_reward(torch.stack([reward_scores(rm, s).float() for rm in rms]), how, lam)


def load_critic(cfg: PPOConfig) -> nn.Module:
    """The critic initialised from the reward model (InstructGPT), its normalisation folded into the
    head: on a whole sequence it starts out giving the RM's normalised score, the units of the returns."""
    return models.apply_reward_norm(models.load_reward_model(cfg.models.reward_model, device=cfg.models.policy.device))


def train(cfg: PPOConfig, resume: bool = False, reward_fn: RewardFn | None = None) -> Path:
    """Run PPO(-ptx) as configured; returns the saved policy directory.

    ``reward_fn`` replaces the reward model with a programmatic reward (tests, rule rewards);
    the critic is still initialised from ``models.reward_model``.
    """
    # 0. set-up ----------------------------------------------------------------------------------
    ctx = loop.start(cfg, "ppo", cfg.models.policy, resume)
    device, dist, run = ctx.device, ctx.dist, ctx.run
    r, p = cfg.rollout, cfg.ppo
    k, estimator = r.samples_per_prompt, ESTIMATORS[cfg.algo.estimator]
    if p.critic_warmup_steps and not estimator.needs_critic:
        raise ConfigError(f"ppo.critic_warmup_steps needs a critic; algo.estimator={cfg.algo.estimator} has none")
    if p.critic_warmup_steps >= cfg.train.steps:
        raise ConfigError(f"ppo.critic_warmup_steps ({p.critic_warmup_steps}) must be below train.steps "
                          f"({cfg.train.steps})")

    # 1. data: prompts of the PPO split, and the pretraining mix --------------------------------
    tokenizer = models.load_tokenizer(cfg.models.policy.path)
    rows = read_prompts(cfg.data.prompts, cfg.data.split)
    global_batch = r.batch_size * dist.world_size
    if len(rows) < global_batch:
        raise DataError(f"{cfg.data.prompts}: {len(rows)} prompts (split {cfg.data.split!r}) are fewer than "
                        f"one rollout batch ({global_batch})")
    dev_rows = rows[len(rows) - cfg.select.n:] if cfg.select.every else []
    rows = rows[:len(rows) - len(dev_rows)]  # the dev prompts of checkpoint selection are never trained on
    if len(rows) < global_batch:
        raise DataError(f"{cfg.data.prompts}: {len(rows)} prompts are left for training after select.n "
                        f"({cfg.select.n}) dev prompts; one rollout batch needs {global_batch}")
    prompt_ids = encode_prompts(tokenizer, [row["prompt"] for row in rows], cfg.data.max_prompt_tokens)
    ptx_rows = read_lm_rows(cfg.data.ptx, tokenizer, cfg.ptx.max_length) if cfg.ptx.coef > 0 else []
    if cfg.ptx.coef > 0 and not ptx_rows:
        raise DataError("ptx.coef > 0 needs data.ptx: a JSONL of {text} or demonstrations")

    # 2. models: trainable policy and critic; frozen reference and reward model ---------------
    pol = cfg.models.policy
    lora = models.LoraOptions(**pol.lora.model_dump(exclude={"enabled"})) if pol.lora.enabled else None
    policy = models.load_policy(pol.path, dtype=pol.dtype, device=pol.device, lora=lora, dropout_off=True)
    critic = load_critic(cfg) if cfg.models.critic == "reward_model" and estimator.needs_critic else None
    ac = ActorCritic(policy, critic, values=estimator.needs_critic).to(device)
    ac.train()
    reference = None
    if lora is None or cfg.models.reference is not None:
        reference = models.load_policy(cfg.models.reference or pol.path, dtype=cfg.models.frozen_dtype,
                                       device=pol.device, dropout_off=True)
        reference.eval().requires_grad_(False)
    if reward_fn is None and cfg.rewards.rm_weight:
        reward_fn = ensemble_reward([models.load_reward_model(path, dtype=cfg.models.frozen_dtype, device=pol.device)
                                     .eval().requires_grad_(False)
                                     for path in (cfg.models.reward_model, *cfg.models.reward_ensemble)],
                                    cfg.rewards.ensemble, cfg.rewards.ensemble_lambda)

    steps_per_update = p.epochs * (r.batch_size // p.minibatch_size)
    total_updates = cfg.train.steps * steps_per_update
    policy_params = [q for q in policy.parameters() if q.requires_grad]
    groups = [{"params": policy_params, "lr": cfg.optim.lr}]
    if estimator.needs_critic:
        value_params = list(critic.parameters() if critic is not None else ac.value_head.parameters())
        groups.append({"params": value_params, "lr": p.critic_lr or cfg.optim.lr})
    optimizer = adamw(groups, cfg.optim)
    scheduler = schedule(optimizer, cfg.optim, total_updates,
                         delays=[p.critic_warmup_steps * steps_per_update, 0][:len(groups)])
    funcs = [(rewards.load(f["fn"]), f["weight"]) for f in rewards.PRESETS.get(cfg.rewards.preset, [])]
    funcs += [(rewards.load(f.fn), f.weight) for f in cfg.rewards.funcs]

    def prompt_rewards(batch_rows: list[dict], texts: list[str]) -> list[float]:
        return rewards.weighted_sum(funcs, batch_rows, texts)

    kl_ctl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else FixedKLController(cfg.kl.coef))
    gen = HFGenerator.for_backend(r.backend, policy, tokenizer, bf16=r.bf16)
    update_rng = torch.Generator().manual_seed(cfg.run.seed + 7)
    ptx_rng = torch.Generator().manual_seed(cfg.run.seed + 11)
    train_module = torch.nn.parallel.DistributedDataParallel(ac) if dist.enabled else ac

    extra = {"kl": kl_ctl, "update_rng": GeneratorState(update_rng), "ptx_rng": GeneratorState(ptx_rng)}
    start = run.resume_training(ac, optimizer, scheduler, **extra) if resume else 0

    def checkpoint(step: int) -> None:
        run.save_training(step, ac, optimizer, scheduler, keep=cfg.run.keep_checkpoints, **extra)

    ptx_batches = PtxBatches(ptx_rows, cfg.ptx.batch_size, tokenizer.pad_token_id, ptx_rng)
    select = None
    if dev_rows:
        def dev_reward(s: Samples, dev: list[dict]) -> list[float]:
            scored = score_rollout(s.to(device), ac=ac, reference=reference, reward_fn=reward_fn, cfg=cfg, kl_coef=0.0,
                                   tokenizer=tokenizer, device=device, chunk=p.minibatch_size,
                                   prompt_rewards=prompt_rewards if funcs else None, rows=dev)
            return scored.scores.tolist()

        ref_gen = HFGenerator(reference, tokenizer, bf16=r.bf16) if reference is not None else gen
        select = Selection(cfg, dev_rows, encode_prompts(tokenizer, [x["prompt"] for x in dev_rows],
                                                         cfg.data.max_prompt_tokens),
                           gen, ref_gen, dev_reward, enabled=dist.is_main)
        if start == 0:
            run.log_metrics(0, {"select/score": select.offer(0, policy)})

    # 3-7. iterate: generate, score, advantages, update, control KL, log --------------------------
    samples_path = Path(cfg.run.out) / "samples.jsonl"
    keys = ("objective/score", "objective/kl", "objective/kl_coef", "response/length_mean")
    with Progress(cfg.train.steps, "ppo", enabled=cfg.run.progress and dist.is_main, start=start, keys=keys) as bar:
        for step in range(start, cfg.train.steps):
            t0 = time.perf_counter()
            idx = rank_slice(step_indices(step, len(rows), global_batch, cfg.run.seed), dist.rank, dist.world_size)
            samples = gen.generate([prompt_ids[i] for i in idx], max_new_tokens=r.max_new_tokens,
                                   temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                   min_new_tokens=r.min_new_tokens, n=k).to(device)
            episodes = [i for i in idx for _ in range(k)]  # k contiguous samples per prompt
            t_gen = time.perf_counter()
            ac.eval()  # dropout is off anyway; eval() makes that explicit for scoring
            batch = score_rollout(samples, ac=ac, reference=reference, reward_fn=reward_fn, cfg=cfg,
                                  kl_coef=kl_ctl.value, tokenizer=tokenizer, device=device,
                                  chunk=p.minibatch_size, prompt_rewards=prompt_rewards if funcs else None,
                                  rows=[rows[i] for i in episodes])
            ac.train()
            t_score = time.perf_counter()
            train_policy = step >= p.critic_warmup_steps
            stats = ppo_update(train_module, batch, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                               device=device, ptx_batches=ptx_batches if ptx_rows and train_policy else None,
                               generator=update_rng, dist=dist, train_policy=train_policy, kl_coef=kl_ctl.value,
                               step=step + 1, last_good=str(run.latest_checkpoint() or 'none'))
            t_train = time.perf_counter()

            # 7. KL control on this rollout's KL; metrics over every rank's rollouts.
            seq_kl = batch.kl.sum(1)
            kl_mean = global_mean(seq_kl)
            metrics = {
                "objective/kl": kl_mean,
                "objective/kl_coef": kl_ctl.value,
                "objective/score": global_mean(batch.scores),
                "objective/non_score_reward": global_mean(batch.non_score_reward.sum(1)),
                "objective/rlhf_reward": global_mean(batch.scores + batch.non_score_reward.sum(1)),
                "objective/entropy": global_mean(-batch.logprobs.sum(1)),
                **stats,
                **({"value/explained_variance": float(explained_variance(batch.values, batch.returns, batch.mask))}
                   if estimator.needs_critic else {}),
                **token_stats("advantage", batch.advantages, batch.mask),
                **token_stats("return", batch.returns, batch.mask),
                "response/length_mean": global_mean(batch.mask.sum(1)),
                "response/no_eos_fraction": global_mean((~samples.ended).float()),
                "perf/step_s": t_train - t0,
                "perf/gen_s": t_gen - t0,
                "perf/score_s": t_score - t_gen,
                "perf/train_s": t_train - t_score,
                "perf/tokens_per_s": float(samples.query_mask.sum() + samples.response_mask.sum())
                * dist.world_size / (t_train - t0),
                "perf/peak_rss_mb": peak_rss_mb(),
            }
            if not all(math.isfinite(v) for k, v in metrics.items() if k != "value/explained_variance"):
                raise TrainingError(f"non-finite metrics at step {step + 1}; last good checkpoint: "
                                    f"{run.latest_checkpoint() or 'none'}")
            kl_ctl.update(kl_mean, n_steps=global_batch * k)
            done = step + 1
            if done % cfg.run.log_every == 0 or done == cfg.train.steps:
                run.log_metrics(done, metrics)
            if dist.is_main:
                with open(samples_path, "a", encoding="utf-8") as f:
                    for i, text, score in zip(episodes, samples.texts, batch.scores.tolist()):
                        f.write(json.dumps({"step": done, "prompt_index": i, "id": rows[i].get("id"),
                                            "response": text, "score": score}) + "\n")
            if select and (done % cfg.select.every == 0 or done == cfg.train.steps):
                run.log_metrics(done, {"select/score": select.offer(done, policy)})
            bar.update(metrics)
            save_every = cfg.train.save_every or cfg.run.save_every
            if save_every and done % save_every == 0 and done < cfg.train.steps:
                checkpoint(done)

    # 8. save the policy (and critic) as Hugging Face directories ---------------------------------
    checkpoint(cfg.train.steps)
    if select:
        chosen = select.finish(policy, cfg.train.steps)
        run.log_metrics(cfg.train.steps, {"select/best_step": chosen})
        run.log(f"ppo: exporting the policy of step {chosen} (best dev score by {cfg.select.by})")
    if critic is not None:
        loop.export(critic, tokenizer, Path(cfg.run.out) / "critic", ctx)
    out = loop.export(policy, tokenizer, Path(cfg.run.out) / "model", ctx)
    run.finish()
    return out

