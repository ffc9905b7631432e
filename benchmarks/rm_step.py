"""Seconds per reward-model optimizer step of preflab (fp32 vs bf16 autocast; prompt shared or not).

Workload: SmolLM2-135M-Instruct (``bundled:smollm2-135m-instruct``) with a 1-output score
head, one micro-batch of 8 prompts with K = 2 responses each (8 pairs, the InstructGPT loss
with C(2,2) = 1 pair per prompt, i.e. Bradley-Terry): 16 rows of 32 prompt + 64 response
tokens. Token ids are deterministic random ids (seed 0) from the ordinary vocabulary; the
step time does not depend on the text.

Each configuration runs in a fresh subprocess (``--one CONFIG``) so that the peak RSS is that
configuration's alone: load the model, 1 warm-up step, then the median of 5 timed steps;
``torch.set_num_threads(2)`` (``--threads N`` to change it: on a shared 2-core machine, 2
OpenMP threads that wait on each other can make a step several times slower than 1 thread).

The step replicates ``preflab.stages.reward.train`` step 3 call for call: ``collate_groups``
(``share_prefix``: each prompt once, its K responses on its cached keys and values, the default
``train.share_prompt``), ``Scorer`` (trunk once, head at the last real token) under
``torch.autocast(cpu, bf16, enabled=bf16)``, ``ranking_loss`` (Eq. 1), ``(total *
scale).backward()``, ``clip_grad``, AdamW + LambdaLR from ``make_optimizer(RMOptim())``,
``zero_grad(set_to_none)``. ``--k 4 --prompt-tokens 96`` is the demo's shape (K = 4 rankings,
prompts with the chat template about 96 tokens), where sharing the prompt matters more.

TRL 1.12's ``RewardTrainer`` is quoted (5.9 s/step on this workload, from the issue), not run.

    .venv/bin/python benchmarks/rm_step.py                 # fp32 + bf16, table
    .venv/bin/python benchmarks/rm_step.py --out r.json    # + JSON
    .venv/bin/python benchmarks/rm_step.py --one bf16      # one configuration, JSON on stdout
    .venv/bin/python benchmarks/rm_step.py --k 4 --prompt-tokens 96   # the demo's K = 4 shape
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "bundled:smollm2-135m-instruct"
PROMPTS, K, PROMPT_TOKENS, RESPONSE_TOKENS = 8, 2, 32, 64
WARMUP, STEPS, THREADS = 1, 5, 2
TARGET_S = 2.5
REFERENCES = [{"config": "ref: TRL 1.12 RewardTrainer (quoted, not run)", "s_per_step": 5.9}]
CONFIGS = {"fp32": (False, True), "bf16": (True, True), "bf16-unshared": (True, False)}  # (bf16, share prompt)


def issue_workload() -> bool:
    return (K, PROMPT_TOKENS, RESPONSE_TOKENS, PROMPTS) == (2, 32, 64, 8)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 / 1024.0  # Linux: KiB


def run(bf16: bool, share: bool, threads: int) -> dict:
    import torch

    from preflab import models
    from preflab.config import RMOptim
    from preflab.data.rankings import Encoded
    from preflab.optim import clip_grad, make_optimizer
    from preflab.rl.ranking import ranking_loss
    from preflab.scoring import Scorer, batch_tokens, collate_groups, scorer_inputs

    models.set_threads(threads)
    device = models.pick_device("cpu")
    tokenizer = models.load_tokenizer(MODEL)
    g = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(PROMPTS):
        prompt = torch.randint(100, len(tokenizer) - 100, (PROMPT_TOKENS,), generator=g).tolist()
        rows = [prompt + torch.randint(100, len(tokenizer) - 100, (RESPONSE_TOKENS,), generator=g).tolist()
                for _ in range(K)]
        groups.append(Encoded(rows, list(range(K))))
    torch.manual_seed(0)  # the new score head is random: the same head in every configuration
    model = models.load_scorer(MODEL, dtype="fp32", device="cpu")
    model.train()
    scorer = Scorer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim_cfg = RMOptim()
    optimizer, scheduler = make_optimizer(params, optim_cfg, WARMUP + STEPS)
    times, losses = [], []
    for _ in range(WARMUP + STEPS):
        # --- as preflab.stages.reward.train, step 3 (one rank, grad_accum 1) ---
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate_groups(groups, tokenizer.pad_token_id, share_prefix=share).items()}
        scale = 1 / PROMPTS
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            flat = scorer(**scorer_inputs(batch))
            parts = ranking_loss(flat, batch["ranks"], batch["valid"])
            (parts.total * scale).backward()
        clip_grad(params, optim_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(parts.total.item() / PROMPTS)
    return {"times": times, "losses": losses, "tokens_per_step": batch_tokens(batch)}


def one(config: str, threads: int = THREADS) -> dict:
    import torch

    bf16, share = CONFIGS[config]
    res = run(bf16, share, threads)
    med = statistics.median(res["times"][WARMUP:])
    return {"config": config, "bf16_autocast": bf16, "share_prompt": share, "s_per_step": med,
            "pairs_per_s": PROMPTS * (K * (K - 1) // 2) / med, "tokens_per_s": res["tokens_per_step"] / med,
            "peak_rss_gib": peak_rss_gib(), "step_times_s": res["times"], "losses": res["losses"],
            "threads": torch.get_num_threads()}


def spawn(config: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", config, "--threads", str(threads), "--k", str(K),
                           "--prompt-tokens", str(PROMPT_TOKENS)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"config": config, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], notes: list[str], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    pairs = PROMPTS * (K * (K - 1) // 2)
    t = Table(title=f"RM step: SmolLM2-135M, {pairs} pairs ({PROMPTS} prompts x K={K}, {PROMPT_TOKENS} + "
                    f"{RESPONSE_TOKENS} tokens), {threads} threads, median of {STEPS} after {WARMUP} warm-up")
    for col in ("config", "s/step (median)", "pairs/s", "peak RSS GiB"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in results:
        if "error" in r:
            t.add_row(r["config"], "error", "", " ".join(r["error"]))
            continue
        name = (f"preflab {'bf16 autocast' if r['bf16_autocast'] else 'fp32'}, "
                f"{'prompt once' if r['share_prompt'] else 'prompt K times'}")
        t.add_row(name, f"{r['s_per_step']:.2f}", f"{r['pairs_per_s']:.1f}", f"{r['peak_rss_gib']:.2f}")
    if issue_workload():  # TRL's time and the target are for the issue's workload only
        for ref in REFERENCES:
            t.add_row(f"[dim]{ref['config']}[/dim]", f"[dim]{ref['s_per_step']:.1f}[/dim]",
                      f"[dim]{pairs / ref['s_per_step']:.1f}[/dim]", "")
        t.add_row("[bold]target: preflab bf16 autocast[/bold]", f"[bold]<= {TARGET_S}[/bold]",
                  f"[bold]>= {pairs / TARGET_S:.1f}[/bold]", "")
    console = Console()
    console.print(t)
    for n in notes:
        console.print(n)


def main() -> None:
    global K, PROMPT_TOKENS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=sorted(CONFIGS), help="run one configuration here; print its JSON")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (2: the laptop setting)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--k", type=int, default=K, help="responses per prompt (the issue's workload: 2)")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="prompt length (the issue's: 32)")
    a = ap.parse_args()
    K, PROMPT_TOKENS = a.k, a.prompt_tokens
    if a.one:
        print(json.dumps(one(a.one, a.threads)))
        return
    load_start = os.getloadavg()
    results = [spawn(c, a.threads) for c in CONFIGS]
    load_end = os.getloadavg()
    notes = []
    bf16 = next((r for r in results if r.get("config") == "bf16" and "s_per_step" in r), None)
    if bf16 and issue_workload():
        notes.append(f"target <= {TARGET_S} s/step (bf16 autocast): "
                     f"{'met' if bf16['s_per_step'] <= TARGET_S else 'NOT met'} ({bf16['s_per_step']:.2f} s)")
    notes.append(f"load average at start/end: {load_start[0]:.2f} / {load_end[0]:.2f} "
                 f"({os.cpu_count()} CPUs; other processes may share them)")
    print_table(results, notes, a.threads)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "workload": {"model": MODEL, "prompts": PROMPTS, "k": K, "prompt_tokens": PROMPT_TOKENS,
                         "response_tokens": RESPONSE_TOKENS, "warmup": WARMUP, "timed_steps": STEPS,
                         "threads": a.threads},
            "results": results, "references": REFERENCES, "target_s_per_step_bf16": TARGET_S, "notes": notes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
