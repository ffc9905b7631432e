"""The little of torch.distributed that every loop needs: ranks, reductions, rank-0 writes, and
the one place a model is wrapped for several ranks (``wrap``: DDP or FSDP2) with the sharded
checkpoints and full-weight export that FSDP needs.

Launch with ``torchrun --nproc_per_node N``: gloo on CPU, nccl on CUDA. With one process
everything here is a no-op, so one recipe serves one device or many (docs/scale-out.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: torch.device) -> Dist:
    """Join the process group torchrun set up (env RANK/WORLD_SIZE); one process: no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is then this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def current() -> Dist:
    """This process's place in the joined process group (one process: rank 0 of 1)."""
    if not in_group():
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def in_group() -> bool:
    """Whether this process is one of several ranks of a joined process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group, if this process joined one (the end of a torchrun stage)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_now(code: int = 0) -> NoReturn:
    """End a rank that has left its group: flush, then exit without interpreter finalization.

    Torch 2.13's gloo teardown at interpreter exit occasionally aborts a rank ("terminate called
    without an active exception", no Python frame left on the stack) after all its work is done:
    about 1 in 30 two-rank CPU runs here, and torchrun then reports the whole job as failed.
    Everything a stage writes is on disk, atomically, before it returns.
    """
    import logging
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if in_group():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if in_group():
        return all_reduce_sum(t) / dist.get_world_size()
    return t


def barrier() -> None:
    if in_group():
        dist.barrier()


def broadcast_object(obj):
    if in_group():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if in_group():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# ---------------------------------------------------------------------------------------------
# Wrapping a model for several ranks: DDP or FSDP2
# ---------------------------------------------------------------------------------------------


def wrap(module: torch.nn.Module, parallel: str, bf16: bool) -> torch.nn.Module:
    """``module`` (a stage's loss module around its model) ready to train on the joined ranks.

    ``ddp``: DistributedDataParallel, a full copy of everything on every rank. ``fsdp``: FSDP2
    (``fully_shard``) on each decoder layer, then on ``module`` itself, which holds the rest
    (embeddings, final norm, head): weights, gradients and optimizer state are sharded over the
    ranks, and a layer's full weights exist only while it runs; every rank starts from rank 0's
    weights, as under DDP (freshly initialised LoRA adapters differ between ranks otherwise).
    ``bf16`` under fsdp: bf16 weights in forward and backward, gradients reduced in fp32 onto the
    fp32 shards. One process: ``module``.
    Build the optimizer after this call: FSDP replaces the parameters by sharded DTensors.
    """
    if not in_group():
        return module
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(module)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # every rank shards the same tensors: rank 0's (as DDP starts), e.g. new LoRA weights
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(module):
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def shard_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over the decoder layers of a frozen model that only runs forward (the RL stage's
    reference), each layer resharded after its forward: a rank holds 1/N of the layers' weights
    and one layer's whole weights at a time. The rest (embeddings, final norm, head) stays whole,
    so the model can be called piecewise (the decoder, then the head) as scoring does. Every rank
    loads the same weights and must run the same number of forwards (as the sharded policy it is
    scored beside). One process: ``model``."""
    if not in_group():
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True)
    return model


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of the transformers models inside ``module``: the classes their
    ``_no_split_modules`` name (Llama: ``LlamaDecoderLayer``), one FSDP unit each; found after
    sharding too (``fully_shard`` renames a block's class ``FSDPLlamaDecoderLayer``)."""
    names = {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in module.modules() if type(m).__name__.removeprefix("FSDP") in names]


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP shards ``module`` or parameters in it."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return any(isinstance(m, FSDPModule) for m in module.modules()) or \
        any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def gathered(root: torch.nn.Module) -> Iterator[None]:
    """Call the model inside ``root`` (``wrap``'s result) directly, not through ``root``'s forward
    (scoring, evaluation): FSDP gathers ``root``'s own weights (embeddings, final norm, head) for
    the duration, and each layer gathers its own as it runs. Every rank must run the same number
    of forwards inside (``even_batches``). Not sharded: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    root._get_fsdp_state()._lazy_init()  # what root's first forward does, in case none ran yet
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def reshard(root: torch.nn.Module) -> None:
    """After forwards without backward (scoring) on ``wrap``'s FSDP root: free the root's gathered
    weights, which FSDP keeps after a forward for the backward it expects. Until then
    ``root.parameters()`` are those full tensors, not the shards the optimizer steps (gradient
    clipping over them would miss the root's gradients). Not sharded: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(root, FSDPModule):
        root.reshard()


def even_batches(batches: list, placeholder: Any, sharded: bool) -> Iterator[tuple[Any, bool]]:
    """``(batch, True)`` for each of this rank's ``batches``; then, when ``sharded`` (under FSDP
    every forward is a collective), ``(placeholder, False)`` until this rank has run as many as
    the rank with the most: run those too and drop their results."""
    most = max(all_gather_object(len(batches))) if sharded else len(batches)  # before any forward
    for batch in batches:
        yield batch, True
    for _ in range(most - len(batches)):
        yield placeholder, False


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """One micro-batch of an accumulated step: under DDP gradients are all-reduced only when
    ``sync`` (the last micro-batch). FSDP reduce-scatters every micro-batch, so that no rank ever
    holds a full gradient; the sum is the same."""
    if sync or not in_group() or is_sharded(module):
        yield
    else:
        with module.no_sync():
            yield


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its shards of ``model``'s and ``optimizer``'s state into the directory
    ``path`` (torch.distributed.checkpoint: one file per rank and a ``.metadata`` index)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Read ``save_sharded``'s directory into ``model`` and ``optimizer``, resharded to this run's
    ranks (sharded or not: another number of ranks, or one process, reads it too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def local_shards(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's part of each of ``model``'s tensors (the whole tensor when it is not sharded)."""
    return {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model.state_dict().items()}


def full_state_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    """``model``'s full weights on CPU, gathered on rank 0 from a sharded model (every rank must
    call this; the others get an empty dict); None when ``model`` is not sharded. Tied weights
    (embeddings and head) come back as one tensor, as in the model, so the export stores it once."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}  # parameter object -> its first name
    for name, p in model.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(p), name)
        if source != name and source in state and name in state:
            state[name] = state[source]
    return state


class FullCopy:
    """A plain (unsharded) model with ``model``'s architecture and buffers and no weights of its own
    (meta tensors), for what needs the whole module with every weight on every rank: sampling
    under FSDP where preflab's engine cannot snapshot the shards (LoRA layers, other
    architectures; ``rollout.GatheredGenerator``).

    Build it before ``wrap`` shards ``model``. ``gather()`` all-gathers ``model``'s full weights
    (every rank must call it, the same number of times) into the copy, in the sharded parameters'
    dtype (the fp32 master weights), and returns it; ``release()`` drops them again. Tied
    parameters stay tied. Between the two, each rank holds the full weights once more than its
    shards (4 bytes per parameter in fp32)."""

    def __init__(self, model: torch.nn.Module):
        import copy

        self.source = model
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                for p in model.parameters()}
        self.model = copy.deepcopy(model, memo)  # buffers (rotary tables) copied; parameters on meta
        self.gathers = 0

    def _set(self, values: dict[str, torch.nn.Parameter]) -> None:
        for name, value in values.items():
            owner, _, attr = name.rpartition(".")
            setattr(self.model.get_submodule(owner), attr, value)

    @torch.no_grad()
    def gather(self) -> torch.nn.Module:
        full: dict[int, torch.nn.Parameter] = {}
        values = {}
        for name, p in self.source.named_parameters(remove_duplicate=False):
            if id(p) not in full:
                t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                full[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            values[name] = full[id(p)]
        self._set(values)
        self.gathers += 1
        return self.model

    def release(self) -> None:
        empty: dict[int, torch.nn.Parameter] = {}
        values = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) not in empty:
                empty[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            values[name] = empty[id(p)]
        self._set(values)
