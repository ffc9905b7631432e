"""The step loop of the gradient trainers (SFT, the RM, DPO), once, and the pieces every training
loop shares, as plain functions (no base class): set-up, the number of steps, micro-steps, the
guarded optimizer step, best weights and the export.

A stage reads top to bottom: set-up, data, model and optimizer, then ``run_steps`` with what only
that trainer knows (its collation, its normaliser, the loss of a batch), then its own final pass::

    ctx = loop.start(cfg, "sft", cfg.model, resume)          # threads, device, ranks, seed, run dir
    total = loop.total_steps(len(train), global_batch, cfg.train.epochs, cfg.train.max_steps, source)
    module = loop.wrap(LossModule(model), cfg.train)           # DDP or FSDP on several ranks
    start = run.resume_training(model, optimizer, scheduler) if resume else 0
    steps = loop.Steps(train, global_batch, micro, collate=..., count=..., batch_loss=..., length=...)
    last = loop.run_steps(ctx, cfg, steps, model=model, module=module, optimizer=optimizer,
                          scheduler=scheduler, start=start, total=total, validate=..., best=...)
    loop.export(model, tokenizer, out, ctx)                     # rank 0 saves, every rank waits

``run_steps`` owns the progress bar, the step's examples and this rank's slice of them, the
micro-batches, the all-reduced normaliser, ``micro_step`` (no_sync, autocast), ``ensure_finite``,
``optimizer_step``, the metrics row, eval-every with ``BestWeights`` and the checkpoints. The online
RL stage's update (``rl_update.ppo_update``) iterates over a rollout instead, and uses
``micro_step`` and ``optimizer_step`` alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import torch

from preflab import distributed, models
from preflab.config import dump_config
from preflab.data.jsonl import atomic_dir
from preflab.data.order import rank_slice, step_indices
from preflab.errors import ConfigError, DataError, TrainingError
from preflab.optim import clip_grad
from preflab.run import Progress, RunDir, peak_rss_mb, seed_everything
from preflab.scoring import batch_tokens


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
                 writer=dist.is_main, schema=type(cfg))
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
def micro_step(module: torch.nn.Module, device: torch.device, j: int, n: int, bf16: bool) -> Iterator[None]:
    """Micro-batch ``j`` of ``n`` of an accumulated step: DDP syncs gradients only on the last (FSDP
    on every one, ``distributed.grad_sync``), bf16 autocast on ``device``."""
    with distributed.grad_sync(module, sync=j == n - 1), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        yield


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                   max_grad_norm: float | None, *, step: int | None, last_good: str | None) -> tuple[float, float]:
    """Clip (a non-finite norm stops here, naming ``step``, 1-based, and ``last_good``, the checkpoint
    ``--resume`` goes back to: nothing is applied), step, advance the schedule, clear the gradients.
    Returns (grad norm, lr used)."""
    grad_norm = clip_grad(params, max_grad_norm, step=step, last_good=last_good)
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



# ---------------------------------------------------------------------------------------------
# The step loop of the gradient trainers
# ---------------------------------------------------------------------------------------------

Batch = TypeVar("Batch", bound=dict)
S = TypeVar("S", bound="StepSums")


class StepSums(Protocol):
    """A trainer's per-micro-batch sums: a NamedTuple of floats (``loss`` the batch's loss summed
    over its normalisation units, then what its metrics need) that ``reduce_sums`` adds over the
    micro-batches and ranks, and that turns the step's sums into its rows of ``metrics.jsonl``."""

    loss: float

    def metrics(self, count: int, step_s: float) -> dict[str, float]: ...


def reduce_sums(cls: type[S], parts: list[S]) -> S:
    """Field by field, the sum of ``parts`` in order (float64), then over every rank; zeros on a
    rank without parts (every rank must call it)."""
    local = [sum(field) for field in zip(*parts)] if parts else [0.0] * len(cls._fields)  # type: ignore[attr-defined]
    return cls(*distributed.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist())


class Validation(NamedTuple):
    """A held-out pass during training: ``metrics`` join the step's row; ``loss`` (lower is better)
    is what ``BestWeights`` compares, None when the pass selects nothing."""

    metrics: dict[str, Any]
    loss: float | None = None


