"""The stage registry: one table that the CLI, the pipeline, config validation and the report read.

Each training stage is one file under ``stages/`` with a ``train(cfg, resume=False) -> Path``
function, and one entry here: its command name, its config class, where its ``train`` lives
(imported only when it runs, so ``preflab --help`` loads no torch), what it writes into its run
directory, and a line of help. Adding a trainer is that file plus one entry (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preflab.config import (
    OFFLINE_METHODS,
    RL_METHODS,
    DPOConfig,
    RecipeInputs,
    RLConfig,
    RMConfig,
    RSConfig,
    Section,
    SFTConfig,
    dpo_recipe,
    rl_recipe,
    rs_recipe,
)


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI command and the run directory's manifest "stage"
    config: type[Section]
    run: str  # "module:function", function(cfg, resume=False) -> Path of the exported model
    outputs: tuple[str, ...]  # paths inside run.out a finished run holds
    help: str
    example: str  # one command line, shown in --help
    # A trainer the pipeline, its rounds and `preflab compare` run as a method: its config dict on a
    # pipeline run (the run's policy, RM, store, ...); the method's preset goes on top.
    recipe: Callable[[RecipeInputs], dict[str, Any]] | None = None

    def load(self) -> Callable[..., Path]:
        module, attr = self.run.split(":")
        return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", SFTConfig, "preflab.stages.sft:train", ("model", "metrics.jsonl"),
          "Supervised fine-tuning on demonstrations (loss on response tokens).",
          "preflab sft --config configs/sft_tiny.yaml run.out=runs/sft"),
    Stage("rm", RMConfig, "preflab.stages.reward:train", ("model", "metrics.jsonl", "eval/rm_eval.json"),
          "Train a reward model on K-way rankings.",
          "preflab rm --config configs/rm_tiny.yaml run.out=runs/rm"),
    Stage("rl", RLConfig, "preflab.stages.rl:train", ("model", "metrics.jsonl", "samples.jsonl"),
          "Online RL against a reward model with a KL penalty: PPO(-ptx), RLOO, GRPO, REINFORCE++, online DPO.",
          "preflab rl --config configs/rl_tiny.yaml run.out=runs/rl", rl_recipe),
    Stage("dpo", DPOConfig, "preflab.stages.dpo:train", ("model", "metrics.jsonl", "reference_logps.json"),
          "Train the policy directly on K-way rankings: DPO, conservative DPO, IPO or SimPO (no reward model).",
          "preflab dpo --config configs/dpo_tiny.yaml run.out=runs/dpo", dpo_recipe),
    Stage("rs", RSConfig, "preflab.stages.rs:train", ("model", "round1/picks.jsonl", "round1/samples.jsonl"),
          "Rejection-sampling fine-tuning: n samples per prompt, the reward model keeps the best, SFT on the picks.",
          "preflab rs --config configs/rs_tiny.yaml run.out=runs/rs", rs_recipe),
)}


# Old stage names that still run, with one DeprecationWarning (`preflab ppo` prints a note too).
RENAMED: dict[str, str] = {"ppo": "rl"}

# The methods the pipeline, `preflab compare` and rounds train, and the stage that trains each: every
# online RL method is the RL stage with its preset (``config.RL_METHODS``), every offline one the
# stage ``config.OFFLINE_METHODS`` names (ipo is the DPO stage).
METHODS: dict[str, str] = {"sft": "sft", "rm": "rm", **dict.fromkeys(RL_METHODS, "rl"),
                           **{m: stage for m, (stage, _) in OFFLINE_METHODS.items()}}


def stage_name(name: str) -> str:
    """``name``, or the current name of a renamed stage (``ppo`` -> ``rl``, with a DeprecationWarning)."""
    if name in RENAMED:
        import warnings

        warnings.warn(f"the stage {name!r} is now {RENAMED[name]!r} (`preflab {RENAMED[name]}`); the old name will "
                      f"be removed", DeprecationWarning, stacklevel=3)
        return RENAMED[name]
    return name


def stage_of(method: str) -> str:
    """The registry stage that trains ``method`` (a KeyError names an unknown one)."""
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method]


def run_stage(name: str, cfg: Any, resume: bool = False) -> Path:
    """Run stage ``name`` with a validated config; returns its exported model directory."""
    name = stage_name(name)
    stage = STAGES[name]
    if not isinstance(cfg, stage.config):
        raise TypeError(f"stage {name!r} takes a {stage.config.__name__}, got {type(cfg).__name__}")
    return stage.load()(cfg, resume=resume)
