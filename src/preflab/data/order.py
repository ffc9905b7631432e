"""Which examples an optimizer step sees: a fresh permutation per epoch, derived from the seed.

Because the order is a pure function of (seed, step), a resumed run needs no loader state.
"""

from __future__ import annotations


def step_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the ``global_batch`` examples of step ``step`` over a dataset of ``n``; no partial batch."""
    import torch

    if n < global_batch:
        raise ValueError(f"{n} examples are fewer than one global batch of {global_batch}")
    per_epoch = n // global_batch
    epoch, within = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[within * global_batch:(within + 1) * global_batch].tolist()


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The contiguous share of a global batch that ``rank`` processes."""
    per = len(indices) // world_size
    return indices[rank * per:(rank + 1) * per]