@dataclass
class Steps(Generic[Batch, S]):
    """What a gradient trainer gives ``run_steps``: its training ``examples``, the ``global_batch``
    of each optimizer step (``data.order.step_indices``; every rank takes its slice) and the
    ``micro_batch`` size, and

    - ``collate(examples) -> batch``: a dict of CPU tensors with ``attention_mask`` (and
      ``prefix_mask`` where a prompt runs once for several responses, ``scoring.batch_tokens``);
    - ``count(batches) -> int or tensor``: this rank's part of the step's normaliser (response
      tokens for SFT, prompts for the RM and DPO); the loop sums it over the ranks;
    - ``batch_loss(batch) -> (loss_sum, sums)``: the batch's loss summed over its normalisation
      units (the loop scales it by ranks / global count and runs backward; the batch is still on
      the CPU), and its ``StepSums``;
    - ``length(example) -> int``: its padded width (the longest sequence). A rank's share of a
      step is sorted by it before it is cut into micro-batches, so each micro-batch pads to its
      own longest example: the same examples, loss and gradient (a sum), fewer padding tokens
      when a step has several micro-batches (``grad_accum`` > 1).
    """

    examples: Sequence[Any]
    global_batch: int
    micro_batch: int
    collate: Callable[[list[Any]], Batch]
    count: Callable[[list[Batch]], int | torch.Tensor]
    batch_loss: Callable[[Batch], tuple[torch.Tensor, S]]
    length: Callable[[Any], int]


def run_steps(ctx: Context, cfg: Any, steps: Steps, *, model: torch.nn.Module, module: torch.nn.Module,
              optimizer: torch.optim.Optimizer, scheduler: Any, start: int, total: int,
              validate: Callable[[int], Validation] | None = None, validate_last: bool = True,
              best: BestWeights | None = None, progress: tuple[str, ...] = ("train/loss",)) -> dict[str, Any]:
    """Optimizer steps ``start`` to ``total`` of a gradient trainer; returns the last step's metrics
    (empty when none ran).

    Each step: its global batch, this rank's slice in micro-batches, the normaliser summed over
    ranks, every micro-batch's ``batch_loss`` x ranks / count backward under ``micro_step``
    (``module`` is the DDP- or FSDP-wrapped one), the step's sums over micro-batches and ranks, a
    non-finite loss refused before the update, ``optimizer_step`` on ``model``'s trainable weights;
    the row (the trainer's ``sums.metrics`` and ``train/lr``, ``train/grad_norm``, ``perf/step_s``,
    ``perf/tokens_per_s``) in ``metrics.jsonl`` every ``run.log_every`` steps; every
    ``train.eval_every`` steps ``validate(step)`` joins the row and offers its loss to ``best``
    (at the last step only with ``validate_last``: a trainer whose final pass comes after the loop
    says False); a checkpoint every ``run.save_every`` steps and after the last. ``cfg``: the
    stage's config (``run``, ``train.bf16``, ``train.eval_every``, ``train.length_groups``,
    ``optim.max_grad_norm``).
    """
    run, dist = ctx.run, ctx.dist
    params = [p for p in model.parameters() if p.requires_grad]
    micro, every = steps.micro_batch, cfg.train.eval_every
    lengths = [steps.length(e) for e in steps.examples]
    last: dict[str, Any] = {}
    with Progress(total, run.stage, enabled=cfg.run.progress and dist.is_main, start=start, keys=progress) as bar:
        for step in range(start, total):
            t0 = time.perf_counter()
            idx = step_indices(step, len(steps.examples), steps.global_batch, cfg.run.seed, lengths,
                               cfg.train.length_groups)
            mine = sorted(rank_slice(idx, dist.rank, dist.world_size), key=lengths.__getitem__)
            batches = [steps.collate([steps.examples[i] for i in mine[j:j + micro]]) for j in range(0, len(mine), micro)]
            # Normalise by the step's global count: exact under accumulation and ranks (DDP
            # averages gradients, hence the world_size factor).
            count = int(distributed.all_reduce_sum(torch.as_tensor(steps.count(batches), dtype=torch.long)))
            scale = dist.world_size / max(1, count)
            parts = []
            for j, batch in enumerate(batches):
                with micro_step(module, ctx.device, j, len(batches), cfg.train.bf16):
                    loss_sum, part = steps.batch_loss(batch)
                    (loss_sum * scale).backward()
                parts.append(part)
            sums = reduce_sums(type(parts[0]), parts)
            ensure_finite(sums.loss, "loss", step, run)
            grad_norm, lr = optimizer_step(params, optimizer, scheduler, cfg.optim.max_grad_norm, step=step + 1,
                                           last_good=str(run.latest_checkpoint() or "none"))

            done = step + 1
            dt = time.perf_counter() - t0
            metrics = {**sums.metrics(count, dt), "train/lr": lr, "train/grad_norm": grad_norm, "perf/step_s": dt,
                       "perf/tokens_per_s": sum(batch_tokens(b) for b in batches) * dist.world_size / dt}
            if validate and every and done % every == 0 and (validate_last or done < total):
                held_out = validate(done)
                metrics.update(held_out.metrics)
                if best is not None and held_out.loss is not None:
                    best.offer(done, held_out.loss, model)
            log_step(run, cfg.run.log_every, done, total, metrics)
            bar.update(metrics)
            if save_due(done, cfg.run.save_every, total):
                run.save_training(done, model, optimizer, scheduler, keep=cfg.run.keep_checkpoints)
            last = metrics
    run.save_training(total, model, optimizer, scheduler, keep=cfg.run.keep_checkpoints)
    return last
