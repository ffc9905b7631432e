"""Which torch attention kernel is faster on this CPU for a training step's attention: forward and
backward of ``scaled_dot_product_attention`` with torch's flash kernel against its math kernel,
at SmolLM2-135M's attention shape (9 heads of 64, bf16, a padding mask as transformers passes),
for key lengths from a short DPO pair to a long SFT row. ``preflab.models.MATH_MAX_KEYS`` (the
length up to which preflab's models use the math kernel on CPU) is read off this table.

The two kernels alternate within each repetition, so load from other work hits both alike;
the time is the median over ``--reps`` repetitions after one warm-up. There is no outside peer:
the two kernels are each other's.

    .venv/bin/python benchmarks/attention.py          # JSON in benchmarks/results/attention.json
    .venv/bin/python benchmarks/attention.py --smoke  # two short lengths, one repetition (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

from preflab import models  # noqa: E402

HEADS, HEAD_DIM = 9, 64
TOKENS_PER_BATCH = 2048  # rows x length held about constant: the shape of a micro-batch
LENGTHS = (64, 96, 128, 160, 192, 256, 384, 512, 1024)
SMOKE = {"TOKENS_PER_BATCH": 64, "LENGTHS": (16, 32)}
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
    common.add_options(ap)
    args = ap.parse_args()
    if args.smoke:
        globals().update(SMOKE)
        args.reps = 1
    record = common.start(args)
    threads = common.set_threads(args.threads)
    rows = [{"config": f"{r['keys']} keys", "status": "ran", **r} for r in measure(args.reps)]
    print(f"attention forward + backward, bf16, {HEADS} heads x {HEAD_DIM}, {threads} threads, "
          f"~{TOKENS_PER_BATCH} tokens per batch (median of {args.reps})")
    print(f"{'keys':>6} {'rows':>5} {'flash ms':>9} {'math ms':>8} {'math/flash':>10}  preflab uses")
    for r in rows:
        print(f"{r['keys']:>6} {r['rows']:>5} {r['flash_ms']:>9.1f} {r['math_ms']:>8.1f} {r['math_over_flash']:>10.2f}  "
              f"{r['preflab_uses']}")
    common.write(common.out_path(args, "attention"), "attention", record, math_max_keys=models.MATH_MAX_KEYS,
                 workload={"heads": HEADS, "head_dim": HEAD_DIM, "tokens_per_batch": TOKENS_PER_BATCH,
                           "reps": args.reps}, results=rows)


if __name__ == "__main__":
    main()
