"""Every forward pass that scores, in one place: what PPO, the RM, evaluation, best-of-N and the
preference trainers call; stages keep only their loops.

- **Token log-probs** of a response at a sampling temperature (``response_logits``): training-time
  logits are divided by the temperature for policy and reference alike (docs/reference.md, "KL").
- **Heads on the last real token**: a reward model's score (``reward_scores``,
  ``sequence_rewards``) and a critic's per-position values (``critic_values``).
- **K-way prompt sharing** (``collate_groups(share_prefix=True)``, ``shared_prefix_rewards``):
  the K responses of a prompt read its cached keys and values; same scores and gradients as K
  full sequences, about half the tokens at K = 4. Rollouts with k samples per prompt get the
  same (``tail_hidden``): policy, reference, critic and RM run each prompt once.
- **Chunking by prompt length, order restored** (``by_query_length``, ``policy_terms``).

A rollout batch (``rollout.Samples``) is queries left-padded and responses right-padded, so every
response starts at column ``Tq``; position ids count real tokens only, so padding on either side
gives the same numbers.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preflab import distributed
from preflab.data.rankings import Encoded, encode_pair
from preflab.lm import TokenNLL, unwrap
from preflab.rl import entropy_from_logits, last_token_index, selective_log_softmax
from preflab.rollout import Samples, left_pad, position_ids

# ---------------------------------------------------------------------------------------------
# Log-probs and heads on rollout batches
# ---------------------------------------------------------------------------------------------


def tail_hidden(model: Any, samples: Samples) -> torch.Tensor:
    """(B, 1 + Tr, H): the trunk's states from the last query token through the response. Column
    t < Tr is the state from which response token t is predicted (and valued); the column of a
    row's last real token is where a reward head reads.

    Rows with the same query (the k samples of a prompt) run it once: the query minus its last
    token is a prefix whose keys and values the rows attend to (``row_hidden``), and each row is
    the last query token plus its response. Same states as the full sequences (queries are
    left-padded, so their last column is real in every row), for about 40% fewer tokens at k = 4
    with the demo's lengths. Not under gradient checkpointing, which drops the cache, nor when
    gradients flow through FSDP-sharded layers.
    """
    q, qm = samples.query, samples.query_mask
    tq = q.shape[1]
    decoder = unwrap(model).get_decoder()
    if tq > 1 and len(q) > 1 and not getattr(decoder, "gradient_checkpointing", False) and bool(qm[:, -1].all()) \
            and not (torch.is_grad_enabled() and _fsdp_layers(decoder)):
        unique, group = torch.unique(torch.cat([q, qm], 1), dim=0, return_inverse=True)
        if len(unique) < len(q):
            rows = torch.cat([q[:, -1:], samples.response], 1)
            rows_mask = torch.cat([qm[:, -1:], samples.response_mask], 1)
            return row_hidden(model, rows, rows_mask, unique[:, :tq - 1], unique[:, tq:2 * tq - 1], group)
    return decoder(**samples.inputs(), use_cache=False).last_hidden_state[:, tq - 1:]


def _fsdp_layers(decoder: Any) -> bool:
    """Whether FSDP shards ``decoder``'s layers: the shared prefix runs each layer twice in one
    forward, which FSDP2 cannot take back through backward (scoring without gradients may share)."""
    layers = getattr(decoder, "layers", None)
    if not layers:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(layers[0], FSDPModule)


def response_hidden(model: Any, samples: Samples) -> torch.Tensor:
    """(B, Tr, H): the trunk's hidden state at the position *before* each response token.

    Column t is the state from which response token t is predicted (and valued).
    """
    return tail_hidden(model, samples)[:, :-1]


def response_logits(model: Any, samples: Samples, temperature: float) -> torch.Tensor:
    """(B, Tr, V) logits for the response tokens, divided by the sampling temperature.

    docs/reference.md §2.3: training-time logits are divided by T for policy and reference alike,
    or the KL rises faster than expected.
    """
    h = response_hidden(model, samples)
    logits = unwrap(model).get_output_embeddings()(h).float()
    return logits / max(temperature, 1e-7)


def scalar_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """A 1-output head (..., H) -> (...) in the head's own precision (fp32 master weights), also
    under bf16 autocast: a bf16 output keeps 8 significant bits, so rewards and values that differ
    by less than ~0.5% tie (one demo RLOO run had 124 equal-reward pairs of different responses).
    The head is one dot product per row, so fp32 costs nothing; the trunk stays in bf16."""
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def score_module(model: Any) -> nn.Module:
    """A sequence-classification model's 1-output head (``score``, or ``classifier``)."""
    base = unwrap(model)
    return getattr(base, "score", None) or getattr(base, "classifier", None)


