"""Batched generation and scoring: the policy samples, then policy, reference, critic and reward
model read the samples in one forward pass each.

Layout of a batch (``Samples``): queries left-padded to ``Tq`` and responses right-padded to
``Tr``, so every response starts at column ``Tq`` of the concatenation. Position ids come from
the attention mask (as in ``generate``), so a forward pass over the concatenation sees exactly
the positions the sampler saw.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import click
import torch

from preflab.generation.engine import per_prompt
from preflab.lm import unwrap


@dataclass
class Samples:
    """One batch of rollouts. Shapes: B rows, Tq query columns, Tr response columns."""

    query: torch.Tensor  # (B, Tq) left-padded prompt ids
    query_mask: torch.Tensor  # (B, Tq) 1 on real prompt tokens
    response: torch.Tensor  # (B, Tr) right-padded response ids (EOS included when sampled)
    response_mask: torch.Tensor  # (B, Tr) 1 on real response tokens
    ended: torch.Tensor  # (B,) bool: the response contains EOS (or the truncation token)
    texts: list[str]  # decoded responses, without the EOS token

    def inputs(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, position_ids of query + response."""
        ids = torch.cat([self.query, self.response], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """query, query_mask, response, response_mask (``ActorCritic``'s arguments)."""
        return {"query": self.query, "query_mask": self.query_mask, "response": self.response,
                "response_mask": self.response_mask}

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def select(self, idx: torch.Tensor | list[int]) -> Samples:
        idx_list = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        t = torch.as_tensor(idx_list, dtype=torch.long)
        return Samples(self.query[t], self.query_mask[t], self.response[t], self.response_mask[t],
                       self.ended[t], [self.texts[i] for i in idx_list])

    def trim_query(self) -> Samples:
        """The same rows without the query columns that are padding in every row (left padding
        sized for a longer prompt of another batch): same scores, fewer tokens."""
        real = self.query_mask.bool().any(0)
        first = int(real.float().argmax()) if bool(real.any()) else self.query.shape[1]
        if first == 0:
            return self
        return replace(self, query=self.query[:, first:], query_mask=self.query_mask[:, first:])

    def to(self, device: torch.device) -> Samples:
        return replace(self, query=self.query.to(device), query_mask=self.query_mask.to(device),
                       response=self.response.to(device), response_mask=self.response_mask.to(device),
                       ended=self.ended.to(device))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding does not shift them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def response_mask_after_stop(response: torch.Tensor, stop_id: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first ``stop_id`` at index >= ``start``; and whether one occurred.

    (B, Tr) -> ((B, Tr) long mask, (B,) bool). With ``start`` > 0 this is lm-human-preferences'
    truncation (``truncate_token`` after ``truncate_after``).
    """
    is_stop = response == stop_id
    if start:
        is_stop[:, :start] = False
    ended = is_stop.any(1)
    first = torch.where(ended, is_stop.float().argmax(1), torch.full_like(ended, response.shape[1], dtype=torch.long))
    cols = torch.arange(response.shape[1], device=response.device)
    return (cols[None, :] <= first[:, None]).long(), ended


# ---------------------------------------------------------------------------------------------
# Generation back ends
# ---------------------------------------------------------------------------------------------


class Generator(Protocol):
    """A sampling back end: HF generate now; vLLM or another engine can stand here later."""

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], temperature: float,
                 top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, n: int = 1) -> Samples:
        """``n`` samples per prompt, as contiguous rows: prompt p owns rows p*n .. p*n + n - 1.
        ``max_new_tokens``: one budget, or one per prompt (``data.chat.token_budgets``)."""
        ...


class InverseCDFSampler:
    """Samples the next token itself and hands ``generate`` a score row that is 0 at that token and
    -inf elsewhere, so greedy decoding keeps it: sampling without ``torch.multinomial``.

    ``multinomial`` draws one exponential variate per vocabulary entry (49,152 per row for
    SmolLM2), which took 23 ms of each 130 ms decoding step on this CPU; one uniform per row
    and a search in the cumulative distribution take about 1 ms and sample the same
    distribution: softmax(scores / temperature), restricted to the top ``top_k`` tokens (0:
    off) and the smallest set with probability >= ``top_p`` (1: off). Draws come from the
    global torch RNG, so ``torch.manual_seed`` makes generation repeatable. Runs after
    ``generate``'s own processors (e.g. ``min_new_tokens`` masking EOS).
    """

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError("temperature must be > 0 for sampling")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            p = sorted_logits.softmax(-1)
            drop_sorted = (p.cumsum(-1) - p) >= self.top_p  # the mass above a token already reaches top_p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        cdf = logits.softmax(-1).double().cumsum(-1)
        u = torch.rand((cdf.shape[0], 1), dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
        # First index whose cumulative mass exceeds u: a token of zero probability is never drawn.
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


class HFGenerator:
    """The default generator: preflab's sampling engine (``generation.engine.Engine``: its own
    decode loop over the model's weights, static KV cache, finished rows dropped, prompts
    bucketed by length, one prefill for the ``n`` samples of a prompt and for repeated prompts)
    on a transformers model, plain or peft-wrapped. Architectures the engine does not run fall
    back to ``HFGenerateGenerator``. ``options`` go to the engine (``max_batch``, ``share_prefix``,
    ``compact_fraction``).

    Random draws: one seed per call from the global torch RNG; the draw of output row r at step
    t depends only on (seed, r, t) (``generation.sampling``), so results do not depend on
    bucketing, batch size or prefix sharing.
    """

    def __init__(self, model: Any, tokenizer: Any, bf16: bool = False, **options: Any):
        from preflab.generation.engine import Engine

        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16
        self.engine = Engine(model, tokenizer, bf16=bf16, **options)
        self._fallback: HFGenerateGenerator | None = None

    @staticmethod
    def for_backend(backend: str, model: Any, tokenizer: Any, bf16: bool = False) -> Generator:
        """``make_generator`` under the name the RL stage imports."""
        return make_generator(model, tokenizer, bf16=bf16, backend=backend)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], temperature: float,
                 top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, n: int = 1) -> Samples:
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  min_new_tokens=min_new_tokens, n=n)
        if not self.engine.supported:
            if self._fallback is None:
                self._fallback = HFGenerateGenerator(self.model, self.tokenizer, bf16=self.bf16)
            return self._fallback.generate(prompts, **kw)
        rows, response = self.engine.generate(prompts, **kw)
        return samples_from_tokens(rows, response, self.tokenizer, device=self.engine.weights().device,
                                   budgets=per_prompt(max_new_tokens, len(prompts)), n=n)


class GatheredGenerator:
    """Sampling from a model that FSDP shards over the ranks (``train.parallel=fsdp``). preflab's
    engine builds its weight snapshot straight from the shards, gathering one weight at a time
    (``generation.engine.snapshot``), so a rank holds its shards and the snapshot, never a second
    full copy. A model the engine cannot snapshot from shards (LoRA layers, another architecture)
    is gathered whole into ``full`` (a ``distributed.FullCopy``) and sampled there (the engine with
    the adapters merged, or ``model.generate``), then dropped. Every rank
    must call ``generate`` together (the gathers are collectives); each samples its own prompts.
    Called after each update, so it samples the updated weights."""

    def __init__(self, full: Any, tokenizer: Any, bf16: bool = False):
        self.full, self.tokenizer, self.bf16 = full, tokenizer, bf16
        self.whole_copies = 0  # calls that gathered the full copy (the engine could not run the model)

    def generate(self, prompts: list[list[int]], **kw: Any) -> Samples:
        gen = HFGenerator(self.full.source, self.tokenizer, bf16=self.bf16)
        if gen.engine.supported:  # the snapshot, built from the shards on every rank alike
            return gen.generate(prompts, **kw)
        self.whole_copies += 1
        model = self.full.gather()
        try:
            return HFGenerator(model, self.tokenizer, bf16=self.bf16).generate(prompts, **kw)
        finally:
            self.full.release()


BACKENDS = ("hf", "vllm")


def make_generator(model: Any, tokenizer: Any, *, bf16: bool = False, backend: str = "hf", **options: Any) -> Generator:
    """The ``Generator`` of ``rollout.backend``: "hf" is preflab's engine over the transformers
    model (``HFGenerator``); "vllm" a vLLM engine that follows the model's weights
    (``generation.vllm.VLLMGenerator``, the ``vllm`` extra). vLLM is imported only when chosen."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, bf16=bf16, **options)
    if backend == "vllm":
        from preflab.generation.vllm import VLLMEngine

        return TokenEngineGenerator(VLLMEngine(model, tokenizer, bf16=bf16, **options), tokenizer,
                                    device=next(model.parameters()).device)
    raise ValueError(f"unknown generation backend {backend!r} (known: {', '.join(BACKENDS)})")


class TokenEngineGenerator:
    """A ``Generator`` over a token-level engine (``engine.generate(...) -> (rows, tokens)``)."""

    def __init__(self, engine: Any, tokenizer: Any, device: torch.device | str = "cpu"):
        self.engine, self.tokenizer, self.device = engine, tokenizer, device

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], temperature: float,
                 top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, n: int = 1) -> Samples:
        budgets = per_prompt(max_new_tokens, len(prompts))
        rows, response = self.engine.generate(prompts, max_new_tokens=max(budgets, default=1), temperature=temperature,
                                              top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens, n=n)
        return samples_from_tokens(rows, response, self.tokenizer, device=self.device, budgets=budgets, n=n)


