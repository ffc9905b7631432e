"""Offline preference optimisation: the policy trained directly on K-way rankings (DPO, cDPO,
IPO, SimPO; the maths in ``rl/preference.py``, the formulas in docs/preference.md).

Read ``train`` top to bottom: 0. set-up, 1. data, 2. model, 3. reference log-probs (computed once,
cached in the run directory), 4. optimizer and resume, 5. the loop, 6. held-out metrics, 7. save.

A ranking's C(K,2) untied pairs are ONE batch element (as the RM's Eq. 1), so a prompt's pairs
never straddle micro-batches or ranks. Each response's log-prob is the sum over its tokens
(EOS included) of log pi(token | prompt, earlier tokens): the exact sequence ``encode_pair`` gives
the RM. By default (``train.share_prompt``) a prompt runs once and its K responses read its
cached keys and values, and the vocabulary projection runs only at response positions.
Works on one process or under ``torchrun`` (DDP or FSDP, ``train.parallel``) like
``stages/reward.py``: the loss is normalised by the step's global count of prompts, so accumulation
and ranks are exact; rank 0 alone writes. With ``dpo.ptx_coef`` each training ranking brings one
demonstration (``data.ptx``) scored in the same forward pass, and its per-token NLL, times gamma,
joins the prompt's loss: the SFT loss as PPO-ptx mixes it in, normalised like the rest. Under
FSDP the KL to the reference on fresh samples is not measured (sampling on sharded weights would
need every rank to decode in lockstep).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from preflab import distributed, loop, models
from preflab.config import DPOConfig
from preflab.data.chat import read_lm_rows
from preflab.dpo_update import (
    REFERENCE_CACHE,
    PreferenceSums,
    Reference,
    SequenceLogps,
    batch_loss,
    collate_ranked,
    demo_nll,
    encode_demos,
    encode_ranked,
    model_inputs,
    pair_demos,
    reference_logps,
    sampled_kl,
)
from preflab.errors import DataError
from preflab.feedback.ranking_sources import read_train_val
from preflab.lm import unwrap
from preflab.optim import make_optimizer
from preflab.rl.preference import REFERENCE_FREE

__all__ = ["REFERENCE_CACHE", "train"]


def train(cfg: DPOConfig, resume: bool = False) -> Path:
    """Train the policy on rankings with the configured preference loss; returns the saved model directory."""
    # 0. set-up: threads, device, ranks, seed, run directory --------------------------------------
    ctx = loop.start(cfg, "dpo", cfg.model, resume)
    device, dist, run = ctx.device, ctx.dist, ctx.run
    bf16, d = cfg.train.bf16, cfg.data

    # 1. data: every source parsed before training, all-tied rankings dropped, tokenized once ---
    tokenizer = models.load_tokenizer(cfg.model.path)
    pad_id = tokenizer.pad_token_id
    train_g, val_g, n_tied = read_train_val(d, cfg.run.seed)
    train_ex, val_ex = encode_ranked(tokenizer, train_g, d.max_length), encode_ranked(tokenizer, val_g, d.max_length)
    global_batch = cfg.train.batch_prompts * cfg.train.grad_accum * dist.world_size
    total_steps = loop.total_steps(len(train_ex), global_batch, cfg.train.epochs, cfg.train.max_steps, d.train,
                                   "rankings with an untied pair (batch_prompts x grad_accum x ranks)")
    kl_prompts = list({json.dumps(g.prompt): g.prompt for g in val_g}.values())[:cfg.eval.kl_prompts]
    ptx = cfg.dpo.ptx_coef > 0
    if ptx:  # the SFT-loss term: one demonstration per training ranking, scored in the same forward pass
        demos = encode_demos(read_lm_rows(d.ptx, tokenizer, d.max_length))
        if not demos:
            raise DataError(f"{d.ptx}: no demonstration with a response token (data.ptx, for dpo.ptx_coef)")
        pair_demos(train_ex, demos, cfg.run.seed + 13)
        run.log(f"dpo: {len(demos)} demonstrations for the SFT-loss term (gamma {cfg.dpo.ptx_coef})")
    run.log(f"dpo: {len(train_ex)} train rankings ({n_tied} all-tied dropped) / {len(val_ex)} "
            f"held out, {total_steps} steps, loss {cfg.dpo.loss} beta {cfg.dpo.resolved_beta()}")
    if not val_ex:
        run.log("dpo: no held-out rankings (data.val gave none, or data.val_fraction is 0): no val/ metrics and "
                "no KL to the reference")

    # 2. the policy --------------------------------------------------------------------------
    lora = loop.lora_options(cfg.model)
    model = models.load_policy(cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device, lora=lora,
                               dropout_off=True)
    if cfg.train.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable()
    share = loop.share_prompt(cfg.train, model)  # not under gradient checkpointing, which drops the cache

    # 3. reference log-probs: from the run directory, or computed now from the weights as loaded
    #    (before a resumed checkpoint replaces them) and cached there --------------------------
    if cfg.dpo.loss not in REFERENCE_FREE:
        if reference_logps(run, model, cfg, {"train": train_ex, "val": val_ex}, pad_id, share):
            run.log(f"dpo: reference log-probs of {sum(len(e.ids) for e in train_ex + val_ex)} responses "
                    f"cached in {REFERENCE_CACHE}")
    reference = Reference(model, cfg)

    # 4. optimizer, schedule; resume --------------------------------------------------------------
    model.train()
    fn = loop.wrap(SequenceLogps(model), cfg.train)  # DDP or FSDP on several ranks; build the optimizer after
    share = loop.share_prompt(cfg.train, fn)  # FSDP: full sequences from here on (the same loss)
    sharded = distributed.is_sharded(fn)
    if sharded and kl_prompts:
        run.log("dpo: no KL to the reference on fresh samples under train.parallel=fsdp (not supported yet)")
        kl_prompts = []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.optim, total_steps)
    start = run.resume_training(model, optimizer, scheduler) if resume else 0

    @torch.no_grad()
    def held_out(step: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if val_ex:
            mine, size, parts = val_ex[dist.rank::dist.world_size], cfg.train.batch_prompts, []
            model.eval()
            chunks = [mine[s:s + size] for s in range(0, len(mine), size)]
            with distributed.gathered(fn):
                for chunk, counted in distributed.even_batches(chunks, val_ex[:1], sharded):
                    batch = collate_ranked(chunk, pad_id, share_prefix=share)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        result = batch_loss(SequenceLogps(model)(**model_inputs(batch, device)), batch, cfg)
                    if counted:
                        parts.append(PreferenceSums.of(result))
            model.train()
            out.update(loop.reduce_sums(PreferenceSums, parts).named("val"))
        if kl_prompts:
            kl, n = sampled_kl(model, reference, tokenizer, kl_prompts, max_new_tokens=cfg.eval.max_new_tokens,
                               batch_size=cfg.eval.batch_size, bf16=bf16, seed=cfg.run.seed + step)
            out.update({"val/kl": kl, "val/kl_samples": n})
        return out

    # 5. the loop: one global batch of prompts per optimizer step, the loss normalised by the
    #    step's global count of prompts ------------------------------------------------------------
    def train_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, PreferenceSums]:
        flat = fn(**model_inputs(batch, device))
        parts, ptx_nll = batch_loss(flat, batch, cfg), demo_nll(flat, batch)  # ptx_nll: 0 without dpo.ptx_coef
        parts = parts._replace(total=parts.total + cfg.dpo.ptx_coef * ptx_nll)
        return parts.total, PreferenceSums.of(parts, float(ptx_nll.detach()))

    steps = loop.Steps(train_ex, global_batch, cfg.train.batch_prompts,
                       collate=lambda part: collate_ranked(part, pad_id, share_prefix=share, demos=ptx),
                       count=lambda batches: sum(len(b["ranks"]) for b in batches), batch_loss=train_loss,
                       length=lambda e: max(map(len, e.ids + (e.demo.ids if e.demo else []))))
    loop.run_steps(ctx, cfg, steps, model=model, module=fn, optimizer=optimizer, scheduler=scheduler, start=start,
                   total=total_steps, validate=lambda step: loop.Validation(held_out(step)), validate_last=False,
                   progress=("train/loss", "train/rewards/accuracy", "val/kl"))

    # 6. held-out preference metrics and KL to the reference --------------------------------------
    final = held_out(total_steps)
    if final:
        run.log_metrics(total_steps, final)

    # 7. a plain Hugging Face causal LM (LoRA merged) ----------------------------------------------
    out = loop.export(model, tokenizer, Path(cfg.run.out) / "model", ctx)
    run.finish(final_metrics=final)
    return out
