"""Seconds per DPO optimizer step: preflab (``preflab dpo``) against TRL's ``DPOTrainer``.

Workload (the issue's): SmolLM2-135M-Instruct (``bundled:smollm2-135m-instruct``), one
micro-batch of 8 pairs per optimizer step, each a 32-token prompt with a chosen and a rejected
64-token response; sigmoid DPO loss, beta 0.1; bf16 autocast with fp32 weights and optimizer
state; no gradient checkpointing; AdamW; 2 torch threads (``--threads N`` or ``auto``). Token ids are deterministic random
ids (seed 0) from the ordinary vocabulary, the same for both tools (the step time does not
depend on the text); TRL gets them pre-tokenised (``prompt_ids``, ``chosen_ids``,
``rejected_ids``), so neither tool tokenises anything while timed.

Each tool runs in its own subprocess (``--one preflab|trl``), the tools alternating for
``--rounds`` rounds (preflab, trl, preflab, trl, ...): load, ``--warmup`` steps, then
``--steps`` timed steps. A tool's s/step is the median of its timed steps over all rounds;
peak RSS is the largest of its processes' own peaks (``VmHWM``). The 1-minute load average is recorded
before and after every process (the machine is shared: read the ratio, which alternation keeps
fair, more than the absolute times).

- preflab's step replicates ``preflab.stages.dpo.train`` step 5 call for call (its parts are in
  ``preflab.dpo_update``):
  ``collate_ranked`` (the prompt run once, its 2 responses on its cached keys and values),
  ``SequenceLogps`` (vocabulary projection at response positions only) under bf16 autocast,
  ``batch_loss`` (``rl.preference``), backward, ``clip_grad``, AdamW + LambdaLR from
  ``make_optimizer(DPOOptim())``, ``zero_grad``. Its reference log-probs are computed once
  before training and cached (the stage's ``reference_logps``); that one-off cost is reported
  as ``reference_once_s`` (for the whole 8-pair set) and is not part of a step.
- TRL's step is ``DPOTrainer``'s own (``bf16=True, use_cpu=True``, gradient checkpointing off,
  ``precompute_ref_log_probs`` at its default False: the reference model runs every step), timed
  as the gap between consecutive ``on_step_end`` callbacks. ``--trl-precompute`` adds a third
  tool, TRL with ``precompute_ref_log_probs=True``, for the like-for-like view of caching.
  ``--trl-math`` adds TRL with its model loaded as preflab loads one (``models.ATTENTION``:
  torch's math attention kernel for short keys, whose backward is faster on CPU than the flash
  kernel transformers' sdpa gets by default): the like-for-like view of that choice.
  Where trl is not importable the TRL rows say "not installed" (``pip install trl==1.16.0``).

    .venv/bin/python benchmarks/dpo_step.py --out benchmarks/results/dpo_step.json
    .venv/bin/python benchmarks/dpo_step.py --rounds 1 --steps 3     # brief
    .venv/bin/python benchmarks/dpo_step.py --smoke                   # tiny random model: every row runs
    .venv/bin/python benchmarks/dpo_step.py --one preflab             # one process, JSON on stdout
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402
from machine import load_1m  # noqa: E402

MODEL = common.BUNDLED
PAIRS, PROMPT_TOKENS, RESPONSE_TOKENS = 8, 32, 64
BETA, THREADS = 0.1, 2
SMOKE = {"MODEL": common.TINY, "PAIRS": 2, "PROMPT_TOKENS": 4, "RESPONSE_TOKENS": 8}
TARGET_RATIO = 0.4
TOOLS = ("preflab", "trl", "trl-precompute", "trl-math")


def make_pairs(vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids: 32 + 64 + 64 random ordinary tokens per pair, seed 0."""
    import torch

    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(100, vocab - 100, (n,), generator=g).tolist()

    return [(ids(PROMPT_TOKENS), ids(RESPONSE_TOKENS), ids(RESPONSE_TOKENS)) for _ in range(PAIRS)]