def response_mask_in_budget(response: torch.Tensor, eos_id: int, budgets: list[int] | None = None,
                            n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_mask_after_stop`` with each row of prompt p (``n`` rows each) also cut at
    ``budgets[p]``: what a back end sampled past a row's budget does not count, an EOS there
    included (the row is unfinished)."""
    if budgets is None:
        return response_mask_after_stop(response, eos_id)
    limit = torch.tensor([b for b in budgets for _ in range(n)], device=response.device)
    inside = torch.arange(response.shape[1], device=response.device)[None, :] < limit[:, None]
    mask, ended = response_mask_after_stop(torch.where(inside, response, torch.full_like(response, -1)), eos_id)
    return mask * inside, ended


def samples_from_tokens(rows: list[list[int]], response: torch.Tensor, tokenizer: Any,
                        device: torch.device | str = "cpu", budgets: list[int] | None = None,
                        n: int = 1) -> Samples:
    """``Samples`` of prompts ``rows`` (token lists) and their responses (R, W) (EOS included when
    sampled; anything after the first EOS, or past the row's prompt's budget, is replaced by padding)."""
    query, query_mask = left_pad(rows, tokenizer.pad_token_id)
    if response.shape[1] == 0:
        response = torch.full((len(rows), 1), tokenizer.pad_token_id, dtype=torch.long)
    mask, ended = response_mask_in_budget(response, tokenizer.eos_token_id, budgets, n)
    response = torch.where(mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, mask)]
    return Samples(query.to(device), query_mask.to(device), response.to(device), mask.to(device), ended.to(device),
                   texts)


class HFGenerateGenerator:
    """Batched, KV-cached sampling with ``model.generate``; stops at EOS or the length limit. The
    engine's fallback for architectures it does not run, and the baseline of benchmarks/generate.py."""

    def __init__(self, model: Any, tokenizer: Any, bf16: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.bf16 = bf16

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], temperature: float,
                 top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, n: int = 1) -> Samples:
        from transformers import LogitsProcessorList

        budgets = per_prompt(max_new_tokens, len(prompts))
        max_new_tokens = max(budgets, default=1)
        prompts = [p for p in prompts for _ in range(n)]  # k contiguous rows per prompt
        tok = self.tokenizer
        model = unwrap(self.model) if not hasattr(self.model, "disable_adapter") else self.model
        device = next(model.parameters()).device
        query, query_mask = left_pad(prompts, tok.pad_token_id)
        query, query_mask = query.to(device), query_mask.to(device)
        # Greedy decoding; with temperature > 0 the last logits processor samples (InverseCDFSampler).
        # top_k=None keeps generation_config's top_k (default 50) from adding its own warper.
        kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True,
                      temperature=None, top_k=None, top_p=None)
        if temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList([InverseCDFSampler(temperature, top_k, top_p)])
        was_training = model.training
        model.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = model.generate(input_ids=query, attention_mask=query_mask, **kwargs)
        model.train(was_training)
        response = out[:, query.shape[1]:]
        if response.shape[1] == 0:
            response = torch.full((len(prompts), 1), tok.pad_token_id, dtype=torch.long, device=device)
        mask, ended = response_mask_in_budget(response, tok.eos_token_id, budgets, n)
        response = torch.where(mask.bool(), response, torch.full_like(response, tok.pad_token_id))
        texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, mask)]
        return Samples(query, query_mask, response, mask, ended, texts)


