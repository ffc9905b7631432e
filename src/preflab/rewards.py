"""Reward functions beside the reward model: user-supplied callables, weighted and summed with
the RM score in the online RL stage (as TRL's ``reward_funcs`` and veRL's custom rewards).

A reward function is ``fn(prompts: list[dict], responses: list[str]) -> list[float]``: one float
per response, where ``prompts[i]`` is the prompt row (from the prompts JSONL, so suite prompts
carry their ``constraints``) that ``responses[i]`` answers. Named in a config as
``module:function``; ``preflab.rewards:constraints`` is the built-in verifiable reward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from preflab.errors import ConfigError

RewardFunc = Callable[[list[dict[str, Any]], list[str]], Sequence[float]]


def load(spec: str) -> RewardFunc:
    """Import ``module:function``; a ConfigError naming the spec if it cannot be found or called."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"rewards.funcs: {spec!r} must look like module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rewards.funcs: cannot load {spec!r} ({e})") from None
    if not callable(fn):
        raise ConfigError(f"rewards.funcs: {spec!r} is not callable")
    return fn


def weighted_sum(funcs: list[tuple[RewardFunc, float]], prompts: list[dict[str, Any]],
                 responses: list[str]) -> list[float]:
    """sum_i w_i f_i(prompts, responses) per response; checks each function returns one finite float each."""
    import math

    total = [0.0] * len(responses)
    for fn, weight in funcs:
        values = [float(v) for v in fn(prompts, responses)]
        name = getattr(fn, "__qualname__", repr(fn))
        if len(values) != len(responses):
            raise ValueError(f"reward function {name} returned {len(values)} values for {len(responses)} responses")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"reward function {name} returned a non-finite value")
        total = [t + weight * v for t, v in zip(total, values)]
    return total


def constraints(prompts: list[dict[str, Any]], responses: list[str]) -> list[float]:
    """The fraction of a prompt's verifiable constraints (word and sentence limits, keywords, case,
    JSON, ...) the response satisfies; 0 for a prompt without constraints (the reward then adds
    nothing). The same checks the gold judge uses, so this is a verifiable reward in the sense of
    Tulu 3's RLVR: it rewards what the prompt states, not what the RM has learned."""
    from preflab.constraints import check_all

    out = []
    for row, text in zip(prompts, responses):
        cons = row.get("constraints") or []
        out.append(sum(check_all(list(cons), text)) / len(cons) if cons else 0.0)
    return out


def refusals(prompts: list[dict[str, Any]], responses: list[str]) -> list[float]:
    """Refusal correctness where the suite knows it: +1 for refusing a prompt of the ``harmful``
    slice, -1 for refusing any other suite prompt, 0 otherwise (a prompt without a ``slice`` adds
    nothing). Guards what SFT taught about refusing against an RM that rewards compliance."""
    from preflab.feedback.rubric import is_refusal

    out = []
    for row, text in zip(prompts, responses):
        kind, refused = row.get("slice"), is_refusal(text)
        if kind is None:
            out.append(0.0)
        elif kind == "harmful":
            out.append(1.0 if refused else 0.0)
        else:
            out.append(-1.0 if refused else 0.0)
    return out


PRESETS: dict[str, list[dict[str, Any]]] = {
    # `rewards.preset: protect`: keep what SFT taught, the suite's verifiable constraints and its refusals.
    # Weight 2 each: at weight 1 the RLOO policy still followed fewer constraints than SFT on two seeds
    # of three at 128 tokens; at 2 on none (docs/results.md, run R2).
    "protect": [{"fn": "preflab.rewards:constraints", "weight": 2.0}, {"fn": "preflab.rewards:refusals", "weight": 2.0}],
}
