"""`preflab sft`: supervised fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from preflab.config.base import (
    LENGTH_GROUPS_HELP,
    PARALLEL_HELP,
    ModelSection,
    OptimSection,
    RunSection,
    Section,
    check_select_best,
)


class SFTData(Section):
    train: str = Field("builtin:examples", description="JSONL of {prompt, response} or {messages}; `builtin:examples`.")
    val: str | None = Field(None, description="Validation JSONL (None: hold out val_fraction of train).")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(512, ge=8, description="Token limit per example (longer ones are truncated).")
    packing: bool = Field(False, description="Pack several examples into one row (no cross-attention masking).")


class SFTTrain(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch (per rank).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    bf16: bool = Field(True, description="bf16 autocast (fp32 master weights and optimizer state).")
    gradient_checkpointing: bool = Field(False)
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=PARALLEL_HELP)
    length_groups: int = Field(0, ge=0, description=LENGTH_GROUPS_HELP)
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0: at the end only).")
    select_best: bool = Field(False, description="Export the weights with the lowest validation loss (checked "
                                                 "every eval_every steps and at the end) instead of the last.")


class SFTOptim(OptimSection):
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(2, ge=0, description="Linear warm-up steps from warmup_start * lr.")


class SFTConfig(Section):
    """`preflab sft`: supervised fine-tuning on demonstrations, loss on response tokens only."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: SFTData = Field(default_factory=SFTData)
    optim: SFTOptim = Field(default_factory=SFTOptim)
    train: SFTTrain = Field(default_factory=SFTTrain)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _select_best_has_held_out(self) -> SFTConfig:
        check_select_best(self.data, self.train)
        return self

__all__ = ["SFTData", "SFTTrain", "SFTOptim", "SFTConfig"]
