"""The GPU path of preflab, checked in one run: each training stage for a few steps, FSDP2, sampling
speed, and the vLLM back end with its weight sync.

Parts (each reports ok, failed or skipped with the reason; the script exits 1 when a part that
ran failed, 2 on a usage error):

- ``sample``: preflab's own sampling engine (``rollout.backend=hf``) on the device: tokens/s of a
  batch of prompts x k samples x new tokens (``min_new_tokens`` = ``max_new_tokens``, so every
  row decodes the full budget).
- ``sft``, ``rm``: the stages from the registry, a few steps each (step times, tokens/s).
- ``rl``: the online RL stage (RLOO, k samples per prompt) a few steps, its reward model the
  ``rm`` part's export (a random-head reward model when that part did not run).
- ``fsdp``: SFT with ``train.parallel=fsdp`` on ONE rank. ``distributed.wrap`` shards only
  inside a group of more than one rank, so ``torchrun --nproc-per-node 1`` would train unsharded;
  this part joins a one-rank process group in its own process (nccl on CUDA, gloo on CPU) and
  lets ``distributed.in_group`` count it, so ``fully_shard``, the sharded checkpoint and the
  gathered export all run. Checks: the checkpoint is sharded (``__0_0.distcp``), the export
  exists, the first step's loss equals the ``sft`` part's (same data and seed) within 0.05
  (bf16) or 1e-4 (fp32).
- ``vllm``: ``make_generator(backend="vllm")``, what ``rollout.backend=vllm`` builds. The policy's
  greedy samples from vLLM are taken, then the policy is trained in place (fused AdamW, as the
  RL stage steps) until it answers each check prompt with a fixed code phrase; vLLM's greedy
  samples after that must equal preflab's own engine's greedy samples of the updated policy,
  differ from vLLM's samples before the update on every prompt, and come after exactly one
  weight copy (none for a call with no update between); with prefix caching on (VLLMEngine's
  default), vLLM's prefix cache must be reset with that copy, since its entries hold keys and
  values computed with the old weights, keyed by token ids alone (the same prompts were sampled
  before the update). When the samples do not match, the cache is reset and the prompts sampled
  again, and whether that matches is reported. Then tokens/s on the ``sample`` part's workload.
- ``rl_vllm``: the RL stage with ``rollout.backend=vllm``, a few steps.

``vllm`` and ``rl_vllm`` are skipped with a reason where vLLM cannot run (``--device cpu``, vllm
not installed); ``--require vllm,rl_vllm`` turns such a skip into a failure. One of them that
stops with an error (not a failed check) runs once more with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
(vLLM's engine in the part's process, where the weights load into its model directly); that
second result is kept in the first one's details, and the part's status stays the first's.

On CUDA every part runs in a process of its own (``--isolate``, the default there): peak GPU
memory (``torch.cuda.max_memory_allocated``) is that part's, a CUDA error or a hang (each part
has a time limit) ends only that part, and vLLM's memory is returned before the next. The JSON
is rewritten after every part, so a run cut short keeps what finished. ``--device cpu --tiny``
runs the same parts on tiny random models in one process, in well under a minute
(tests/test_gpu_check.py).

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json          # one GPU; sized for < 10 min on an H100
    python benchmarks/gpu_check.py --parts vllm,rl_vllm --require vllm,rl_vllm
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check_tiny.json   # or --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # machine.py, also when this file is imported (tests)
if importlib.util.find_spec("preflab") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bundled and tiny models are local; GPU machines may be offline
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = HERE / "results"
STATUSES = ("ok", "failed", "skipped")
PARTS: dict[str, str] = {
    "sample": "preflab's sampling engine (rollout.backend=hf): tokens/s",
    "sft": "SFT stage, a few steps",
    "rm": "reward model stage, a few steps",
    "rl": "online RL stage (RLOO), a few steps",
    "fsdp": "SFT with train.parallel=fsdp on one rank",
    "vllm": "rollout.backend=vllm: weight sync after an update, tokens/s",
    "rl_vllm": "online RL stage with rollout.backend=vllm, a few steps",
}
VLLM_PARTS = ("vllm", "rl_vllm")
RL_STAGE = "rl"  # the online RL stage's name in preflab.registry.STAGES (`ppo` before 0.3.0)
# Seconds a part may run in its own process (--isolate) before it is stopped and reported failed.
TIMEOUT_S = {"sample": 120, "sft": 150, "rm": 150, "rl": 200, "fsdp": 150, "vllm": 300, "rl_vllm": 300}

# The weight-sync check: prompts and the code phrase the update teaches for each.
SYNC_PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three."]
SYNC_TARGETS = ["Code word: amber falcon.", "Code word: quiet harbour.", "Code word: seven lanterns.",
                "Code word: paper comet."]


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the bundled model on the device, or tiny random models on CPU."""

    model: str
    bf16: bool
    max_length: int
    sft_steps: int
    sft_batch: int
    rm_steps: int
    rm_batch: int
    rl_steps: int
    rl_prompts: int
    rl_k: int
    rl_new_tokens: int
    sample_prompts: int
    sample_k: int
    sample_new_tokens: int
    sync_lr: float
    sync_max_steps: int


