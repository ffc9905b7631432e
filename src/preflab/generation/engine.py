"""preflab's sampling engine: a decode loop of its own over the policy's weights.

What ``model.generate`` spends per decoding step besides the matrix products, and what this
loop does instead:

- bf16 autocast re-casts every fp32 weight on every call unless the weight is a leaf that
  requires grad (frozen LoRA base weights are not): the engine takes one *weight snapshot* per
  policy version (LoRA adapters merged, q/k/v and gate/up concatenated, cast once to the
  compute dtype) and reuses it until a parameter changes (``Tensor._version``).
- The module stack (30 decoder layers of kwargs plumbing, mask builders, cache objects that
  grow by ``torch.cat``) is replaced by one function per layer over a pre-allocated KV cache
  (``[layers, rows, kv_heads, prompt + new, head_dim]``, written in place).
- Rows that emitted EOS are dropped from the batch (the cache is compacted when an eighth of
  the rows are done), so the last long row does not drag finished ones along.
- Prompts are bucketed by length: rows are sorted by prompt length and cut into micro-batches
  of at most ``max_batch`` rows, each padded to its own longest prompt.
- Prefix sharing: identical prompts (the ``n`` samples of one prompt, or repeated prompts a
  caller passes) are prefilled once; their KV entries are copied to each sample's row.

The arithmetic follows transformers' Llama code under the same dtype rules (fp32 residual
stream and norms with bf16 matmuls under bf16 autocast; everything bf16 for a bf16 model), so
greedy tokens equal ``model.generate``'s. Architectures other than Llama-style decoders
(llama, mistral without sliding window, qwen2) and LoRA variants other than plain LoRA are
``Unsupported``: ``rollout.HFGenerator`` then falls back to ``model.generate``.

This module sits below ``rollout``: it returns token ids, and ``rollout`` builds ``Samples``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import preflab.generation.sampling as sampling

SUPPORTED = ("llama", "mistral", "qwen2")


class Unsupported(Exception):
    """The model cannot run on the engine's fast path (the caller falls back to generate)."""


# ---------------------------------------------------------------------------------------------
# Weight snapshot
# ---------------------------------------------------------------------------------------------


