"""Rejection-sampling fine-tuning (Llama 2's RS; ReST/RAFT): each round, n samples per prompt
from the current policy, the reward model keeps the best (optionally only above a threshold,
only ones that ended), and the policy is fine-tuned on those picks with the SFT stage.

Read ``train`` top to bottom: 0. set-up, 1. prompts and the reward model, 2. the rounds
(sample and pick with ``evals.best_of_n``, then the SFT stage on the picks, through the registry), 3. the last
round's model becomes ``RUN/model``. A round's files: ``RUN/roundR/samples.jsonl`` (every
candidate with its reward), ``picks.jsonl`` (the SFT data) and ``sft/`` (an SFT run directory).
``--resume`` keeps finished rounds and written picks (never resamples them) and resumes the SFT
run of the current round from its checkpoint. Under ``torchrun`` every rank samples its share
of the prompts, rank 0 writes the picks, and the SFT runs on all ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from preflab import distributed, models
from preflab.config import RSConfig, SFTConfig, dump_config
from preflab.data.chat import read_prompts
from preflab.data.jsonl import atomic_dir, atomic_write_text, read_jsonl, write_jsonl
from preflab.errors import DataError
from preflab.evals.best_of_n import best_of_n
from preflab.registry import run_stage
from preflab.run import RunDir, read_manifest, seed_everything


def round_sft_config(cfg: RSConfig, policy: str, picks: Path, out: Path) -> SFTConfig:
    """The SFT config of one round: the policy so far, trained on the round's picks."""
    t = cfg.train
    return SFTConfig.model_validate({
        "model": {**cfg.models.policy.model_dump(), "path": policy},
        "data": {"train": str(picks), "val_fraction": 0, "max_length": t.max_length},
        "optim": cfg.optim.model_dump(),
        "train": {"epochs": t.epochs, "max_steps": t.max_steps, "batch_size": t.batch_size,
                  "grad_accum": t.grad_accum, "bf16": t.bf16, "gradient_checkpointing": t.gradient_checkpointing},
        "run": {**cfg.run.model_dump(), "out": str(out)},
    })