FULL = Sizes(model="bundled:smollm2-135m-instruct", bf16=True, max_length=256, sft_steps=8, sft_batch=8,
             rm_steps=4, rm_batch=8, rl_steps=4, rl_prompts=4, rl_k=4, rl_new_tokens=64,
             sample_prompts=32, sample_k=4, sample_new_tokens=128, sync_lr=1e-4, sync_max_steps=80)
TINY = Sizes(model="tiny:", bf16=False, max_length=128, sft_steps=4, sft_batch=4,
             rm_steps=2, rm_batch=2, rl_steps=2, rl_prompts=4, rl_k=2, rl_new_tokens=8,
             sample_prompts=4, sample_k=2, sample_new_tokens=16, sync_lr=1e-2, sync_max_steps=150)


class Skip(Exception):
    """A part that cannot run here (the reason is the message)."""


@dataclass
class Check:
    """One run's settings, shared by its parts (a part's own process rebuilds it from the arguments)."""

    device: str
    tiny: bool
    work: Path
    sizes: Sizes
    threads: int | None = None

    def configs(self, name: str) -> Path | None:
        """configs/NAME_tiny.yaml in tiny mode (the repository's or the package's copy), else None."""
        if not self.tiny:
            return None
        for base in (ROOT / "configs", ROOT / "src" / "preflab" / "configs"):
            if (base / f"{name}_tiny.yaml").is_file():
                return base / f"{name}_tiny.yaml"
        raise FileNotFoundError(f"configs/{name}_tiny.yaml")

    def model_overrides(self, prefix: str) -> list[str]:
        out = [f"{prefix}.path={self.sizes.model}", f"{prefix}.device={self.device}"]
        return out + ([f"{prefix}.threads={self.threads}"] if self.threads else [])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def run_stage(c: Check, stage: str, part: str, overrides: list[str]) -> tuple[Path, list[dict]]:
    """Run registry stage ``stage`` into WORK/PART (a fresh directory); returns it and its metric rows."""
    from preflab import registry
    from preflab.config import load_config

    out = c.work / part
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(registry.STAGES[stage].config, c.configs(stage),
                      [*overrides, f"run.out={out}", "run.progress=false"])
    registry.run_stage(stage, cfg)
    return out, metric_rows(out)


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def step_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "perf/step_s" in r]


def after_warmup(values: list[float]) -> list[float]:
    """The values after the first (a warm-up: allocation, kernel selection, compilation)."""
    return values[1:] if len(values) > 1 else values


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def step_stats(rows: list[dict], key: str = "perf/step_s") -> dict[str, Any]:
    steps = [r[key] for r in step_rows(rows) if key in r]
    return {"median": median_or_none(after_warmup(steps)), "steps": steps}


