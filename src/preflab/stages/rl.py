"""Stage C, ``preflab rl``: online RL against a reward model with a KL leash to the SFT model: PPO(-ptx)
with a critic (GAE), or the critic-free estimators RLOO, GRPO (Dr. GRPO), REINFORCE++ and online DPO
(``algo.estimator``). Before 0.3.0 this stage was ``preflab ppo`` (``stages/ppo.py``).

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

import json
import time
from pathlib import Path

import torch

from preflab import distributed, loop, models, rewards
from preflab.config import RLConfig
from preflab.data.chat import read_lm_rows, read_prompts, token_budget
from preflab.data.order import rank_slice, step_indices
from preflab.errors import ConfigError, DataError
from preflab.optim import adamw, schedule
from preflab.rl import AdaptiveKLController, FixedKLController, explained_variance
from preflab.rl.estimators import ESTIMATORS
from preflab.rl.stats import between_prompt_share, prompt_variance_sums
from preflab.rl_update import (
    PtxBatches,
    RewardFn,
    Samples,
    ensemble_reward,
    global_mean,
    load_critic,
    ppo_update,
    score_rollout,
    token_stats,
)
from preflab.rollout import GatheredGenerator, HFGenerator, encode_prompts
from preflab.run import GeneratorState, Progress, peak_rss_mb
from preflab.scoring import ActorCritic
from preflab.selection import Selection

ESTIMATES = ("value/explained_variance", "objective/prompt_share")  # NaN where a rollout has no spread


def train(cfg: RLConfig, resume: bool = False, reward_fn: RewardFn | None = None) -> Path:
    """Run the online RL stage as configured (PPO(-ptx), RLOO, GRPO, ...); returns the saved policy directory.

    ``reward_fn`` replaces the reward model with a programmatic reward (tests, rule rewards);
    the critic is still initialised from ``models.reward_model``.
    """
    # 0. set-up ----------------------------------------------------------------------------------
    ctx = loop.start(cfg, "rl", cfg.models.policy, resume)
    device, dist, run = ctx.device, ctx.dist, ctx.run
    r, p = cfg.rollout, cfg.ppo
    k, estimator = r.samples_per_prompt, ESTIMATORS[cfg.algo.estimator]
    if p.critic_warmup_steps and not estimator.needs_critic:
        raise ConfigError(f"ppo.critic_warmup_steps needs a critic; algo.estimator={cfg.algo.estimator} has none")
    fsdp = cfg.train.parallel == "fsdp" and dist.enabled
    if fsdp:
        refuse_under_fsdp(cfg)
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
    # Under train.parallel=fsdp the policy, critic (``loop.wrap``) and reference are sharded; the
    # reward model stays whole on every rank (frozen models run forward only, in frozen_dtype).
    pol = cfg.models.policy
    lora = loop.lora_options(pol)
    policy = models.load_policy(pol.path, dtype=pol.dtype, device=pol.device, lora=lora, dropout_off=True)
    critic = load_critic(cfg) if cfg.models.critic != "policy_head" and estimator.needs_critic else None
    ac = ActorCritic(policy, critic, values=estimator.needs_critic).to(device)
    ac.train()
    reference = None
    if lora is None or cfg.models.reference is not None:
        reference = models.load_policy(cfg.models.reference or pol.path, dtype=cfg.models.frozen_dtype,
                                       device=pol.device, dropout_off=True)
        reference.eval().requires_grad_(False)
        if fsdp:
            distributed.shard_frozen(reference)
    if reward_fn is None and cfg.rewards.rm_weight:
        reward_fn = ensemble_reward([models.load_reward_model(path, dtype=cfg.models.frozen_dtype, device=pol.device)
                                     .eval().requires_grad_(False)
                                     for path in (cfg.models.reward_model, *cfg.models.reward_ensemble)])

    # Sampling needs every weight: under FSDP the engine snapshots the shards each rollout (a
    # weightless copy of the policy, built before sharding, for what the engine cannot run).
    gen = (GatheredGenerator(distributed.FullCopy(policy), tokenizer, bf16=r.bf16) if fsdp
           else HFGenerator.for_backend(r.backend, policy, tokenizer, bf16=r.bf16))
    train_module = loop.wrap(ac, cfg.train)  # DDP, or FSDP sharding ``ac`` in place; one process: ``ac``
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
    update_rng = torch.Generator().manual_seed(cfg.run.seed + 7)
    ptx_rng = torch.Generator().manual_seed(cfg.run.seed + 11)

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
    with Progress(cfg.train.steps, "rl", enabled=cfg.run.progress and dist.is_main, start=start, keys=keys) as bar:
        for step in range(start, cfg.train.steps):
            t0 = time.perf_counter()
            idx = rank_slice(step_indices(step, len(rows), global_batch, cfg.run.seed), dist.rank, dist.world_size)
            samples = gen.generate([prompt_ids[i] for i in idx],
                                   max_new_tokens=[token_budget(rows[i], r.max_new_tokens) for i in idx],
                                   temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                   min_new_tokens=r.min_new_tokens, n=k).to(device)
            episodes = [i for i in idx for _ in range(k)]  # k contiguous samples per prompt
            t_gen = time.perf_counter()
            ac.eval()  # dropout is off anyway; eval() makes that explicit for scoring
            batch = score_rollout(samples, ac=ac, reference=reference, reward_fn=reward_fn, cfg=cfg,
                                  kl_coef=kl_ctl.value, tokenizer=tokenizer, device=device,
                                  chunk=p.minibatch_size, prompt_rewards=prompt_rewards if funcs else None,
                                  rows=[rows[i] for i in episodes])
            distributed.reshard(ac)  # FSDP: the root's parameters are its shards again
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
            seq_reward = batch.scores + batch.non_score_reward.sum(1)  # score - beta * KL per episode
            prompt_share = ({"objective/prompt_share": between_prompt_share(
                distributed.all_reduce_sum(prompt_variance_sums(seq_reward, k)), k)} if k > 1 else {})
            metrics = {
                "objective/kl": kl_mean,
                "objective/kl_coef": kl_ctl.value,
                "objective/score": global_mean(batch.scores),
                "objective/non_score_reward": global_mean(batch.non_score_reward.sum(1)),
                "objective/rlhf_reward": global_mean(seq_reward),
                "objective/entropy": global_mean(-batch.logprobs.sum(1)),
                **prompt_share,
                **({"objective/rm_std": global_mean(batch.member_std)} if batch.member_std is not None else {}),
                **({"objective/length_slope": batch.length_slope} if batch.length_slope is not None else {}),
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
            loop.ensure_finite([v for k, v in metrics.items() if k not in ESTIMATES], "metrics", step, run)
            kl_ctl.update(kl_mean, n_steps=global_batch * k)
            done = step + 1
            loop.log_step(run, cfg.run.log_every, done, cfg.train.steps, metrics)
            if dist.is_main:
                with open(samples_path, "a", encoding="utf-8") as f:
                    for i, text, score in zip(episodes, samples.texts, batch.scores.tolist()):
                        f.write(json.dumps({"step": done, "prompt_index": i, "id": rows[i].get("id"),
                                            "response": text, "score": score}) + "\n")
            if select and (done % cfg.select.every == 0 or done == cfg.train.steps):
                run.log_metrics(done, {"select/score": select.offer(done, policy)})
            bar.update(metrics)
            if loop.save_due(done, cfg.train.save_every or cfg.run.save_every, cfg.train.steps):
                checkpoint(done)

    # 8. save the policy (and critic) as Hugging Face directories ---------------------------------
    checkpoint(cfg.train.steps)
    if select:
        chosen = select.finish(policy, cfg.train.steps)
        run.log_metrics(cfg.train.steps, {"select/best_step": chosen})
        run.log(f"rl: exporting the policy of step {chosen} (best dev score by {cfg.select.by})")
    if critic is not None:
        loop.export(critic, tokenizer, Path(cfg.run.out) / "critic", ctx)
    out = loop.export(policy, tokenizer, Path(cfg.run.out) / "model", ctx)
    run.finish()
    return out



def refuse_under_fsdp(cfg: RLConfig) -> None:
    """What the RL stage does not support under ``train.parallel=fsdp`` yet, refused before any model
    loads."""
    if cfg.select.every:
        raise ConfigError("select.every with train.parallel=fsdp is not supported yet (rank 0 samples the dev "
                          "prompts alone); use train.parallel=ddp")
    if cfg.ptx.coef > 0:
        raise ConfigError("ptx.coef > 0 with train.parallel=fsdp is not supported yet (the pretraining rows run "
                          "the policy a second time in the same forward); use train.parallel=ddp")
    if cfg.rollout.backend != "hf":
        raise ConfigError(f"rollout.backend={cfg.rollout.backend} with train.parallel=fsdp is not supported yet; "
                          "use rollout.backend=hf or train.parallel=ddp")