# ---------------------------------------------------------------------------------------------
# Scoring: one forward pass per model
# ---------------------------------------------------------------------------------------------
















# ---------------------------------------------------------------------------------------------
# `preflab generate`
# ---------------------------------------------------------------------------------------------


def encode_prompts(tokenizer: Any, prompts: list[str | list[dict[str, str]]], max_prompt_tokens: int | None = None) -> list[list[int]]:
    from preflab.data.chat import render_prompt

    out = []
    for p in prompts:
        ids = tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        out.append(ids[-max_prompt_tokens:] if max_prompt_tokens else ids)
    return out


def generate_texts(model: Any, tokenizer: Any, prompts: list, *, max_new_tokens: int | list[int] = 128,
                   temperature: float = 0.7, batch_size: int = 16, bf16: bool = True,
                   progress: bool = False, cache: Path | None = None, seed: int = 0, cache_key: str = "",
                   generator: Generator | None = None) -> list[str]:
    """Sample one response per prompt, in batches; returns decoded texts in prompt order.
    ``max_new_tokens``: one budget, or one per prompt. ``generator``: another back end than
    preflab's engine over ``model`` (e.g. ``generation.llamacpp``; ``model`` is then unused).

    ``cache``: a JSONL file each finished batch is appended to, so a killed call resumes at the
    first unfinished batch. Each batch then draws from its own seed (``seed`` and its position),
    so the resumed texts equal the uninterrupted ones; the file's first line is a key of the
    prompts, settings and ``cache_key`` (e.g. the model), and a file with another key is
    started afresh.
    """
    import json

    from preflab.run import Progress

    gen = generator or HFGenerator(model, tokenizer, bf16=bf16)
    ids = encode_prompts(tokenizer, prompts)
    budgets = per_prompt(max_new_tokens, len(ids))
    # Similar lengths together: less padding, faster batches; results go back in input order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts: list[str] = [""] * len(ids)
    key = max_new_tokens if isinstance(max_new_tokens, int) else budgets  # an int keeps old caches valid
    done = _batch_cache(cache, json.dumps([ids, key, temperature, batch_size, seed, cache_key]))
    with Progress(len(ids), "generate", enabled=progress) as bar, \
            (open(cache, "a", encoding="utf-8") if cache is not None else contextlib.nullcontext()) as log:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            out_texts = done.get(s)
            if out_texts is None or len(out_texts) != len(chunk):
                with torch.random.fork_rng(devices=[]) if log else contextlib.nullcontext():
                    if log:  # each cached batch from its own seed: a resumed call equals an uninterrupted one
                        torch.manual_seed(seed * 1_000_003 + s)
                    out_texts = gen.generate([ids[i] for i in chunk], max_new_tokens=[budgets[i] for i in chunk],
                                             temperature=temperature).texts
                if log:
                    log.write(json.dumps({"start": s, "texts": out_texts}) + "\n")
                    log.flush()
            for i, t in zip(chunk, out_texts):
                texts[i] = t
            bar.update(advance=len(chunk))
    return texts


