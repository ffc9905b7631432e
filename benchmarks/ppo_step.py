"""Seconds per PPO step (rollout + update) of preflab against TRL's PPOTrainer, in one run.

Identical settings for both: policy SmolLM2-135M-Instruct; reward model and critic = a copy of it
with a 1-output classification head (the same saved directory); 16 prompts per rollout (~49
tokens), up to 64 new tokens (both stop at EOS: TRL's generate inherits the model's EOS), temperature 0.7, KL coef 0.05, lr 3e-6,
minibatch 8, 1 PPO epoch, then 4; 2 threads (``--threads N`` or ``auto``). TRL is 1.12.0 (`pip install trl==1.12.0`, the last
release with PPOTrainer, in `trl.experimental.ppo`; where that is not importable, e.g. under TRL
1.16, the TRL rows say "not installed"); TRL ignores bf16 on CPU, preflab uses bf16
autocast with fp32 master weights (its default) -- the precision each tool runs at on this CPU.

Each (tool, epochs) runs in a fresh subprocess (`--one TOOL EPOCHS`), so peak RSS is its own;
tools alternate; 1 warm-up step, then the median of the timed steps. preflab's split of a step
(generation, scoring, training) comes from its own `perf/*` metrics.

    .venv/bin/python benchmarks/ppo_step.py                  # both tools, 1 and 4 epochs
    .venv/bin/python benchmarks/ppo_step.py --tools preflab  # preflab only
    .venv/bin/python benchmarks/ppo_step.py --smoke          # tiny random models, 1 epoch: every row runs

Rows named ``preflab-vhead`` use the value-head critic on the policy trunk (one trained model
instead of two): an option of preflab's, shown beside the identical-settings comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

MODEL = common.BUNDLED
N_PROMPTS, NEW_TOKENS, MINIBATCH, THREADS = 16, 64, 8, 2
# Micro-batches per minibatch for preflab (1: the minibatch of 8 in one pass, as TRL does).
# 4 (micro-batches of 2) gives the same update (a test holds 1x8 == 8x1) with about 1 GiB less
# peak memory; benchmarks/results/ppo_step.json was measured with 1.
MICRO_ACCUM = 1
SMOKE = {"MODEL": common.TINY, "N_PROMPTS": 2, "NEW_TOKENS": 4, "MINIBATCH": 2}
WORK = Path(tempfile.gettempdir()) / "preflab-bench-ppo"  # the saved RM fixture, reused by later runs
TRL_PPO = "trl.experimental.ppo"
TOPICS = ["the ocean", "volcanoes", "bread baking", "chess openings", "the moon landing", "honey bees",
          "electric cars", "the Roman empire", "jazz music", "rain forests", "black holes", "coffee",
          "mountain climbing", "origami", "penguins", "solar panels"]


def prepare() -> tuple[Path, Path]:
    """The shared RM/critic directory (seeded random head) and the prompt file."""
    import torch

    from preflab import models

    WORK.mkdir(parents=True, exist_ok=True)
    rm_dir, prompts = WORK / "rm", WORK / "prompts.jsonl"
    if MODEL == common.TINY:
        rm_dir = Path("tiny:1")  # a tiny: spec counts as a reward model
    elif not models.is_reward_model(str(rm_dir)):  # a random score head saved as an RM: timing needs no training
        torch.manual_seed(0)
        models.save_model(models.load_scorer(MODEL), models.load_tokenizer(MODEL), rm_dir, reward_model=True)
    prompts.write_text("".join(json.dumps({"id": i, "prompt": "Write a short, friendly paragraph for a curious "
                                           f"ten year old that explains something surprising about {t}."}) + "\n"
                               for i, t in enumerate(TOPICS[:N_PROMPTS])))
    return rm_dir, prompts


def run_preflab(epochs: int, steps: int, critic: str = "reward_model") -> dict:
    from preflab.config import RLConfig, load_config
    from preflab.stages import rl as rl_stage

    rm_dir, prompts = prepare()
    out = WORK / f"preflab-e{epochs}-{os.getpid()}"
    cfg = load_config(RLConfig, None, [
        f"models.policy.path={MODEL}", f"models.policy.threads={'null' if THREADS is None else THREADS}",
        f"models.reward_model={rm_dir}",
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
    common.trl_env()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from preflab import models

    common.peer_threads(THREADS)
    rm_dir, prompts = prepare()
    policy_dir, rm_path = models.resolve(MODEL), models.resolve(str(rm_dir))
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
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1),
                         value_model=AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1),
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


def one(tool: str, epochs: int, steps: int) -> dict:
    import torch

    result = TOOLS[tool](epochs, steps)
    return {"config": f"{tool}-e{epochs}", "tool": tool, "epochs": epochs, **result,
            "peak_rss_gib": common.peak_rss_gib(), "threads": torch.get_num_threads()}


def main() -> None:
    global WORK, THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=2, metavar=("TOOL", "EPOCHS"))
    ap.add_argument("--tools", default="preflab,trl,preflab-vhead", help=f"comma-separated, of {', '.join(TOOLS)}")
    ap.add_argument("--epochs", default="1,4")
    ap.add_argument("--steps", type=int, default=4, help="steps per run, the first one a warm-up")
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    common.add_options(ap)
    a = ap.parse_args()
    THREADS = a.threads
    if a.smoke:
        globals().update(SMOKE)
        a.steps = 2
        if not a.one:
            a.epochs = "1"
            a.work = Path(tempfile.mkdtemp(prefix="preflab-bench-ppo-smoke-"))
    WORK = a.work or WORK
    if a.one:
        common.print_row(one(a.one[0], int(a.one[1]), a.steps))
        return
    record = common.start(a)
    prepare()
    trl_missing = common.missing(TRL_PPO)
    if trl_missing:
        trl_missing += f"; TRL {common.version('trl')} has no PPOTrainer: pip install trl==1.12.0"
    results = []
    for epochs in [int(e) for e in a.epochs.split(",")]:
        for tool in a.tools.split(","):
            config = f"{tool}-e{epochs}"
            if tool == "trl" and trl_missing:
                results.append(common.not_run(config, trl_missing, tool=tool, epochs=epochs))
                continue
            args = ["--one", tool, str(epochs), "--steps", str(a.steps), "--work", str(WORK),
                    "--threads", "auto" if THREADS is None else str(THREADS)] + (["--smoke"] if a.smoke else [])
            results.append(common.run(__file__, args, config, lambda t=tool, e=epochs: one(t, e, a.steps), a.smoke))
            r = results[-1]
            r.update(tool=tool, epochs=epochs)
            print(f"done: {config}: " + (f"{r['s_per_step']:.1f} s/step" if r["status"] == "ran" else r["status"]),
                  flush=True)
    if a.smoke:
        shutil.rmtree(WORK, ignore_errors=True)
    for r in results:
        trl = next((x for x in results if x["tool"] == "trl" and x["epochs"] == r["epochs"] and x["status"] == "ran"), None)
        if trl and r["tool"] != "trl" and r["status"] == "ran":
            r["time_vs_trl"] = r["s_per_step"] / trl["s_per_step"]
            r["rss_vs_trl"] = r["peak_rss_gib"] / trl["peak_rss_gib"]
    common.print_table(
        f"PPO step: {common.model_label(a.smoke)}, {N_PROMPTS} prompts, {NEW_TOKENS} new tokens, minibatch {MINIBATCH}, "
        f"threads {record['threads']}",
        [("config", ""), ("s/step (median)", "{s_per_step:.1f}"), ("gen s", "{gen_s:.1f}"), ("score s", "{score_s:.1f}"),
         ("train s", "{train_s:.1f}"), ("peak RSS GiB", "{peak_rss_gib:.2f}"), ("time vs TRL", "{time_vs_trl:.2f}x"),
         ("RSS vs TRL", "{rss_vs_trl:.2f}x")], results, [])
    common.write(common.out_path(a, "ppo_step"), "ppo_step", record, versions={"trl": common.version("trl")},
                 workload={"model": MODEL, "prompts": N_PROMPTS, "new_tokens": NEW_TOKENS, "minibatch": MINIBATCH,
                           "micro_accum": MICRO_ACCUM, "steps_per_run": a.steps, "warmup_steps": 1},
                 results=results)


if __name__ == "__main__":
    main()
