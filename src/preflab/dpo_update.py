"""The preference trainers' pieces below the recipe (``stages/dpo.py`` holds the recipe): a
prompt's K encoded responses (``Ranked``) and their collation with a shared prompt, summed response
log-probs with the prompt run once, the reference log-probs computed once and cached in the run
directory, the KL to the reference on fresh samples, the loss of a batch and its running sums.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from preflab import distributed, models
from preflab.config import DPOConfig
from preflab.data.chat import IGNORE, Example, render_prompt
from preflab.data.jsonl import atomic_write_text
from preflab.data.rankings import Group, encode_pair
from preflab.lm import unwrap
from preflab.rl import selective_log_softmax
from preflab.rl.preference import REFERENCE_FREE, PreferenceParts, preference_loss
from preflab.rl.ranking import pad_rewards
from preflab.rollout import HFGenerator, left_pad
from preflab.run import RunDir
from preflab.scoring import padded_ranks, response_logits, row_hidden, shared_prefix

REFERENCE_CACHE = "reference_logps.json"

# ---------------------------------------------------------------------------------------------
# Data: a prompt's K responses with where each response starts
# ---------------------------------------------------------------------------------------------


@dataclass
class Ranked:
    """One prompt's K encoded responses: ``ids[i]`` = prompt + response + EOS (``encode_pair``),
    ``prompt_len[i]`` its prompt tokens, ``ranks[i]`` its tier (0 best). ``ref[i]``: the
    reference's summed log-prob of response i, once computed. ``targets[i]``, where set, marks the
    tokens that count instead of everything after the prompt (a demonstration's assistant turns).
    ``demo``: the demonstration paired with this ranking for the SFT-loss term (``dpo.ptx_coef``)."""

    ids: list[list[int]]
    prompt_len: list[int]
    ranks: list[int]
    ref: list[float] = field(default_factory=list)
    targets: list[list[bool]] | None = None
    demo: Ranked | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(s) - p for s, p in zip(self.ids, self.prompt_len)]


def encode_ranked(tokenizer, groups: list[Group], max_length: int) -> list[Ranked]:
    """``encode_pair`` for every response, plus the prompt length each sequence kept (a prompt
    longer than its share of ``max_length`` keeps its tail, as in ``encode_pair``)."""
    out = []
    for g in groups:
        p = len(tokenizer(render_prompt(tokenizer, g.prompt), add_special_tokens=False)["input_ids"])
        ids, plen = [], []
        for r in g.responses:
            seq = encode_pair(tokenizer, g.prompt, r, max_length)
            n_resp = len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1
            if p + n_resp > max_length:
                n_resp = min(n_resp, max_length - min(p, max_length // 2))
            ids.append(seq)
            plen.append(len(seq) - n_resp)
        out.append(Ranked(ids, plen, list(g.ranks)))
    return out


def encode_demos(rows: list[Example]) -> list[Ranked]:
    """Tokenized demonstrations (``data.chat.read_lm_rows``) as one-response ``Ranked``: the tokens
    with a label are the ones that count (every assistant turn; every token but the first of a
    ``{text}`` row)."""
    out = []
    for e in rows:
        targets = [label != IGNORE for label in e.labels]
        targets[0] = False  # nothing predicts the first token
        out.append(Ranked([list(e.input_ids)], [targets.index(True)], [0], targets=[targets]))
    return out


def pair_demos(examples: list[Ranked], demos: list[Ranked], seed: int) -> None:
    """Give each training ranking its demonstration: a seeded permutation of ``demos``, cycled when
    there are fewer demonstrations than rankings. The same on every rank and on resume."""
    order = torch.randperm(len(demos), generator=torch.Generator().manual_seed(seed)).tolist()
    for i, e in enumerate(examples):
        e.demo = demos[order[i % len(order)]]


def collate_ranked(batch: list[Ranked], pad_id: int, share_prefix: bool = False,
                   demos: bool = False) -> dict[str, torch.Tensor]:
    """Prompts of any K -> rows (sum K, T) right-padded, ``response_mask`` (sum K, T) on response
    tokens, ``lengths`` (sum K,), ``ref`` (sum K,) when cached, and (P, Kmax) ranks and validity.

    ``share_prefix``: each prompt's common prefix, cut one token short of its shortest prompt (so
    every response token is predicted from inside its row), becomes one left-padded row of
    ``prefix_ids`` (P, Tp); ``group`` (sum K,) maps a row to its prefix (as ``scoring.collate_groups``).

    ``demos``: each ranking's paired demonstration follows the rankings' rows as one more row (its
    own prefix), so one forward pass scores both; ``demo_tokens`` (P,) counts each one's targets.
    ``ranks``, ``valid``, ``lengths`` and ``ref`` describe the rankings alone.
    """
    groups = batch + [g.demo for g in batch] if demos else batch
    cut = [min(shared_prefix(g.ids), min(g.prompt_len) - 1) if share_prefix else 0 for g in groups]
    cut = [max(0, c) for c in cut]
    rows = [(ids[c:], p - c, g.targets[i][c:] if g.targets else None)
            for g, c in zip(groups, cut) for i, (ids, p) in enumerate(zip(g.ids, g.prompt_len))]
    width = max(len(r) for r, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, start, targets) in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        if targets is None:
            resp[i, start:len(r)] = True
        else:
            resp[i, :len(r)] = torch.tensor(targets)
    ranks, valid = padded_ranks(batch)
    out = {"input_ids": input_ids, "attention_mask": mask, "response_mask": resp, "ranks": ranks, "valid": valid,
           "lengths": torch.tensor([n for g in batch for n in g.lengths], dtype=torch.long)}
    if all(g.ref for g in batch):
        out["ref"] = torch.tensor([x for g in batch for x in g.ref], dtype=torch.float64)
    if demos:
        out["demo_tokens"] = torch.tensor([sum(g.demo.targets[0]) for g in batch], dtype=torch.long)
    if share_prefix:
        out["prefix_ids"], out["prefix_mask"] = left_pad([g.ids[0][:c] for g, c in zip(groups, cut)], pad_id)
        out["group"] = torch.tensor([p for p, g in enumerate(groups) for _ in g.ids], dtype=torch.long)
    return out


MODEL_KEYS = ("input_ids", "attention_mask", "response_mask", "prefix_ids", "prefix_mask", "group")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k in MODEL_KEYS}


# ---------------------------------------------------------------------------------------------
# Summed response log-probs, a shared prompt run once
# ---------------------------------------------------------------------------------------------




class SequenceLogps(nn.Module):
    """``forward(input_ids, attention_mask, response_mask[, prefix_ids, prefix_mask, group]) -> (N,)``
    summed log-probs (fp32) of each row's response tokens. The output layer runs only at the
    positions that predict a response token. DDP wraps this module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, response_mask, prefix_ids=None, prefix_mask=None, group=None):
        hidden = row_hidden(self.model, input_ids, attention_mask, prefix_ids, prefix_mask, group)
        keep = response_mask[:, 1:]
        logits = unwrap(self.model).get_output_embeddings()(hidden[:, :-1][keep]).float()
        logp = -F.cross_entropy(logits, input_ids[:, 1:][keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        return logp.new_zeros(input_ids.shape[0]).index_add(0, rows, logp)


@torch.no_grad()
def sequence_logps(model: nn.Module, examples: list[Ranked], pad_id: int, *, batch_prompts: int, bf16: bool,
                   share: bool, shard: bool = True) -> list[list[float]]:
    """Summed response log-probs of every response of ``examples`` (``shard``: each rank does its
    slice, every rank gets all)."""
    device = next(model.parameters()).device
    d = distributed.current() if shard else distributed.Dist()
    mine = list(range(d.rank, len(examples), d.world_size))
    was_training = model.training
    model.eval()
    fn = SequenceLogps(model)
    out: dict[int, list[float]] = {}
    for s in range(0, len(mine), batch_prompts):
        chunk = mine[s:s + batch_prompts]
        batch = collate_ranked([examples[i] for i in chunk], pad_id, share_prefix=share)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            flat = fn(**model_inputs(batch, device)).double().cpu().tolist()
        at = 0
        for i in chunk:
            k = len(examples[i].ids)
            out[i] = flat[at:at + k]
            at += k
    model.train(was_training)
    merged: dict[int, list[float]] = {}
    for part in distributed.all_gather_object(out) if shard else [out]:
        merged.update(part)
    return [merged[i] for i in range(len(examples))]


# ---------------------------------------------------------------------------------------------
# The reference: log-probs computed once, cached in the run directory
# ---------------------------------------------------------------------------------------------


def reference_fingerprint(cfg: DPOConfig, sets: dict[str, list[Ranked]]) -> str:
    """What the cached reference log-probs depend on: the reference, precision and every token."""
    h = hashlib.sha256(json.dumps({"policy": cfg.model.path, "reference": cfg.model.reference,
                                   "lora": cfg.model.lora.enabled, "dtype": cfg.model.dtype,
                                   "bf16": cfg.train.bf16}).encode())
    for name, exs in sets.items():
        h.update(name.encode())
        for e in exs:
            h.update(json.dumps([e.ids, e.prompt_len]).encode())
    return h.hexdigest()


def compute_reference_logps(policy: nn.Module, cfg: DPOConfig, sets: dict[str, list[Ranked]], pad_id: int,
                            share: bool) -> dict[str, list[list[float]]]:
    """The reference's summed log-probs of every response: ``model.reference`` when set, else the
    policy as loaded (the initial policy; with LoRA, its adapters disabled)."""
    kw = dict(batch_prompts=cfg.train.batch_prompts, bf16=cfg.train.bf16, share=share)
    if cfg.model.reference:
        ref = models.load_policy(cfg.model.reference, dtype=cfg.model.dtype, device=cfg.model.device)
        return {name: sequence_logps(ref, exs, pad_id, **kw) for name, exs in sets.items()}
    ctx = policy.disable_adapter() if cfg.model.lora.enabled else contextlib.nullcontext()
    with ctx:
        return {name: sequence_logps(policy, exs, pad_id, **kw) for name, exs in sets.items()}


def reference_logps(run: RunDir, policy: nn.Module, cfg: DPOConfig, sets: dict[str, list[Ranked]], pad_id: int,
                    share: bool) -> bool:
    """Fill each example's ``ref`` from ``RUN/reference_logps.json``, computing and writing it first
    when it is missing or was made for other data or another reference. Returns whether it computed."""
    path = Path(cfg.run.out) / REFERENCE_CACHE
    fp = reference_fingerprint(cfg, sets)
    cached = None
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("fingerprint") != fp:
            run.log(f"dpo: {path.name} was computed for other data or another reference; recomputing")
            cached = None
    computed = cached is None
    if computed:
        cached = {"fingerprint": fp, "logps": compute_reference_logps(policy, cfg, sets, pad_id, share)}
        if distributed.current().is_main:
            atomic_write_text(path, json.dumps(cached))
        distributed.barrier()
    for name, exs in sets.items():
        for e, ref in zip(exs, cached["logps"][name]):
            e.ref = list(ref)
    return computed


class Reference:
    """The reference model for KL on fresh samples: the policy with adapters disabled (LoRA), a
    frozen copy loaded on first use (initial policy or ``model.reference``)."""

    def __init__(self, policy: nn.Module, cfg: DPOConfig):
        self.policy, self.cfg = policy, cfg
        self.model: nn.Module | None = None

    def logits(self, samples, temperature: float) -> torch.Tensor:
        if self.cfg.model.lora.enabled and not self.cfg.model.reference:
            with self.policy.disable_adapter():
                return response_logits(self.policy, samples, temperature)
        if self.model is None:
            spec = self.cfg.model.reference or self.cfg.model.path
            dtype = "bf16" if self.cfg.train.bf16 else self.cfg.model.dtype
            self.model = models.load_policy(spec, dtype=dtype, device=self.cfg.model.device).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        return response_logits(self.model, samples, temperature)


@torch.no_grad()
def sampled_kl(policy: nn.Module, reference: Reference, tokenizer, prompts: list, *, max_new_tokens: int,
               batch_size: int, bf16: bool, seed: int) -> tuple[float, int]:
    """KL(policy || reference) in nats per response, estimated on one T = 1 sample per prompt
    (k1: the mean over samples of sum_t log pi - log pi_ref, unbiased). Each rank samples its
    slice; returns (mean over all ranks' samples, count)."""
    from preflab.rollout import encode_prompts

    d = distributed.current()
    mine = prompts[d.rank::d.world_size]
    device = next(policy.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)
    was_training = policy.training
    policy.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100003 * d.rank)
        gen = HFGenerator(policy, tokenizer, bf16=bf16)
        for s in range(0, len(mine), batch_size):
            ids = encode_prompts(tokenizer, mine[s:s + batch_size])
            samples = gen.generate(ids, max_new_tokens=max_new_tokens, temperature=1.0).trim_query()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                lp = selective_log_softmax(response_logits(policy, samples, 1.0), samples.response)
                ref = selective_log_softmax(reference.logits(samples, 1.0), samples.response)
            m = samples.response_mask.bool()
            per = torch.where(m, lp - ref, torch.zeros_like(lp)).sum(1)
            total += torch.tensor([float(per.sum()), len(per)], dtype=torch.float64)
    policy.train(was_training)
    total = distributed.all_reduce_sum(total)
    return (float(total[0] / total[1]) if total[1] else float("nan")), int(total[1])


# ---------------------------------------------------------------------------------------------
# A batch's loss and its sums
# ---------------------------------------------------------------------------------------------


class PreferenceSums(NamedTuple):
    """Sums of a step's (or a held-out pass's) preference statistics: the loss summed over prompts,
    then prompts, pairs and pairs ranked right, the implicit rewards and summed log-probs of
    the winners and losers summed over pairs, and the paired demonstrations' per-token NLL summed
    over prompts (``loop.reduce_sums`` adds them over batches and ranks)."""

    loss: float
    prompts: float
    pairs: float
    correct: float
    chosen: float
    rejected: float
    logps_chosen: float
    logps_rejected: float
    ptx_nll: float = 0.0

    @classmethod
    def of(cls, parts: PreferenceParts, ptx_nll: float = 0.0) -> PreferenceSums:
        return cls(float(parts.total.detach()), parts.n_prompts, parts.n_pairs, parts.n_correct, parts.chosen_reward,
                   parts.rejected_reward, parts.chosen_logps, parts.rejected_logps, ptx_nll)

    def named(self, prefix: str) -> dict[str, float]:
        """Per prompt (the loss, the demonstrations' NLL) and per pair (the rest), as ``PREFIX/...`` metrics."""
        pairs = max(1.0, self.pairs)
        ptx = {f"{prefix}/ptx_nll": self.ptx_nll / max(1.0, self.prompts)} if self.ptx_nll else {}  # TRAIN_PTX_NLL
        return {**ptx, f"{prefix}/loss": self.loss / max(1.0, self.prompts),
                f"{prefix}/rewards/chosen": self.chosen / pairs, f"{prefix}/rewards/rejected": self.rejected / pairs,
                f"{prefix}/rewards/margin": (self.chosen - self.rejected) / pairs,
                f"{prefix}/rewards/accuracy": self.correct / pairs,
                f"{prefix}/logps/chosen": self.logps_chosen / pairs,
                f"{prefix}/logps/rejected": self.logps_rejected / pairs}

    def metrics(self, prompts: int, step_s: float) -> dict[str, float]:
        return {**self.named("train"), "train/prompts": prompts}


def batch_loss(flat: torch.Tensor, batch: dict[str, torch.Tensor], cfg: DPOConfig) -> PreferenceParts:
    """``rl.preference.preference_loss`` of a ``collate_ranked`` batch from its policy log-probs
    (the rankings' rows; the paired demonstrations' rows after them, where the batch has them,
    are ``demo_nll``'s)."""
    valid = batch["valid"].to(flat.device)
    n = int(valid.sum())
    ref = pad_rewards(batch["ref"].to(flat.device, torch.float32), valid) if cfg.dpo.loss not in REFERENCE_FREE else None
    return preference_loss(pad_rewards(flat[:n].float(), valid), ref,
                           pad_rewards(batch["lengths"].to(flat.device, torch.float32), valid),
                           batch["ranks"].to(flat.device), valid, loss=cfg.dpo.loss, beta=cfg.dpo.resolved_beta(),
                           label_smoothing=cfg.dpo.label_smoothing, simpo_gamma=cfg.dpo.simpo_gamma,
                           nll_coef=cfg.dpo.nll_coef)


def demo_nll(flat: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The paired demonstrations' per-token NLL, summed over the batch's prompts (one each; 0 when
    the batch has none): the SFT-loss term that ``dpo.ptx_coef`` weighs."""
    if "demo_tokens" not in batch:
        return flat.new_zeros((), dtype=torch.float32)
    n = int(batch["valid"].sum())
    return -(flat[n:].float() / batch["demo_tokens"].to(flat.device).clamp(min=1)).sum()