def finite(values: list[float]) -> bool:
    return bool(values) and all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def verdict(checks: dict[str, bool]) -> tuple[str, str | None]:
    """("ok", None) when every check holds, else ("failed", the ones that did not)."""
    bad = [k for k, v in checks.items() if not v]
    return ("ok", None) if not bad else ("failed", "not met: " + ", ".join(bad))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_device(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def builtin_prompts(n: int) -> list[str]:
    """``n`` prompts from the demonstrations shipped with preflab (repeated when fewer)."""
    from preflab.data.jsonl import builtin_path, read_jsonl

    rows = [r["prompt"] for r in read_jsonl(builtin_path("builtin:examples")) if isinstance(r.get("prompt"), str)]
    return [rows[i % len(rows)] for i in range(n)]


def write_rankings(path: Path, n: int) -> Path:
    """K = 4 rankings from the demonstrations: the demo's own response first, then another
    prompt's response, its first words, and a non-answer."""
    from preflab.data.jsonl import builtin_path, read_jsonl

    demos = [r for r in read_jsonl(builtin_path("builtin:examples")) if isinstance(r.get("response"), str)]
    rows = []
    for i in range(n):
        d, other = demos[i % len(demos)], demos[(i + 7) % len(demos)]
        rows.append({"prompt": d["prompt"], "responses": [d["response"], other["response"],
                                                          " ".join(d["response"].split()[:3]), "I don't know."],
                     "order": [[0], [1], [2], [3]]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reward_model_for_rl(c: Check) -> tuple[str, str]:
    """(reward model, where it came from): the ``rm`` part's export, else a random score head."""
    from preflab import models

    exported = c.work / "rm" / "model"
    if models.is_reward_model(str(exported)):
        return str(exported), "the rm part's export"
    if c.tiny:
        return "tiny:", "tiny: (random; the rm part's export is missing)"
    target = c.work / "random_rm"
    if not models.is_reward_model(str(target)):
        import torch

        torch.manual_seed(0)
        models.save_model(models.load_scorer(c.sizes.model, device="cpu"), models.load_tokenizer(c.sizes.model),
                          target, reward_model=True)
    return str(target), "a random score head (the rm part's export is missing)"


# ---------------------------------------------------------------------------------------------
# The parts: each returns a dict (status, reason, step_s, tokens_per_s, details) or raises Skip
# ---------------------------------------------------------------------------------------------


def part_sft(c: Check, parallel: str = "ddp", part: str = "sft") -> dict[str, Any]:
    s = c.sizes
    over = [*c.model_overrides("model"), f"train.max_steps={s.sft_steps}", f"train.batch_size={s.sft_batch}",
            f"train.parallel={parallel}"]
    if not c.tiny:
        over += ["data.train=builtin:examples", f"data.max_length={s.max_length}", "data.val_fraction=0.1"]
    out, rows = run_stage(c, "sft", part, over)
    losses = [r["train/loss"] for r in step_rows(rows)]
    status, reason = verdict({f"{s.sft_steps} steps logged": len(losses) == s.sft_steps,
                              "finite losses": finite(losses),
                              "exported model": (out / "model" / "config.json").is_file()})
    tps = [r["perf/tokens_per_s"] for r in step_rows(rows) if "perf/tokens_per_s" in r]
    return {"status": status, "reason": reason, "step_s": step_stats(rows),
            "tokens_per_s": median_or_none(after_warmup(tps)),
            "details": {"losses": losses, "val_loss": next((r["val/loss"] for r in reversed(rows) if "val/loss" in r),
                                                         None)}}


def part_rm(c: Check) -> dict[str, Any]:
    s = c.sizes
    over = [*c.model_overrides("model"), f"train.max_steps={s.rm_steps}", f"train.batch_prompts={s.rm_batch}"]
    if not c.tiny:
        data = write_rankings(c.work / "rankings.jsonl", (s.rm_steps + 1) * s.rm_batch)
        over += [f"data.train={data}", "data.format=kway", f"data.val_fraction={1 / (s.rm_steps + 1):.4f}",
                 f"data.max_length={s.max_length}"]
    out, rows = run_stage(c, "rm", "rm", over)
    losses = [r["train/loss"] for r in step_rows(rows)]
    status, reason = verdict({f"{s.rm_steps} steps logged": len(losses) == s.rm_steps, "finite losses": finite(losses),
                              "exported model": (out / "model" / "config.json").is_file()})
    tps = [r["perf/tokens_per_s"] for r in step_rows(rows) if "perf/tokens_per_s" in r]
    final = rows[-1] if rows else {}
    return {"status": status, "reason": reason, "step_s": step_stats(rows),
            "tokens_per_s": median_or_none(after_warmup(tps)),
            "details": {"losses": losses, **{k: v for k, v in final.items() if k.startswith(("eval/", "rm/"))}}}


def part_rl(c: Check, backend: str = "hf", part: str = "rl") -> dict[str, Any]:
    s = c.sizes
    rm, rm_source = reward_model_for_rl(c)
    episodes = s.rl_prompts * s.rl_k
    over = [*c.model_overrides("models.policy"), f"models.reward_model={rm}", "data.prompts=builtin:prompts",
            "data.split=null", "algo.estimator=rloo", f"rollout.samples_per_prompt={s.rl_k}",
            f"rollout.batch_size={s.rl_prompts}", f"rollout.max_new_tokens={s.rl_new_tokens}",
            f"rollout.backend={backend}", f"ppo.minibatch_size={episodes // 2}", "ppo.epochs=1",
            f"train.steps={s.rl_steps}", "optim.warmup_steps=0"]
    out, rows = run_stage(c, RL_STAGE, part, over)
    steps = step_rows(rows)
    gen_tps = [r["response/length_mean"] * episodes / r["perf/gen_s"] for r in steps if r.get("perf/gen_s")]
    samples = out / "samples.jsonl"
    n_samples = len(samples.read_text().splitlines()) if samples.is_file() else 0
    status, reason = verdict({
        f"{s.rl_steps} steps logged": len(steps) == s.rl_steps,
        "finite scores and KL": finite([r[k] for r in steps for k in ("objective/score", "objective/kl")]),
        f"{s.rl_steps * episodes} samples written": n_samples == s.rl_steps * episodes,
        "exported policy": (out / "model" / "config.json").is_file()})
    return {"status": status, "reason": reason, "step_s": step_stats(rows),
            "tokens_per_s": median_or_none(after_warmup(gen_tps)),
            "details": {"backend": backend, "reward_model": rm_source, "episodes_per_step": episodes,
                        **{k.split("/")[1]: step_stats(rows, k)["median"]
                           for k in ("perf/gen_s", "perf/score_s", "perf/train_s")},
                        "score": [r["objective/score"] for r in steps], "kl": [r["objective/kl"] for r in steps],
                        "tokens_per_s_is": "sampled response tokens / generation seconds"}}


@contextlib.contextmanager
def one_rank_group(device: str) -> Iterator[None]:
    """A process group of this process alone (nccl on CUDA, gloo on CPU), which preflab's
    ``distributed.in_group`` counts as a group, so ``train.parallel=fsdp`` shards over one rank."""
    import torch
    import torch.distributed as dist

    from preflab import distributed

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    real = distributed.in_group
    distributed.in_group = lambda: dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        distributed.in_group = real
        dist.destroy_process_group()


def part_fsdp(c: Check) -> dict[str, Any]:
    with one_rank_group(c.device):
        result = part_sft(c, parallel="fsdp", part="fsdp")
    out = c.work / "fsdp"
    shards = sorted(p.relative_to(out).as_posix() for p in out.glob("checkpoints/step-*/sharded/*"))
    losses = result["details"]["losses"]
    ref = [r["train/loss"] for r in step_rows(metric_rows(c.work / "sft"))]
    tol = 0.05 if c.sizes.bf16 else 1e-4
    checks = {"sharded checkpoint (__0_0.distcp)": any(p.endswith("/__0_0.distcp") for p in shards)}
    details = {**result["details"], "checkpoint_files": shards, "first_loss_tolerance": tol}
    if ref and losses:
        details["first_loss_unsharded"] = ref[0]
        details["first_loss_diff"] = abs(losses[0] - ref[0])
        checks[f"first loss within {tol} of the sft part's"] = details["first_loss_diff"] <= tol
    else:
        details["first_loss_diff"] = None
        details["note"] = "the sft part's losses are missing: the first-step comparison was not made"
    status, reason = verdict(checks)
    if result["status"] != "ok":
        status, reason = "failed", "; ".join(x for x in (result["reason"], reason) if x)
    return {**result, "status": status, "reason": reason, "details": details}


def greedy(gen: Any, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Each prompt's greedy response: its token ids (EOS included when sampled) and its text."""
    s = gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return [r[m.bool()].tolist() for r, m in zip(s.response.cpu(), s.response_mask.cpu())], list(s.texts)


def memorise(policy: Any, tokenizer: Any, prompts: list[str], targets: list[str], *, lr: float, max_steps: int,
             device: str) -> dict[str, Any]:
    """Train ``policy`` in place (fp32, fused AdamW: parameters change without their version
    counters moving, as in the RL stage) until it answers each prompt with its target; stops when
    the mean token loss is below 0.01 or after ``max_steps``."""

    from preflab.config import RLOptim
    from preflab.data.chat import collate, tokenize_conversation
    from preflab.lm import TokenNLL
    from preflab.optim import adamw

    examples = [tokenize_conversation(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": t}],
                                      512) for p, t in zip(prompts, targets)]
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    loss_fn = TokenNLL(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adamw([{"params": params}], RLOptim(lr=lr, warmup_steps=0))
    policy.train()
    losses: list[float] = []
    for _ in range(max_steps):
        nll, n = loss_fn(**batch)
        loss = nll / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if losses[-1] < 0.01:
            break
    policy.eval()
    return {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
            "fused_adamw": bool(optimizer.defaults.get("fused"))}


def weight_sync_check(gen: Any, policy: Any, tokenizer: Any, *, lr: float, max_steps: int, device: str,
                      max_new_tokens: int = 32) -> dict[str, Any]:
    """The weight-sync check of the ``vllm`` part on a generator over a weight-following engine
    (``gen.engine.syncs`` counts the copies); tests run it with a fake engine."""
    from preflab.rollout import HFGenerator, encode_prompts

    engine = gen.engine
    llm = getattr(engine, "llm", None)
    resets = count_calls(llm, "reset_prefix_cache")
    ours = HFGenerator(policy, tokenizer, bf16=False)
    prompts = encode_prompts(tokenizer, SYNC_PROMPTS)
    before, before_texts = greedy(gen, prompts, max_new_tokens)
    ours_before, _ = greedy(ours, prompts, max_new_tokens)
    syncs_before = engine.syncs
    greedy(gen, prompts, max_new_tokens)
    syncs_unchanged, resets_before = engine.syncs, resets[0]
    update = memorise(policy, tokenizer, SYNC_PROMPTS, SYNC_TARGETS, lr=lr, max_steps=max_steps, device=device)
    after, after_texts = greedy(gen, prompts, max_new_tokens)
    syncs_after, resets_after = engine.syncs, resets[0]
    ours_after, ours_after_texts = greedy(ours, prompts, max_new_tokens)
    details: dict[str, Any] = {
        "update": update,
        "syncs": {"first_call": syncs_before, "call_without_update": syncs_unchanged, "after_update": syncs_after},
        "agree_before_update": sum(a == b for a, b in zip(before, ours_before)),
        "agree_after_update": sum(a == b for a, b in zip(after, ours_after)),
        "differ_from_before": sum(a != b for a, b in zip(after, before)),
        "prompts": len(prompts),
        "prefix_caching": prefix_caching(llm),
        "prefix_cache_resets_with_the_update": resets_after - resets_before if resets[1] else None,
        "policy_answers_target": sum(t == x for t, x in zip(SYNC_TARGETS, ours_after_texts)),
        "texts": [{"prompt": p, "before": b, "after": a, "preflab_after": o}
                  for p, b, a, o in zip(SYNC_PROMPTS, before_texts, after_texts, ours_after_texts)],
    }
    checks = {"one weight copy at the first call": syncs_before == 1,
              "no copy without an update": syncs_unchanged == syncs_before,
              "one copy after the update": syncs_after == syncs_before + 1,
              "greedy samples after the update equal preflab's engine on the updated policy": after == ours_after,
              "greedy samples after the update differ from before on every prompt":
                  details["differ_from_before"] == len(prompts)}
    if resets[1] and details["prefix_caching"] is not False:
        # The cache holds keys and values computed with the old weights, keyed by token ids only:
        # after a weight copy, a prompt that hits it samples partly from the old weights.
        checks["vLLM's prefix cache reset with the weight copy"] = resets_after > resets_before
    if after != ours_after:  # diagnose: were stale prefix-cache entries (computed with the old weights) used?
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()
            again, _ = greedy(gen, prompts, max_new_tokens)
            details["after_reset_prefix_cache_equal_preflab"] = again == ours_after
    status, reason = verdict(checks)
    return {"status": status, "reason": reason, "details": details}


def count_calls(obj: Any, method: str) -> list:
    """[calls so far, whether ``obj`` has ``method``]: ``obj.method`` is wrapped to count its calls."""
    box: list = [0, hasattr(obj, method)]
    if box[1]:
        real = getattr(obj, method)

        def counted(*args: Any, **kwargs: Any) -> Any:
            box[0] += 1
            return real(*args, **kwargs)

        setattr(obj, method, counted)
    return box


def prefix_caching(llm: Any) -> bool | None:
    """Whether the vLLM engine caches prompt prefixes (None: this version does not say where)."""
    engine = getattr(llm, "llm_engine", None)
    for cfg in (getattr(getattr(engine, "vllm_config", None), "cache_config", None), getattr(engine, "cache_config", None)):
        if cfg is not None and hasattr(cfg, "enable_prefix_caching"):
            return bool(cfg.enable_prefix_caching)
    return None


def sampling_speed(gen: Any, prompts: list[list[int]], k: int, new_tokens: int, device: str) -> dict[str, Any]:
    """Tokens/s of one call sampling ``k`` x ``new_tokens`` per prompt (temperature 1, every row
    to the full budget), after a short warm-up call."""
    import torch

    torch.manual_seed(0)
    gen.generate(prompts[:2], max_new_tokens=4, temperature=1.0, min_new_tokens=4, n=k)
    sync_device(device)
    t0 = time.perf_counter()
    s = gen.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, min_new_tokens=new_tokens, n=k)
    sync_device(device)
    seconds = time.perf_counter() - t0
    tokens = int(s.response_mask.sum())
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "prompts": len(prompts), "k": k,
            "new_tokens": new_tokens}


def part_sample(c: Check) -> dict[str, Any]:
    from preflab import models
    from preflab.rollout import encode_prompts, make_generator

    s = c.sizes
    policy = models.load_policy(s.model, device=c.device, dropout_off=True).eval()
    tokenizer = models.load_tokenizer(s.model)
    gen = make_generator(policy, tokenizer, bf16=s.bf16, backend="hf")
    speed = sampling_speed(gen, encode_prompts(tokenizer, builtin_prompts(s.sample_prompts)), s.sample_k,
                           s.sample_new_tokens, c.device)
    status, reason = verdict({"every row sampled to the budget":
                              speed["tokens"] == s.sample_prompts * s.sample_k * s.sample_new_tokens})
    return {"status": status, "reason": reason, "tokens_per_s": speed["tokens_per_s"],
            "details": {**speed, "engine": "preflab (rollout.backend=hf)", "bf16": s.bf16,
                        "fast_path": bool(getattr(getattr(gen, "engine", None), "supported", False))}}


def vllm_missing(c: Check) -> str | None:
    """Why vLLM cannot run here, or None."""
    if c.device != "cuda":
        return f"vLLM runs on CUDA only (--device {c.device})"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'preflab[vllm]')"
    return None


def part_vllm(c: Check, llm: Any = None, sampling_params: Callable[..., Any] | None = None) -> dict[str, Any]:
    from preflab import models
    from preflab.rollout import encode_prompts, make_generator

    if llm is None and (why := vllm_missing(c)):
        raise Skip(why)
    s = c.sizes
    policy = models.load_policy(s.model, device=c.device, dropout_off=True)
    tokenizer = models.load_tokenizer(s.model)
    fake = {"llm": llm, "sampling_params": sampling_params} if llm is not None else {}
    t0 = time.perf_counter()
    gen = make_generator(policy, tokenizer, bf16=True, backend="vllm", **fake)
    start_s = time.perf_counter() - t0
    result = weight_sync_check(gen, policy, tokenizer, lr=s.sync_lr, max_steps=s.sync_max_steps, device=c.device)
    speed = sampling_speed(gen, encode_prompts(tokenizer, builtin_prompts(s.sample_prompts)), s.sample_k,
                           s.sample_new_tokens, c.device)
    result["tokens_per_s"] = speed["tokens_per_s"]
    result["details"].update(engine_start_s=start_s, sampling=speed,
                             env={k: v for k, v in os.environ.items() if k.startswith("VLLM_")})
    return result


def part_rl_vllm(c: Check) -> dict[str, Any]:
    if why := vllm_missing(c):
        raise Skip(why)
    return part_rl(c, backend="vllm", part="rl_vllm")


RUNNERS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "sample": part_sample, "sft": part_sft, "rm": part_rm, "rl": part_rl, "fsdp": part_fsdp, "vllm": part_vllm,
    "rl_vllm": part_rl_vllm}


# ---------------------------------------------------------------------------------------------
# Running a part: here, or in a process of its own
# ---------------------------------------------------------------------------------------------


def gpu_peak_reset(device: str) -> None:
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def gpu_memory(device: str) -> dict[str, float | None]:
    """Peak memory torch allocated in this process, and the device's memory in use by every
    process (vLLM's engine may run in another), in MiB."""
    if device != "cuda":
        return {"peak_gpu_mib": None, "gpu_in_use_mib": None}
    import torch

    if not torch.cuda.is_available():
        return {"peak_gpu_mib": None, "gpu_in_use_mib": None}
    free, total = torch.cuda.mem_get_info()
    return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2 ** 20, "gpu_in_use_mib": (total - free) / 2 ** 20}


