"""vLLM as the sampling back end (GPU machines): ``rollout.backend: vllm``, the ``vllm`` extra.

The engine is colocated with training, as TRL's and OpenRLHF's colocated modes run it: one vLLM
``LLM`` in this process, built from the policy's checkpoint directory, and before every
``generate`` the policy's current weights are copied into it when any parameter changed since
the last copy (``Tensor._version`` counts in-place updates, so an optimizer step is seen without
the training loop calling anything). LoRA adapters are merged into the weights sent (vLLM gets
plain weights under the base model's parameter names). Prefix sharing is vLLM's: the ``n``
samples of a prompt are one request with ``SamplingParams(n=...)`` and prefix caching on.

Sampling semantics match the engine's: temperature (0: greedy), top-k (0: off), top-p,
``min_tokens`` keeping EOS out, stop at the tokenizer's EOS. Random draws come from vLLM's own
generator, seeded per call from the global torch RNG (repeatable runs; not the same draws as
the CPU engine).

``vllm`` is imported only when this back end is built; without it installed, building it raises
one ``ConfigError`` naming the extra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from preflab.errors import ConfigError
from preflab.generation.engine import effective_linear, param_version


def _is_lora_layer(mod: Any) -> bool:
    return hasattr(mod, "base_layer") and hasattr(mod, "lora_A")


def hf_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the transformers model under DDP/peft wrappers, named as in its own
    checkpoint, with active LoRA adapters merged into their base weights (adapter tensors left out)."""
    from preflab.lm import unwrap

    base = unwrap(model)
    lora = {name: mod for name, mod in base.named_modules() if name and _is_lora_layer(mod)}
    for name, mod in lora.items():
        w, b = effective_linear(mod)
        yield f"{name}.weight", w.detach()
        if b is not None:
            yield f"{name}.bias", b.detach()
    for name, p in base.named_parameters():
        if not any(name.startswith(prefix + ".") for prefix in lora):
            yield name, p.detach()


def _load_into_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Run inside a vLLM worker (``LLM.collective_rpc``): load weights into its model."""
    worker.model_runner.model.load_weights(weights=weights)


def _local_model(llm: Any) -> Any | None:
    """The vLLM model object when the engine runs in this process (V0, or V1 with
    VLLM_ENABLE_V1_MULTIPROCESSING=0), else None."""
    worker = getattr(getattr(getattr(llm, "llm_engine", None), "model_executor", None), "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # V1 wraps the worker once more
    runner = getattr(worker, "model_runner", None)
    model = getattr(runner, "model", None)
    return model if hasattr(model, "load_weights") else None


def push_weights(llm: Any, weights: list[tuple[str, torch.Tensor]]) -> str:
    """Load ``weights`` into the engine: directly when its model lives in this process, else by
    ``collective_rpc`` into every worker. Returns the route taken."""
    model = _local_model(llm)
    if model is not None:
        model.load_weights(weights)
        return "local"
    if hasattr(llm, "collective_rpc"):
        llm.collective_rpc(_load_into_worker, args=(weights,))
        return "rpc"
    raise ConfigError("this vLLM version exposes neither the engine's model nor collective_rpc: cannot sync weights")


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"rollout.backend is 'vllm' but vLLM cannot be imported ({e}). Install the extra "
            "(pip install 'preflab[vllm]', a CUDA machine) or set rollout.backend: hf") from None
    return vllm


class VLLMEngine:
    """Token-level vLLM sampler that follows a training model's weights (see the module docstring).

    ``llm`` and ``sampling_params`` replace the real ``vllm.LLM`` and ``vllm.SamplingParams``
    (tests use fakes); ``engine_options`` go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``).
    """

    def __init__(self, model: Any, tokenizer: Any, bf16: bool = True, *, llm: Any = None,
                 sampling_params: Callable[..., Any] | None = None, **engine_options: Any):
        self.model, self.tokenizer = model, tokenizer
        if llm is None or sampling_params is None:
            vllm = import_vllm()
            sampling_params = sampling_params or vllm.SamplingParams
            if llm is None:
                from preflab.lm import unwrap

                path = getattr(unwrap(model).config, "_name_or_path", None)
                if not path:
                    raise ConfigError("the vLLM back end needs a model loaded from a directory (config._name_or_path)")
                opts = {"dtype": "bfloat16" if bf16 else "auto", "enable_prefix_caching": True,
                        "gpu_memory_utilization": 0.3, **engine_options}
                llm = vllm.LLM(model=str(path), **opts)
        self.llm, self.sampling_params = llm, sampling_params
        self.synced_version: tuple[int, ...] | None = None
        self.syncs = 0

    def sync(self) -> bool:
        """Copy the model's weights into the engine if any parameter changed since the last copy."""
        version = param_version(self.model)
        if version == self.synced_version:
            return False
        with torch.no_grad():
            push_weights(self.llm, list(hf_weights(self.model)))
        # vLLM's prefix cache is keyed by token ids alone: its entries hold keys and values of the old
        # weights, so a repeated prompt (or the chat template's shared prefix) would read them.
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()
        self.synced_version, self.syncs = version, self.syncs + 1
        return True

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_k: int = 0,
                 top_p: float = 1.0, min_new_tokens: int = 0, n: int = 1) -> tuple[list[list[int]], torch.Tensor]:
        """Same contract as ``engine.Engine.generate``: (rows, tokens), n contiguous rows per prompt."""
        self.sync()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        params = self.sampling_params(
            n=n, temperature=float(temperature), top_k=top_k if top_k > 0 else -1, top_p=float(top_p),
            min_tokens=min_new_tokens, max_tokens=max_new_tokens, stop_token_ids=[eos],
            seed=int(torch.randint(0, 2 ** 31 - 1, (1,)).item()), detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        rows, responses = [], []
        for prompt, out in zip(prompts, outs):
            if len(out.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for a prompt, expected {n}")
            for c in out.outputs:
                ids = list(c.token_ids)[:max_new_tokens]
                if getattr(c, "finish_reason", None) == "stop" and (not ids or ids[-1] != eos) and len(ids) < max_new_tokens:
                    ids.append(eos)  # stopped on EOS without reporting it: the rollout layout keeps EOS
                rows.append(list(prompt))
                responses.append(ids)
        width = max(1, max(len(r) for r in responses))
        tokens = torch.full((len(responses), width), pad, dtype=torch.long)
        for i, r in enumerate(responses):
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return rows, tokens