def sample_and_pick(cfg: RSConfig, policy_spec: str, rm: Any, tokenizer: Any, rows: list[dict[str, Any]],
                    round_no: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every candidate row, the picks) of one round; each rank samples its share, all get all."""
    s = cfg.sampling
    d = distributed.current()
    policy = models.load_policy(policy_spec, dtype="bf16" if s.bf16 else cfg.models.policy.dtype,
                                device=cfg.models.policy.device).eval()
    mine = list(range(d.rank, len(rows), d.world_size))
    res = best_of_n(policy, rm, tokenizer, [rows[i]["prompt"] for i in mine], n=s.n, max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature, top_p=s.top_p, batch_prompts=s.batch_prompts, bf16=s.bf16,
                    require_eos=s.require_eos, max_prompt_tokens=cfg.data.max_prompt_tokens,
                    seed=cfg.run.seed + 1_000_003 * round_no + 100003 * d.rank)
    del policy
    part = []
    for k, i in enumerate(mine):
        keep = bool(res.texts[k].strip()) and (res.ended[k] or not s.require_eos) and (
            s.threshold is None or res.scores[k] >= s.threshold)
        part.append((i, {"id": rows[i].get("id", i), "prompt": rows[i]["prompt"], "candidates": res.candidates[k],
                         "rewards": res.candidate_scores[k], "ended": res.candidate_ended[k],
                         "pick": res.picks[k], "kept": keep}))
    merged = dict(kv for p in distributed.all_gather_object(part) for kv in p)
    samples = [merged[i] for i in range(len(rows))]
    picks = [{"id": r["id"], "prompt": r["prompt"], "completion": r["candidates"][r["pick"]],
              "reward": r["rewards"][r["pick"]]} for r in samples if r["kept"]]
    return samples, picks


def round_metrics(samples: list[dict[str, Any]], picks: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    rewards = [x for r in samples for x in r["rewards"]]
    best = [r["rewards"][r["pick"]] for r in samples]
    return {f"{prefix}/reward_mean": sum(rewards) / len(rewards), f"{prefix}/best_reward_mean": sum(best) / len(best),
            f"{prefix}/ended": sum(e for r in samples for e in r["ended"]) / len(rewards),
            f"{prefix}/picks": len(picks), f"{prefix}/kept": len(picks) / len(samples),
            f"{prefix}/pick_reward_mean": sum(p["reward"] for p in picks) / len(picks) if picks else float("nan")}


def finished(run_dir: Path) -> bool:
    try:
        return read_manifest(run_dir).get("status") == "finished" and (run_dir / "model" / "config.json").is_file()
    except Exception:
        return False


def train(cfg: RSConfig, resume: bool = False) -> Path:
    """Run the configured rounds; returns ``RUN/model`` (the last round's fine-tuned policy)."""
    # 0. set-up --------------------------------------------------------------------------------
    models.set_threads(cfg.models.policy.threads)
    device = models.pick_device(cfg.models.policy.device)
    dist = distributed.init(device)
    seed_everything(cfg.run.seed + 100003 * dist.rank)
    root = Path(cfg.run.out)
    run = RunDir(root, stage="rs", config=dump_config(cfg), seed=cfg.run.seed, resume=resume, writer=dist.is_main,
                 schema=RSConfig)
    s = cfg.sampling

    # 1. prompts and the reward model ------------------------------------------------------------
    rows = read_prompts(cfg.data.prompts, cfg.data.split)[:cfg.data.limit]
    if not rows:
        raise DataError(f"{cfg.data.prompts}: no prompts (split {cfg.data.split!r})")
    tokenizer = models.load_tokenizer(cfg.models.policy.path)
    rm = models.load_reward_model(cfg.models.reward_model, dtype="bf16" if s.bf16 else "fp32",
                                  device=cfg.models.policy.device).eval()
    run.log(f"rs: {len(rows)} prompts x {s.n} samples, {cfg.train.rounds} round(s)")

    # 2. rounds: sample n, keep the RM's best, fine-tune on the picks ------------------------------
    policy = cfg.models.policy.path
    final: dict[str, Any] = {}
    for r in range(1, cfg.train.rounds + 1):
        rdir, prefix = root / f"round{r}", f"round{r}"
        sft_dir, picks_path = rdir / "sft", rdir / "picks.jsonl"
        if resume and finished(sft_dir):
            run.log(f"rs: round {r} finished earlier; kept")
            policy = str(sft_dir / "model")
            continue
        if resume and picks_path.is_file() and (rdir / "samples.jsonl").is_file():
            samples, picks = read_jsonl(rdir / "samples.jsonl"), read_jsonl(picks_path)
            run.log(f"rs: round {r}: {len(picks)} picks from before; not resampled")
        else:
            samples, picks = sample_and_pick(cfg, policy, rm, tokenizer, rows, r)
            if dist.is_main:
                write_jsonl(rdir / "samples.jsonl", samples)
                write_jsonl(picks_path, picks)  # written last: its presence means the round's sampling is done
            distributed.barrier()
            metrics = round_metrics(samples, picks, prefix)
            run.log_metrics(r, metrics)
            final.update(metrics)
        need = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size
        if len(picks) < need:
            raise DataError(f"rs round {r}: {len(picks)} picks, fewer than one SFT batch ({need}); lower "
                            "sampling.threshold, raise sampling.max_new_tokens or set sampling.require_eos=false")
        sft_cfg = round_sft_config(cfg, policy, picks_path, sft_dir)
        policy = str(run_stage("sft", sft_cfg, resume=resume and (sft_dir / "metrics.jsonl").is_file()))
        run.log(f"rs: round {r} fine-tuned on {len(picks)} picks -> {policy}")

    # 3. the last round's model is the stage's output ---------------------------------------------
    out = root / "model"
    if dist.is_main:
        with atomic_dir(out) as tmp:
            for f in Path(policy).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        atomic_write_text(root / "rounds.json", json.dumps({"rounds": cfg.train.rounds, "model": str(Path(policy))}))
    distributed.barrier()
    run.finish(final_metrics=final)
    return out
