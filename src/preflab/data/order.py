"""Which examples an optimizer step sees: a fresh permutation per epoch, derived from the seed.

Because the order is a pure function of (seed, step), a resumed run needs no loader state.
"""

from __future__ import annotations

from collections.abc import Sequence


def step_indices(step: int, n: int, global_batch: int, seed: int, lengths: Sequence[int] | None = None,
                 group: int = 0) -> list[int]:
    """Indices of the ``global_batch`` examples of step ``step`` over a dataset of ``n``; no partial batch.

    With ``lengths`` (one per example) and ``group`` > 1, each run of ``group`` consecutive steps
    of an epoch pools its examples, sorts them by length and cuts them into steps again, which
    follow each other in a random order: every step's examples have similar lengths, so a batch
    pads less, and each epoch still sees the same examples once."""
    import torch

    if n < global_batch:
        raise ValueError(f"{n} examples are fewer than one global batch of {global_batch}")
    per_epoch = n // global_batch
    epoch, within = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if lengths is None or group <= 1:
        return perm[within * global_batch:(within + 1) * global_batch].tolist()
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} examples")
    # One shuffle per group of the epoch, all drawn here, so a step's indices depend on (seed, step) only.
    shuffles = [torch.randperm(min(group, per_epoch - s), generator=g).tolist() for s in range(0, per_epoch, group)]
    first = within - within % group
    pool = sorted(perm[first * global_batch:(first + len(shuffles[first // group])) * global_batch].tolist(),
                  key=lambda i: lengths[i])
    k = shuffles[first // group][within - first]
    return pool[k * global_batch:(k + 1) * global_batch]


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The share of a global batch that ``rank`` processes: every ``world_size``-th index from
    position ``rank``, so with length groups (a step's indices sorted by length) every rank gets
    short and long examples alike and none waits for the others at the gradient's all-reduce."""
    per = len(indices) // world_size
    return indices[rank::world_size][:per]
