"""`preflab dpo` (DPO, cDPO, IPO, SimPO) and `preflab rs` (rejection-sampling fine-tuning)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from preflab.config.base import (
    LENGTH_GROUPS_HELP,
    PARALLEL_HELP,
    ModelSection,
    OptimSection,
    RecipeInputs,
    RunSection,
    Section,
)
from preflab.config.rm import RankingData


class DPOModel(ModelSection):
    reference: str | None = Field(None, description="Reference model (None: the initial policy; with LoRA, the "
                                                    "policy with adapters disabled). Its log-probs of the training "
                                                    "responses are computed once and cached in the run directory.")


class DPOData(RankingData):
    ptx: str | None = Field(None, description="Demonstrations JSONL (or {text} rows) for the SFT-loss term "
                                              "`dpo.ptx_coef`: each training ranking is paired with one row, "
                                              "truncated at max_length.")


class DPOLoss(Section):
    loss: Literal["dpo", "cdpo", "ipo", "simpo"] = Field(
        "dpo", description="dpo: -log sigmoid(beta * margin of log-ratios); cdpo: DPO with label smoothing; "
                           "ipo: squared distance of the per-token log-ratio margin to 1/(2 beta); simpo: "
                           "reference-free, per-token average log-probs with a target margin (docs/preference.md).")
    beta: float | None = Field(None, gt=0, description="None: 0.1 for dpo, cdpo and ipo; 2.0 for simpo.")
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="cdpo only: probability that a label is flipped.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo only: target margin gamma (the paper's, not TRL's "
                                                      "gamma/beta ratio).")
    nll_coef: float = Field(0.0, ge=0, description="alpha of DPO + NLL (RPO): adds alpha x the per-token NLL of "
                                                   "each prompt's best-ranked response, so preferred answers keep "
                                                   "their likelihood (0: off).")
    ptx_coef: float = Field(0.0, ge=0, description="gamma of the SFT-loss term on demonstrations (`data.ptx`): "
                                                   "each prompt's loss gains gamma x the per-token NLL of the "
                                                   "demonstration paired with it, as PPO-ptx mixes in its "
                                                   "pretraining rows (0: off).")

    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.loss == "simpo" else 0.1)


class DPOOptim(OptimSection):
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW); the DPO paper uses 5e-7 with batch 64.")
    warmup_steps: int = Field(2, ge=0, description="Linear warm-up steps from warmup_start * lr.")


class DPOTrain(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training rankings.")
    max_steps: int | None = Field(None, ge=1)
    batch_prompts: int = Field(8, ge=1, description="Prompts (not pairs) per micro-batch, per rank.")
    grad_accum: int = Field(1, ge=1)
    bf16: bool = True
    gradient_checkpointing: bool = False
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=PARALLEL_HELP)
    length_groups: int = Field(0, ge=0, description=LENGTH_GROUPS_HELP)
    share_prompt: bool = Field(True, description="Run a prompt once and its K responses on its cached keys and "
                                                 "values; ignored under gradient_checkpointing.")
    eval_every: int = Field(0, ge=0, description="Held-out metrics every N steps (0: at the end only).")


class DPOEval(Section):
    kl_prompts: int = Field(16, ge=0, description="Held-out prompts sampled once each (T = 1) to estimate "
                                                  "KL(policy || reference) in nats per response (0: off).")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call and held-out scoring batch.")


class DPORun(RunSection):
    out: str = Field("runs/dpo", description="Run directory.")


class DPOConfig(Section):
    """`preflab dpo`: the policy trained directly on K-way rankings (DPO, cDPO, IPO or SimPO)."""

    model: DPOModel = Field(default_factory=DPOModel)
    data: DPOData
    dpo: DPOLoss = Field(default_factory=DPOLoss)
    optim: DPOOptim = Field(default_factory=DPOOptim)
    train: DPOTrain = Field(default_factory=DPOTrain)
    eval: DPOEval = Field(default_factory=DPOEval)
    run: DPORun = Field(default_factory=DPORun)

    @model_validator(mode="after")
    def _ptx_has_data(self) -> DPOConfig:
        if self.dpo.ptx_coef > 0 and not self.data.ptx:
            raise ValueError("dpo.ptx_coef > 0 needs data.ptx: a JSONL of demonstrations or {text} rows")
        return self


class RSModels(Section):
    policy: ModelSection = Field(default_factory=ModelSection)
    reward_model: str = Field(..., description="Reward model directory (from `preflab rm`).")


class RSData(Section):
    prompts: str = Field(..., description="Prompt JSONL (suite format, {prompt} or {messages}).")
    split: str | None = Field("ppo", description="Keep rows whose `split` equals this (None: all).")
    limit: int | None = Field(None, ge=1, description="Only the first N prompts of the split.")
    max_prompt_tokens: int = Field(256, ge=8)


class RSSampling(Section):
    n: int = Field(4, ge=1, description="Samples per prompt; the reward model keeps the best one.")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_prompts: int = Field(8, ge=1, description="Prompts per generate() call (n samples each).")
    threshold: float | None = Field(None, description="Keep a pick only if its (normalised) reward is at least this.")
    require_eos: bool = Field(True, description="Only responses that ended (EOS) can be picked.")
    bf16: bool = Field(True, description="bf16 autocast for sampling and scoring.")


class RSTrain(Section):
    rounds: int = Field(1, ge=1, description="Sample-pick-fine-tune rounds; round r samples from round r-1's model.")
    epochs: float = Field(1.0, gt=0, description="SFT passes over each round's picks.")
    max_steps: int | None = Field(None, ge=1, description="SFT steps per round (None: from epochs).")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    bf16: bool = True
    gradient_checkpointing: bool = False
    max_length: int = Field(384, ge=8, description="Token limit of a pick (prompt + response).")


class RSOptim(OptimSection):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of each round's SFT.")
    warmup_steps: int = Field(2, ge=0)


class RSRun(RunSection):
    out: str = Field("runs/rs", description="Run directory.")


class RSConfig(Section):
    """`preflab rs`: rejection-sampling fine-tuning: n samples per prompt, the RM picks the best, SFT on the picks."""

    models: RSModels
    data: RSData
    sampling: RSSampling = Field(default_factory=RSSampling)
    train: RSTrain = Field(default_factory=RSTrain)
    optim: RSOptim = Field(default_factory=RSOptim)
    run: RSRun = Field(default_factory=RSRun)

def dpo_recipe(run: RecipeInputs) -> dict[str, Any]:
    """The DPO stage on a pipeline run: the store's RM rankings (10% of the prompts held out) at the
    RM's sequence length, from the run's policy, one epoch at lr 2e-5 with the SFT loss on the
    run's demonstrations at weight 1 (``dpo.ptx_coef``; docs/results.md: the step with the term kept
    IFEval and constraints where lr 6e-6 without it lost IFEval's instructions)."""
    return {"model": {"path": run.policy, **run.model, **({"reference": run.reference} if run.reference else {})},
            "data": {"train": f"store:{run.store}", "split": "rm", "val_fraction": 0.1, "max_length": run.max_length,
                     "ptx": run.demos},
            "dpo": {"ptx_coef": 1.0}, "optim": {"lr": 2e-5}, "train": {"epochs": 1, "batch_prompts": 8},
            "run": {"out": run.out, "seed": run.seed, "progress": True}}


