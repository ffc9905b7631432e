"""Stage B: a scalar reward model trained on K-way rankings (InstructGPT Eq. 1).

Read top to bottom: data (rows -> ``Group``s -> token ids), the model's score at the last real
token, the loss with every prompt as one batch element, then ``train`` (evaluation: ``evals/rm_eval.py``):
0. set-up, 1. data, 2. model and optimizer, 3. the loop, 4. normalisation, 5. evaluation, 6. save.

The RM reads exactly what PPO's rollouts give it: the chat-rendered prompt, the response and
the end-of-turn (EOS) token; the score is the head output at that last real token
(RLHF_REFERENCE.md §2), padding ignored. All C(K,2) pairs of a prompt form ONE batch element,
K forward passes per prompt, tied pairs dropped (§1); by default (``train.share_prompt``) the
prompt part of those K passes runs once and the K responses read its cached keys and values.
Works on one process or under ``torchrun`` (DDP), like ``stages/sft.py``: the loss is
normalised by the step's global count of prompts, so gradient accumulation and ranks are exact;
rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from preflab import distributed, models
from preflab.cli import stage_command
from preflab.config import RMConfig, dump_config
from preflab.data.chat import read_demos, render_prompt
from preflab.data.jsonl import atomic_write_text, read_jsonl
from preflab.data.order import step_indices
from preflab.data.schema import ranks_from_order, validate_order
from preflab.errors import DataError, TrainingError
from preflab.evals.rm_eval import evaluate, print_report, report_metrics
from preflab.lm import unwrap
from preflab.optim import clip_grad, make_optimizer
from preflab.rl.ranking import batched_kway_ranking_loss, batched_plackett_luce_loss
from preflab.rollout import left_pad, position_ids, score_head
from preflab.run import Progress, RunDir, peak_rss_mb, seed_everything

# ---------------------------------------------------------------------------------------------
# Data: grouped K-way rows, TRL pairs, or the preference store -> Group
# ---------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One prompt's K ranked responses. ``ranks[i]``: tier of response i, 0 = best, equal = tied."""

    prompt: str | list[dict[str, str]]
    responses: list[str]
    ranks: list[int]
    category: str | None = None
    slice: str | None = None
    labeler: str | None = None

    def pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) index pairs; ties give none."""
        k = len(self.responses)
        return [(w, v) for w in range(k) for v in range(k) if self.ranks[w] < self.ranks[v]]


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_group(obj: Any, fmt: str | None = None) -> Group:
    """A grouped K-way row ``{prompt, responses, order, category?, slice?, labeler?}`` (also under
    ``meta``) or a TRL pair ``{prompt, chosen, rejected}`` (K = 2). ``fmt`` None: by the keys."""
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    kind = fmt or ("pairs" if "chosen" in obj else "kway")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)):
        raise ValueError("'prompt' must be a string or a list of chat messages")
    if kind == "pairs":
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], str):
                raise ValueError(f"{key!r} must be a string")
        responses, ranks = [obj["chosen"], obj["rejected"]], [0, 1]
    else:
        if "responses" not in obj and "chosen" in obj:
            raise ValueError("a pairs row, but data.format is kway")
        responses = obj["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise ValueError("'responses' must be a list of strings")
        ranks = ranks_from_order(validate_order(obj["order"], len(responses)), len(responses))
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    pick = {k: _text_or_none(obj.get(k, meta.get(k))) for k in ("category", "slice", "labeler")}
    return Group(prompt, list(responses), ranks, **pick)


def read_groups(source: str, fmt: str | None = None, split: str | None = None) -> list[Group]:
    """Every group of a JSONL file (bad row: DataError ``file:line: reason``) or of ``store:PATH``
    (the preference store's rankings of ``split``, with the prompts' category and slice)."""
    if not source.startswith("store:"):
        return read_jsonl(source, lambda obj: parse_group(obj, fmt))
    path = Path(source.removeprefix("store:"))
    if not path.is_file():  # PreferenceStore() would create an empty store
        raise DataError(f"{path}: preference store not found")
    from preflab.feedback.store import PreferenceStore

    with PreferenceStore(path) as store:
        rows = store.grouped_kway(split=split)
        prompts = {p.id: p for p in store.prompts(split=split)}
    out = []
    for row in rows:
        p = prompts.get(row["meta"].get("prompt_id"))
        out.append(Group(row["prompt"], list(row["responses"]), ranks_from_order(row["order"]),
                         category=p.category if p else None, slice=p.slice if p else None,
                         labeler=_text_or_none(row["meta"].get("labeler"))))
    return out


def split_val(groups: list[Group], fraction: float, seed: int) -> tuple[list[Group], list[Group]]:
    """Hold out ``fraction`` of the *prompts* (every labeler's ranking of a prompt goes to the same side)."""
    keys = sorted({json.dumps(g.prompt) for g in groups})
    if fraction <= 0 or len(keys) < 2:
        return groups, []
    random.Random(seed).shuffle(keys)
    val = set(keys[:max(1, int(round(len(keys) * fraction)))])
    return [g for g in groups if json.dumps(g.prompt) not in val], [g for g in groups if json.dumps(g.prompt) in val]


def encode_pair(tokenizer, prompt: str | list[dict[str, str]], response: str, max_length: int) -> list[int]:
    """Token ids of chat-rendered prompt + response + EOS: the sequence a PPO rollout gives the RM.

    Prompt and response are tokenized apart, as in rollouts (query ids, then sampled ids). Over
    ``max_length``, the response keeps its head (at most max_length - min(prompt, max_length/2)
    tokens, EOS then lost, like a cut-off sample) and the prompt keeps its tail.
    """
    p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(r) > max_length:
        r = r[:max_length - min(len(p), max_length // 2)]
        p = p[len(p) - (max_length - len(r)):]
    return p + r


@dataclass
class Encoded:
    ids: list[list[int]]  # K token sequences
    ranks: list[int]


def encode_groups(tokenizer, groups: list[Group], max_length: int) -> list[Encoded]:
    return [Encoded([encode_pair(tokenizer, g.prompt, r, max_length) for r in g.responses], list(g.ranks))
            for g in groups]


def shared_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence of a group starts with (the rendered prompt, at
    least), capped so each sequence keeps one token of its own: the head reads that token."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(max(0, n)):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return max(0, n)


def collate_groups(batch: list[Encoded], pad_id: int, share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """Prompts of any K -> rows (sum K, T) right-padded, and (P, Kmax) ranks and validity mask.

    Rows are in group order, so ``rewards (sum K,)`` scatter into (P, Kmax) with ``valid``.
    ``share_prefix``: each group's common prefix (its prompt) becomes one left-padded row of
    ``prefix_ids`` (P, Tp) and the rows hold only the K continuations; ``group`` (sum K,) maps a
    row to its prefix. ``Scorer`` then runs a prompt once, not K times, for the same scores.
    """
    cut = [shared_prefix(g.ids) if share_prefix else 0 for g in batch]
    rows = [ids[c:] for g, c in zip(batch, cut) for ids in g.ids]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    kmax = max(len(g.ids) for g in batch)
    ranks = torch.zeros((len(batch), kmax), dtype=torch.long)
    valid = torch.zeros((len(batch), kmax), dtype=torch.bool)
    for p, g in enumerate(batch):
        ranks[p, :len(g.ranks)] = torch.tensor(g.ranks)
        valid[p, :len(g.ranks)] = True
    out = {"input_ids": input_ids, "attention_mask": mask, "ranks": ranks, "valid": valid}
    if share_prefix:  # collate_groups' keys other than ranks and valid are Scorer's arguments
        out["prefix_ids"], out["prefix_mask"] = left_pad([g.ids[0][:c] for g, c in zip(batch, cut)], pad_id)
        out["group"] = torch.tensor([p for p, g in enumerate(batch) for _ in g.ids], dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------
# The score: the head at the last real token, with our own forward
# ---------------------------------------------------------------------------------------------


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,) column of the last 1 in each row (left or right padding alike)."""
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (cols + 1)).argmax(1)


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) raw scores: the trunk runs once, the 1-output head reads only the last real token.

    Position ids count real tokens (as ``generate`` does), so padding on either side gives the
    same score; with right padding they equal transformers' own, so the saved model's
    ``AutoModelForSequenceClassification`` forward (last non-pad token) returns the same scores.
    """
    hidden = unwrap(model).get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    return head_at_last_token(model, hidden, attention_mask)


def head_at_last_token(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the score head on each row's last real token of ``hidden`` (B, T, H)."""
    idx = last_real_index(attention_mask)
    return score_head(model, hidden[torch.arange(hidden.shape[0], device=hidden.device), idx])


@functools.cache
def _cache_argument(decoder_type: type) -> str:
    """transformers 5 names a decoder's cache argument ``cache``, 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder_type.forward).parameters else "past_key_values"


def shared_prefix_rewards(model: nn.Module, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                          group: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) raw scores of prefix[group[i]] + row i, each prefix run once: its keys and values are
    cached, gathered per row, and the rows attend to them. The same scores and gradients as
    ``sequence_rewards`` on the concatenations (prompt tokens never attend to responses), for
    about half the tokens when K = 4 responses share a prompt. Not under gradient checkpointing,
    which drops the cache."""
    from transformers import DynamicCache

    decoder = unwrap(model).get_decoder()
    kw = _cache_argument(type(decoder))
    try:
        cache = DynamicCache(config=unwrap(model).config)
    except TypeError:  # transformers 4.x
        cache = DynamicCache()
    if prefix_ids.shape[1]:
        decoder(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                use_cache=True, **{kw: cache})
        cache.batch_select_indices(group)
    mask = torch.cat([prefix_mask[group], attention_mask], dim=1)
    hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask)[:, -input_ids.shape[1]:],
                     use_cache=True, **{kw: cache}).last_hidden_state
    return head_at_last_token(model, hidden, attention_mask)


def scorer_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The arguments of ``Scorer`` in a ``collate_groups`` batch."""
    return {k: v for k, v in batch.items() if k not in ("ranks", "valid")}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a ``collate_groups`` batch runs through the model (a shared prompt counts once)."""
    return int(batch["attention_mask"].sum()) + (int(batch["prefix_mask"].sum()) if "prefix_mask" in batch else 0)


class Scorer(nn.Module):
    """``forward(input_ids, attention_mask[, prefix_ids, prefix_mask, group]) -> (N,)`` raw rewards
    (a batch of ``collate_groups``); DDP wraps this module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, prefix_ids=None, prefix_mask=None, group=None):
        if prefix_ids is None:
            return sequence_rewards(self.model, input_ids, attention_mask)
        return shared_prefix_rewards(self.model, prefix_ids, prefix_mask, group, input_ids, attention_mask)


@torch.no_grad()
def score_ids(model: nn.Module, seqs: list[list[int]], pad_id: int, *, batch_size: int = 16,
              bf16: bool = False, shard: bool = False) -> list[float]:
    """Raw scores of token sequences, batched by length; ``shard``: each rank scores its slice, all get all."""
    device = next(model.parameters()).device
    rank, world = _rank_world() if shard else (0, 1)
    mine = list(range(rank, len(seqs), world))
    mine.sort(key=lambda i: len(seqs[i]))
    was_training = model.training
    model.eval()
    out: dict[int, float] = {}
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        batch = collate_groups([Encoded([seqs[i] for i in chunk], [0] * len(chunk))], pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            r = sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out.update(zip(chunk, r.float().cpu().tolist()))
    model.train(was_training)
    merged: dict[int, float] = {}
    for part in distributed.all_gather_object(out) if shard else [out]:
        merged.update(part)
    return [merged[i] for i in range(len(seqs))]


def _rank_world() -> tuple[int, int]:
    import torch.distributed as tdist

    if tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def score_texts(model: nn.Module, tokenizer, prompts: list, responses: list[str], *, max_length: int = 384,
                batch_size: int = 16, bf16: bool = False, normalise: bool = False) -> list[float]:
    """Scores of (prompt, response) pairs; ``normalise`` applies the stored gain and bias."""
    seqs = [encode_pair(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    raw = score_ids(model, seqs, tokenizer.pad_token_id, batch_size=batch_size, bf16=bf16)
    if not normalise:
        return raw
    cfg = unwrap(model).config
    gain, bias = getattr(cfg, "preflab_reward_gain", 1.0), getattr(cfg, "preflab_reward_bias", 0.0)
    return [gain * s + bias for s in raw]


def score_groups(model, encoded: list[Encoded], pad_id: int, *, batch_size: int, bf16: bool,
                 shard: bool = False) -> list[list[float]]:
    flat = score_ids(model, [ids for e in encoded for ids in e.ids], pad_id, batch_size=batch_size,
                     bf16=bf16, shard=shard)
    out, i = [], 0
    for e in encoded:
        out.append(flat[i:i + len(e.ids)])
        i += len(e.ids)
    return out


# ---------------------------------------------------------------------------------------------
# The loss: a SUM over prompts, so the caller normalises by the step's global prompt count
# ---------------------------------------------------------------------------------------------


@dataclass
class LossParts:
    total: torch.Tensor  # sum over prompts of the per-prompt loss (differentiable)
    n_prompts: int  # prompts with at least one untied pair
    n_pairs: int
    n_correct: int


def pad_rewards(flat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(sum K,) rewards in group order -> (P, Kmax), zeros where ``valid`` is False (differentiable)."""
    return flat.new_zeros(valid.shape).masked_scatter(valid, flat)


def _kway_sum(rewards, ranks, valid) -> torch.Tensor:
    # InstructGPT Eq. 1: -1/C_eff sum log sigmoid(r_w - r_l) per prompt (0 for an all-tied prompt).
    return batched_kway_ranking_loss(rewards, ranks, valid).per_prompt_loss.sum()


def _plackett_luce_sum(rewards, ranks, valid) -> torch.Tensor:
    # The batched PL loss is a mean over the P prompts (RLHF_REFERENCE.md §5).
    return batched_plackett_luce_loss(rewards, ranks, valid) * rewards.shape[0]


LOSSES = {"kway": _kway_sum, "plackett_luce": _plackett_luce_sum}


def ranking_loss(flat_rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor,
                 loss: str = "kway") -> LossParts:
    """The micro-batch's summed loss and pair counts from (sum K,) rewards of a ``collate_groups`` batch."""
    rewards = pad_rewards(flat_rewards.float(), valid)
    with torch.no_grad():
        counts = batched_kway_ranking_loss(rewards.detach(), ranks, valid)
    return LossParts(LOSSES[loss](rewards, ranks, valid), int((counts.n_pairs > 0).sum()),
                     int(counts.n_pairs.sum()), int(counts.n_correct.sum()))


# ---------------------------------------------------------------------------------------------
# Normalisation after training
# ---------------------------------------------------------------------------------------------


def normalisation(demo_scores: list[float], policy_scores: list[float], *, demos_mean_zero: bool,
                  policy_gain_bias: bool) -> tuple[float, float]:
    """(gain, bias) with reward = gain * raw + bias.

    policy_gain_bias: held-out policy samples get mean 0, std 1 (lm-human-preferences
    ``set_reward_norm``, biased std). demos_mean_zero: the bias makes the demonstrations' mean 0
    (InstructGPT); with both, the gain comes from the policy samples and the bias from the demos.
    """
    gain, bias = 1.0, 0.0
    if policy_gain_bias and len(policy_scores) > 1:
        gain = 1.0 / max(float(np.std(policy_scores)), 1e-8)
        bias = -gain * float(np.mean(policy_scores))
    if demos_mean_zero and demo_scores:
        bias = -gain * float(np.mean(demo_scores))
    return gain, bias


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def train(cfg: RMConfig, resume: bool = False) -> Path:
    """Train, normalise, evaluate and save a reward model; returns the saved Hugging Face directory."""
    # 0. set-up: device, ranks, seed, run directory ---------------------------------------------
    models.set_threads(cfg.model.threads)
    device = models.pick_device(cfg.model.device)
    dist = distributed.init(device)
    seed_everything(cfg.run.seed + 100003 * dist.rank)
    run = RunDir(cfg.run.out, stage="rm", config=dump_config(cfg), seed=cfg.run.seed, resume=resume,
                 writer=dist.is_main)
    bf16, d = cfg.train.bf16, cfg.data

    # 1. data: parse every source before any training, drop all-tied rankings, tokenize once ----
    tokenizer = models.load_tokenizer(cfg.model.path)
    pad_id = tokenizer.pad_token_id
    train_g = read_groups(d.train, d.format, d.split)
    val_g = read_groups(d.val, d.format, d.val_split) if d.val else []
    if not d.val:
        train_g, val_g = split_val(train_g, d.val_fraction, cfg.run.seed)
    n_read = len(train_g)
    train_g, val_g = [g for g in train_g if g.pairs()], [g for g in val_g if g.pairs()]
    train_ex, val_ex = encode_groups(tokenizer, train_g, d.max_length), encode_groups(tokenizer, val_g, d.max_length)
    global_batch = cfg.train.batch_prompts * cfg.train.grad_accum * dist.world_size
    if len(train_ex) < global_batch:
        raise DataError(f"{d.train}: {len(train_ex)} rankings with an untied pair, fewer than one global batch "
                        f"({global_batch} = batch_prompts x grad_accum x ranks)")
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * (len(train_ex) // global_batch)))
    run.log(f"rm: {len(train_ex)} train rankings ({n_read - len(train_ex)} all-tied dropped) / "
            f"{len(val_ex)} held out, {total_steps} steps, loss {cfg.train.loss}")

    # 2. model (scalar head on the SFT trunk), optimizer, schedule; resume ----------------------
    model = models.load_scorer(cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device)
    if cfg.model.lora.enabled:
        model = models.wrap_lora(model, models.LoraOptions(**cfg.model.lora.model_dump(exclude={"enabled"})),
                                 task_type="SEQ_CLS", modules_to_save=["score"])
    if cfg.train.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable()
    share = cfg.train.share_prompt and not cfg.train.gradient_checkpointing  # checkpointing drops the cache
    model.train()  # dropout is off in the config (load_scorer); train() only matters for LoRA dropout
    scorer: nn.Module = Scorer(model)
    if dist.enabled:
        scorer = torch.nn.parallel.DistributedDataParallel(scorer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.optim, total_steps)
    start = run.resume_training(model, optimizer, scheduler) if resume else 0

    def checkpoint(step: int) -> None:
        run.save_training(step, model, optimizer, scheduler, keep=cfg.run.keep_checkpoints)

    def held_out(ex: list[Encoded], groups: list[Group]) -> dict[str, Any]:
        scores = score_groups(model, ex, pad_id, batch_size=cfg.train.batch_prompts * 4, bf16=bf16, shard=True)
        return evaluate(groups, scores, n_bins=cfg.eval.n_bins, temperature_scaling=cfg.eval.temperature_scaling,
                        worst_k=cfg.eval.worst_k, seed=cfg.run.seed)

    # 3. the loop: one global batch of prompts per optimizer step -------------------------------
    micro = cfg.train.batch_prompts
    with Progress(total_steps, "rm", enabled=cfg.run.progress and dist.is_main, start=start,
                  keys=("train/loss", "train/accuracy", "rm/accuracy")) as bar:
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            idx = step_indices(step, len(train_ex), global_batch, cfg.run.seed)
            mine = idx[dist.rank * micro * cfg.train.grad_accum:(dist.rank + 1) * micro * cfg.train.grad_accum]
            batches = [collate_groups([train_ex[i] for i in mine[j:j + micro]], pad_id, share_prefix=share)
                       for j in range(0, len(mine), micro)]
            # Normalise by the global count of prompts with an untied pair in this step: each
            # prompt is one element of Eq. 1's mean, exact under accumulation and ranks (DDP
            # averages gradients, hence the world_size factor); mirrors SFT's token count.
            n_prompts = int(distributed.all_reduce_sum(
                torch.tensor(sum(len(set(train_ex[i].ranks)) > 1 for i in mine), dtype=torch.long)))
            scale = dist.world_size / max(1, n_prompts)
            sums = torch.zeros(3, dtype=torch.float64)  # loss sum, pairs, correct pairs
            for j, batch in enumerate(batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                sync = not dist.enabled or j == len(batches) - 1
                ctx = scorer.no_sync() if not sync else contextlib.nullcontext()
                with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    flat = scorer(**scorer_inputs(batch))
                    parts = ranking_loss(flat, batch["ranks"], batch["valid"], cfg.train.loss)
                    (parts.total * scale).backward()
                sums += torch.tensor([parts.total.item(), parts.n_pairs, parts.n_correct], dtype=torch.float64)
            sums = distributed.all_reduce_sum(sums)
            loss = float(sums[0]) / max(1, n_prompts)
            if not math.isfinite(loss):
                raise TrainingError(f"non-finite loss at step {step + 1}; last good checkpoint: "
                                    f"{run.latest_checkpoint() or 'none'}")
            grad_norm = clip_grad(params, cfg.optim.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            dt = time.perf_counter() - t0
            metrics = {"train/loss": loss, "train/accuracy": float(sums[2] / max(1.0, float(sums[1]))),
                       "train/lr": lr, "train/grad_norm": grad_norm, "train/prompts": n_prompts,
                       "train/pairs": int(sums[1]), "perf/step_s": dt, "perf/pairs_per_s": float(sums[1]) / dt,
                       "perf/tokens_per_s": sum(batch_tokens(b) for b in batches) * dist.world_size / dt}
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and val_ex and done < total_steps:
                rep = held_out(val_ex, val_g)
                metrics.update({"rm/accuracy": rep["accuracy"], "rm/loss": rep["loss"]})
            if done % cfg.run.log_every == 0 or done == total_steps:
                metrics["perf/peak_rss_mb"] = peak_rss_mb()
                run.log_metrics(done, metrics)
            bar.update(metrics)
            if cfg.run.save_every and done % cfg.run.save_every == 0 and done < total_steps:
                checkpoint(done)
    checkpoint(total_steps)

    # 4. normalisation: demonstrations' mean score 0 (InstructGPT §3.5); optionally policy samples
    #    N(0, 1) (lm-human-preferences). Without demos, the top-ranked training responses stand in.
    if d.demos:
        demos = [(m[:-1], m[-1]["content"]) for m in read_demos(d.demos)]
        demo_source = d.demos
    else:
        demos = [(g.prompt, r) for g in train_g for r, k in zip(g.responses, g.ranks) if k == 0]
        demo_source = "top-ranked training responses (no data.demos)"
    demo_raw = score_ids(model, [encode_pair(tokenizer, p, r, d.max_length) for p, r in demos], pad_id,
                         batch_size=micro * 4, bf16=bf16, shard=True) if cfg.norm.demos_mean_zero else []
    pool = val_ex or train_ex  # "held-out policy samples": every response of the held-out rankings
    policy_raw = score_ids(model, [s for e in pool for s in e.ids], pad_id, batch_size=micro * 4, bf16=bf16,
                           shard=True) if cfg.norm.policy_gain_bias else []
    gain, bias = normalisation(demo_raw, policy_raw, demos_mean_zero=cfg.norm.demos_mean_zero,
                               policy_gain_bias=cfg.norm.policy_gain_bias)
    unwrap(model).config.preflab_reward_gain = gain
    unwrap(model).config.preflab_reward_bias = bias
    final: dict[str, Any] = {"rm/norm_gain": gain, "rm/norm_bias": bias}
    if demo_raw:
        final["rm/demo_score_mean"] = gain * float(np.mean(demo_raw)) + bias
    run.log(f"rm: normalisation gain {gain:.4g} bias {bias:.4g} (demos: {demo_source})")

    # 5. held-out evaluation: accuracy, calibration, worst pairs, labeler ceiling ---------------
    if val_ex:
        report = held_out(val_ex, val_g)
        report["normalisation"] = {"gain": gain, "bias": bias, "demos": demo_source}
        final.update(report_metrics(report))
        if dist.is_main:
            atomic_write_text(Path(cfg.run.out) / "eval" / "rm_eval.json", json.dumps(report, indent=2, default=str))
            if cfg.run.progress:
                print_report(report)
    run.log_metrics(total_steps, final)

    # 6. a plain Hugging Face sequence-classification checkpoint (LoRA merged) -------------------
    out = Path(cfg.run.out) / "model"
    if dist.is_main:
        models.save_model(model, tokenizer, out)
    distributed.barrier()
    run.finish(final_metrics=final)
    return out


cli = stage_command("rm", RMConfig, "preflab.stages.reward:train",
                    "Train a reward model on K-way rankings (InstructGPT Eq. 1; all pairs of a prompt in one element).")
