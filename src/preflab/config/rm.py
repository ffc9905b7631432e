"""`preflab rm`: the reward model, and where rankings come from."""

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


class RankingData(Section):
    """Where K-way rankings come from (the RM and the preference trainers read the same sources)."""

    train: str = Field(..., description="Grouped K-way JSONL ({prompt, responses, order}), pairs JSONL, "
                                        "or `store:PATH` (the preference store; split from `split`).")
    format: Literal["kway", "pairs"] = Field("kway", description="kway: rankings (all C(K,2) pairs of a prompt "
                                                                 "are one batch element); pairs: {prompt, chosen, "
                                                                 "rejected} rows.")
    split: str | None = Field("rm", description="Store split to train on (store: sources only).")
    val: str | None = Field(None, description="Held-out file or store (None: hold out val_fraction).")
    val_split: str | None = Field("eval", description="Store split for held-out evaluation.")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(384, ge=16, description="Token limit of prompt + response.")
    labels: Literal["each", "consensus"] = Field(
        "each", description="Training prompts ranked by several labelers: each: every labeler's ranking is its own "
                            "group (InstructGPT); consensus: one group ranked by the labelers' mean tier (less "
                            "noise per pair, one group's cost). Held-out rankings stay per labeler.")


class RMData(RankingData):
    demos: str | None = Field(None, description="Demonstrations JSONL: after training, a bias makes their mean score 0.")


class RMOptim(OptimSection):
    lr: float = Field(9e-6, gt=0, description="InstructGPT: 9e-6, cosine to 10%.")


class RMTrain(Section):
    loss: Literal["kway", "plackett_luce"] = Field(
        "kway", description="kway: InstructGPT Eq. 1 (all C(K,2) pairs of a prompt as one element); "
                            "plackett_luce: listwise likelihood.")
    epochs: float = Field(1.0, gt=0, description="InstructGPT trains one epoch (more overfits).")
    max_steps: int | None = Field(None, ge=1)
    batch_prompts: int = Field(8, ge=1, description="Prompts (not pairs) per micro-batch, per rank.")
    grad_accum: int = Field(1, ge=1)
    bf16: bool = True
    gradient_checkpointing: bool = False
    frozen_layers: int = Field(0, ge=0, description="Keep the token embeddings and the lowest N decoder layers at "
                                                    "the starting model's weights: no gradient flows below layer N, "
                                                    "so a step costs less (SmolLM2-135M has 30 layers; 0: train all).")
    heads: int = Field(1, ge=1, description="Reward heads on the one trunk, each trained on its own bootstrap "
                                            "resample of the rankings (Poisson(1) counts per ranking): an ensemble "
                                            "for one model's cost. Its score is the heads' mean normalised score; "
                                            "the RL stage optimises `rewards.ensemble` over the heads. Not with "
                                            "LoRA or FSDP.")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=PARALLEL_HELP)
    length_groups: int = Field(0, ge=0, description=LENGTH_GROUPS_HELP)
    share_prompt: bool = Field(True, description="Run a prompt once and its K responses on its cached keys and "
                                                 "values (same loss, about half the tokens for K = 4); "
                                                 "ignored under gradient_checkpointing.")
    eval_every: int = Field(0, ge=0, description="Held-out accuracy and loss every N steps (0: at the end only).")
    select_best: bool = Field(False, description="Export the weights with the lowest held-out loss (checked every "
                                                 "eval_every steps and at the end) instead of the last: train until "
                                                 "held-out accuracy stops rising without guessing the epochs. The "
                                                 "reported held-out metrics then come from the set that chose them.")


class RMNorm(Section):
    demos_mean_zero: bool = Field(True, description="Bias so the demonstrations' mean score is 0 (InstructGPT).")
    policy_gain_bias: bool = Field(False, description="Gain and bias so held-out policy samples have mean 0, "
                                                      "std 1 (lm-human-preferences).")


class RMEval(Section):
    n_bins: int = Field(10, ge=2, description="Bins of the expected calibration error.")
    temperature_scaling: bool = Field(True, description="Fit a temperature on a validation split and report ECE after it.")
    worst_k: int = Field(20, ge=0, description="Held-out pairs where the RM is most confidently wrong, with texts.")


class RMRun(RunSection):
    out: str = Field("runs/rm", description="Run directory.")


class RMConfig(Section):
    """`preflab rm`: a scalar reward head trained on K-way rankings."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: RMData
    optim: RMOptim = Field(default_factory=RMOptim)
    train: RMTrain = Field(default_factory=RMTrain)
    norm: RMNorm = Field(default_factory=RMNorm)
    eval: RMEval = Field(default_factory=RMEval)
    run: RMRun = Field(default_factory=RMRun)

    @model_validator(mode="after")
    def _select_best_has_held_out(self) -> RMConfig:
        check_select_best(self.data, self.train)
        if self.train.heads > 1 and (self.model.lora.enabled or self.train.parallel == "fsdp"):
            raise ValueError(f"train.heads: {self.train.heads} heads need the whole model on each rank: not with "
                             "model.lora.enabled or train.parallel: fsdp (set train.heads: 1, or train the "
                             "ensemble as separate reward models)")
        return self

__all__ = ["RankingData", "RMData", "RMOptim", "RMTrain", "RMNorm", "RMEval", "RMRun", "RMConfig"]