def _base_model(model: Any) -> Any:
    """The transformers model under DDP and peft wrappers (LoRA layers stay inside it)."""
    from preflab.lm import unwrap

    return unwrap(model)


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself, or the full tensor of a parameter FSDP shards over the ranks (a DTensor: an
    all-gather, so every rank must ask for the same tensors in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def effective_linear(mod: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear, with active plain-LoRA adapters merged (peft's layers); the
    module itself is not changed. A weight FSDP shards is gathered (``whole``)."""
    if not hasattr(mod, "base_layer") or not hasattr(mod, "lora_A"):
        if not isinstance(mod, torch.nn.Linear):
            raise Unsupported(f"{type(mod).__name__} is not a Linear layer")
        return whole(mod.weight), whole(mod.bias)
    base = mod.base_layer
    w, b = effective_linear(base)
    if getattr(mod, "disable_adapters", False) or getattr(mod, "merged", False):
        return w, b  # merged: the base weight already holds the delta
    delta = None
    for name in mod.active_adapters:
        if name not in mod.lora_A:
            continue
        if name in getattr(mod, "lora_variant", {}):
            raise Unsupported(f"LoRA variant {type(mod.lora_variant[name]).__name__} (e.g. DoRA)")
        d = mod.get_delta_weight(name)
        delta = d if delta is None else delta + d
    return (w if delta is None else w + delta.to(w.dtype)), b


_optimizer_steps = 0
_hook: Any = None


def _count_step(*_: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def watch_optimizers() -> None:
    """Count every ``optimizer.step()`` in this process (a global post-step hook, registered once)."""
    global _hook
    if _hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook = register_optimizer_step_post_hook(_count_step)


def param_version(model: Any) -> tuple[int, ...]:
    """Changes whenever a parameter of ``model`` is replaced, modified in place by an op that bumps
    its version counter (``load_state_dict``, ``copy_``, foreach optimizers) or any optimizer steps:
    fused AdamW (the RL stage's) updates parameters without bumping their version counters, so
    steps are counted by a global hook. Writes through ``.data`` are not seen."""
    watch_optimizers()
    return (_optimizer_steps, *(x for p in model.parameters() for x in (id(p), p._version)))


def _can_pack(w: torch.Tensor) -> bool:
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear:
    """``F.linear`` with a fixed weight. A bf16 weight on CPU is pre-packed once into oneDNN's
    blocked layout (what inductor's weight freezing does): ``F.linear`` re-packs it on every call,
    which measured about half the time of a decode-step matmul at 32 rows on this CPU. Same
    kernel, same rounding: outputs are bitwise equal to ``F.linear``'s."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool = True):
        self.shape = tuple(weight.shape)
        self.weight: torch.Tensor | None = weight
        self.bias, self.packed = bias, None
        if pack and bias is None and _can_pack(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
            self.weight = None  # the packed copy is all a call reads: do not hold both

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, None, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    ln2: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass
class Snapshot:
    """Everything a decoding step reads, in the dtypes it computes in."""

    layers: list[Layer]
    embed: torch.Tensor  # (V, H) in the residual dtype
    norm: torch.Tensor
    lm_head: Linear  # (V, H) in the matmul dtype
    eps: float
    n_heads: int
    n_kv: int
    head_dim: int
    rotary: Any  # the model's rotary-embedding module (rope scaling included)
    resid: torch.dtype
    mm: torch.dtype
    version: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return self.embed.device


def snapshot(model: Any, bf16: bool, pack: bool = True) -> Snapshot:
    """Weights of a Llama-style causal LM for the decode loop; raises ``Unsupported`` otherwise.
    A model FSDP shards is gathered one weight at a time (each cast or concatenated before the
    next is gathered), so building the snapshot never holds a second full copy of the weights."""
    base = _base_model(model)
    cfg = base.config
    kind = getattr(cfg, "model_type", "")
    if kind not in SUPPORTED:
        raise Unsupported(f"model type {kind!r} (the engine runs {', '.join(SUPPORTED)})")
    if getattr(cfg, "sliding_window", None) and kind == "mistral":
        raise Unsupported("sliding-window attention")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {cfg.hidden_act}")
    inner = base.get_decoder()
    if not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise Unsupported("decoder without layers/rotary_emb")
    if any(hasattr(m, "lora_A") and hasattr(getattr(getattr(m, "base_layer", None), "weight", None), "full_tensor")
           for m in base.modules()):
        raise Unsupported("LoRA layers sharded by FSDP")  # before any gather: rollout.GatheredGenerator gathers a full copy
    embed = whole(inner.embed_tokens.weight.detach())
    resid = embed.dtype
    mm = torch.bfloat16 if (bf16 or resid == torch.bfloat16) else resid

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(mm)

    def cat(*ts: torch.Tensor | None) -> torch.Tensor | None:
        if all(t is None for t in ts):
            return None
        if any(t is None for t in ts):
            raise Unsupported("bias on some projections only")
        return torch.cat([t.detach() for t in ts]).to(mm)  # type: ignore[union-attr]

    layers = []
    with torch.no_grad():
        for blk in inner.layers:
            att, mlp = blk.self_attn, blk.mlp
            if any(hasattr(att, k) for k in ("q_norm", "k_norm")):
                raise Unsupported("q/k norms")
            (wq, bq), (wk, bk), (wv, bv) = (effective_linear(m) for m in (att.q_proj, att.k_proj, att.v_proj))
            wo, bo = effective_linear(att.o_proj)
            (wg, bg), (wu, bu) = effective_linear(mlp.gate_proj), effective_linear(mlp.up_proj)
            wd, bd = effective_linear(mlp.down_proj)
            if bg is not None or bu is not None or bd is not None:
                raise Unsupported("MLP biases")
            layers.append(Layer(
                ln1=whole(blk.input_layernorm.weight.detach()), qkv=Linear(cat(wq, wk, wv), cat(bq, bk, bv), pack),
                o=Linear(cast(wo), cast(bo), pack), ln2=whole(blk.post_attention_layernorm.weight.detach()),
                gate_up=Linear(cat(wg, wu), None, pack), down=Linear(cast(wd), None, pack)))
        head = base.get_output_embeddings()
        tied = getattr(head, "weight", None) is inner.embed_tokens.weight  # tied embeddings: gathered once
        head_w, head_b = (embed, whole(head.bias)) if tied and not hasattr(head, "lora_A") else effective_linear(head)
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        return Snapshot(
            layers=layers, embed=embed, norm=whole(inner.norm.weight.detach()),
            lm_head=Linear(cast(head_w), cast(head_b), pack), eps=float(inner.norm.variance_epsilon),
            n_heads=n_heads, n_kv=getattr(cfg, "num_key_value_heads", None) or n_heads, head_dim=head_dim,
            rotary=inner.rotary_emb, resid=resid, mm=mm, version=param_version(model))


# ---------------------------------------------------------------------------------------------
# The forward pass over a pre-allocated KV cache
# ---------------------------------------------------------------------------------------------


def _rms(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: statistics in fp32, result in the input dtype times the weight."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(h.dtype)


def rotary_tables(w: Snapshot, positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, D) cos and sign-folded sin from the model's own rotary module (rope scaling
    included): sin's first half negated, so ``x * cos + roll(x, D/2) * sin`` is transformers'
    ``x * cos + rotate_half(x) * sin`` with one op fewer."""
    cos, sin = w.rotary(torch.empty(0, dtype=w.resid, device=device), torch.arange(positions, device=device)[None])
    cos, sin = cos[0], sin[0]
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


@dataclass
class Cache:
    k: torch.Tensor  # (L, B, kv_heads, S, D)
    v: torch.Tensor
    key_valid: torch.Tensor  # (B, S) bool: real prompt tokens and generated tokens
    length: int = 0  # columns written

    def select(self, rows: torch.Tensor) -> Cache:
        """Only ``rows`` (compaction after EOS, expansion for prefix sharing); copies the written part."""
        L, _, H, S, D = self.k.shape
        k = self.k.new_empty((L, len(rows), H, S, D))
        v = self.v.new_empty((L, len(rows), H, S, D))
        k[:, :, :, :self.length] = self.k[:, rows, :, :self.length]
        v[:, :, :, :self.length] = self.v[:, rows, :, :self.length]
        return Cache(k, v, self.key_valid[rows], self.length)


def forward(w: Snapshot, ids: torch.Tensor, pos: torch.Tensor, cache: Cache, cos_table: torch.Tensor,
            sin_table: torch.Tensor) -> torch.Tensor:
    """Run ``ids`` (B, T) at positions ``pos`` (B, T) into cache columns ``cache.length`` ..
    ``+ T``; returns the last column's logits (B, V) in the matmul dtype (as ``generate``'s model
    call would: bf16 under autocast)."""
    B, T = ids.shape
    start, end = cache.length, cache.length + T
    H, KV, D = w.n_heads, w.n_kv, w.head_dim
    h = F.embedding(ids, w.embed)
    # (B, T, 1, D). rotate_half(x) * sin == roll(x, D/2) * sin_signed exactly (only signs move).
    cos, sin = cos_table[pos].unsqueeze(2), sin_table[pos].unsqueeze(2)
    valid = cache.key_valid[:, :end]
    if T == 1:
        mask = valid[:, None, None, :]
    else:  # causal within the new columns; a left-pad query sees itself (no all-masked row)
        q_idx = torch.arange(start, end, device=ids.device)
        k_idx = torch.arange(end, device=ids.device)
        causal = k_idx[None, :] <= q_idx[:, None]
        mask = (causal[None] & valid[:, None, :]) | (k_idx[None, None, :] == q_idx[None, :, None])
        mask = mask[:, None]
    for i, lw in enumerate(w.layers):
        x = _rms(h, lw.ln1, w.eps).to(w.mm)
        qkv = lw.qkv(x)
        qk = qkv[..., :(H + KV) * D].view(B, T, H + KV, D)  # rotary on q and k heads at once
        qk = (qk * cos + qk.roll(D // 2, -1) * sin).to(w.mm)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        cache.k[i, :, :, start:end] = k
        cache.v[i, :, :, start:end] = qkv[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2)
        if T == 1:  # one query per row: the heads of a KV group are its queries (transformers' pack_gqa)
            a = F.scaled_dot_product_attention(qk[:, 0, :H].view(B, KV, H // KV, D), cache.k[i, :, :, :end],
                                               cache.v[i, :, :, :end], attn_mask=mask, scale=D ** -0.5)
            a = a.reshape(B, T, H * D)
        else:
            a = F.scaled_dot_product_attention(q, cache.k[i, :, :, :end], cache.v[i, :, :, :end], attn_mask=mask,
                                               scale=D ** -0.5, enable_gqa=KV != H)
            a = a.transpose(1, 2).reshape(B, T, H * D)
        h = h + lw.o(a)
        x = _rms(h, lw.ln2, w.eps).to(w.mm)
        g, u = lw.gate_up(x).chunk(2, dim=-1)
        h = h + lw.down(F.silu(g) * u)
    cache.length = end
    x = _rms(h[:, -1], w.norm, w.eps).to(w.mm)
    return w.lm_head(x)


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


def per_prompt(max_new_tokens: int | list[int], n_prompts: int) -> list[int]:
    """One token budget per prompt from one budget for all or a list of them (checked)."""
    if isinstance(max_new_tokens, int):
        budgets = [max_new_tokens] * n_prompts
    else:
        budgets = [int(b) for b in max_new_tokens]
        if len(budgets) != n_prompts:
            raise ValueError(f"{len(budgets)} token budgets for {n_prompts} prompts")
    if any(b < 1 for b in budgets):
        raise ValueError(f"token budgets must be >= 1, got {min(budgets)}")
    return budgets


class Engine:
    """preflab's decode loop (see the module docstring); ``rollout.HFGenerator`` wraps it.

    ``max_batch``: rows decoded together (after expanding ``n``); ``share_prefix``: prefill each
    distinct prompt once; ``compact_fraction``: finished rows leave the batch once they are at
    least this fraction of it (0: at once).
    """

    def __init__(self, model: Any, tokenizer: Any, bf16: bool = False, *, max_batch: int = 64,
                 share_prefix: bool = True, compact_fraction: float = 0.125):
        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16
        self.max_batch, self.share_prefix, self.compact_fraction = max_batch, share_prefix, compact_fraction
        self._weights: Snapshot | None = None
        self.fallback_reason: str | None = None  # why the model cannot run here (None: it can)

    def weights(self) -> Snapshot | None:
        """The current snapshot (rebuilt after any parameter change); None: not supported."""
        if self.fallback_reason is not None:
            return None
        if self._weights is not None and self._weights.version == param_version(self.model):
            return self._weights
        self._weights = None  # free the old snapshot before building the new one
        try:
            self._weights = snapshot(self.model, self.bf16)
        except Unsupported as e:
            self.fallback_reason = str(e)
            return None
        return self._weights

    @property
    def supported(self) -> bool:
        return self.weights() is not None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], temperature: float,
                 top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0,
                 n: int = 1) -> tuple[list[list[int]], torch.Tensor]:
        """``n`` samples per prompt: (rows, tokens). ``rows[r]`` is the prompt of output row ``r``
        (prompt ``r // n``); ``tokens`` (rows, W) holds each response up to and including its EOS,
        pad after it, W the longest response. ``max_new_tokens``: one budget for all, or one per
        prompt (a row stops at its own budget). Raises ``Unsupported`` for models it cannot run."""
        w = self.weights()
        if w is None:
            raise Unsupported(self.fallback_reason)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        rows = [list(p) for p in prompts for _ in range(n)]  # output row r = prompt r // n, sample r % n
        budget = torch.tensor([b for b in per_prompt(max_new_tokens, len(prompts)) for _ in range(n)],
                              dtype=torch.long)
        seed = sampling.new_seed() if temperature > 0 else 0
        tokens = torch.full((len(rows), int(budget.max()) if len(rows) else 1), pad, dtype=torch.long)
        lengths = torch.zeros(len(rows), dtype=torch.long)
        # Buckets: rows sorted by prompt length (identical prompts adjacent), whole groups per batch.
        order = sorted(range(len(rows)), key=lambda r: (len(rows[r]), rows[r], int(budget[r])))
        groups: list[list[int]] = []
        for r in order:
            if self.share_prefix and groups and rows[groups[-1][0]] == rows[r]:
                groups[-1].append(r)
            else:
                groups.append([r])
        batch: list[list[int]] = []
        args = (tokens, lengths, seed, budget, temperature, top_k, top_p, min_new_tokens, pad, eos)
        for g in groups:
            if batch and sum(map(len, batch)) + len(g) > self.max_batch:
                self._decode(w, rows, batch, *args)
                batch = []
            batch.append(g)
        if batch:
            self._decode(w, rows, batch, *args)
        return rows, tokens[:, :max(1, int(lengths.max()))]

    def _decode(self, w: Snapshot, rows: list[list[int]], groups: list[list[int]], tokens: torch.Tensor,
                lengths: torch.Tensor, seed: int, budget: torch.Tensor, temperature: float, top_k: int, top_p: float,
                min_new: int, pad: int, eos: int) -> None:
        """Prefill the distinct prompts of ``groups`` once, expand to one row per sample, decode
        until each row's EOS or its ``budget``."""
        dev = w.device
        max_new = int(budget[[r for g in groups for r in g]].max())
        heads = [rows[g[0]] for g in groups]
        Tp = max(len(h) for h in heads)
        ids = torch.tensor([[pad] * (Tp - len(h)) + h for h in heads], dtype=torch.long)
        mask = torch.tensor([[0] * (Tp - len(h)) + [1] * len(h) for h in heads], dtype=torch.long)
        S = Tp + max_new
        pos_max = int(mask.sum(1).max()) + max_new
        cos_t, sin_t = rotary_tables(w, pos_max, dev)
        ids, mask = ids.to(dev), mask.to(dev)
        key_valid = torch.ones((len(heads), S), dtype=torch.bool, device=dev)
        key_valid[:, :Tp] = mask.bool()
        shape = (len(w.layers), len(heads), w.n_kv, S, w.head_dim)
        cache = Cache(torch.empty(shape, dtype=w.mm, device=dev), torch.empty(shape, dtype=w.mm, device=dev), key_valid)
        prompt_pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = forward(w, ids, prompt_pos, cache, cos_t, sin_t)
        n_real = mask.sum(1)
        counts = torch.tensor([len(g) for g in groups], device=dev)
        if int(counts.max()) > 1:  # prefix sharing: each sample gets a copy of its prompt's KV entries
            expand = torch.repeat_interleave(torch.arange(len(groups), device=dev), counts)
            cache, logits, n_real = cache.select(expand), logits[expand], n_real[expand]
        out_rows = torch.tensor([r for g in groups for r in g], dtype=torch.long)  # output row of each cache row
        alive = torch.ones(len(out_rows), dtype=torch.bool)
        next_pos = n_real.clone()
        for t in range(max_new):
            scores = logits.float()
            if t < min_new:
                scores[:, eos] = float("-inf")
            if temperature > 0:
                scores = sampling.process(scores, temperature=temperature, top_k=top_k, top_p=top_p)
                nxt = sampling.draw(scores, sampling.uniforms(seed, out_rows, t))
            else:
                nxt = scores.argmax(-1)
            nxt_cpu = nxt.cpu()
            tokens[out_rows[alive], t] = nxt_cpu[alive]
            lengths[out_rows[alive]] = t + 1
            alive &= (nxt_cpu != eos) & (budget[out_rows] > t + 1)
            n_alive = int(alive.sum())
            if n_alive == 0 or t == max_new - 1:
                break
            # Finished rows stop counting at once; they leave the batch (a copy of the cache) once
            # enough of them are done for the smaller batch to pay for the copy.
            if len(alive) - n_alive >= max(1, self.compact_fraction * len(alive)):
                keep = alive.nonzero()[:, 0]
                cache = cache.select(keep.to(dev))
                out_rows, nxt, next_pos = out_rows[keep], nxt[keep.to(dev)], next_pos[keep.to(dev)]
                alive = torch.ones(len(keep), dtype=torch.bool)
            logits = forward(w, nxt[:, None], next_pos[:, None], cache, cos_t, sin_t)
            next_pos = next_pos + 1
