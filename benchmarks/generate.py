"""Seconds to sample 64 prompts x 64 new tokens from SmolLM2-135M-Instruct on this CPU: preflab's
sampler (``rollout.InverseCDFSampler``: one uniform per row) against ``generate``'s own
``do_sample=True`` (``torch.multinomial``: one exponential variate per vocabulary entry), same
model, prompts, batch size, bf16 autocast and temperature, alternating, best of ``--repeats``.

    .venv/bin/python benchmarks/generate.py
"""

from __future__ import annotations

import argparse
import time

MODEL = "bundled:smollm2-135m-instruct"
TOPICS = ["the ocean", "volcanoes", "bread baking", "chess openings", "the moon landing", "honey bees",
          "electric cars", "the Roman empire"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from preflab import models
    from preflab.rollout import HFGenerator, encode_prompts

    models.set_threads(a.threads)
    tok = models.load_tokenizer(MODEL)
    model = models.load_policy(MODEL)
    model.eval()
    texts = [f"Tell me something surprising about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(a.prompts)]
    ids = encode_prompts(tok, texts)
    ours = HFGenerator(model, tok, bf16=True)

    def preflab_sampler() -> None:
        for s in range(0, len(ids), a.batch_size):
            ours.generate(ids[s:s + a.batch_size], max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                          temperature=0.7)

    def hf_multinomial() -> None:
        from preflab.rollout import left_pad

        for s in range(0, len(ids), a.batch_size):
            q, m = left_pad(ids[s:s + a.batch_size], tok.pad_token_id)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model.generate(input_ids=q, attention_mask=m, do_sample=True, temperature=0.7, top_k=0,
                               max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    runs = {"preflab InverseCDFSampler": preflab_sampler, "HF do_sample (multinomial)": hf_multinomial}
    best = dict.fromkeys(runs, float("inf"))
    preflab_sampler()  # warm-up
    for _ in range(a.repeats):
        for name, fn in runs.items():
            torch.manual_seed(0)
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    t = Table(title=f"{a.prompts} prompts x {a.new_tokens} new tokens, batch {a.batch_size}, {a.threads} threads, bf16")
    for c in ("sampler", "seconds (best)", "new tokens / s"):
        t.add_column(c, justify="right")
    for name, sec in best.items():
        t.add_row(name, f"{sec:.2f}", f"{a.prompts * a.new_tokens / sec:.0f}")
    Console().print(t)


if __name__ == "__main__":
    main()
