"""Sampling throughput on SmolLM2-135M-Instruct (fp32 weights, bf16 autocast, T = 0.7, every row
forced to the full length with min_new_tokens so all engines do the same work):

- ``preflab``: preflab's engine (``rollout.HFGenerator`` -> ``generation.engine``), prefix sharing on
- ``preflab-unshared``: the same engine prefilling every sample's prompt (k > 1 rows only)
- ``hf-generator``: the previous ``HFGenerator`` path (``rollout.HFGenerateGenerator``: ``model.generate``
  with preflab's inverse-CDF sampler, dynamic cache)
- ``hf-generate``: plain ``model.generate(do_sample=True)`` (``torch.multinomial``)

Rows: 64 prompts x 64 tokens, 256 x 128, and 16 prompts x k = 8 samples x 64 tokens. Every engine
decodes ``--batch-size`` rows at a time. Engines of a row run back to back (order alternating
between repeats), so a shared machine's load hits them alike: read the ratios. ``--batches N``
times only the first N batches of each row (tokens/s is a per-batch rate; the JSON records how
many prompts were measured), to keep a run on a loaded 2-core machine under ~5 minutes.

    .venv/bin/python benchmarks/generate.py --out benchmarks/results/generate.json
    .venv/bin/python benchmarks/generate.py --threads 1 --batches 1   # a loaded machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import PeakRSS, describe, load_1m, print_machine  # noqa: E402

MODEL = "bundled:smollm2-135m-instruct"
TOPICS = ["the ocean", "volcanoes", "bread baking", "chess openings", "the moon landing", "honey bees",
          "electric cars", "the Roman empire"]
ROWS = [(64, 1, 64), (256, 1, 128), (16, 8, 64)]  # prompts, samples per prompt, new tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64, help="Rows decoded together, every engine.")
    ap.add_argument("--batches", type=int, default=0, help="Time only the first N batches of each row (0: all).")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="preflab,hf-generator,hf-generate")
    ap.add_argument("--rows", default="", help="Subset of rows, e.g. 64x1x64,16x8x64.")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON.")
    a = ap.parse_args()

    import torch

    from preflab import models
    from preflab.rollout import HFGenerateGenerator, HFGenerator, encode_prompts, left_pad

    models.set_threads(a.threads)
    info = describe()
    print_machine(info)
    tok = models.load_tokenizer(MODEL)
    model = models.load_policy(MODEL).eval()

    ours = HFGenerator(model, tok, bf16=True, max_batch=a.batch_size)
    unshared = HFGenerator(model, tok, bf16=True, max_batch=a.batch_size, share_prefix=False)
    old = HFGenerateGenerator(model, tok, bf16=True)

    def hf_generate(prompts: list[list[int]], n: int, new: int) -> None:
        q, m = left_pad([p for p in prompts for _ in range(n)], tok.pad_token_id)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.generate(input_ids=q, attention_mask=m, do_sample=True, temperature=0.7, top_k=0,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)

    def via(gen):
        return lambda prompts, n, new: gen.generate(prompts, n=n, max_new_tokens=new, min_new_tokens=new,
                                                    temperature=0.7)

    engines = {"preflab": via(ours), "preflab-unshared": via(unshared), "hf-generator": via(old),
               "hf-generate": hf_generate}
    chosen = [e for e in a.engines.split(",") if e]
    rows = [r for r in ROWS if not a.rows or f"{r[0]}x{r[1]}x{r[2]}" in a.rows.split(",")]

    warm = encode_prompts(tok, ["warm up"] * 2)
    for name in set(chosen) | {"preflab-unshared"}:
        engines[name](warm, 2, 4)

    results, t_start = [], time.perf_counter()
    for n_prompts, k, new in rows:
        texts = [f"Tell me something surprising about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n_prompts)]
        ids = encode_prompts(tok, texts)
        per_batch = max(1, a.batch_size // k)
        batches = [ids[s:s + per_batch] for s in range(0, len(ids), per_batch)]
        if a.batches:
            batches = batches[:a.batches]
        measured = sum(len(b) for b in batches)
        names = [e for e in chosen]
        if k > 1 and "preflab" in chosen:
            names.insert(names.index("preflab") + 1, "preflab-unshared")
        best: dict[str, dict] = {}
        for rep in range(a.repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):
                torch.manual_seed(0)
                load = load_1m()
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    for b in batches:
                        engines[name](b, k, new)
                    sec = time.perf_counter() - t0
                rate = measured * k * new / sec
                print(f"  {n_prompts} x k={k} x {new}: {name:17s} {sec:7.2f} s  {rate:7.0f} tokens/s  "
                      f"peak RSS {rss.gib:.2f} GiB  load {load}", flush=True)
                if name not in best or rate > best[name]["tokens_per_s"]:
                    best[name] = {"engine": name, "prompts": n_prompts, "samples_per_prompt": k, "new_tokens": new,
                                  "tokens_per_s": round(rate, 1), "peak_rss_gib": round(rss.gib, 3),
                                  "seconds": round(sec, 2), "measured_prompts": measured, "batch_size": a.batch_size,
                                  "load_1m": load}
        for r in best.values():
            base = best.get("preflab", {}).get("tokens_per_s")
            r["preflab_speedup"] = round(base / r["tokens_per_s"], 2) if base else None
            results.append(r)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M-Instruct, bf16 autocast, T=0.7, batch {a.batch_size} rows, {a.threads} threads; "
                    f"load {info['load_1m']} -> {load_1m()}")
    for c in ("prompts x k x tokens", "engine", "tokens/s", "preflab is x faster", "peak RSS GiB", "measured prompts"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(f"{r['prompts']} x {r['samples_per_prompt']} x {r['new_tokens']}", r["engine"],
                  f"{r['tokens_per_s']:.0f}", f"{r['preflab_speedup']:.2f}" if r["preflab_speedup"] else "",
                  f"{r['peak_rss_gib']:.2f}", str(r["measured_prompts"]))
    Console(width=160).print(t)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": info, "load_1m_end": load_1m(),
                                     "threads": a.threads, "results": results}, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
