"""The pieces every training loop shares, as plain functions (no base class): set-up, the number of
steps, accumulation over micro-batches, the guarded optimizer step and the export.

A stage reads top to bottom and calls these where its numbered steps say so::

    ctx = loop.start(cfg, "sft", cfg.model, resume)          # threads, device, ranks, seed, run dir
    total = loop.total_steps(len(train), global_batch, cfg.train.epochs, cfg.train.max_steps, source)
    module = loop.wrap(LossModule(model), cfg.train)           # DDP or FSDP on several ranks
    for j, batch in enumerate(batches):
        with loop.micro_step(module, ctx, j, len(batches), bf16):   # no_sync except the last, autocast
            ...loss.backward()
    grad_norm, lr = loop.optimizer_step(params, optimizer, scheduler, cfg.optim.max_grad_norm, ctx.run, step)
    loop.export(model, tokenizer, out, ctx)                     # rank 0 saves, every rank waits
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preflab import distributed, models
from preflab.config import dump_config
from preflab.data.jsonl import atomic_dir
from preflab.errors import ConfigError, DataError, TrainingError
from preflab.optim import clip_grad
from preflab.run import RunDir, peak_rss_mb, seed_everything


@dataclass
class Context:
    device: torch.device
    dist: distributed.Dist
    run: RunDir


def start(cfg: Any, stage: str, model: Any, resume: bool) -> Context:
    """Threads and device from ``model`` (a ModelSection; the allocator keeps freed blocks except
    under train.parallel=fsdp), join the ranks, seed each rank (seed + 100003 x rank), open the
    run directory (rank 0 writes)."""
    fsdp = getattr(getattr(cfg, "train", None), "parallel", "ddp") == "fsdp"
    models.set_threads(model.threads, keep_blocks=not fsdp)
    device = models.pick_device(model.device)
    dist = distributed.init(device)
    seed_everything(cfg.run.seed + 100003 * dist.rank)
    run = RunDir(cfg.run.out, stage=stage, config=dump_config(cfg), seed=cfg.run.seed, resume=resume,
                 writer=dist.is_main)
    return Context(device, dist, run)


def total_steps(n_examples: int, global_batch: int, epochs: float, max_steps: int | None, source: str,
                what: str = "examples") -> int:
    """Optimizer steps for ``epochs`` over ``n_examples`` in global batches (no partial batch), or
    ``max_steps``; a DataError naming ``source`` when there is not one batch."""
    if n_examples < global_batch:
        raise DataError(f"{source}: {n_examples} {what}, fewer than one global batch ({global_batch})")
    return max_steps or max(1, math.ceil(epochs * (n_examples // global_batch)))


def wrap(module: torch.nn.Module, train: Any) -> torch.nn.Module:
    """``distributed.wrap`` as the stage's ``train`` section says (``parallel``, ``bf16``); what FSDP
    does not support yet is refused here, before the first step."""
    parallel = getattr(train, "parallel", "ddp")
    if parallel == "fsdp" and distributed.in_group() and getattr(train, "select_best", False):
        raise ConfigError("train.select_best with train.parallel=fsdp is not supported yet; use train.parallel=ddp")
    return distributed.wrap(module, parallel, train.bf16)


def share_prompt(train: Any, module: torch.nn.Module) -> bool:
    """Whether a step runs each prompt once for its K responses (``train.share_prompt``): not under
    gradient checkpointing, which drops the cache, nor under FSDP, whose units may run only once
    per forward and backward (the full sequences give the same loss)."""
    return train.share_prompt and not train.gradient_checkpointing and not distributed.is_sharded(module)


@contextlib.contextmanager
def micro_step(module: torch.nn.Module, ctx: Context, j: int, n: int, bf16: bool) -> Iterator[None]:
    """One micro-batch of an accumulated step: DDP syncs gradients only on the last (FSDP on every
    one, ``distributed.grad_sync``), bf16 autocast."""
    with distributed.grad_sync(module, sync=j == n - 1), \
            torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
        yield


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                   max_grad_norm: float | None, run: RunDir, step: int) -> tuple[float, float]:
    """Clip (a non-finite norm stops here, naming step ``step + 1`` and the last good checkpoint:
    nothing is applied), step, advance the schedule, clear the gradients. Returns (grad norm, lr used)."""
    grad_norm = clip_grad(params, max_grad_norm, step=step + 1, last_good=str(run.latest_checkpoint() or "none"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def export(model: torch.nn.Module, tokenizer: Any, out: Path, ctx: Context) -> Path:
    """A plain Hugging Face directory (LoRA merged), written by rank 0; every rank waits for it.
    A sharded (FSDP) model's full weights are gathered on rank 0 first."""
    state = distributed.full_state_dict(model)
    if ctx.dist.is_main:
        models.save_model(model, tokenizer, out, state_dict=state)
    distributed.barrier()
    return out


class BestWeights:
    """The trainable weights with the lowest validation loss so far (``train.select_best`` of SFT
    and the RM), in ``DIR/weights.pt`` and ``DIR/meta.json`` (written together by a directory
    rename, so a kill leaves the previous pair). A resumed run reads them back, and replays the
    same steps, so it finds the same best."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.step: int | None = None
        self.val_loss = math.inf
        meta = path / "meta.json"
        if enabled and meta.is_file():
            m = json.loads(meta.read_text())
            self.step, self.val_loss = int(m["step"]), float(m["val_loss"])

    def offer(self, step: int, val_loss: float, model: torch.nn.Module) -> None:
        if not self.enabled or not val_loss < self.val_loss:
            return
        weights = {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
        with atomic_dir(self.path) as tmp:
            torch.save(weights, tmp / "weights.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
        self.step, self.val_loss = step, val_loss

    def load_into(self, model: torch.nn.Module) -> None:
        weights = torch.load(self.path / "weights.pt", map_location="cpu")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v)


def lora_options(model: Any) -> models.LoraOptions | None:
    """The LoRA options of a config's model section (None: LoRA off)."""
    return models.LoraOptions(**model.lora.model_dump(exclude={"enabled"})) if model.lora.enabled else None


def ensure_finite(values: float | Iterable[float], what: str, step: int, run: RunDir) -> None:
    """A non-finite ``what`` after step ``step + 1`` stops the run before the update, naming the last
    good checkpoint (the one ``--resume`` continues from)."""
    if not all(math.isfinite(v) for v in ([values] if isinstance(values, float | int) else values)):
        raise TrainingError(f"non-finite {what} at step {step + 1}; last good checkpoint: "
                            f"{run.latest_checkpoint() or 'none'}")


def log_step(run: RunDir, every: int, done: int, total: int, metrics: dict[str, Any]) -> None:
    """``metrics.jsonl`` every ``run.log_every`` steps and at the last one, with the peak resident memory."""
    if done % every == 0 or done == total:
        metrics.setdefault("perf/peak_rss_mb", peak_rss_mb())
        run.log_metrics(done, metrics)


def save_due(done: int, every: int, total: int) -> bool:
    """Whether step ``done`` writes a checkpoint (every ``every`` steps; the last is saved after the loop)."""
    return bool(every) and done % every == 0 and done < total

