"""Seconds per PPO step (rollout + update) of preflab against TRL's PPOTrainer, in one run.

Identical settings for both: policy SmolLM2-135M-Instruct; reward model and critic = a copy of it
with a 1-output classification head (the same saved directory); 16 prompts per rollout (~49
tokens), up to 64 new tokens (both stop at EOS: TRL's generate inherits the model's EOS), temperature 0.7, KL coef 0.05, lr 3e-6,
minibatch 8, 1 PPO epoch, then 4; 2 threads. TRL is 1.12.0 (`pip install trl==1.12.0`, the last
release with PPOTrainer, in `trl.experimental.ppo`); TRL ignores bf16 on CPU, preflab uses bf16
autocast with fp32 master weights (its default) -- the precision each tool runs at on this CPU.

Each (tool, epochs) runs in a fresh subprocess (`--one TOOL EPOCHS`), so peak RSS is its own;
tools alternate; 1 warm-up step, then the median of the timed steps. preflab's split of a step
(generation, scoring, training) comes from its own `perf/*` metrics.

    .venv/bin/python benchmarks/ppo_step.py                  # both tools, 1 and 4 epochs
    .venv/bin/python benchmarks/ppo_step.py --tools preflab  # preflab only

Rows named ``preflab-vhead`` use the value-head critic on the policy trunk (one trained model
instead of two): an option of preflab's, shown beside the identical-settings comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "bundled:smollm2-135m-instruct"
N_PROMPTS, NEW_TOKENS, MINIBATCH, THREADS = 16, 64, 8, 2
# Micro-batches per minibatch for preflab (1: the minibatch of 8 in one pass, as TRL does).
# 4 (micro-batches of 2) gives the same update (a test holds 1x8 == 8x1) with about 1 GiB less
# peak memory; benchmarks/results/ppo_step.json was measured with 1.
MICRO_ACCUM = 1
RESULTS = Path(__file__).resolve().parent / "results" / "ppo_step.json"
WORK = Path(tempfile.gettempdir()) / "preflab-bench-ppo"
TOPICS = ["the ocean", "volcanoes", "bread baking", "chess openings", "the moon landing", "honey bees",
          "electric cars", "the Roman empire", "jazz music", "rain forests", "black holes", "coffee",
          "mountain climbing", "origami", "penguins", "solar panels"]


def prepare() -> tuple[Path, Path]:
    """The shared RM/critic directory (seeded random head) and the prompt file."""
    import torch

    from preflab import models

    WORK.mkdir(parents=True, exist_ok=True)
    rm_dir, prompts = WORK / "rm", WORK / "prompts.jsonl"
    if not models.is_reward_model(str(rm_dir)):  # a random score head saved as an RM: timing needs no training
        torch.manual_seed(0)
        models.save_model(models.load_scorer(MODEL), models.load_tokenizer(MODEL), rm_dir, reward_model=True)
    prompts.write_text("".join(json.dumps({"id": i, "prompt": "Write a short, friendly paragraph for a curious "
                                           f"ten year old that explains something surprising about {t}."}) + "\n"
                               for i, t in enumerate(TOPICS)))
    return rm_dir, prompts


def run_preflab(epochs: int, steps: int, critic: str = "reward_model") -> dict:
    from preflab.config import RLConfig, load_config
    from preflab.stages import rl as rl_stage

    rm_dir, prompts = prepare()
    out = WORK / f"preflab-e{epochs}-{os.getpid()}"
    cfg = load_config(RLConfig, None, [
        f"models.policy.path={MODEL}", f"models.policy.threads={THREADS}", f"models.reward_model={rm_dir}",
        f"data.prompts={prompts}", "data.split=null", f"rollout.batch_size={N_PROMPTS}",
        f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.temperature=0.7",
        "rollout.missing_eos_penalty=null", f"ppo.minibatch_size={MINIBATCH}", f"ppo.grad_accum={MICRO_ACCUM}", f"ppo.epochs={epochs}",
        "kl.coef=0.05", "optim.lr=3e-6", f"train.steps={steps}", f"run.out={out}", "run.progress=false",
        f"models.critic={critic}"])
    rl_stage.train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]  # drop warm-up
    shutil.rmtree(out, ignore_errors=True)  # checkpoints with optimizer state: ~3 GiB a run
    med = {k: statistics.median(r[k] for r in rows) for k in ("perf/step_s", "perf/gen_s", "perf/score_s", "perf/train_s")}
    return {"s_per_step": med["perf/step_s"], "gen_s": med["perf/gen_s"], "score_s": med["perf/score_s"],
            "train_s": med["perf/train_s"], "steps": [r["perf/step_s"] for r in rows]}


def run_trl(epochs: int, steps: int) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from preflab import models

    torch.set_num_threads(THREADS)
    rm_dir, prompts = prepare()
    policy_dir = models.resolve(MODEL)
    tok = models.load_tokenizer(MODEL)  # pad = <|endoftext|>, distinct from EOS (TRL masks on pad)
    tok.padding_side = "left"
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"] for r in rows]
    data = Dataset.from_dict({"input_ids": ids})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    # TRL 1.12: rollout batch = per_device_train_batch_size x gradient_accumulation_steps (16), split
    # into num_mini_batches (2) minibatches of 8, each one micro-batch of per_device_train_batch_size.
    args = PPOConfig(output_dir=str(WORK / f"trl-{os.getpid()}"), per_device_train_batch_size=MINIBATCH,
                     gradient_accumulation_steps=N_PROMPTS // MINIBATCH, num_mini_batches=N_PROMPTS // MINIBATCH,
                     num_ppo_epochs=epochs, total_episodes=N_PROMPTS * steps, response_length=NEW_TOKENS,
                     local_rollout_forward_batch_size=N_PROMPTS, temperature=0.7, kl_coef=0.05,
                     learning_rate=3e-6, missing_eos_penalty=None, use_cpu=True, bf16=False,
                     report_to=[], save_strategy="no", logging_steps=1000, num_sample_generations=0,
                     seed=0)
    trainer = PPOTrainer(args=args, processing_class=tok,
                         model=AutoModelForCausalLM.from_pretrained(policy_dir),
                         ref_model=AutoModelForCausalLM.from_pretrained(policy_dir),
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1),
                         train_dataset=data, callbacks=[Timer()])
    start = time.perf_counter()
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    marks = [start, *times]
    per = [b - a for a, b in zip(marks, marks[1:])][1:]  # drop warm-up
    assert len(times) == steps, f"expected {steps} TRL updates of {N_PROMPTS} prompts, got {len(times)}"
    return {"s_per_step": statistics.median(per), "steps": per}


# preflab-vhead: the critic is a value head on the policy trunk (`models.critic=policy_head`), an
# option of preflab's, NOT the identical setting (TRL and preflab's default train a separate critic).
TOOLS = {"preflab": lambda e, s: run_preflab(e, s), "preflab-vhead": lambda e, s: run_preflab(e, s, "policy_head"),
         "trl": lambda e, s: run_trl(e, s)}


def one(tool: str, epochs: int, steps: int) -> None:
    result = TOOLS[tool](epochs, steps)
    result.update(tool=tool, epochs=epochs, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=2, metavar=("TOOL", "EPOCHS"))
    ap.add_argument("--tools", default="preflab,trl,preflab-vhead", help=f"comma-separated, of {', '.join(TOOLS)}")
    ap.add_argument("--epochs", default="1,4")
    ap.add_argument("--steps", type=int, default=4, help="steps per run, the first one a warm-up")
    a = ap.parse_args()
    if a.one:
        one(a.one[0], int(a.one[1]), a.steps)
        return
    prepare()
    results = []
    for epochs in [int(e) for e in a.epochs.split(",")]:
        for tool in a.tools.split(","):
            if tool == "trl":
                try:
                    import trl.experimental.ppo  # noqa: F401
                except ImportError:
                    print("TRL PPO not importable: pip install trl==1.12.0 (skipping TRL)")
                    continue
            out = subprocess.run([sys.executable, __file__, "--one", tool, str(epochs), "--steps", str(a.steps)],
                                 capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"{tool} (epochs {epochs}) failed")
            results.append(json.loads(line[0][7:]))
            print(f"done: {tool} epochs={epochs}: {results[-1]['s_per_step']:.1f} s/step", flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"PPO step: {N_PROMPTS} prompts, {NEW_TOKENS} new tokens, minibatch {MINIBATCH}, {THREADS} threads")
    for c in ("tool", "epochs", "s/step (median)", "gen s", "score s", "train s", "peak RSS GiB", "time vs TRL", "RSS vs TRL"):
        t.add_column(c, justify="right")
    for r in results:
        trl = next((x for x in results if x["tool"] == "trl" and x["epochs"] == r["epochs"]), None)
        ratio = f"{r['s_per_step'] / trl['s_per_step']:.2f}x" if trl and r["tool"] != "trl" else ""
        mem = f"{r['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x" if trl and r["tool"] != "trl" else ""
        t.add_row(r["tool"], str(r["epochs"]), f"{r['s_per_step']:.1f}", *(f"{r[k]:.1f}" if k in r else "" for k in
                  ("gen_s", "score_s", "train_s")), f"{r['peak_rss_gib']:.2f}", ratio, mem)
    Console().print(t)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"results": results, "loadavg_end": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