def score_head(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Apply a sequence-classification model's 1-output head: (..., H) -> (...)."""
    return scalar_head(score_module(model), hidden)


def reward_norm(model: Any) -> tuple[float, float]:
    """(gain, bias) stored with a reward model by the RM stage; identity when absent."""
    cfg = unwrap(model).config
    return float(getattr(cfg, "preflab_reward_gain", 1.0)), float(getattr(cfg, "preflab_reward_bias", 0.0))


def reward_scores(rm: Any, samples: Samples, normalise: bool = True) -> torch.Tensor:
    """(B,) reward at the last real token, with the RM's stored gain and bias applied."""
    hidden = tail_hidden(rm, samples)
    raw = head_at_last_token(rm, hidden, torch.cat([samples.query_mask[:, -1:], samples.response_mask], 1))
    if not normalise:
        return raw
    gain, bias = reward_norm(rm)
    return gain * raw + bias


def critic_values(critic: Any, samples: Samples) -> torch.Tensor:
    """(B, Tr) value estimates V(query + response[:t]) for every response position."""
    return score_head(critic, response_hidden(critic, samples))


def by_query_length(samples: Samples, rows: list[int] | None = None) -> list[int]:
    """``rows`` (default: all) ordered by the number of real query tokens, shortest first."""
    lengths = samples.query_mask.sum(1).tolist()
    return sorted(range(len(lengths)) if rows is None else rows, key=lambda i: lengths[i])


# ---------------------------------------------------------------------------------------------
# The trainable pair of online RL: policy and critic in one module (one DDP forward per micro-batch)
# ---------------------------------------------------------------------------------------------


class ActorCritic(nn.Module):
    """Policy plus a critic: a separate scorer model (InstructGPT: initialised from the RM), a
    zero-initialised value head on the policy trunk (lm-human-preferences; one trunk pass), or
    none (``values=False``: the critic-free estimators; values are 0)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None, values: bool = True):
        super().__init__()
        self.policy = policy
        self.critic = critic if values else None
        self.value_head = None
        if values and critic is None:
            hidden = unwrap(policy).config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.ptx = TokenNLL(policy)

    def forward(self, query, query_mask, response, response_mask, temperature: float,
                ptx: dict[str, torch.Tensor] | None = None):
        """Log-probs (B, Tr) of ``response`` after ``query`` (a ``Samples``' tensors), values
        (B, Tr), token entropy (B, Tr, no grad) and the pretraining NLL sum and token count
        (zeros without ``ptx``). Rows sharing a query run it once (``response_hidden``)."""
        s = Samples(query, query_mask, response, response_mask, torch.ones(len(response), dtype=torch.bool), [])
        base = unwrap(self.policy)
        h = response_hidden(self.policy, s)
        logits = base.get_output_embeddings()(h).float() / max(temperature, 1e-7)
        logprobs = selective_log_softmax(logits, response)
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        if self.value_head is not None:
            values = scalar_head(self.value_head, h)
        elif self.critic is None:
            values = torch.zeros_like(logprobs)
        else:
            values = critic_values(self.critic, s)
        if ptx is not None:
            ptx_sum, ptx_n = self.ptx(**ptx)
        else:
            ptx_sum, ptx_n = logprobs.new_zeros(()), torch.zeros((), dtype=torch.long)
        return logprobs, values, entropy, ptx_sum, ptx_n


@torch.no_grad()
def policy_terms(samples: Samples, *, ac: ActorCritic, reference: nn.Module | None, temperature: float,
                 chunk: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, Tr) log pi_old, log pi_ref of the sampled tokens and the critic's values, in rollout order.

    Rows are scored in chunks of similar prompt length, each without its all-padding query
    columns, and put back in rollout order (scores do not depend on padding). ``reference``
    None: the policy with its LoRA adapters disabled.
    """
    device = samples.query.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    logprobs, ref_logprobs, values = [], [], []
    order = by_query_length(samples)
    for s in range(0, len(order), chunk):
        part = samples.select(order[s:s + chunk]).trim_query()
        with autocast:
            lp, v, _, _, _ = ac(**part.tensors(), temperature=temperature)
            if reference is None:
                with ac.policy.disable_adapter():
                    ref_logits = response_logits(ac.policy, part, temperature)
            else:
                ref_logits = response_logits(reference, part, temperature)
        logprobs.append(lp)
        values.append(v)
        ref_logprobs.append(selective_log_softmax(ref_logits, part.response))
    back = torch.argsort(torch.tensor(order, device=device))  # row i of the rollout is row back[i] of the chunks
    return tuple(torch.cat(x)[back] for x in (logprobs, ref_logprobs, values))


# ---------------------------------------------------------------------------------------------
# Reward-model scores of token sequences, with K-way prompt sharing
# ---------------------------------------------------------------------------------------------


def shared_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence of a group starts with (the rendered prompt, at
    least), capped so each sequence keeps one token of its own: the head reads that token."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(max(0, n)):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return max(0, n)


def padded_ranks(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Kmax) ranks of each prompt's responses (0 best) and the mask of real ones, from items
    with ``.ranks`` (``Encoded``, ``dpo_update.Ranked``)."""
    kmax = max(len(g.ranks) for g in batch)
    ranks = torch.zeros((len(batch), kmax), dtype=torch.long)
    valid = torch.zeros((len(batch), kmax), dtype=torch.bool)
    for p, g in enumerate(batch):
        ranks[p, :len(g.ranks)] = torch.tensor(g.ranks)
        valid[p, :len(g.ranks)] = True
    return ranks, valid


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
    ranks, valid = padded_ranks(batch)
    out = {"input_ids": input_ids, "attention_mask": mask, "ranks": ranks, "valid": valid}
    if batch[0].weights is not None:  # (P, M) bootstrap counts of M reward heads (not a Scorer argument)
        out["weights"] = torch.tensor([g.weights for g in batch], dtype=torch.float32)
    if share_prefix:
        out["prefix_ids"], out["prefix_mask"] = left_pad([g.ids[0][:c] for g, c in zip(batch, cut)], pad_id)
        out["group"] = torch.tensor([p for p, g in enumerate(batch) for _ in g.ids], dtype=torch.long)
    return out


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
    idx = last_token_index(attention_mask)
    return score_head(model, hidden[torch.arange(hidden.shape[0], device=hidden.device), idx])


@functools.cache
def _cache_argument(decoder_type: type) -> str:
    """transformers 5 names a decoder's cache argument ``cache``, 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder_type.forward).parameters else "past_key_values"


def row_hidden(model: nn.Module, input_ids, attention_mask, prefix_ids=None, prefix_mask=None, group=None):
    """(N, T, H) decoder states of the rows; with a prefix, the prefix runs once and each row
    attends to its cached keys and values (a ``collate_groups(share_prefix=True)`` batch's layout)."""
    decoder = unwrap(model).get_decoder()
    if prefix_ids is None:
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                       use_cache=False).last_hidden_state
    from transformers import DynamicCache

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
    return decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask)[:, -input_ids.shape[1]:],
                   use_cache=True, **{kw: cache}).last_hidden_state