def run_here(name: str, c: Check) -> dict[str, Any]:
    """Run part ``name`` in this process; never raises (an exception is the part's failure)."""
    from machine import PeakRSS

    if c.threads:
        import torch

        torch.set_num_threads(c.threads)
    gpu_peak_reset(c.device)
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        try:
            result = RUNNERS[name](c)
        except Skip as e:
            result = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a part's failure is a result, not the end of the run
            result = {"status": "failed", "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                      "error": traceback.format_exc()[-4000:]}
    return finish(name, result, time.perf_counter() - t0, rss.gib * 1024, c.device)


def finish(name: str, result: dict[str, Any], seconds: float, peak_rss_mib: float | None, device: str) -> dict[str, Any]:
    base: dict[str, Any] = {"part": name, "what": PARTS[name], "status": "failed", "reason": None, "seconds": seconds,
                            "step_s": None, "tokens_per_s": None, "peak_rss_mib": peak_rss_mib,
                            **gpu_memory(device), "details": {}}
    return {**base, **result, "part": name, "seconds": seconds}


def run_isolated(name: str, c: Check, timeout: float, env: dict[str, str] | None = None,
                 tag: str | None = None) -> dict[str, Any]:
    """Run part ``name`` in a child process (this script with ``--part``, ``env`` added to its
    environment), stopped after ``timeout`` s; ``tag`` names its result and log files (default ``name``)."""
    tag = tag or name
    result_path = c.work / "results" / f"{tag}.json"
    log_path = c.work / "logs" / f"{tag}.log"
    for p in (result_path, log_path):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--work", str(c.work), "--device", c.device,
           "--model", c.sizes.model, "--result", str(result_path), *(["--tiny"] if c.tiny else []),
           *(["--threads", str(c.threads)] if c.threads else [])]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the part's leftovers (e.g. vLLM's engine process)
        proc.wait()
    seconds = time.perf_counter() - t0
    tail = log_path.read_text(errors="replace")[-4000:]
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        result["seconds"] = seconds
        return result
    why = f"stopped after {timeout:.0f} s" if code is None else f"its process exited with code {code}"
    lines = [x for x in tail.splitlines() if x.strip()]
    return finish(name, {"status": "failed", "reason": f"{why}: {lines[-1] if lines else 'no output'}", "error": tail},
                  seconds, None, "cpu")


