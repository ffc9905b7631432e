"""Stage A: supervised fine-tuning on demonstrations, loss on response tokens only.

Read top to bottom: 0. set-up, 1. data, 2. model and optimizer, 3. the loop, 4. save.
Works on one process or under ``torchrun`` (DDP or FSDP, ``train.parallel``; every rank takes its
slice of each global batch, the loss is normalised by the step's global token count, rank 0 alone
writes).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple

import torch

from preflab import distributed, loop, models
from preflab.config import SFTConfig
from preflab.data.chat import IGNORE, Example, collate, pack, read_demos, tokenize_conversation
from preflab.lm import TokenNLL
from preflab.optim import make_optimizer


def split_val(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic hold-out of ``fraction`` of the examples (at least one when fraction > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(examples) * fraction)))
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def response_tokens(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The tokens the loss is taken on (labelled, after the shift): SFT's normaliser."""
    return sum((b["labels"][:, 1:] != IGNORE).sum() for b in batches)


class NLLSums(NamedTuple):
    """A step's summed response-token NLL (over its micro-batches and ranks)."""

    loss: float

    def metrics(self, tokens: int, step_s: float) -> dict[str, float]:
        return {"train/loss": self.loss / max(1, tokens), "train/tokens": tokens}


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

    best = loop.BestWeights(Path(cfg.run.out) / "best", enabled=cfg.train.select_best and bool(val_ex) and dist.is_main)

    # 3. the loop: one global batch per optimizer step, the loss normalised by the step's global
    #    count of response tokens -----------------------------------------------------------------
    micro = cfg.train.batch_size

    def batch_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, NLLSums]:
        nll, _ = loss_fn(**{k: v.to(device) for k, v in batch.items()})
        return nll, NLLSums(float(nll.detach()))

    def validate(step: int) -> loop.Validation:
        val = validation_loss(loss_fn, val_ex, micro, tokenizer.pad_token_id, device, bf16, dist)
        return loop.Validation({"val/loss": val}, loss=val)

    steps = loop.Steps(train_ex, global_batch, micro, collate=lambda part: collate(part, tokenizer.pad_token_id),
                       count=response_tokens, batch_loss=batch_loss, length=lambda e: len(e.input_ids))
    last = loop.run_steps(ctx, cfg, steps, model=model, module=loss_fn, optimizer=optimizer, scheduler=scheduler,
                          start=start, total=total_steps, validate=validate if val_ex else None, best=best,
                          progress=("train/loss", "val/loss", "perf/tokens_per_s"))

    # 4. final validation and a plain Hugging Face checkpoint -----------------------------------
    final = {}
    if val_ex:  # the last step's validation when eval_every hit it
        final["val/loss"] = last["val/loss"] if "val/loss" in last else validate(total_steps).loss
        best.offer(total_steps, final["val/loss"], model)
        run.log_metrics(total_steps, final)
    if best.enabled and best.step is not None:
        if best.step != total_steps:
            best.load_into(model)
            run.log(f"sft: exporting step {best.step} (val loss {best.val_loss:.4f}), not the last step")
        final.update({"best/step": best.step, "best/val_loss": best.val_loss})
    out = loop.export(model, tokenizer, Path(cfg.run.out) / "model", ctx)
    run.finish(final_metrics=final)
    return out