def shared_prefix_rewards(model: nn.Module, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                          group: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) raw scores of prefix[group[i]] + row i, each prefix run once: its keys and values are
    cached, gathered per row, and the rows attend to them. The same scores and gradients as
    ``sequence_rewards`` on the concatenations (prompt tokens never attend to responses), for
    about half the tokens when K = 4 responses share a prompt. Not under gradient checkpointing,
    which drops the cache."""
    hidden = row_hidden(model, input_ids, attention_mask, prefix_ids, prefix_mask, group)
    return head_at_last_token(model, hidden, attention_mask)


def scorer_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The arguments of ``Scorer`` in a ``collate_groups`` batch."""
    return {k: v for k, v in batch.items() if k not in ("ranks", "valid", "weights")}


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
    """Raw scores of token sequences, batched by length; ``shard``: each rank scores its slice, all get all.
    A sharded (FSDP) model: inside ``distributed.gathered``, with ``shard``."""
    device = next(model.parameters()).device
    d = distributed.current() if shard else distributed.Dist()
    rank, world = d.rank, d.world_size
    mine = list(range(rank, len(seqs), world))
    mine.sort(key=lambda i: len(seqs[i]))
    was_training = model.training
    model.eval()
    out: dict[int, float] = {}
    chunks = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
    for chunk, counted in distributed.even_batches(chunks, [0], shard and distributed.is_sharded(model)):
        batch = collate_groups([Encoded([seqs[i] for i in chunk], [0] * len(chunk))], pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            r = sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        if counted:
            out.update(zip(chunk, r.float().cpu().tolist()))
    model.train(was_training)
    merged: dict[int, float] = {}
    for part in distributed.all_gather_object(out) if shard else [out]:
        merged.update(part)
    return [merged[i] for i in range(len(seqs))]


def score_texts(model: nn.Module, tokenizer, prompts: list, responses: list[str], *, max_length: int = 384,
                batch_size: int = 16, bf16: bool = False, normalise: bool = False) -> list[float]:
    """Scores of (prompt, response) pairs; ``normalise`` applies the stored gain and bias."""
    seqs = [encode_pair(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    raw = score_ids(model, seqs, tokenizer.pad_token_id, batch_size=batch_size, bf16=bf16)
    if not normalise:
        return raw
    gain, bias = reward_norm(model)
    return (torch.tensor(raw, dtype=torch.float64) * gain + bias).tolist()  # (N,), or (N, M) of M heads


def ensemble_text_scores(members: list[str], prompts: list, responses: list[str], *, max_length: int = 384,
                         batch_size: int = 16, bf16: bool = False) -> list[list[float]]:
    """(M, N) normalised scores (``score_texts(normalise=True)``) of (prompt, response) pairs by each
    reward model of ``members``, loaded one at a time, a model with several heads (``rm.train.heads``)
    giving a row per head; ``rl.stats.ensemble_spread`` turns them into each pair's mean and uncertainty."""
    from preflab import models
    from preflab.reward_heads import head_mode

    out = []
    for spec in members:
        rm = models.load_reward_model(spec, dtype="bf16" if bf16 else "fp32").eval()
        with head_mode(rm, "members") as heads:
            scores = score_texts(rm, models.load_tokenizer(spec), prompts, responses, max_length=max_length,
                                 batch_size=batch_size, bf16=bf16, normalise=True)
        out.extend([list(row) for row in zip(*scores)] if heads > 1 else [scores])
        del rm
    return out


def add_ensemble_uncertainty(rows: list[dict[str, Any]], members: list[str], **kw: Any) -> None:
    """Each sample row (``prompt``, ``response``; an evaluation's samples.jsonl) gets each member's
    normalised reward (``rm_ensemble_scores``), their mean (``rm_ensemble_mean``) and their std, the
    ensemble's uncertainty (``rm_ensemble_std``). ``kw``: ``ensemble_text_scores``' settings."""
    from preflab.rl.stats import ensemble_spread

    scores = ensemble_text_scores(members, [r["prompt"] for r in rows], [r["response"] for r in rows], **kw)
    mean, std = ensemble_spread(scores)
    for j, r in enumerate(rows):
        r.update(rm_ensemble_scores=[float(m[j]) for m in scores], rm_ensemble_mean=float(mean[j]),
                 rm_ensemble_std=float(std[j]))


def run_reward_ensemble(run: str | Path) -> list[str]:
    """The reward models of a pipeline run trained with ``rm_ensemble`` >= 2: RUN/rm/model, RUN/rm-2/model,
    ... as far as they exist, or RUN/rm/model alone where it has several heads (``rm.train.heads``);
    [] when the run has a single one-head RM (or ``run`` is no run directory)."""
    from preflab.models import saved_heads

    found = []
    for name in itertools.chain(["rm"], (f"rm-{i}" for i in itertools.count(2))):
        model = Path(run) / name / "model"
        if not (model / "config.json").is_file():
            break
        found.append(str(model))
    return found if len(found) > 1 or (found and saved_heads(found[0]) > 1) else []


def score_groups(model, encoded: list[Encoded], pad_id: int, *, batch_size: int, bf16: bool,
                 shard: bool = False) -> list[list[float]]:
    flat = score_ids(model, [ids for e in encoded for ids in e.ids], pad_id, batch_size=batch_size,
                     bf16=bf16, shard=shard)
    out, i = [], 0
    for e in encoded:
        out.append(flat[i:i + len(e.ids)])
        i += len(e.ids)
    return out

