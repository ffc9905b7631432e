"""Seconds per SFT optimizer step of preflab (fp32 vs bf16 autocast) against TRL's SFTTrainer, in one run.

Workload: SmolLM2-135M-Instruct (``bundled:smollm2-135m-instruct``), one micro-batch of 8
sequences x 128 tokens per optimizer step. The first 32 tokens of every row are "prompt"
(label -100), the other 96 are "response" (labelled), so 8 x 96 = 768 positions carry a
loss (position t predicts token t+1). Token ids are deterministic random ids (seed 0) from
the ordinary vocabulary; the step time does not depend on the text.

Each configuration runs in a fresh subprocess (``--one CONFIG``) so that the peak RSS is
that configuration's alone: load the model, 1 warm-up step, then the median of 5 timed
steps; 2 torch threads (``--threads N`` or ``auto``).

preflab's step replicates ``preflab.stages.sft.train`` step 3 call for call: ``TokenNLL``
under ``torch.autocast(cpu, bf16, enabled=bf16)``, ``(nll * scale).backward()``,
``clip_grad``, AdamW + LambdaLR from ``make_optimizer(SFTOptim())``, ``zero_grad(set_to_none)``.
tokens/s counts all tokens of the batch (attention_mask sum), as sft.py's
``perf/tokens_per_s`` does.

The peer, TRL's ``SFTTrainer``, runs in the same run on the same 8 rows (pre-tokenised
``input_ids`` + ``labels``), same optimizer settings, fp32 and ``bf16=True, use_cpu=True``,
gradient checkpointing off (preflab's default; TRL's own default is on). Its step time is
the gap between consecutive ``on_step_end`` callbacks. Where trl is not importable its rows
say "not installed" (``pip install trl==1.16.0``, the version measured).

    .venv/bin/python benchmarks/sft_step.py            # preflab and TRL, fp32 + bf16
    .venv/bin/python benchmarks/sft_step.py --smoke    # tiny random model, 1 timed step: every row runs
    .venv/bin/python benchmarks/sft_step.py --one bf16 # one configuration, JSON on stdout
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

MODEL = common.BUNDLED
BATCH, SEQ, PROMPT = 8, 128, 32
WARMUP, STEPS = 1, 5
SMOKE = {"MODEL": common.TINY, "BATCH": 2, "SEQ": 16, "PROMPT": 4, "WARMUP": 1, "STEPS": 1}
TARGET_S = 2.5
CONFIGS = {"fp32": ("preflab", False), "bf16": ("preflab", True),
           "trl-fp32": ("trl", False), "trl-bf16": ("trl", True)}


def make_rows(vocab_size: int):
    """(input_ids, labels) lists: BATCH rows of SEQ ids, the first PROMPT labels -100."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab_size, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids.tolist(), labels.tolist()


def run_preflab(bf16: bool, threads: int | None) -> dict:
    import torch

    from preflab import distributed, models
    from preflab.config import SFTOptim
    from preflab.data.chat import Example, collate
    from preflab.lm import TokenNLL
    from preflab.optim import clip_grad, make_optimizer

    common.set_threads(threads)
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


def run_trl(bf16: bool, threads: int | None) -> dict:
    common.trl_env()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from preflab import models
    from preflab.config import SFTOptim

    common.peer_threads(threads)
    models.quiet_transformers()
    path = models.resolve(MODEL)
    tokenizer = models.load_tokenizer(MODEL)
    ids, labels = make_rows(len(tokenizer))
    data = Dataset.from_dict({"input_ids": ids, "labels": labels})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    o = SFTOptim()
    timer = common.step_timer()
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
    return {"times": timer.times(), "losses": [], "tokens_per_step": BATCH * SEQ,
            "labelled_per_step": BATCH * (SEQ - PROMPT), "loss_type": getattr(args, "loss_type", None),
            "version": common.version("trl")}


def one(config: str, threads: int | None) -> dict:
    import torch

    kind, bf16 = CONFIGS[config]
    res = run_preflab(bf16, threads) if kind == "preflab" else run_trl(bf16, threads)
    timed = res["times"][WARMUP:]
    med = statistics.median(timed)
    return {
        "config": config, "tool": kind, "label": f"{kind} {'bf16 autocast' if bf16 else 'fp32'}",
        "bf16_autocast": bf16, "s_per_step": med, "tokens_per_s": res["tokens_per_step"] / med,
        "peak_rss_gib": common.peak_rss_gib(), "step_times_s": res["times"], "warmup_steps": WARMUP,
        "timed_steps": len(timed), "tokens_per_step": res["tokens_per_step"],
        "labelled_per_step": res["labelled_per_step"], "losses": res["losses"], "threads": torch.get_num_threads(),
        **({"trl_loss_type": res["loss_type"], "trl_version": res["version"]} if kind == "trl" else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=sorted(CONFIGS), help="run one configuration here; print its JSON")
    common.add_options(ap)
    a = ap.parse_args()
    if a.smoke:
        globals().update(SMOKE)
    if a.one:
        common.print_row(one(a.one, a.threads))
        return

    record = common.start(a)
    args = ["--threads", "auto" if a.threads is None else str(a.threads)] + (["--smoke"] if a.smoke else [])
    trl_missing = common.missing("trl")
    results = [common.not_run(c, trl_missing, tool="trl") if trl_missing and CONFIGS[c][0] == "trl"
               else common.run(__file__, ["--one", c, *args], c, lambda c=c: one(c, a.threads), a.smoke)
               for c in CONFIGS]
    notes = []
    bf16 = next((r for r in results if r["config"] == "bf16" and r["status"] == "ran"), None)
    if bf16 and not a.smoke:
        notes.append(f"target <= {TARGET_S} s/step (bf16 autocast): {'met' if bf16['s_per_step'] <= TARGET_S else 'NOT met'} "
                     f"({bf16['s_per_step']:.2f} s)")
    notes += common.ratio_note(results, "bf16", "trl-bf16", "time per step, bf16")
    common.print_table(
        f"SFT step: {common.model_label(a.smoke)}, {BATCH} x {SEQ} tokens ({PROMPT} prompt), threads {record['threads']}, "
        f"median of {STEPS} after {WARMUP} warm-up",
        [("config", ""), ("s/step (median)", "{s_per_step:.2f}"), ("tokens/s", "{tokens_per_s:.0f}"),
         ("peak RSS GiB", "{peak_rss_gib:.2f}")], results, notes)
    common.write(common.out_path(a, "sft_step"), "sft_step", record, versions={"trl": common.version("trl")},
                 workload={"model": MODEL, "batch": BATCH, "seq": SEQ, "prompt_tokens": PROMPT,
                           "labelled_positions": BATCH * (SEQ - PROMPT), "warmup": WARMUP, "timed_steps": STEPS},
                 results=results, notes=notes)


if __name__ == "__main__":
    main()
