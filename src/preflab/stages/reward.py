"""Stage B: a scalar reward model trained on K-way rankings (InstructGPT Eq. 1).

Read ``train`` top to bottom: 0. set-up, 1. data, 2. model and optimizer, 3. the loop,
4. normalisation, 5. evaluation, 6. save. The rankings are read by ``feedback/ranking_sources.py``
(a file through ``data/rankings.py``, or the store), scored by ``scoring.py`` (head at the last
real token, K-way prompt sharing), the loss is ``rl/ranking.ranking_loss`` and the held-out
report ``evals/rm_eval.py``.

The RM reads exactly what PPO's rollouts give it: the chat-rendered prompt, the response and
the end-of-turn (EOS) token; the score is the head output at that last real token
(docs/reference.md), padding ignored. All C(K,2) pairs of a prompt form ONE batch element,
K forward passes per prompt, tied pairs dropped; by default (``train.share_prompt``) the
prompt part of those K passes runs once and the K responses read its cached keys and values.
With ``train.heads`` > 1 the head is M heads on the one trunk, each weighing every ranking by its own
bootstrap count (``reward_heads``): an ensemble for one model's cost.
Works on one process or under ``torchrun`` (DDP or FSDP, ``train.parallel``), like ``stages/sft.py``:
the loss is normalised by the step's global count of prompts, so gradient accumulation and ranks
are exact; rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from preflab import distributed, loop, models, reward_heads
from preflab.config import RMConfig
from preflab.data.chat import read_demos
from preflab.data.jsonl import atomic_write_text
from preflab.data.rankings import Encoded, Group, encode_groups, encode_pair
from preflab.errors import ConfigError
from preflab.evals.rm_eval import ensemble_report, evaluate, print_report, report_metrics
from preflab.feedback.ranking_sources import read_train_val
from preflab.lm import unwrap
from preflab.optim import make_optimizer
from preflab.rl.ranking import ranking_loss
from preflab.scoring import Scorer, collate_groups, score_groups, score_ids, scorer_inputs

# ---------------------------------------------------------------------------------------------
# A step's loss and metrics
# ---------------------------------------------------------------------------------------------


def untied_prompts(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Prompts with an untied pair in ``collate_groups`` batches: each is one element of Eq. 1's
    mean, the RM's normaliser (as SFT's response tokens)."""
    return torch.tensor(sum(len(set(ranks[valid].tolist())) > 1 for b in batches
                            for ranks, valid in zip(b["ranks"], b["valid"])), dtype=torch.long)


class RankingSums(NamedTuple):
    """Sums over a step's micro-batches and ranks: Eq. 1 summed over prompts, pairs, pairs ranked right."""

    loss: float
    pairs: float
    correct: float

    def metrics(self, prompts: int, step_s: float) -> dict[str, float]:
        return {"train/loss": self.loss / max(1, prompts), "train/accuracy": self.correct / max(1.0, self.pairs),
                "train/prompts": prompts, "train/pairs": int(self.pairs), "perf/pairs_per_s": self.pairs / step_s}


# ---------------------------------------------------------------------------------------------
# Normalisation after training
# ---------------------------------------------------------------------------------------------


def normalisation(demo_scores: list[float], policy_scores: list[float], *, demos_mean_zero: bool,
                  policy_gain_bias: bool) -> tuple[float, float]:
    """(gain, bias) with reward = gain * raw + bias.

    policy_gain_bias: held-out policy samples get mean 0, std 1 (lm-human-preferences
    ``set_reward_norm``, biased std). demos_mean_zero: the bias makes the demonstrations' mean 0
    (InstructGPT); with both, the gain comes from the policy samples and the bias from the demos.
    """
    gain, bias = 1.0, 0.0
    if policy_gain_bias and len(policy_scores) > 1:
        gain = 1.0 / max(float(np.std(policy_scores)), 1e-8)
        bias = -gain * float(np.mean(policy_scores))
    if demos_mean_zero and demo_scores:
        bias = -gain * float(np.mean(demo_scores))
    return gain, bias