def rs_recipe(run: RecipeInputs) -> dict[str, Any]:
    """Rejection sampling on a pipeline run: one round of best-of-4 by the RM on 256 RL-split prompts,
    sampled with the labeling budget (the lengths the RM was trained on), SFT on the picks. It has
    no KL reference."""
    return {"models": {"policy": {"path": run.policy, **run.model}, "reward_model": run.reward_model},
            "data": {"prompts": run.prompts, "split": "ppo", "limit": 256},
            "sampling": {"n": 4, "max_new_tokens": run.sample_tokens, "temperature": 0.7},
            "train": {"rounds": 1, "epochs": 1, "batch_size": 8, "max_length": 320},
            "run": {"out": run.out, "seed": run.seed, "progress": True}}


# The offline preference trainers the pipeline, rounds and `preflab compare` train: method -> (the
# registry stage that trains it, its preset over that stage's recipe). ipo is the DPO stage's IPO loss.
OFFLINE_METHODS: dict[str, tuple[str, dict]] = {
    "dpo": ("dpo", {"dpo": {"loss": "dpo"}}),
    "ipo": ("dpo", {"dpo": {"loss": "ipo"}}),
    "rs": ("rs", {}),
}
OfflineMethod = Literal[tuple(OFFLINE_METHODS)]  # the methods above, one place

__all__ = ["dpo_recipe", "rs_recipe", "OFFLINE_METHODS", "OfflineMethod", "DPOModel", "DPOData", "DPOLoss", "DPOOptim", "DPOTrain", "DPOEval", "DPORun", "DPOConfig", "RSModels", "RSData", "RSSampling", "RSTrain", "RSOptim", "RSRun", "RSConfig"]
