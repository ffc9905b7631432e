"""Seconds per SFT optimizer step of preflab (fp32 vs bf16 autocast), optionally against TRL.

Workload: SmolLM2-135M-Instruct (``bundled:smollm2-135m-instruct``), one micro-batch of 8
sequences x 128 tokens per optimizer step. The first 32 tokens of every row are "prompt"
(label -100), the other 96 are "response" (labelled), so 8 x 96 = 768 positions carry a
loss (position t predicts token t+1). Token ids are deterministic random ids (seed 0) from
the ordinary vocabulary; the step time does not depend on the text.

Each configuration runs in a fresh subprocess (``--one CONFIG``) so that the peak RSS is
that configuration's alone: load the model, 1 warm-up step, then the median of 5 timed
steps; ``torch.set_num_threads(2)``.

preflab's step replicates ``preflab.stages.sft.train`` step 3 call for call: ``TokenNLL``
under ``torch.autocast(cpu, bf16, enabled=bf16)``, ``(nll * scale).backward()``,
``clip_grad``, AdamW + LambdaLR from ``make_optimizer(SFTOptim())``, ``zero_grad(set_to_none)``.
tokens/s counts all tokens of the batch (attention_mask sum), as sft.py's
``perf/tokens_per_s`` does.

``--trl``: also runs TRL's ``SFTTrainer`` (if importable) on the same 8 rows (pre-tokenised
``input_ids`` + ``labels``), same optimizer settings, fp32 and ``bf16=True, use_cpu=True``,
gradient checkpointing off (preflab's default; TRL's own default is on). Its step time is
the gap between consecutive ``on_step_end`` callbacks.

    .venv/bin/python benchmarks/sft_step.py            # preflab fp32 + bf16
    .venv/bin/python benchmarks/sft_step.py --trl      # + TRL fp32 + bf16
    .venv/bin/python benchmarks/sft_step.py --one bf16 # one configuration, JSON on stdout
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
BATCH, SEQ, PROMPT = 8, 128, 32
WARMUP, STEPS, THREADS = 1, 5, 2
RESULTS = Path(__file__).resolve().parent / "results" / "sft_step.json"
TARGET_S = 2.5

# Quoted, not measured here.
REFERENCES = [
    {"config": "ref: TRL 1.12 SFTTrainer fp32 + grad. ckpt (issue)", "s_per_step": 6.4, "peak_rss_gib": None,
     "peak_rss_note": "3.7 GB", "source": "issue"},
    {"config": "ref: TRL 1.16 SFTTrainer fp32 (quoted: an earlier measurement on a 2-core machine)", "s_per_step": 6.0, "peak_rss_gib": 4.9,
     "source": "an earlier measurement on another 2-core machine"},
    {"config": "ref: TRL 1.16 SFTTrainer bf16 autocast (quoted: an earlier measurement on a 2-core machine)", "s_per_step": 4.0, "peak_rss_gib": 4.5,
     "source": "an earlier measurement on another 2-core machine"},
]
CONFIGS = {"fp32": ("preflab", False), "bf16": ("preflab", True),
           "trl-fp32": ("trl", False), "trl-bf16": ("trl", True)}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 / 1024.0  # Linux: KiB


def make_rows(vocab_size: int):
    """(input_ids, labels) lists: BATCH rows of SEQ ids, the first PROMPT labels -100."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab_size, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids.tolist(), labels.tolist()