def child(name: str, c: Check, path: Path) -> None:
    """``--part NAME --result PATH``: run one part, write its result to PATH, leave at once (no
    teardown of process groups or engines that could hang once the result is safe)."""
    result = run_here(name, c)
    from preflab.run import peak_rss_mb

    result["peak_rss_mib"] = peak_rss_mb()  # this part's process, not the parent's memory at fork
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    tmp.rename(path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "transformers": transformers.__version__, "vllm": version_of("vllm"), "preflab": version_of("preflab"),
            "peft": version_of("peft")}


def gpu_info() -> dict[str, Any] | None:
    """The GPUs as nvidia-smi lists them (this process opens no CUDA context: the parts' own
    processes hold the device), else as torch sees them."""
    import torch

    if not torch.cuda.is_available():
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        rows = [[x.strip() for x in line.split(",")] for line in out.stdout.strip().splitlines()]
        if out.returncode == 0 and rows:
            name, mem, driver, cap = rows[0]
            return {"name": name, "count": len(rows), "memory_gib": float(mem) / 1024, "driver": driver,
                    "capability": cap}
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "count": torch.cuda.device_count(), "memory_gib": p.total_memory / 2 ** 30,
            "driver": None, "capability": f"{p.major}.{p.minor}"}


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def print_table(report: dict[str, Any]) -> None:
    from machine import print_machine
    from rich.console import Console
    from rich.table import Table

    mem = "peak GPU MiB" if report["device"] == "cuda" else "peak RSS MiB"
    t = Table(title=f"preflab GPU path: {report['model']} on {report['device']}" + (" (tiny)" if report["tiny"] else ""))
    for col in ("part", "status", "wall s", "step s (median)", "tokens/s", mem, "note"):
        t.add_column(col, justify="left" if col in ("part", "status", "note") else "right")
    colour = {"ok": "green", "failed": "red", "skipped": "yellow"}
    for r in report["parts"]:
        step = (r.get("step_s") or {}).get("median")
        peak = r.get("peak_gpu_mib") if report["device"] == "cuda" else r.get("peak_rss_mib")
        note = r.get("reason") or ""
        d = r.get("details") or {}
        if r["part"] == "fsdp" and d.get("first_loss_diff") is not None and not note:
            note = f"first-step loss {d['first_loss_diff']:.2g} from unsharded"
        if r["part"] == "vllm" and "syncs" in d and not note:
            note = f"{d['agree_after_update']}/{d['prompts']} prompts equal after the update"
        t.add_row(r["part"], f"[{colour.get(r['status'], 'white')}]{r['status']}[/]", fmt(r.get("seconds"), ".1f"),
                  fmt(step, ".3f"), fmt(r.get("tokens_per_s"), ".0f"), fmt(peak, ".0f"), note)
    console = Console(width=max(120, shutil.get_terminal_size().columns))
    console.print(t)
    console.print("tokens/s: sft, rm, fsdp: tokens trained per second; rl, rl_vllm: response tokens sampled per "
                  "second of the rollout's generation; sample, vllm: tokens sampled per second (k samples per "
                  "prompt, every row to the full budget)")
    v = report["versions"]
    console.print(f"torch {v['torch']} (CUDA {v['torch_cuda']}), transformers {v['transformers']}, vllm {v['vllm']}, "
                  f"preflab {v['preflab']}")
    if report.get("gpu"):
        g = report["gpu"]
        console.print(f"GPU: {g['name']} x{g['count']}, {g['memory_gib']:.0f} GiB, driver {g.get('driver')}")
    print_machine(report["machine"])


