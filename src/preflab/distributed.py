"""The little of torch.distributed that every loop needs: ranks, reductions, rank-0 writes.

Launch with ``torchrun --nproc_per_node N``: gloo on CPU, nccl on CUDA. With one process
everything here is a no-op, so one recipe serves one device or many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NoReturn

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
