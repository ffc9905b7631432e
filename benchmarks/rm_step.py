"""Seconds per reward-model optimizer step of preflab (fp32 vs bf16 autocast; prompt shared or not).

Workload: SmolLM2-135M-Instruct (``bundled:smollm2-135m-instruct``) with a 1-output score
head, one micro-batch of 8 prompts with K = 2 responses each (8 pairs, the InstructGPT loss
with C(2,2) = 1 pair per prompt, i.e. Bradley-Terry): 16 rows of 32 prompt + 64 response
tokens. Token ids are deterministic random ids (seed 0) from the ordinary vocabulary; the
step time does not depend on the text.

Each configuration runs in a fresh subprocess (``--one CONFIG``) so that the peak RSS is that
configuration's alone: load the model, 1 warm-up step, then the median of 5 timed steps;
2 torch threads (``--threads N`` or ``auto`` to change it: on a shared 2-core machine, 2
OpenMP threads that wait on each other can make a step several times slower than 1 thread).

The step replicates ``preflab.stages.reward.train`` step 3 call for call: ``collate_groups``
(``share_prefix``: each prompt once, its K responses on its cached keys and values, the default
``train.share_prompt``), ``Scorer`` (trunk once, head at the last real token) under
``torch.autocast(cpu, bf16, enabled=bf16)``, ``ranking_loss`` (Eq. 1), ``(total *
scale).backward()``, ``clip_grad``, AdamW + LambdaLR from ``make_optimizer(RMOptim())``,
``zero_grad(set_to_none)``. ``bf16-half-frozen`` freezes the embeddings and the lower half of
the decoder layers first, as ``train.frozen_layers`` does (the demo: 15 of 30). ``--k 4 --prompt-tokens 96`` is the demo's shape (K = 4 rankings,
prompts with the chat template about 96 tokens), where sharing the prompt matters more.

The peer, TRL's ``RewardTrainer``, runs in the same run (fp32 and ``bf16=True, use_cpu=True``,
gradient checkpointing off, the same optimizer settings) on the same groups given as its
pre-tokenised pairs (``chosen_ids``, ``rejected_ids``): each prompt's C(K,2) pairs, every pair a
full prompt + response row twice, one optimizer step per batch of all of them; its step time is
the gap between consecutive ``on_step_end`` callbacks. Where trl is not importable its rows say
"not installed".

    .venv/bin/python benchmarks/rm_step.py                 # preflab and TRL; table and JSON
    .venv/bin/python benchmarks/rm_step.py --smoke         # tiny random model, 1 timed step: every row runs
    .venv/bin/python benchmarks/rm_step.py --one bf16      # one configuration, JSON on stdout
    .venv/bin/python benchmarks/rm_step.py --k 4 --prompt-tokens 96   # the demo's K = 4 shape
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
PROMPTS, K, PROMPT_TOKENS, RESPONSE_TOKENS = 8, 2, 32, 64
WARMUP, STEPS = 1, 5
SMOKE = {"MODEL": common.TINY, "PROMPTS": 2, "PROMPT_TOKENS": 4, "RESPONSE_TOKENS": 8, "WARMUP": 1, "STEPS": 1}
TARGET_S = 2.5
# config: (tool, bf16, share prompt, lower half of the decoder layers frozen: `train.frozen_layers`)
CONFIGS = {"fp32": ("preflab", False, True, False), "bf16": ("preflab", True, True, False),
           "bf16-unshared": ("preflab", True, False, False), "bf16-half-frozen": ("preflab", True, True, True),
           "trl-fp32": ("trl", False, False, False), "trl-bf16": ("trl", True, False, False)}


def issue_workload() -> bool:
    return (MODEL, K, PROMPT_TOKENS, RESPONSE_TOKENS, PROMPTS) == (common.BUNDLED, 2, 32, 64, 8)


def make_groups(vocab: int) -> list[list[list[int]]]:
    """PROMPTS groups of K rows (prompt + response ids), best first; random ordinary ids, seed 0."""
    import torch

    g = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(PROMPTS):
        prompt = torch.randint(100, vocab - 100, (PROMPT_TOKENS,), generator=g).tolist()
        groups.append([prompt + torch.randint(100, vocab - 100, (RESPONSE_TOKENS,), generator=g).tolist()
                       for _ in range(K)])
    return groups


def run_preflab(bf16: bool, share: bool, half_frozen: bool, threads: int | None) -> dict:
    import torch

    from preflab import models
    from preflab.config import RMOptim
    from preflab.data.rankings import Encoded
    from preflab.optim import clip_grad, make_optimizer
    from preflab.rl.ranking import ranking_loss
    from preflab.scoring import Scorer, batch_tokens, collate_groups, scorer_inputs

    common.set_threads(threads)
    device = models.pick_device("cpu")
    tokenizer = models.load_tokenizer(MODEL)
    groups = [Encoded(rows, list(range(K))) for rows in make_groups(len(tokenizer))]
    torch.manual_seed(0)  # the new score head is random: the same head in every configuration
    model = models.load_scorer(MODEL, dtype="fp32", device="cpu")
    if half_frozen:  # as the stage does with train.frozen_layers = L / 2
        from preflab.distributed import decoder_layers

        models.freeze_lower_layers(model, len(decoder_layers(model)) // 2)
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


def run_trl(bf16: bool, threads: int | None) -> dict:
    common.trl_env()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from preflab import models
    from preflab.config import RMOptim

    common.peer_threads(threads)
    models.quiet_transformers()
    tokenizer = models.load_tokenizer(MODEL)
    pairs = [(rows[i], rows[j]) for rows in make_groups(len(tokenizer)) for i in range(K) for j in range(i + 1, K)]
    data = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(models.resolve(MODEL), num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    o = RMOptim()
    timer = common.step_timer()
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out, per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1,
            max_steps=WARMUP + STEPS, learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
            adam_epsilon=o.eps, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
            lr_scheduler_type="cosine", warmup_steps=o.warmup_steps, max_length=None,
            bf16=bf16, fp16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
            report_to="none", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                callbacks=[timer])
        trainer.train()
    return {"times": timer.times(), "losses": [], "tokens_per_step": sum(len(c) + len(r) for c, r in pairs),
            "trl_version": common.version("trl")}


def one(config: str, threads: int | None) -> dict:
    import torch

    tool, bf16, share, half_frozen = CONFIGS[config]
    res = run_preflab(bf16, share, half_frozen, threads) if tool == "preflab" else run_trl(bf16, threads)
    med = statistics.median(res["times"][WARMUP:])
    label = (f"preflab {'bf16 autocast' if bf16 else 'fp32'}, {'prompt once' if share else 'prompt K times'}"
             f"{', lower half of the layers frozen' if half_frozen else ''}"
             if tool == "preflab" else f"TRL RewardTrainer {'bf16 autocast' if bf16 else 'fp32'}, C(K,2) pairs")
    return {"config": config, "tool": tool, "label": label, "bf16_autocast": bf16, "share_prompt": share,
            "lower_half_frozen": half_frozen,
            "s_per_step": med, "pairs_per_s": PROMPTS * (K * (K - 1) // 2) / med,
            "tokens_per_s": res["tokens_per_step"] / med, "tokens_per_step": res["tokens_per_step"],
            "peak_rss_gib": common.peak_rss_gib(), "step_times_s": res["times"], "losses": res["losses"],
            "threads": torch.get_num_threads(), **({"trl_version": res["trl_version"]} if tool == "trl" else {})}


def main() -> None:
    global K, PROMPT_TOKENS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=sorted(CONFIGS), help="run one configuration here; print its JSON")
    ap.add_argument("--k", type=int, default=K, help="responses per prompt (the issue's workload: 2)")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="prompt length (the issue's: 32)")
    common.add_options(ap)
    a = ap.parse_args()
    if a.smoke:
        globals().update(SMOKE)
    K = a.k
    PROMPT_TOKENS = SMOKE["PROMPT_TOKENS"] if a.smoke else a.prompt_tokens
    if a.one:
        common.print_row(one(a.one, a.threads))
        return
    record = common.start(a)
    args = ["--threads", "auto" if a.threads is None else str(a.threads), "--k", str(K),
            "--prompt-tokens", str(PROMPT_TOKENS)] + (["--smoke"] if a.smoke else [])
    trl_missing = common.missing("trl")
    results = [common.not_run(c, trl_missing, tool="trl") if trl_missing and CONFIGS[c][0] == "trl"
               else common.run(__file__, ["--one", c, *args], c, lambda c=c: one(c, a.threads), a.smoke)
               for c in CONFIGS]
    notes = []
    by = {r["config"]: r for r in results if r["status"] == "ran"}
    if "bf16" in by and issue_workload():
        notes.append(f"target <= {TARGET_S} s/step (bf16 autocast): "
                     f"{'met' if by['bf16']['s_per_step'] <= TARGET_S else 'NOT met'} ({by['bf16']['s_per_step']:.2f} s)")
    notes += common.ratio_note(results, "bf16", "trl-bf16", "time per step, bf16")
    pairs = PROMPTS * (K * (K - 1) // 2)
    common.print_table(
        f"RM step: {common.model_label(a.smoke)}, {pairs} pairs ({PROMPTS} prompts x K={K}, {PROMPT_TOKENS} + {RESPONSE_TOKENS} tokens), "
        f"threads {record['threads']}, median of {STEPS} after {WARMUP} warm-up",
        [("config", ""), ("s/step (median)", "{s_per_step:.2f}"), ("pairs/s", "{pairs_per_s:.1f}"),
         ("tokens/step", "tokens_per_step"), ("peak RSS GiB", "{peak_rss_gib:.2f}")], results, notes)
    name = "rm_step" if K == 2 else f"rm_step_k{K}"
    common.write(common.out_path(a, name), "rm_step", record, versions={"trl": common.version("trl")},
                 workload={"model": MODEL, "prompts": PROMPTS, "k": K, "prompt_tokens": PROMPT_TOKENS,
                           "response_tokens": RESPONSE_TOKENS, "warmup": WARMUP, "timed_steps": STEPS},
                 results=results, notes=notes)


if __name__ == "__main__":
    main()