def write(report: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out)


def selected(text: str | None, what: str) -> list[str]:
    names = [x.strip() for x in (text or "").split(",") if x.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"{what}: unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})", file=sys.stderr)
        raise SystemExit(2)
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                 epilog="Parts: " + "; ".join(f"{k}: {v}" for k, v in PARTS.items()))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny random models and small sizes (fast; CPU tests)")
    ap.add_argument("--smoke", action="store_true", help="the same as --device cpu --tiny")
    ap.add_argument("--model", default=None, help="the policy for every part (default: bundled SmolLM2-135M, or tiny:)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated, in this order (default: all)")
    ap.add_argument("--require", default="", help="parts whose skip counts as a failure, e.g. vllm,rl_vllm")
    ap.add_argument("--out", type=Path, default=None,
                    help="the JSON (default: benchmarks/results/gpu_check.json; with --tiny results/smoke/gpu_check.json)")
    ap.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary directory, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each part in its own process (default: on CUDA yes, on CPU no)")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply each isolated part's time limit")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: each stage's own choice)")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # a child process runs one part
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # ... and writes its result here
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.smoke:
        a.device, a.tiny = "cpu", True
    sizes = TINY if a.tiny else FULL
    if a.model:
        sizes = Sizes(**{**asdict(sizes), "model": a.model})
    if a.part:
        child(a.part, Check(a.device, a.tiny, a.work, sizes, a.threads), a.result or a.work / "results" / f"{a.part}.json")
    parts, required = selected(a.parts, "--parts"), set(selected(a.require, "--require"))
    out = a.out or (RESULTS / "smoke" / "gpu_check.json" if a.tiny else RESULTS / "gpu_check.json")
    work = a.work or Path(tempfile.mkdtemp(prefix="preflab-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    c = Check(a.device, a.tiny, work, sizes, a.threads)
    isolate = a.device == "cuda" if a.isolate is None else a.isolate

    import torch
    from machine import describe

    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "gpu_check", "date": dt.datetime.now().isoformat(timespec="seconds"), "smoke": a.tiny,
        "command": " ".join([Path(sys.executable).name, "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": a.device, "tiny": a.tiny, "model": sizes.model, "sizes": asdict(sizes), "isolated": isolate,
        "rl_stage": RL_STAGE, "versions": versions(), "gpu": gpu_info(), "machine": describe(),
        "parts": [], "summary": {}, "exit_code": None, "seconds": None, "work": str(work) if a.keep else None,
    }
    no_cuda = a.device == "cuda" and not torch.cuda.is_available()
    if no_cuda:
        print(f"--device cuda: torch {torch.__version__} sees no CUDA device (built with CUDA {torch.version.cuda})",
              file=sys.stderr)
    if not no_cuda:  # convert the bundled model once, before the parts read it
        with contextlib.suppress(Exception):
            from preflab import models

            models.resolve(sizes.model)
    write(report, out)  # the versions and the machine, even if the first part never ends
    for i, name in enumerate(parts):
        print(f"[{i + 1}/{len(parts)}] {name}: {PARTS[name]} ...", flush=True)
        why_not = vllm_missing(c) if name in VLLM_PARTS else None
        if no_cuda:
            r = finish(name, {"status": "failed", "reason": f"--device cuda: no CUDA device is available (torch "
                                                            f"{torch.__version__}, CUDA {torch.version.cuda})"},
                       0.0, None, "cpu")
        elif why_not:  # decided here: no process to start
            r = finish(name, {"status": "skipped", "reason": why_not}, 0.0, None, "cpu")
        elif isolate:
            r = run_isolated(name, c, TIMEOUT_S[name] * a.timeout_scale)
        else:
            r = run_here(name, c)
        if (name in VLLM_PARTS and isolate and r["status"] == "failed" and r.get("error")
                and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ):
            # It stopped with an error: once more with vLLM's engine in the part's own process (the
            # weights are then loaded into the model directly), so the report says which way works.
            print(f"    {r['reason']}\n    again with VLLM_ENABLE_V1_MULTIPROCESSING=0 ...", flush=True)
            again = run_isolated(name, c, TIMEOUT_S[name] * a.timeout_scale, tag=f"{name}-engine-in-process",
                                 env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
            r["details"] = {**(r.get("details") or {}), "again_with_engine_in_process": again}
        if name in required and r["status"] == "skipped":
            r["status"], r["reason"] = "failed", f"required, but skipped: {r['reason']}"
        print(f"    {r['status']} in {r['seconds']:.1f} s" + (f": {r['reason']}" if r.get("reason") else ""), flush=True)
        report["parts"].append(r)
        report["summary"] = {s: sum(x["status"] == s for x in report["parts"]) for s in STATUSES}
        report["seconds"] = time.perf_counter() - started
        write(report, out)  # after every part: a run cut short keeps what finished
    code = 1 if report["summary"].get("failed") else 0
    report.update(exit_code=code, seconds=time.perf_counter() - started)
    write(report, out)
    print_table(report)
    print(f"{report['summary']}; {report['seconds']:.0f} s" + (f"; wrote {out}" if out else ""))
    if not a.keep and a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