def run_preflab(warmup: int, steps: int) -> dict:
    import torch

    from preflab import models
    from preflab.config import DPOConfig, DPOOptim
    from preflab.dpo_update import (
        Ranked,
        SequenceLogps,
        batch_loss,
        collate_ranked,
        model_inputs,
        sequence_logps,
    )
    from preflab.optim import clip_grad, make_optimizer
    from preflab.scoring import batch_tokens

    common.set_threads(THREADS)
    device = models.pick_device("cpu")
    tokenizer = models.load_tokenizer(MODEL)
    pairs = make_pairs(len(tokenizer))
    examples = [Ranked([p + c, p + r], [len(p), len(p)], [0, 1]) for p, c, r in pairs]
    cfg = DPOConfig.model_validate({"data": {"train": "unused"}, "dpo": {"loss": "dpo", "beta": BETA}})
    model = models.load_policy(MODEL, dtype="fp32", device="cpu", dropout_off=True)
    # --- as preflab.stages.dpo.train, step 3: reference log-probs once, before training ---
    t0 = time.perf_counter()
    for e, ref in zip(examples, sequence_logps(model, examples, tokenizer.pad_token_id, batch_prompts=PAIRS,
                                               bf16=True, share=True, shard=False)):
        e.ref = ref
    reference_once = time.perf_counter() - t0
    model.train()
    fn = SequenceLogps(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim_cfg = DPOOptim()
    optimizer, scheduler = make_optimizer(params, optim_cfg, warmup + steps)
    times, cpu, losses = [], [], []
    for _ in range(warmup + steps):
        # --- step 5 (one rank, grad_accum 1) ---
        t0, c0 = time.perf_counter(), time.process_time()
        batch = collate_ranked(examples, tokenizer.pad_token_id, share_prefix=True)
        scale = 1 / PAIRS
        with torch.autocast(device.type, dtype=torch.bfloat16):
            parts = batch_loss(fn(**model_inputs(batch, device)), batch, cfg)
            (parts.total * scale).backward()
        clip_grad(params, optim_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(parts.total.item() / PAIRS)
    return {"times": times, "cpu_times": cpu, "losses": losses, "tokens_per_step": batch_tokens(batch),
            "reference_once_s": reference_once}


def run_trl(warmup: int, steps: int, precompute: bool, math: bool = False) -> dict:
    common.trl_env()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from preflab import models
    from preflab.config import DPOOptim

    common.peer_threads(THREADS)
    models.quiet_transformers()
    tokenizer = models.load_tokenizer(MODEL)
    pairs = make_pairs(len(tokenizer))
    data = Dataset.from_dict({"prompt_ids": [p for p, _, _ in pairs], "chosen_ids": [c for _, c, _ in pairs],
                              "rejected_ids": [r for _, _, r in pairs]})
    if math:
        models.register_attention()
    model = AutoModelForCausalLM.from_pretrained(models.resolve(MODEL), dtype=torch.float32,
                                                 **({"attn_implementation": models.ATTENTION} if math else {}))
    model.config.pad_token_id = tokenizer.pad_token_id
    o = DPOOptim()

    class PreTokenised(DPOTrainer):
        """DPOTrainer on rows that are already ``prompt_ids``/``chosen_ids``/``rejected_ids`` (what its
        own ``_prepare_dataset`` produces from text); the training step is untouched."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    timer = common.step_timer()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1,
            max_steps=warmup + steps, learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
            adam_epsilon=o.eps, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
            lr_scheduler_type="cosine", warmup_steps=o.warmup_steps, beta=BETA, loss_type=["sigmoid"],
            max_length=None, precompute_ref_log_probs=precompute, bf16=True, fp16=False, use_cpu=True,
            gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=10_000,
            disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        trainer = PreTokenised(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                               callbacks=[timer])
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    return {"times": timer.times(0), "cpu_times": timer.times(1), "losses": [], "tokens_per_step": PAIRS * 2 * (PROMPT_TOKENS + RESPONSE_TOKENS),
            "train_call_s": total}


def one(tool: str, warmup: int, steps: int) -> dict:
    res = run_preflab(warmup, steps) if tool == "preflab" else run_trl(warmup, steps, tool == "trl-precompute",
                                                                        tool == "trl-math")
    import torch

    timed = res.pop("times")
    return {"config": tool, "tool": tool, "step_times_s": timed, "step_cpu_s": res.pop("cpu_times"),
            "warmup_steps": warmup, "peak_rss_gib": common.peak_rss_gib(), "threads": torch.get_num_threads(), **res}


def spawn(tool: str, warmup: int, steps: int, env: dict | None, smoke: bool) -> dict:
    load = load_1m()
    args = ["--one", tool, "--warmup", str(warmup), "--steps", str(steps),
            "--threads", "auto" if THREADS is None else str(THREADS)] + (["--smoke"] if smoke else [])
    out = common.run(__file__, args, tool, lambda: one(tool, warmup, steps), smoke, env=env)
    out["load_1min_before"], out["load_1min_after"] = load, load_1m()
    return out


def summarise(tool: str, runs: list[dict], warmup: int) -> dict:
    ok = [r for r in runs if r["status"] == "ran"]
    if not ok:
        return {**runs[-1], "config": tool, "tool": tool}
    timed = [t for r in ok for t in r["step_times_s"][warmup:]]
    cpu = [t for r in ok for t in r["step_cpu_s"][warmup:]]
    med = statistics.median(timed)
    out = {"config": tool, "tool": tool, "status": "ran", "s_per_step": med,
           "peak_rss_gib": max(r["peak_rss_gib"] for r in ok),
           "min_s_per_step": min(timed), "cpu_s_per_step": statistics.median(cpu),
           "timed_steps": len(timed), "processes": len(ok), "step_times_s": [r["step_times_s"] for r in ok],
           "step_cpu_s": [r["step_cpu_s"] for r in ok], "threads": ok[0]["threads"],
           "tokens_per_step": ok[0]["tokens_per_step"], "pairs_per_s": PAIRS / med,
           "load_1min": [[r["load_1min_before"], r["load_1min_after"]] for r in ok]}
    if tool == "preflab":
        out["reference_once_s"] = statistics.median(r["reference_once_s"] for r in ok)
        out["losses"] = ok[0]["losses"]
    return out


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", choices=TOOLS, help="run one tool in this process; print its JSON")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (one process per tool per round)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps per process (both tools' first two steps are slow on some CPUs)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--trl-precompute", action="store_true",
                    help="also run TRL with precompute_ref_log_probs=True (reference cached, like preflab)")
    ap.add_argument("--trl-math", action="store_true",
                    help="also run TRL with preflab's attention (math kernel for short keys), like for like")
    ap.add_argument("--passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for both tools: idle OpenMP threads sleep instead of spinning, "
                         "which keeps a loaded, shared machine from inflating both tools' times")
    common.add_options(ap)
    a = ap.parse_args()
    THREADS = a.threads
    if a.smoke:
        globals().update(SMOKE)
        if not a.one:
            a.rounds, a.warmup, a.steps = 1, 1, 1
    if a.one:
        common.print_row(one(a.one, a.warmup, a.steps))
        return
    record = common.start(a)
    tools = ["preflab", "trl"] + (["trl-precompute"] if a.trl_precompute else []) + (["trl-math"] if a.trl_math else [])
    trl_missing = common.missing("trl")
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"} if a.passive else None
    for _ in range(a.rounds):
        for tool in tools:
            runs[tool].append(common.not_run(tool, trl_missing) if trl_missing and tool != "preflab"
                              else spawn(tool, a.warmup, a.steps, env, a.smoke))
    results = [summarise(t, runs[t], a.warmup) for t in tools]
    notes = []
    by = {r["tool"]: r for r in results if r["status"] == "ran"}
    ratio = by["preflab"]["s_per_step"] / by["trl"]["s_per_step"] if "preflab" in by and "trl" in by else None
    if ratio is not None:
        notes.append(f"preflab / TRL time per step: {ratio:.2f}x"
                     + ("" if a.smoke else f" (target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})"))
        notes.append(f"CPU seconds per step (process time, all threads), preflab / TRL: "
                     f"{by['preflab']['cpu_s_per_step']:.1f} / {by['trl']['cpu_s_per_step']:.1f}; fastest steps: "
                     f"{by['preflab']['min_s_per_step']:.1f} / {by['trl']['min_s_per_step']:.1f} s")
    notes += common.ratio_note(results, "preflab", "trl-precompute", "with precompute_ref_log_probs")
    notes += common.ratio_note(results, "preflab", "trl-math", "with preflab's attention kernels")
    common.print_table(
        f"DPO step: {common.model_label(a.smoke)}, {PAIRS} pairs of {PROMPT_TOKENS} prompt + {RESPONSE_TOKENS} response tokens, bf16 "
        f"autocast, threads {record['threads']} (median of timed steps)",
        [("tool", ""), ("s/step", "{s_per_step:.2f}"), ("pairs/s", "{pairs_per_s:.2f}"),
         ("peak RSS GiB", "{peak_rss_gib:.2f}"), ("timed steps", "timed_steps"), ("CPU s/step", "{cpu_s_per_step:.1f}")],
        results, notes)
    common.write(common.out_path(a, "dpo_step"), "dpo_step", record, versions={"trl": common.version("trl")},
                 ratio_preflab_over_trl=ratio,
                 omp_wait_policy="PASSIVE" if a.passive else os.environ.get("OMP_WAIT_POLICY"),
                 workload={"model": MODEL, "pairs": PAIRS, "prompt_tokens": PROMPT_TOKENS,
                           "response_tokens": RESPONSE_TOKENS, "beta": BETA, "loss": "sigmoid", "bf16_autocast": True,
                           "gradient_checkpointing": False, "rounds": a.rounds, "warmup": a.warmup,
                           "timed_steps_per_process": a.steps},
                 results=results, notes=notes)


if __name__ == "__main__":
    main()