def _batch_cache(cache: Path | None, key_text: str) -> dict[int, list[str]]:
    """The finished batches of ``generate_texts``' cache ({start: texts}) when its first line holds
    this key; otherwise (or missing) the file is started afresh with the key and {} is returned."""
    import hashlib
    import json

    if cache is None:
        return {}
    header = json.dumps({"key": hashlib.sha256(key_text.encode()).hexdigest()})
    lines = cache.read_text(encoding="utf-8").splitlines() if cache.is_file() else []
    if lines[:1] != [header]:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(header + "\n", encoding="utf-8")
        return {}
    done = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
            done[int(row["start"])] = list(row["texts"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill: that batch runs again
    return done


@click.command("generate")
@click.option("--model", "model_spec", required=True, help="Model directory, hub id, bundled: or tiny:.")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL with `id` and `prompt` (or `messages`).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output JSONL {id, response}.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0), help="0: greedy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--limit", default=None, type=click.IntRange(1), help="Only the first N prompts.")
@click.option("--threads", default=None, type=click.IntRange(1))
@click.option("--id-field", default="id", show_default=True,
              help="The prompt rows' id key (e.g. `key` for IFEval files).")
@click.option("--backend", type=click.Choice(["hf", "llamacpp"]), default="hf", show_default=True,
              help="hf: preflab's engine (as fast or faster from 8 rows per batch); llamacpp: llama.cpp (the "
                   "llamacpp extra; faster one row at a time, --batch-size 1) on the bundled GGUF, or on a GGUF "
                   "exported once from a saved Llama-style model. See docs/performance.md.")
