"""Which torch attention kernel is faster on this CPU for a training step's attention: forward and
backward of ``scaled_dot_product_attention`` with torch's flash kernel against its math kernel,
at SmolLM2-135M's attention shape (9 heads of 64, bf16, a padding mask as transformers passes),
for key lengths from a short DPO pair to a long SFT row. ``preflab.models.MATH_MAX_KEYS`` (the
length up to which preflab's models use the math kernel on CPU) is read off this table.

The two kernels alternate within each repetition, so load from other work hits both alike;
the time is the median over ``--reps`` repetitions after one warm-up.

    .venv/bin/python benchmarks/attention.py --out benchmarks/results/attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from preflab import models

HEADS, HEAD_DIM, THREADS = 9, 64, 2
TOKENS_PER_BATCH = 2048  # rows x length held about constant: the shape of a micro-batch
LENGTHS = (64, 96, 128, 160, 192, 256, 384, 512, 1024)
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def inputs(rows: int, length: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, HEADS, length, HEAD_DIM, generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None].repeat(rows, 1, 1, 1)
    mask[0, :, :, :5] = False  # one left-padded row, as in a padded batch
    mask[0, :, :5, 0] = True  # its padded queries see one key (no empty softmax rows)
    return q, k, v, mask


def fwd_bwd_ms(kernel: SDPBackend, q, k, v, mask) -> float:
    t0 = time.perf_counter()
    with sdpa_kernel([kernel]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.float().sum().backward()
    return (time.perf_counter() - t0) * 1000


def measure(reps: int) -> list[dict]:
    rows = []
    for length in LENGTHS:
        batch = inputs(max(1, TOKENS_PER_BATCH // length), length)
        times = {name: [] for name in KERNELS}
        for rep in range(reps + 1):
            for name, kernel in KERNELS.items():
                ms = fwd_bwd_ms(kernel, *batch)
                if rep:  # the first round warms up
                    times[name].append(ms)
        flash, math = (statistics.median(times[n]) for n in KERNELS)
        rows.append({"keys": length, "rows": batch[0].shape[0], "flash_ms": flash, "math_ms": math,
                     "math_over_flash": math / flash, "preflab_uses": "math" if length <= models.MATH_MAX_KEYS else "flash"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    models.set_threads(THREADS)
    rows = measure(args.reps)
    print(f"attention forward + backward, bf16, {HEADS} heads x {HEAD_DIM}, {THREADS} threads, "
          f"~{TOKENS_PER_BATCH} tokens per batch (median of {args.reps})")
    print(f"{'keys':>6} {'rows':>5} {'flash ms':>9} {'math ms':>8} {'math/flash':>10}  preflab uses")
    for r in rows:
        print(f"{r['keys']:>6} {r['rows']:>5} {r['flash_ms']:>9.1f} {r['math_ms']:>8.1f} {r['math_over_flash']:>10.2f}  "
              f"{r['preflab_uses']}")
    if args.out:
        payload = {"results": rows, "math_max_keys": models.MATH_MAX_KEYS, "torch": torch.__version__,
                   "threads": THREADS, "reps": args.reps, "load_1min": os.getloadavg()[0],
                   "command": "benchmarks/attention.py" + (f" --reps {args.reps}" if args.reps != 5 else "")
                   + f" --out {args.out}"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
