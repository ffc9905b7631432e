"""Seconds per DPO optimizer step: preflab (``preflab dpo``) against TRL's ``DPOTrainer``.

Workload (the issue's): SmolLM2-135M-Instruct (``bundled:smollm2-135m-instruct``), one
micro-batch of 8 pairs per optimizer step, each a 32-token prompt with a chosen and a rejected
64-token response; sigmoid DPO loss, beta 0.1; bf16 autocast with fp32 weights and optimizer
state; no gradient checkpointing; AdamW; 2 torch threads. Token ids are deterministic random
ids (seed 0) from the ordinary vocabulary, the same for both tools (the step time does not
depend on the text); TRL gets them pre-tokenised (``prompt_ids``, ``chosen_ids``,
``rejected_ids``), so neither tool tokenises anything while timed.

Each tool runs in its own subprocess (``--one preflab|trl``), the tools alternating for
``--rounds`` rounds (preflab, trl, preflab, trl, ...): load, ``--warmup`` steps, then
``--steps`` timed steps. A tool's s/step is the median of its timed steps over all rounds;
peak RSS is the largest ``ru_maxrss`` of its processes. The 1-minute load average is recorded
before and after every process (the machine is shared: read the ratio, which alternation keeps
fair, more than the absolute times).

- preflab's step replicates ``preflab.stages.dpo.train`` step 5 call for call:
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

    .venv/bin/python benchmarks/dpo_step.py --out benchmarks/results/dpo_step.json
    .venv/bin/python benchmarks/dpo_step.py --rounds 1 --steps 3     # brief
    .venv/bin/python benchmarks/dpo_step.py --one preflab             # one process, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "bundled:smollm2-135m-instruct"
PAIRS, PROMPT_TOKENS, RESPONSE_TOKENS = 8, 32, 64
BETA, THREADS = 0.1, 2
TARGET_RATIO = 0.4
TOOLS = ("preflab", "trl", "trl-precompute", "trl-math")
REFERENCES = [{"tool": "ref: TRL 1.16 DPOTrainer bf16 (quoted: an earlier measurement on a 2-core machine)", "s_per_step": 8.7,
               "peak_rss_gib": 6.1}]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 / 1024.0  # Linux: KiB


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
    from preflab.optim import clip_grad, make_optimizer
    from preflab.stages.dpo import (
        Ranked,
        SequenceLogps,
        batch_loss,
        batch_tokens,
        collate_ranked,
        model_inputs,
        sequence_logps,
    )

    models.set_threads(THREADS)
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from preflab import models
    from preflab.config import DPOOptim

    torch.set_num_threads(THREADS)
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

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.marks:
                self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            self.marks.append((time.perf_counter(), time.process_time()))

    timer = Timer()
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
    times = [b[0] - a[0] for a, b in zip(timer.marks, timer.marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(timer.marks, timer.marks[1:])]
    return {"times": times, "cpu_times": cpu, "losses": [], "tokens_per_step": PAIRS * 2 * (PROMPT_TOKENS + RESPONSE_TOKENS),
            "train_call_s": total}


def one(tool: str, warmup: int, steps: int) -> dict:
    res = run_preflab(warmup, steps) if tool == "preflab" else run_trl(warmup, steps, tool == "trl-precompute",
                                                                        tool == "trl-math")
    import torch

    timed = res.pop("times")
    return {"tool": tool, "step_times_s": timed, "step_cpu_s": res.pop("cpu_times"), "warmup_steps": warmup, "peak_rss_gib": peak_rss_gib(),
            "threads": torch.get_num_threads(), **res}


def spawn(tool: str, warmup: int, steps: int, env: dict | None = None) -> dict:
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--one", tool, "--warmup", str(warmup), "--steps", str(steps),
                           "--threads", str(THREADS)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"tool": tool, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_1min_before"], out["load_1min_after"] = load, os.getloadavg()[0]
    return out


def summarise(tool: str, runs: list[dict], warmup: int) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"tool": tool, "error": runs[-1]["error"] if runs else "not run"}
    timed = [t for r in ok for t in r["step_times_s"][warmup:]]
    cpu = [t for r in ok for t in r["step_cpu_s"][warmup:]]
    med = statistics.median(timed)
    out = {"tool": tool, "s_per_step": med, "peak_rss_gib": max(r["peak_rss_gib"] for r in ok),
           "min_s_per_step": min(timed), "cpu_s_per_step": statistics.median(cpu),
           "timed_steps": len(timed), "processes": len(ok), "step_times_s": [r["step_times_s"] for r in ok],
           "step_cpu_s": [r["step_cpu_s"] for r in ok],
           "tokens_per_step": ok[0]["tokens_per_step"], "pairs_per_s": PAIRS / med,
           "load_1min": [[r["load_1min_before"], r["load_1min_after"]] for r in ok]}
    if tool == "preflab":
        out["reference_once_s"] = statistics.median(r["reference_once_s"] for r in ok)
        out["losses"] = ok[0]["losses"]
    return out


def machine() -> dict:
    import torch
    import transformers

    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info["amx_bf16"] = "amx_bf16" in flags
    shared = Path(__file__).resolve().parent / "machine.py"
    if shared.exists():  # the shared helper, when present, describes the machine its own way
        sys.path.insert(0, str(shared.parent))
        try:
            import machine as machine_helper

            info["machine"] = machine_helper.describe()
            machine_helper.print_machine(info["machine"])
        except Exception as e:  # a helper that fails must not lose the measurements
            info["machine_error"] = repr(e)
    return info


def trl_version() -> str | None:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return None


def print_table(results: list[dict], notes: list[str]) -> None:
    from rich.table import Table

    from preflab.run import table_console

    t = Table(title=f"DPO step: SmolLM2-135M, {PAIRS} pairs of {PROMPT_TOKENS} prompt + {RESPONSE_TOKENS} response "
                    f"tokens, bf16 autocast, {THREADS} threads (median of timed steps)")
    for col in ("tool", "s/step", "pairs/s", "peak RSS GiB", "timed steps"):
        t.add_column(col, justify="left" if col == "tool" else "right")
    t.add_column("CPU s/step", justify="right")
    for r in results:
        if "error" in r:
            t.add_row(r["tool"], "error", "", "", " ".join(map(str, r["error"]))[:80])
            continue
        t.add_row(r["tool"], f"{r['s_per_step']:.2f}", f"{r['pairs_per_s']:.2f}", f"{r['peak_rss_gib']:.2f}",
                  str(r["timed_steps"]), f"{r['cpu_s_per_step']:.1f}")
    for ref in REFERENCES:
        t.add_row(f"[dim]{ref['tool']}[/dim]", f"[dim]{ref['s_per_step']:.1f}[/dim]", "",
                  f"[dim]{ref['peak_rss_gib']:.1f}[/dim]", "")
    console = table_console()
    console.print(t)
    for n in notes:
        console.print(n)


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
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads of both tools (the issue's: 2)")
    ap.add_argument("--passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for both tools: idle OpenMP threads sleep instead of spinning, "
                         "which keeps a loaded, shared machine from inflating both tools' times")
    a = ap.parse_args()
    THREADS = a.threads
    if a.one:
        print(json.dumps(one(a.one, a.warmup, a.steps)))
        return
    tools = ["preflab", "trl"] + (["trl-precompute"] if a.trl_precompute else []) + (["trl-math"] if a.trl_math else [])
    version = trl_version()
    if version is None:
        tools = ["preflab"]
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"} if a.passive else None
    load_start = os.getloadavg()
    for _ in range(a.rounds):
        for tool in tools:
            runs[tool].append(spawn(tool, a.warmup, a.steps, env))
    load_end = os.getloadavg()
    results = [summarise(t, runs[t], a.warmup) for t in tools]
    notes = []
    by = {r["tool"]: r for r in results if "s_per_step" in r}
    ratio = by["preflab"]["s_per_step"] / by["trl"]["s_per_step"] if "preflab" in by and "trl" in by else None
    if ratio is not None:
        notes.append(f"preflab / TRL time per step: {ratio:.2f}x (target <= {TARGET_RATIO}x: "
                     f"{'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    if "preflab" in by and "trl" in by:
        notes.append(f"CPU seconds per step (process time, all threads), preflab / TRL: "
                     f"{by['preflab']['cpu_s_per_step']:.1f} / {by['trl']['cpu_s_per_step']:.1f} = "
                     f"{by['preflab']['cpu_s_per_step'] / by['trl']['cpu_s_per_step']:.2f}x; fastest steps: "
                     f"{by['preflab']['min_s_per_step']:.1f} / {by['trl']['min_s_per_step']:.1f} s = "
                     f"{by['preflab']['min_s_per_step'] / by['trl']['min_s_per_step']:.2f}x")
    if "preflab" in by and "trl-precompute" in by:
        notes.append(f"preflab / TRL with precompute_ref_log_probs: "
                     f"{by['preflab']['s_per_step'] / by['trl-precompute']['s_per_step']:.2f}x")
    if "preflab" in by and "trl-math" in by:
        notes.append(f"preflab / TRL with preflab's attention kernels: "
                     f"{by['preflab']['s_per_step'] / by['trl-math']['s_per_step']:.2f}x")
    if version is None:
        notes.append("trl is not importable here (pip install trl==1.16.0, the version measured; "
                     "the bench extra pins 1.12.0 for PPOTrainer); TRL not run")
    notes.append(f"1-minute load average at start/end: {load_start[0]:.2f} / {load_end[0]:.2f} "
                 f"({os.cpu_count()} CPUs, shared with other work)")
    print_table(results, notes)
    info = machine()  # printed by benchmarks/machine.py when that helper is there
    if "machine" not in info:
        print(f"machine: {json.dumps(info)}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "results": results, "trl_version": version, "ratio_preflab_over_trl": ratio,
            "target_ratio": TARGET_RATIO, "load_1min": {"start": load_start[0], "end": load_end[0]},
            "omp_wait_policy": "PASSIVE" if a.passive else os.environ.get("OMP_WAIT_POLICY"),
            "workload": {"model": MODEL, "pairs": PAIRS, "prompt_tokens": PROMPT_TOKENS,
                         "response_tokens": RESPONSE_TOKENS, "beta": BETA, "loss": "sigmoid", "bf16_autocast": True,
                         "gradient_checkpointing": False, "threads": THREADS, "rounds": a.rounds,
                         "warmup": a.warmup, "timed_steps_per_process": a.steps},
            "machine": info, "references": REFERENCES, "notes": notes,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
