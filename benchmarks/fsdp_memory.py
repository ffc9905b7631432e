"""Peak resident memory of an SFT (or online RL) rank under DDP and under FSDP (two gloo ranks on CPU).

A random Llama (``--hidden``, ``--layers``; the default has 90.4M parameters, with the tiny
byte-level tokenizer) is saved to a temporary directory, then trained ``--steps`` steps by
``torchrun --nproc_per_node 2 -m preflab.cli sft`` once with ``train.parallel=ddp`` and once with
``train.parallel=fsdp``: fp32 weights and AdamW, no bf16, 2 sequences of about 70 tokens per rank
per step, no checkpoint before the last step. The figure is rank 0's peak RSS (``VmHWM``,
the ``perf/peak_rss_mb`` of the last step's metrics row, before the final checkpoint and export),
beside the model state the arithmetic expects per rank: 16 bytes per parameter (fp32 weights,
gradients, Adam's two moments), divided by the ranks under FSDP. Peak RSS also holds what every
process has (torch, transformers, the data; ``baseline_mb``: a one-process run of the tiny model).

``--stage rl``: the online RL stage instead (``preflab rl``, configs/rl_tiny.yaml: PPO with a value
head on the policy, 2 prompts of 8 sampled tokens per rank per step, 2 PPO epochs), the random
Llama as the trained policy and as the frozen reference (bf16; its layers sharded under FSDP),
the tiny random reward model. Both sample with preflab's engine, whose weight snapshot (4 bytes
per parameter in fp32) FSDP ranks build from the shards, one gathered weight at a time.
JSON in ``fsdp_memory_rl.json``; with ``--bf16``, bf16 autocast in training and sampling (the
pipeline's setting: the engine's snapshot in bf16), JSON in ``fsdp_memory_rl_bf16.json``.

No outside peer: DDP and FSDP (torch's, as ``train.parallel`` runs them) are each other's.

    .venv/bin/python benchmarks/fsdp_memory.py       # JSON in benchmarks/results/fsdp_memory.json
    .venv/bin/python benchmarks/fsdp_memory.py --layers 2                     # brief
    .venv/bin/python benchmarks/fsdp_memory.py --smoke   # a 1-layer model of width 256, 1 step (seconds)
    .venv/bin/python benchmarks/fsdp_memory.py --stage rl   # the RL stage; fsdp_memory_rl.json
    .venv/bin/python benchmarks/fsdp_memory.py --stage rl --bf16   # in bf16; fsdp_memory_rl_bf16.json
    .venv/bin/python benchmarks/fsdp_memory.py --stage rl --layers 24 --out benchmarks/results/fsdp_memory_rl_24l.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"hidden": 256, "layers": 1, "steps": 1}


def make_model(where: Path, hidden: int, layers: int) -> int:
    """A random Llama with the tiny tokenizer in ``where``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preflab import models

    tok = models.load_tokenizer("tiny:")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(where)
    tok.save_pretrained(where)
    return sum(p.numel() for p in model.parameters())


def last_peak_rss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "perf/peak_rss_mb" in r][-1]["perf/peak_rss_mb"]


def sft(model: Path | str, demos: Path, out: Path, steps: int, parallel: str | None, threads: int | None,
        stage: str = "sft", bf16: bool = False) -> float:
    """Rank 0's peak RSS in MiB of ``preflab sft`` (``stage`` rl: ``preflab rl``, with ``bf16``
    autocast in training and sampling; ``parallel``: two ranks; None: one process)."""
    thread_arg = "null" if threads is None else threads
    if stage == "rl":
        args = ["rl", "--config", str(ROOT / "configs/rl_tiny.yaml"), f"models.policy.path={model}",
                "models.reward_model=tiny:", f"train.steps={steps}", "rollout.batch_size=2",
                "ppo.minibatch_size=2", f"models.policy.threads={thread_arg}", "run.progress=false", f"run.out={out}",
                f"train.bf16={str(bf16).lower()}", f"rollout.bf16={str(bf16).lower()}"]
    else:
        args = ["sft", f"model.path={model}", f"data.train={demos}", "data.val_fraction=0", "data.max_length=96",
                f"train.max_steps={steps}", "train.batch_size=2", "train.bf16=false", f"model.threads={thread_arg}",
                "run.save_every=0", "run.progress=false", f"run.out={out}"]
    if parallel:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "preflab.cli", *args, f"train.parallel={parallel}"]
    else:
        cmd = [sys.executable, "-m", "preflab.cli", *args]
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    return last_peak_rss(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--stage", choices=("sft", "rl"), default="sft")
    ap.add_argument("--bf16", action="store_true", help="--stage rl: bf16 autocast in training and sampling (the "
                                                        "pipeline's setting); JSON in fsdp_memory_rl_bf16.json")
    common.add_options(ap, threads=1)  # per rank
    a = ap.parse_args()
    if a.smoke:
        vars(a).update(SMOKE)
    record = common.start(a)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = make_model(tmp / "model", a.hidden, a.layers)
        demos = tmp / "demos.jsonl"
        demos.write_text("".join(json.dumps({"prompt": f"Please say the number {i} in words, then stop.",
                                             "response": f"The number is {i}; that is all I have to say."}) + "\n"
                                 for i in range(64)))
        state_mb = 16 * n / 2**20
        baseline = sft("tiny:", demos, tmp / "base", 1, None, a.threads, a.stage, a.bf16)
        results = [{"config": parallel, "status": "ran", "world_size": 2,
                    "peak_rss_mb": sft(tmp / "model", demos, tmp / parallel, a.steps, parallel, a.threads, a.stage,
                                       a.bf16),
                    "model_state_mb": state_mb / (2 if parallel == "fsdp" else 1)} for parallel in ("ddp", "fsdp")]
    ddp, fsdp = (r["peak_rss_mb"] for r in results)
    summary = {"fsdp_over_ddp": fsdp / ddp, "fsdp_over_ddp_above_baseline": (fsdp - baseline) / (ddp - baseline)}
    common.print_table(f"Rank 0's peak RSS, {a.stage}, {n / 1e6:.1f}M parameters, 2 gloo ranks, {a.steps} steps",
                       [("parallel", ""), ("peak RSS MiB", "{peak_rss_mb:.0f}"),
                        ("model state MiB (16 B/param / ranks)", "{model_state_mb:.0f}")], results,
                       [f"one-process baseline (tiny model): {baseline:.0f} MiB; FSDP / DDP {summary['fsdp_over_ddp']:.2f}, "
                        f"above the baseline {summary['fsdp_over_ddp_above_baseline']:.2f}"])
    name = "fsdp_memory" if a.stage == "sft" else "fsdp_memory_rl" + ("_bf16" if a.bf16 else "")
    common.write(common.out_path(a, name), "fsdp_memory", record, stage=a.stage, bf16=a.bf16, parameters=n, steps=a.steps,
                 workload={"hidden": a.hidden, "layers": a.layers}, baseline_mb=baseline, results=results, **summary)


if __name__ == "__main__":
    main()