def run_preflab(bf16: bool) -> dict:
    import torch

    from preflab import distributed, models
    from preflab.config import SFTOptim
    from preflab.data.chat import Example, collate
    from preflab.lm import TokenNLL
    from preflab.optim import clip_grad, make_optimizer

    models.set_threads(THREADS)
    device = models.pick_device("cpu")
    tokenizer = models.load_tokenizer(MODEL)
    ids, labels = make_rows(len(tokenizer))
    examples = [Example(i, lab) for i, lab in zip(ids, labels)]
    model = models.load_policy(MODEL, dtype="fp32", device="cpu")
    model.train()
    loss_fn = TokenNLL(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim_cfg = SFTOptim()
    optimizer, scheduler = make_optimizer(params, optim_cfg, WARMUP + STEPS)

    times, losses = [], []
    for _step in range(WARMUP + STEPS):
        # --- as preflab.stages.sft.train, step 3 (one rank, grad_accum 1) ---
        t0 = time.perf_counter()
        batches = [collate(examples, tokenizer.pad_token_id)]
        n_tokens = distributed.all_reduce_sum(sum((b["labels"][:, 1:] != -100).sum() for b in batches))
        scale = 1 / max(1, int(n_tokens))
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                nll, _ = loss_fn(**batch)
                (nll * scale).backward()
            loss_sum += nll.detach().double().cpu()
        loss = float(distributed.all_reduce_sum(loss_sum)) / max(1, int(n_tokens))
        clip_grad(params, optim_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        n_seen = sum(b["attention_mask"].sum().item() for b in batches)
        times.append(dt)
        losses.append(loss)
    return {"times": times, "losses": losses, "tokens_per_step": int(n_seen), "labelled_per_step": int(n_tokens)}


def run_trl(bf16: bool) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from preflab import models
    from preflab.config import SFTOptim

    torch.set_num_threads(THREADS)
    models.quiet_transformers()
    path = models.resolve(MODEL)
    tokenizer = models.load_tokenizer(MODEL)
    ids, labels = make_rows(len(tokenizer))
    data = Dataset.from_dict({"input_ids": ids, "labels": labels})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    o = SFTOptim()

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
            max_steps=WARMUP + STEPS, learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
            adam_epsilon=o.eps, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
            lr_scheduler_type="cosine", warmup_steps=o.warmup_steps, max_length=SEQ,
            bf16=bf16, fp16=False, use_cpu=True, gradient_checkpointing=False,
            completion_only_loss=False, save_strategy="no", report_to="none", logging_steps=10_000,
            disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
        trainer.train()
    times = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    return {"times": times, "losses": [], "tokens_per_step": BATCH * SEQ,
            "labelled_per_step": BATCH * (SEQ - PROMPT), "loss_type": getattr(args, "loss_type", None)}


def one(config: str) -> dict:
    kind, bf16 = CONFIGS[config]
    res = run_preflab(bf16) if kind == "preflab" else run_trl(bf16)
    timed = res["times"][WARMUP:]
    med = statistics.median(timed)
    import torch

    return {
        "config": config, "tool": kind, "bf16_autocast": bf16, "s_per_step": med,
        "tokens_per_s": res["tokens_per_step"] / med, "peak_rss_gib": peak_rss_gib(),
        "step_times_s": res["times"], "warmup_steps": WARMUP, "timed_steps": len(timed),
        "tokens_per_step": res["tokens_per_step"], "labelled_per_step": res["labelled_per_step"],
        "losses": res["losses"], "threads": torch.get_num_threads(),
        **({"trl_loss_type": res["loss_type"]} if "loss_type" in res else {}),
    }


def spawn(config: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", config], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"config": config, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch
    import transformers

    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info["amx_bf16"] = "amx_bf16" in flags
    return info


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(results: list[dict], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SFT step: SmolLM2-135M, {BATCH} x {SEQ} tokens ({PROMPT} prompt), "
                    f"{THREADS} threads, median of {STEPS} after {WARMUP} warm-up")
    for col in ("config", "s/step (median)", "tokens/s", "peak RSS GiB"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in results:
        if "error" in r:
            t.add_row(r["config"], "error", "", " ".join(r["error"]))
            continue
        name = f"{r['tool']} {'bf16 autocast' if r['bf16_autocast'] else 'fp32'}"
        t.add_row(name, f"{r['s_per_step']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_gib']:.2f}")
    for ref in REFERENCES:
        rss = ref.get("peak_rss_note") or f"{ref['peak_rss_gib']:.1f}"
        t.add_row(f"[dim]{ref['config']}[/dim]", f"[dim]{ref['s_per_step']:.1f}[/dim]",
                  f"[dim]{BATCH * SEQ / ref['s_per_step']:.0f}[/dim]", f"[dim]{rss}[/dim]")
    t.add_row("[bold]target: preflab bf16 autocast[/bold]", f"[bold]<= {TARGET_S}[/bold]",
              f"[bold]>= {BATCH * SEQ / TARGET_S:.0f}[/bold]", "")
    console = Console()
    console.print(t)
    for n in notes:
        console.print(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=sorted(CONFIGS), help="run one configuration here; print its JSON")
    ap.add_argument("--trl", action="store_true", help="also run TRL's SFTTrainer (if importable)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one)))
        return

    configs, notes = ["fp32", "bf16"], []
    if a.trl:
        if trl_available():
            configs += ["trl-fp32", "trl-bf16"]
        else:
            notes.append("--trl: trl is not importable in this environment; TRL comparison skipped.")
    info = machine()
    results = [spawn(c) for c in configs]
    info["loadavg_end"] = os.getloadavg()
    bf16 = next((r for r in results if r.get("config") == "bf16" and "s_per_step" in r), None)
    if bf16:
        ok = bf16["s_per_step"] <= TARGET_S
        notes.append(f"target <= {TARGET_S} s/step (bf16 autocast): {'met' if ok else 'NOT met'} "
                     f"({bf16['s_per_step']:.2f} s)")
    notes.append(f"load average at start/end: {info['loadavg_start'][0]:.2f} / {info['loadavg_end'][0]:.2f} "
                 f"({info['cpus']} CPUs; other processes may share them)")
    print_table(results, notes)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "workload": {"model": MODEL, "batch": BATCH, "seq": SEQ, "prompt_tokens": PROMPT,
                     "labelled_positions": BATCH * (SEQ - PROMPT), "warmup": WARMUP, "timed_steps": STEPS,
                     "threads": THREADS},
        "machine": info, "results": results, "references": REFERENCES, "target_s_per_step_bf16": TARGET_S,
        "notes": notes, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
