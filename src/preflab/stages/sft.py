"""Stage A: supervised fine-tuning on demonstrations, loss on response tokens only.

Read top to bottom: 0. set-up, 1. data, 2. model and optimizer, 3. the loop, 4. save.
Works on one process or under ``torchrun`` (DDP or FSDP, ``train.parallel``; every rank takes its
slice of each global batch, the loss is normalised by the step's global token count, rank 0 alone
writes).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from preflab import distributed, loop, models
from preflab.config import SFTConfig
from preflab.data.chat import IGNORE, Example, collate, pack, read_demos, tokenize_conversation
from preflab.data.order import rank_slice, step_indices
from preflab.lm import TokenNLL
from preflab.optim import make_optimizer
from preflab.run import Progress


def split_val(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic hold-out of ``fraction`` of the examples (at least one when fraction > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(examples) * fraction)))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


@torch.no_grad()
def validation_loss(loss_fn: TokenNLL, examples: list[Example], batch_size: int, pad_id: int,
                    device, bf16: bool, dist: distributed.Dist) -> float:
    loss_fn.eval()
    total = torch.zeros(2, dtype=torch.float64)
    mine = examples[dist.rank::dist.world_size]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    for part, counted in distributed.even_batches(batches, examples[:1], distributed.is_sharded(loss_fn)):
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            nll, count = loss_fn(**batch)
        if counted:
            total += torch.tensor([nll.item(), count.item()], dtype=torch.float64)
    loss_fn.train()
    total = distributed.all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def train(cfg: SFTConfig, resume: bool = False) -> Path:
    """Run SFT as configured; returns the directory of the saved Hugging Face model."""
    # 0. set-up: device, ranks, seed, run directory ---------------------------------------------
    ctx = loop.start(cfg, "sft", cfg.model, resume)
    device, dist, run = ctx.device, ctx.dist, ctx.run
    bf16 = cfg.train.bf16

    # 1. data: parse every file before any training, tokenize once, hold out validation -------
    tokenizer = models.load_tokenizer(cfg.model.path)
    train_convs = read_demos(cfg.data.train)
    val_convs = read_demos(cfg.data.val) if cfg.data.val else []

    def encode(convs):
        out = [tokenize_conversation(tokenizer, c, cfg.data.max_length) for c in convs]
        return [e for e in out if any(label != IGNORE for label in e.labels)]

    train_ex, val_ex = encode(train_convs), encode(val_convs)
    if not cfg.data.val:
        train_ex, val_ex = split_val(train_ex, cfg.data.val_fraction, cfg.run.seed)
    if cfg.data.packing:
        train_ex = pack(train_ex, cfg.data.max_length)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size  # batch_size x grad_accum x ranks
    total_steps = loop.total_steps(len(train_ex), global_batch, cfg.train.epochs, cfg.train.max_steps,
                                   cfg.data.train, "training examples")
    run.log(f"sft: {len(train_ex)} train / {len(val_ex)} val examples, {total_steps} steps")

    # 2. model, optimizer, schedule; resume from the newest checkpoint --------------------------
    lora = loop.lora_options(cfg.model)
    model = models.load_policy(cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device, lora=lora)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    loss_fn = loop.wrap(TokenNLL(model), cfg.train)  # DDP or FSDP on several ranks; build the optimizer after
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.optim, total_steps)
    start = run.resume_training(model, optimizer, scheduler) if resume else 0

    def checkpoint(step: int) -> None:
        run.save_training(step, model, optimizer, scheduler, keep=cfg.run.keep_checkpoints)

    best = loop.BestWeights(Path(cfg.run.out) / "best", enabled=cfg.train.select_best and bool(val_ex) and dist.is_main)

    # 3. the loop: one global batch per optimizer step ------------------------------------------
    micro = cfg.train.batch_size
    last_val: float | None = None  # validation loss after the last step, when eval_every hit it
    with Progress(total_steps, "sft", enabled=cfg.run.progress and dist.is_main, start=start,
                  keys=("train/loss", "val/loss", "perf/tokens_per_s")) as bar:
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            idx = step_indices(step, len(train_ex), global_batch, cfg.run.seed)
            mine = rank_slice(idx, dist.rank, dist.world_size)
            batches = [collate([train_ex[i] for i in mine[j:j + micro]], tokenizer.pad_token_id)
                       for j in range(0, len(mine), micro)]
            # Normalise by the global count of response tokens in this step: exact under
            # accumulation and ranks (DDP averages gradients, hence the world_size factor).
            n_tokens = distributed.all_reduce_sum(sum((b["labels"][:, 1:] != IGNORE).sum() for b in batches))
            scale = dist.world_size / max(1, int(n_tokens))
            loss_sum = torch.zeros((), dtype=torch.float64)
            for j, batch in enumerate(batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                with loop.micro_step(loss_fn, ctx, j, len(batches), bf16):
                    nll, _ = loss_fn(**batch)
                    (nll * scale).backward()
                loss_sum += nll.detach().double().cpu()
            loss = float(distributed.all_reduce_sum(loss_sum)) / max(1, int(n_tokens))
            loop.ensure_finite(loss, "loss", step, run)
            grad_norm, lr = loop.optimizer_step(params, optimizer, scheduler, cfg.optim.max_grad_norm, run, step)

            done = step + 1
            dt = time.perf_counter() - t0
            metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                       "train/tokens": int(n_tokens), "perf/step_s": dt,
                       "perf/tokens_per_s": sum(b["attention_mask"].sum().item() for b in batches)
                       * dist.world_size / dt}
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and val_ex:
                metrics["val/loss"] = validation_loss(loss_fn, val_ex, micro, tokenizer.pad_token_id,
                                                      device, bf16, dist)
                best.offer(done, metrics["val/loss"], model)
                last_val = metrics["val/loss"] if done == total_steps else None
            loop.log_step(run, cfg.run.log_every, done, total_steps, metrics)
            bar.update(metrics)
            if loop.save_due(done, cfg.run.save_every, total_steps):
                checkpoint(done)

    # 4. final validation and a plain Hugging Face checkpoint -----------------------------------
    final = {}
    if val_ex:
        final["val/loss"] = last_val if last_val is not None else validation_loss(
            loss_fn, val_ex, micro, tokenizer.pad_token_id, device, bf16, dist)
        best.offer(total_steps, final["val/loss"], model)
        run.log_metrics(total_steps, final)
    checkpoint(total_steps)
    if best.enabled and best.step is not None:
        if best.step != total_steps:
            best.load_into(model)
            run.log(f"sft: exporting step {best.step} (val loss {best.val_loss:.4f}), not the last step")
        final.update({"best/step": best.step, "best/val_loss": best.val_loss})
    out = loop.export(model, tokenizer, Path(cfg.run.out) / "model", ctx)
    run.finish(final_metrics=final)
    return out
