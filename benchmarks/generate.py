"""Sampling throughput on SmolLM2-135M-Instruct, preflab's sampler beside the others in one run
(same prompts, same batches, same token budget, same threads):

- ``preflab``: preflab's engine (``rollout.HFGenerator`` -> ``generation.engine``; fp32 weights,
  bf16 matmuls), prefix sharing on
- ``preflab-unshared``: the same engine prefilling every sample's prompt (k > 1 rows only)
- ``hf-generator``: the previous ``HFGenerator`` path (``rollout.HFGenerateGenerator``: ``model.generate``
  with preflab's inverse-CDF sampler, dynamic cache)
- ``hf-generate``: plain ``model.generate`` (``torch.multinomial`` when sampling)
- ``llamacpp``: llama.cpp through llama-cpp-python's low-level batch API (``llama_batch`` +
  ``llama_decode``, every row its own sequence, one ``llama_decode`` per step for the whole
  batch; ``generation.llamacpp``) on the bundled Q4_1 GGUF, token choice by preflab's sampling
  code. Its row says "not installed" where ``llama_cpp`` cannot be imported.

Modes: ``sample`` (T = 0.7, every row forced to the full length with min_new_tokens so all
engines do the same work) and ``greedy`` (T = 0, rows stop at EOS; tokens/s counts the tokens
each engine produced). In greedy mode each engine's texts are compared with preflab's, prompt by
prompt ("same text"): llama.cpp runs the quantised GGUF with 8-bit activations, preflab the
de-quantised weights in bf16, so the two can differ.

Rows: 64 prompts x 64 tokens, 256 x 128, and 16 prompts x k = 8 samples x 64 tokens. Every engine
decodes ``--batch-size`` rows at a time. Engines of a row run back to back (order alternating
between repeats), so a shared machine's load hits them alike: read the ratios. The table shows
each engine's best repeat; the JSON also has every repeat's tokens/s and preflab's ratio to each
engine within each repeat (``preflab_speedup_each_repeat``), the spread a shared machine leaves. ``--batches N``
times only the first N batches of each row (tokens/s is a per-batch rate; the JSON records how
many prompts were measured), to keep a run on a loaded 2-core machine under ~5 minutes. The JSON
records how busy other processes kept the CPU (``others_busy_cores``) and whether the machine
was shared.

    .venv/bin/python benchmarks/generate.py --out benchmarks/results/generate.json
    .venv/bin/python benchmarks/generate.py --threads 1 --batches 1   # a loaded machine
    .venv/bin/python benchmarks/generate.py --smoke                   # tiny model: every row runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import PeakRSS, describe, load_1m, print_machine  # noqa: E402

MODEL = "bundled:smollm2-135m-instruct"
TOPICS = ["the ocean", "volcanoes", "bread baking", "chess openings", "the moon landing", "honey bees",
          "electric cars", "the Roman empire"]
ROWS = [(64, 1, 64), (256, 1, 128), (16, 8, 64)]  # prompts, samples per prompt, new tokens
MODES = {"sample": 0.7, "greedy": 0.0}  # temperature of each mode
SHARED_BUSY_CORES = 0.5  # other processes keeping this much CPU busy make the machine "shared"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64, help="Rows decoded together, every engine.")
    ap.add_argument("--batches", type=int, default=0, help="Time only the first N batches of each row (0: all).")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch's threads and llama.cpp's.")
    ap.add_argument("--engines", default="preflab,hf-generator,hf-generate,llamacpp")
    ap.add_argument("--modes", default="sample,greedy", help="sample (T=0.7, full length), greedy (T=0).")
    ap.add_argument("--rows", default="", help="Subset of rows, e.g. 64x1x64,16x8x64.")
    ap.add_argument("--model", default=MODEL, help="Model spec (tests use tiny:).")
    ap.add_argument("--gguf-type", default="q8_0",
                    help="llamacpp's matrix type when the model has no GGUF of its own (a saved directory). "
                         "Engine llamacpp-TYPE (e.g. llamacpp-bf16) runs the model's weights exported as TYPE.")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON.")
    ap.add_argument("--smoke", action="store_true",
                    help="The smallest setting: tiny random model, first row, one batch of 2 (seconds; the "
                         "numbers mean nothing, every engine's row runs).")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.rows, a.batches, a.batch_size, a.repeats = "tiny:", "64x1x64", 1, 2, 1

    import torch

    from preflab import models
    from preflab.generation import llamacpp
    from preflab.rollout import (
        HFGenerateGenerator,
        HFGenerator,
        TokenEngineGenerator,
        encode_prompts,
        left_pad,
        response_mask_after_stop,
    )

    models.set_threads(a.threads)
    others_start = round(models.busy_cores_of_others(1.0), 2)
    info = describe()
    print_machine(info)
    print(f"  other processes' CPU use: {others_start} cores")
    tok = models.load_tokenizer(a.model)
    model = models.load_policy(a.model).eval()

    ours = HFGenerator(model, tok, bf16=True, max_batch=a.batch_size)
    unshared = HFGenerator(model, tok, bf16=True, max_batch=a.batch_size, share_prefix=False)
    old = HFGenerateGenerator(model, tok, bf16=True)
    chosen = [e for e in a.engines.split(",") if e]
    llama: dict = {}  # engine name -> generator
    llama_info: dict[str, dict] = {}
    for name in [e for e in chosen if e.startswith("llamacpp")]:
        if not llamacpp.available():
            llama_info[name] = {"status": "not installed",
                                "reason": "llama_cpp is not importable: pip install 'preflab[llamacpp]'"}
            continue
        qtype = name.partition("-")[2]  # llamacpp: the model's own GGUF; llamacpp-TYPE: its weights exported
        path = llamacpp.gguf_for(a.model, a.gguf_type) if not qtype else \
            llamacpp.gguf_for(str(models.resolve(a.model)), qtype)
        engine = llamacpp.LlamaCppEngine(path, tok, threads=a.threads, max_batch=a.batch_size)
        llama[name], llama_info[name] = TokenEngineGenerator(engine, tok), {"status": "ok", **llamacpp.describe(engine)}
    for name, i in llama_info.items():
        print(f"  {name}: {i}")

    def hf_generate(prompts: list[list[int]], n: int, new: int, temperature: float, min_new: int):
        q, m = left_pad([p for p in prompts for _ in range(n)], tok.pad_token_id)
        kw = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(input_ids=q, attention_mask=m, max_new_tokens=new, min_new_tokens=min_new,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
        resp = out[:, q.shape[1]:]
        mask, _ = response_mask_after_stop(resp, tok.eos_token_id)
        texts = [tok.decode(r[mk.bool()], skip_special_tokens=True) for r, mk in zip(resp, mask)]
        return texts, int(mask.sum())

    def via(gen):
        def run(prompts, n, new, temperature, min_new):
            s = gen.generate(prompts, n=n, max_new_tokens=new, min_new_tokens=min_new, temperature=temperature)
            return s.texts, int(s.response_mask.sum())
        return run

    engines = {"preflab": via(ours), "preflab-unshared": via(unshared), "hf-generator": via(old),
               "hf-generate": hf_generate}
    engines.update({name: via(gen) for name, gen in llama.items()})
    modes = [m for m in a.modes.split(",") if m]
    rows = [r for r in ROWS if not a.rows or f"{r[0]}x{r[1]}x{r[2]}" in a.rows.split(",")]

    warm = encode_prompts(tok, ["warm up"] * 2)
    for name in (set(chosen) | {"preflab-unshared"}) & set(engines):
        engines[name](warm, 2, 4, 0.7, 0)

    results, t_start = [], time.perf_counter()
    for mode in modes:
        temperature = MODES[mode]
        for n_prompts, k, new in rows:
            texts = [f"Tell me something surprising about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n_prompts)]
            ids = encode_prompts(tok, texts)
            per_batch = max(1, a.batch_size // k)
            batches = [ids[s:s + per_batch] for s in range(0, len(ids), per_batch)]
            if a.batches:
                batches = batches[:a.batches]
            measured = sum(len(b) for b in batches)
            min_new = new if temperature > 0 else 0
            names = list(chosen)
            if k > 1 and "preflab" in chosen:
                names.insert(names.index("preflab") + 1, "preflab-unshared")
            shape = {"mode": mode, "temperature": temperature, "prompts": n_prompts, "samples_per_prompt": k,
                     "new_tokens": new, "min_new_tokens": min_new, "measured_prompts": measured,
                     "batch_size": a.batch_size, "threads": a.threads}
            best: dict[str, dict] = {}
            outputs: dict[str, list[str]] = {}
            each: dict[str, list[float]] = {}  # tokens/s of every repeat, in repeat order
            for rep in range(a.repeats):
                for name in (names if rep % 2 == 0 else names[::-1]):
                    if name not in engines:
                        status = llama_info.get(name, {}).get("status", "unknown engine")
                        best[name] = {"engine": name, **shape, "status": status, "tokens_per_s": None,
                                      "reason": llama_info.get(name, {}).get("reason", "")}
                        if rep == 0:
                            print(f"  {mode} {n_prompts} x k={k} x {new}: {name:17s} {status}")
                        continue
                    torch.manual_seed(0)
                    load = load_1m()
                    out_texts, n_tokens = [], 0
                    with PeakRSS() as rss:
                        t0 = time.perf_counter()
                        for b in batches:
                            bt, bn = engines[name](b, k, new, temperature, min_new)
                            out_texts += bt
                            n_tokens += bn
                        sec = time.perf_counter() - t0
                    outputs.setdefault(name, out_texts)
                    rate = n_tokens / sec
                    each.setdefault(name, []).append(round(rate, 1))
                    print(f"  {mode} {n_prompts} x k={k} x {new}: {name:17s} {sec:7.2f} s  {rate:7.0f} tokens/s  "
                          f"peak RSS {rss.gib:.2f} GiB  load {load}", flush=True)
                    if name not in best or rate > best[name]["tokens_per_s"]:
                        best[name] = {"engine": name, **shape, "status": "ok", "tokens_per_s": round(rate, 1),
                                      "tokens": n_tokens, "peak_rss_gib": round(rss.gib, 3),
                                      "seconds": round(sec, 2), "load_1m": load}
            base = best.get("preflab", {}).get("tokens_per_s")
            for name in names:
                r = best[name]
                r["preflab_speedup"] = round(base / r["tokens_per_s"], 2) if base and r["tokens_per_s"] else None
                if name in each:  # the ratio within each repeat: the same load for both, as far as it goes
                    r["tokens_per_s_each_repeat"] = each[name]
                    if "preflab" in each:
                        r["preflab_speedup_each_repeat"] = [round(p / x, 2) for p, x in zip(each["preflab"], each[name])]
                if mode == "greedy" and name != "preflab" and name in outputs and "preflab" in outputs:
                    r.update(agreement(outputs["preflab"], outputs[name]))
                results.append(r)
    others_end = round(models.busy_cores_of_others(1.0), 2)
    shared = max(others_start, others_end) >= SHARED_BUSY_CORES

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{a.model}, preflab bf16 vs llama.cpp, batch {a.batch_size} rows, {a.threads} threads; "
                    f"load {info['load_1m']} -> {load_1m()}; other processes {others_start} -> {others_end} cores"
                    + (" (shared machine)" if shared else ""))
    for c in ("mode", "prompts x k x tokens", "engine", "tokens/s", "preflab is x faster", "greedy same text",
              "peak RSS GiB", "measured prompts"):
        t.add_column(c, justify="right")
    for r in results:
        same = f"{r['same_text']}/{r['compared']}" if "same_text" in r else ""
        t.add_row(r["mode"], f"{r['prompts']} x {r['samples_per_prompt']} x {r['new_tokens']}", r["engine"],
                  f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else r["status"],
                  f"{r['preflab_speedup']:.2f}" if r["preflab_speedup"] else "", same,
                  f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "", str(r["measured_prompts"]))
    Console(width=170).print(t)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    report = {"command": " ".join(["benchmarks/generate.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "model": a.model, "machine": info,
              "others_busy_cores": {"start": others_start, "end": others_end}, "machine_shared": shared,
              "load_1m_end": load_1m(), "threads": a.threads, "llamacpp": llama_info, "results": results}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {a.out}")
    return report


def agreement(ref: list[str], other: list[str]) -> dict:
    """How many texts equal preflab's, and where the others first differ (characters in)."""
    same = sum(x == y for x, y in zip(ref, other))
    first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
             for x, y in zip(ref, other) if x != y]
    examples = [{"preflab": x, "other": y} for x, y in zip(ref, other) if x != y][:2]
    return {"same_text": same, "compared": len(ref),
            "first_difference_chars_median": statistics.median(first) if first else None,
            "differing_examples": examples}


if __name__ == "__main__":
    main()