def head_column(raw: list, m: int) -> list[float]:
    """Head ``m``'s scores from ``score_ids`` output: floats of a one-head model, or a list per
    sequence of a model with several heads."""
    return [r[m] for r in raw] if raw and isinstance(raw[0], list) else raw


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def train(cfg: RMConfig, resume: bool = False) -> Path:
    """Train, normalise, evaluate and save a reward model; returns the saved Hugging Face directory."""
    # 0. set-up: device, ranks, seed, run directory ---------------------------------------------
    ctx = loop.start(cfg, "rm", cfg.model, resume)
    device, dist, run = ctx.device, ctx.dist, ctx.run
    bf16, d = cfg.train.bf16, cfg.data

    # 1. data: parse every source before any training, drop all-tied rankings, tokenize once ----
    tokenizer = models.load_tokenizer(cfg.model.path)
    pad_id = tokenizer.pad_token_id
    train_g, val_g, n_tied = read_train_val(d, cfg.run.seed)
    train_ex, val_ex = encode_groups(tokenizer, train_g, d.max_length), encode_groups(tokenizer, val_g, d.max_length)
    heads = cfg.train.heads  # > 1: each head weighs every ranking by its own bootstrap count
    if boot := reward_heads.bootstrap_weights(len(train_ex), heads, cfg.run.seed):
        train_ex = [dataclasses.replace(e, weights=w) for e, w in zip(train_ex, boot)]
    global_batch = cfg.train.batch_prompts * cfg.train.grad_accum * dist.world_size  # prompts x accum x ranks
    total_steps = loop.total_steps(len(train_ex), global_batch, cfg.train.epochs, cfg.train.max_steps, d.train,
                                   "rankings with an untied pair")
    run.log(f"rm: {len(train_ex)} train rankings ({n_tied} all-tied dropped) / "
            f"{len(val_ex)} held out, {total_steps} steps, loss {cfg.train.loss}")

    # 2. model (scalar head, or `heads` heads, on the SFT trunk), optimizer, schedule; resume ----
    model = models.load_scorer(cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device, heads=heads)
    if (got := reward_heads.head_count(model)) != heads:
        raise ConfigError(f"train.heads: {heads}, but {cfg.model.path} is a reward model with {got} heads; "
                          f"set train.heads: {got}, or start from the SFT model")
    if cfg.model.lora.enabled:
        model = models.wrap_lora(model, loop.lora_options(cfg.model),
                                 task_type="SEQ_CLS", modules_to_save=["score"])
    models.freeze_lower_layers(model, cfg.train.frozen_layers)
    if cfg.train.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable()
    model.train()  # dropout is off in the config (load_scorer); train() only matters for LoRA dropout
    scorer = loop.wrap(Scorer(model), cfg.train)  # DDP or FSDP on several ranks; build the optimizer after
    share = loop.share_prompt(cfg.train, scorer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.optim, total_steps)
    start = run.resume_training(model, optimizer, scheduler) if resume else 0
    score_batch = 4 * cfg.train.batch_prompts * cfg.train.grad_accum  # sequences per no-grad scoring pass

    def held_out(ex: list[Encoded], groups: list[Group]) -> dict[str, Any]:
        with distributed.gathered(scorer):
            scores = score_groups(model, ex, pad_id, batch_size=score_batch, bf16=bf16, shard=True)
        return evaluate(groups, scores, n_bins=cfg.eval.n_bins, temperature_scaling=cfg.eval.temperature_scaling,
                        worst_k=cfg.eval.worst_k, seed=cfg.run.seed)

    best = loop.BestWeights(Path(cfg.run.out) / "best", enabled=cfg.train.select_best and bool(val_ex) and dist.is_main)

    # 3. the loop: one global batch of prompts per optimizer step, the loss normalised by the
    #    step's global count of prompts with an untied pair ---------------------------------------
    micro = cfg.train.batch_prompts

    def batch_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, RankingSums]:
        batch = {k: v.to(device) for k, v in batch.items()}
        with reward_heads.head_mode(model, "raw"):  # (N, heads) raw scores where there are several
            rewards = scorer(**scorer_inputs(batch))
        parts = ranking_loss(rewards, batch["ranks"], batch["valid"], cfg.train.loss, batch.get("weights"))
        return parts.total, RankingSums(float(parts.total.detach()), parts.n_pairs, parts.n_correct)

    def validate(step: int) -> loop.Validation:
        rep = held_out(val_ex, val_g)
        return loop.Validation({"rm/accuracy": rep["accuracy"], "rm/loss": rep["loss"]}, loss=rep["loss"])

    steps = loop.Steps(train_ex, global_batch, micro, collate=lambda part: collate_groups(part, pad_id, share_prefix=share),
                       count=untied_prompts, batch_loss=batch_loss, length=lambda e: max(map(len, e.ids)))
    loop.run_steps(ctx, cfg, steps, model=model, module=scorer, optimizer=optimizer, scheduler=scheduler, start=start,
                   total=total_steps, validate=validate if val_ex else None, validate_last=False, best=best,
                   progress=("train/loss", "train/accuracy", "rm/accuracy"))

    # After the loop, the held-out loss of the last step competes too
    final: dict[str, Any] = {}
    if cfg.train.select_best and val_ex:  # the last step competes too; every rank then holds the best
        best.offer(total_steps, held_out(val_ex, val_g)["loss"], model)  # the main rank keeps it
        distributed.barrier()
        best = loop.BestWeights(best.path, enabled=True)
        if best.step != total_steps:
            best.load_into(model)
            run.log(f"rm: exporting step {best.step} (held-out loss {best.val_loss:.4f}), not the last step")
        final.update({"best/step": best.step, "best/val_loss": best.val_loss})

    # 4. normalisation: demonstrations' mean score 0 (InstructGPT §3.5); optionally policy samples
    #    N(0, 1) (lm-human-preferences). Without demos, the top-ranked training responses stand in.
    if d.demos:
        demos = [(m[:-1], m[-1]["content"]) for m in read_demos(d.demos)]
        demo_source = d.demos
    else:
        demos = [(g.prompt, r) for g in train_g for r, k in zip(g.responses, g.ranks) if k == 0]
        demo_source = "top-ranked training responses (no data.demos)"
    #    Several heads: each its own gain and bias, from its own raw scores.
    pool = val_ex or train_ex  # "held-out policy samples": every response of the held-out rankings
    with distributed.gathered(scorer), reward_heads.head_mode(model, "raw"):
        demo_raw = score_ids(model, [encode_pair(tokenizer, p, r, d.max_length) for p, r in demos], pad_id,
                             batch_size=score_batch, bf16=bf16, shard=True) if cfg.norm.demos_mean_zero else []
        policy_raw = score_ids(model, [s for e in pool for s in e.ids], pad_id, batch_size=score_batch, bf16=bf16,
                               shard=True) if cfg.norm.policy_gain_bias else []
    norms = [normalisation(head_column(demo_raw, m), head_column(policy_raw, m),
                           demos_mean_zero=cfg.norm.demos_mean_zero, policy_gain_bias=cfg.norm.policy_gain_bias)
             for m in range(heads)]
    if heads == 1:
        gain, bias = norms[0]
        unwrap(model).config.preflab_reward_gain = gain
        unwrap(model).config.preflab_reward_bias = bias
    else:
        reward_heads.store_norm(model, [g for g, _ in norms], [b for _, b in norms])
        gain, bias = (float(np.mean(x)) for x in zip(*norms))  # reported: the heads' mean
    final.update({"rm/norm_gain": gain, "rm/norm_bias": bias})
    if demo_raw:
        final["rm/demo_score_mean"] = float(np.mean([g * x + b for m, (g, b) in enumerate(norms)
                                                     for x in head_column(demo_raw, m)]))
    run.log(f"rm: normalisation gain {gain:.4g} bias {bias:.4g}{' (heads mean)' if heads > 1 else ''} "
            f"(demos: {demo_source})")

    # 5. held-out evaluation: accuracy, calibration, worst pairs, labeler ceiling ---------------
    if val_ex:
        report = held_out(val_ex, val_g)
        report["normalisation"] = {"gain": gain, "bias": bias, "demos": demo_source}
        if heads > 1:  # each head's accuracy and where they disagree, as `preflab rm-eval` reports an ensemble
            with distributed.gathered(scorer), reward_heads.head_mode(model, "members"):
                by_group = score_groups(model, val_ex, pad_id, batch_size=score_batch, bf16=bf16, shard=True)
            members = [[[x[m] for x in g] for g in by_group] for m in range(heads)]
            report["ensemble"] = ensemble_report(val_g, members, [f"head{m}" for m in range(heads)],
                                                 top_k=cfg.eval.worst_k)
        final.update(report_metrics(report))
        if dist.is_main:
            atomic_write_text(Path(cfg.run.out) / "eval" / "rm_eval.json", json.dumps(report, indent=2, default=str))
            if cfg.run.progress:
                print_report(report)
    run.log_metrics(total_steps, final)

    # 6. a plain Hugging Face sequence-classification checkpoint (LoRA merged) -------------------
    out = loop.export(model, tokenizer, Path(cfg.run.out) / "model", ctx)
    run.finish(final_metrics=final)
    return out