@click.option("--gguf-type", type=click.Choice(["q8_0", "q4_0", "q4_1", "bf16", "f16", "f32"]), default="q8_0",
              show_default=True, help="llamacpp: the matrix type of an exported GGUF (q4_0: llama.cpp's fastest on "
                                      "x86, furthest from the weights); bundled: models run their own GGUF.")
def generate_cli(model_spec, prompts_path, out_path, max_new_tokens, temperature, seed, batch_size, limit, threads,
                 id_field, backend, gguf_type):
    """Sample one response per prompt from a model and write JSONL {id, response}.

    Example: preflab generate --model runs/demo/sft/model --prompts prompts.jsonl --out responses.jsonl
    """
    from preflab import models
    from preflab.data.jsonl import iter_jsonl, write_jsonl
    from preflab.errors import DataError

    def parse(obj):
        if not isinstance(obj, dict) or id_field not in obj:
            raise ValueError(f"each row needs an {id_field!r}")
        key = obj[id_field]
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise ValueError(f"{id_field!r} must be a string or an integer, got {key!r}")
        if isinstance(obj.get("prompt"), str):
            return key, obj["prompt"]
        if isinstance(obj.get("messages"), list):
            return key, obj["messages"]
        if isinstance(obj.get("prompt"), list):  # TRL's conversational prompt
            return key, obj["prompt"]
        raise ValueError("each row needs 'prompt' (a string) or 'messages' (a list)")

    rows, first_line = [], {}
    for lineno, obj in iter_jsonl(prompts_path):
        try:
            key, prompt = parse(obj)
        except ValueError as e:
            raise DataError(f"{prompts_path}:{lineno}: {e}") from None
        if key in first_line:  # responses are matched to prompts by id: two rows with one id cannot be
            raise DataError(f"{prompts_path}:{lineno}: duplicate id {key!r} (first at line {first_line[key]})")
        first_line[key] = lineno
        rows.append((key, prompt))
    rows = rows[:limit]
    models.set_threads(threads)
    torch.manual_seed(seed)
    tokenizer = models.load_tokenizer(model_spec)
    model, generator = None, None
    if backend == "llamacpp":  # fixed weights from a GGUF; the torch model is not loaded
        from preflab.generation import llamacpp

        engine = llamacpp.LlamaCppEngine(llamacpp.gguf_for(model_spec, gguf_type), tokenizer,
                                         threads=torch.get_num_threads(), max_batch=batch_size)
        generator = TokenEngineGenerator(engine, tokenizer)
    else:
        model = models.load_policy(model_spec)
    t0 = time.time()
    texts = generate_texts(model, tokenizer, [p for _, p in rows], max_new_tokens=max_new_tokens,
                           temperature=temperature, batch_size=batch_size, progress=True, generator=generator)
    write_jsonl(Path(out_path), [{"id": i, "response": t} for (i, _), t in zip(rows, texts)])
    click.echo(f"wrote {len(rows)} responses to {out_path} in {time.time() - t0:.1f}s")
