"""Typed configs for every stage: pydantic models, loaded from YAML, overridden with dotted keys.

``load_config(SFTConfig, "configs/sft.yaml", ["optim.lr=1e-5", "train.batch_size=4"])``

A wrong key, type or range raises ``ConfigError`` naming the key (``optim.lr``), and nothing
starts. Each stage gets only the sections it needs (pass a function what it needs, nothing more).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from preflab.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and a
    number must be finite (``inf``, ``nan``, ``1e999`` are errors naming the key, also inside
    tuples, lists and free-form mappings such as the pipeline's stage overrides)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        bad = _non_finite(value)
        if bad is not None:
            where, number = bad
            raise ValueError(f"must be a finite number, got {number}" if not where
                             else f"{where} must be a finite number, got {number}")
        return value


def _non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """The first non-finite float in ``value`` (nested lists, tuples and dicts) as (dotted key
    inside ``value``, the number), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items = enumerate(value) if isinstance(value, list | tuple) else value.items() if isinstance(value, dict) else ()
    for k, v in items:
        bad = _non_finite(v, f"{where}.{k}" if where else str(k))
        if bad is not None:
            return bad
    return None


# ---------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------


class LoraSection(Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="peft target_modules.")


class ModelSection(Section):
    path: str = Field(
        "bundled:smollm2-135m-instruct",
        description="A local directory, a hub id, `bundled:smollm2-135m-instruct` or `tiny:` (random, for tests).",
    )
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Weight dtype. Keep fp32 for training: bf16 autocast does the speed-up."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present, else CPU.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: auto, one per core that "
                                                        "other processes leave free, checked at each stage's start).")
    lora: LoraSection = Field(default_factory=LoraSection)


class OptimSection(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas (InstructGPT: 0.9, 0.95).")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    schedule: Literal["cosine", "constant", "linear"] = Field("cosine")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from warmup_start * lr.")
    warmup_start: float = Field(0.0, ge=0, le=1, description="Warm-up starts at this fraction of lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine/linear decay floor as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None: off).")


class RunSection(Section):
    out: str = Field("runs/sft", description="Run directory.")
    seed: int = Field(0, description="Seed for python, numpy and torch (per rank: seed + 100003 * rank).")
    log_every: int = Field(1, ge=1, description="Write metrics every N optimizer steps.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = Field(1, ge=1, description="How many recent checkpoints to keep.")
    progress: bool = Field(True, description="Show a progress bar.")
    trackers: list[Literal["tensorboard", "mlflow"]] = Field(
        [], description="Also send metrics to these trackers (metrics.jsonl is always written): tensorboard "
                        "(RUN/tensorboard; pip install 'preflab[tensorboard]'), mlflow (MLFLOW_TRACKING_URI, "
                        "else RUN/mlruns; pip install 'preflab[mlflow]').")


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


class SFTData(Section):
    train: str = Field("builtin:examples", description="JSONL of {prompt, response} or {messages}; `builtin:examples`.")
    val: str | None = Field(None, description="Validation JSONL (None: hold out val_fraction of train).")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(512, ge=8, description="Token limit per example (longer ones are truncated).")
    packing: bool = Field(False, description="Pack several examples into one row (no cross-attention masking).")


PARALLEL_HELP = ("How several ranks (torchrun) share the model: ddp keeps a full copy on every rank; fsdp "
                 "shards weights, gradients and optimizer state over the ranks (FSDP2, one unit per decoder "
                 "layer; bf16 then means bf16 weights in compute with fp32 gradient reduction). One process: no "
                 "effect. docs/scale-out.md")


class SFTTrain(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch (per rank).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    bf16: bool = Field(True, description="bf16 autocast (fp32 master weights and optimizer state).")
    gradient_checkpointing: bool = Field(False)
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=PARALLEL_HELP)
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps (0: at the end only).")
    select_best: bool = Field(False, description="Export the weights with the lowest validation loss (checked "
                                                 "every eval_every steps and at the end) instead of the last.")


class SFTOptim(OptimSection):
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(2, ge=0, description="Linear warm-up steps from warmup_start * lr.")


def check_select_best(data: Any, train: Any) -> None:
    """``train.select_best`` picks among held-out scores: without held-out data it would silently
    export the last step."""
    if train.select_best and not data.val and data.val_fraction == 0:
        raise ValueError("train.select_best needs held-out data: set data.val or data.val_fraction > 0")


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


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


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
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=PARALLEL_HELP)
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
        return self


# ---------------------------------------------------------------------------------------------
# PPO-ptx
# ---------------------------------------------------------------------------------------------


class PPOModels(Section):
    policy: ModelSection = Field(default_factory=ModelSection)
    reward_model: str = Field(..., description="Reward model directory (from `preflab rm`).")
    reward_ensemble: list[str] = Field(
        default_factory=list, description="Further reward models (e.g. the same data, other seeds): with any, the "
        "reward is `rewards.ensemble` over all of them (the critic still starts from `reward_model`).")
    critic: Literal["reward_model", "policy_head"] = Field(
        "reward_model", description="reward_model: a separate critic initialised from the RM (InstructGPT); "
                                    "policy_head: a value head on the policy trunk (less memory).")
    reference: str | None = Field(None, description="Reference model (None: the initial policy; with LoRA, "
                                                    "the policy with adapters disabled).")
    frozen_dtype: Literal["fp32", "bf16"] = Field(
        "bf16", description="Weights of the frozen reference and reward model. bf16 halves their memory and is "
                            "what bf16 autocast feeds the matmuls anyway; the trained models stay fp32.")


class PPOData(Section):
    prompts: str = Field(..., description="Prompt JSONL (suite format, {prompt} or {messages}).")
    split: str | None = Field("ppo", description="Keep rows whose `split` equals this (None: all).")
    max_prompt_tokens: int = Field(256, ge=8)
    ptx: str | None = Field(None, description="Pretraining-mix JSONL of {text} (or demonstrations) for PPO-ptx.")


class Rollout(Section):
    batch_size: int = Field(16, ge=1, description="Prompts per rollout (per rank).")
    max_new_tokens: int = Field(64, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; training logits are divided by it.")
    top_k: int = Field(0, ge=0, description="0: off.")
    top_p: float = Field(1.0, gt=0, le=1)
    missing_eos_penalty: float | None = Field(
        -1.0, description="Score given to responses that end without EOS (None: keep the RM score).")
    truncate_token: str | None = Field(None, description="Pad after this token (lm-human-preferences); None: off.")
    truncate_after: int = Field(0, ge=0)
    bf16: bool = Field(True, description="bf16 autocast for sampling and scoring.")
    samples_per_prompt: int = Field(
        1, ge=1, description="k: samples of each prompt per rollout (rollout.batch_size prompts give batch_size * k "
                             "episodes); the group estimators (rloo, grpo) need k >= 2.")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Sampling back end: hf (preflab's engine over the transformers model) or vllm (GPU; the "
                          "vllm extra; the policy's weights are synced into it after each update).")


class PPOHyper(Section):
    epochs: int = Field(1, ge=1, description="PPO epochs per rollout (InstructGPT: 1).")
    minibatch_size: int = Field(8, ge=1, description="Rollouts per minibatch (per rank).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per minibatch.")
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_rewards: bool = Field(False, description="Scale rewards to unit variance without shifting the mean.")
    critic_lr: float | None = Field(None, gt=0, description="Critic LR (None: optim.lr).")
    critic_warmup_steps: int = Field(
        0, ge=0, description="The first N rollouts train only the critic (the policy, its pretraining mix "
        "and its LR schedule wait), so policy updates start with a critic fitted to this policy's returns.")


class AlgoSection(Section):
    estimator: Literal["gae", "rloo", "grpo", "reinforce_pp", "online_dpo"] = Field(
        "gae", description="gae: PPO with a critic (InstructGPT); rloo: leave-one-out baseline over the k samples of "
                           "a prompt; grpo: group-normalised; reinforce_pp: REINFORCE++ (global whitening); "
                           "online_dpo: DPO's loss on each prompt's best and worst of k fresh samples as the reward "
                           "model (and reward functions) rank them. Only gae builds and trains a critic.")
    dpo_beta: float = Field(0.1, gt=0, description="online_dpo: DPO's beta on the sequence log-ratios to the "
                                                   "reference.")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="reward: -beta * KL in the per-token reward (k1, InstructGPT; kl.estimator applies); "
                              "loss: beta * k3 KL added to the policy loss (GRPO).")
    grpo_scale: bool = Field(True, description="grpo: divide by the group's std (False: Dr. GRPO, centred only).")


class RewardFunc(Section):
    fn: str = Field(..., description="`module:function` taking (prompt rows, responses) and returning one float "
                                     "per response, e.g. `preflab.rewards:constraints`.")
    weight: float = Field(1.0, description="Weight of this function's reward in the sum.")


class RewardsSection(Section):
    rm_weight: float = Field(1.0, ge=0, description="Weight of the reward model's score (0: reward functions only).")
    funcs: list[RewardFunc] = Field(default_factory=list, description="Programmatic rewards added to the RM score.")
    ensemble: Literal["mean", "mean_minus_std", "min"] = Field(
        "mean_minus_std", description="How the scores of `models.reward_model` and `models.reward_ensemble` "
                                      "combine: mean, mean - ensemble_lambda x std over the members (conservative "
                                      "where they disagree), or the worst member.")
    ensemble_lambda: float = Field(1.0, ge=0, description="lambda of mean_minus_std.")
    preset: Literal["none", "protect"] = Field(
        "none", description="Reward functions added to `funcs`: protect = the suite's verifiable constraints "
                            "(preflab.rewards:constraints) and refusal correctness (preflab.rewards:refusals), "
                            "weight 1 each: what SFT taught, kept while the RM is optimised.")


class KLSection(Section):
    coef: float = Field(0.05, ge=0, description="beta (initial value when adaptive).")
    adaptive: bool = Field(False, description="Adaptive controller (Ziegler et al.).")
    target: float = Field(6.0, gt=0, description="Target KL in nats (adaptive).")
    horizon: int = Field(10000, ge=1, description="Horizon in episodes (adaptive).")
    estimator: Literal["k1", "k3"] = Field("k1")


class PTXSection(Section):
    coef: float = Field(0.0, ge=0, description="gamma: 0 is PPO, > 0 is PPO-ptx (InstructGPT: 27.8).")
    batch_size: int = Field(8, ge=1, description="Pretraining sequences per minibatch.")
    max_length: int = Field(128, ge=8)


class SelectSection(Section):
    every: int = Field(0, ge=0, description="Score the policy on a dev split every N updates (and before the "
                                            "first) and export the best-scoring weights (0: off, the last step).")
    n: int = Field(64, ge=2, description="Dev prompts: the last N of the stage's prompt split, never trained on.")
    by: Literal["panel", "reward"] = Field(
        "panel", description="panel: the simulated labelers' win-rate of the policy against the reference model "
                             "on the dev prompts; reward: the mean reward of dev samples.")


class PPOOptim(OptimSection):
    lr: float = Field(3e-6, gt=0)
    eps: float = Field(1e-5, gt=0, description="Adam eps (lm-human-preferences: 1e-5).")
    schedule: Literal["cosine", "constant", "linear"] = Field("constant")
    warmup_steps: int = Field(10, ge=0, description="InstructGPT: 10 iterations from 0.1x.")
    warmup_start: float = Field(0.1, ge=0, le=1)


class PPOTrain(Section):
    steps: int = Field(20, ge=1, description="Rollout + update iterations.")
    bf16: bool = True
    save_every: int = Field(0, ge=0)


class PPORun(RunSection):
    out: str = Field("runs/ppo", description="Run directory.")


class PPOConfig(Section):
    """`preflab ppo`: PPO(-ptx) against a reward model with a per-token KL penalty to the SFT model."""

    models: PPOModels
    data: PPOData
    rollout: Rollout = Field(default_factory=Rollout)
    algo: AlgoSection = Field(default_factory=AlgoSection)
    rewards: RewardsSection = Field(default_factory=RewardsSection)
    ppo: PPOHyper = Field(default_factory=PPOHyper)
    kl: KLSection = Field(default_factory=KLSection)
    ptx: PTXSection = Field(default_factory=PTXSection)
    select: SelectSection = Field(default_factory=SelectSection)
    optim: PPOOptim = Field(default_factory=PPOOptim)
    train: PPOTrain = Field(default_factory=PPOTrain)
    run: PPORun = Field(default_factory=PPORun)

    @model_validator(mode="after")
    def _episodes_fit(self) -> PPOConfig:
        k, est = self.rollout.samples_per_prompt, self.algo.estimator
        if est == "online_dpo" and (self.ppo.minibatch_size % k or (self.ppo.minibatch_size // self.ppo.grad_accum) % k):
            raise ValueError(f"algo.estimator=online_dpo pairs a prompt's samples within a micro-batch: "
                             f"ppo.minibatch_size / ppo.grad_accum must be a multiple of rollout.samples_per_prompt "
                             f"({k})")
        if est in ("rloo", "grpo", "online_dpo") and k < 2:
            raise ValueError(f"rollout.samples_per_prompt must be >= 2 for algo.estimator={est} (got {k})")
        episodes = self.rollout.batch_size * k
        if episodes % self.ppo.minibatch_size:
            raise ValueError(f"ppo.minibatch_size ({self.ppo.minibatch_size}) must divide the episodes of a rollout "
                             f"(rollout.batch_size x rollout.samples_per_prompt = {episodes})")
        return self


# ---------------------------------------------------------------------------------------------
# The main job
# ---------------------------------------------------------------------------------------------


# The online RL methods the pipeline and `preflab compare` know: overrides of the RL stage config
# on top of the pipeline's `ppo` section (ppo_ptx also gets the pipeline's `ppo_ptx` section). The
# group methods keep PPO's episodes per update: 4 prompts x k = 4 samples = 16.
RL_METHODS: dict[str, dict[str, Any]] = {
    "ppo": {"ptx": {"coef": 0.0}},
    "ppo_ptx": {"ptx": {"coef": 1.0}},
    "rloo": {"algo": {"estimator": "rloo"}, "rollout": {"samples_per_prompt": 4, "batch_size": 4},
             "ptx": {"coef": 0.0}},
    "grpo": {"algo": {"estimator": "grpo", "kl_in": "loss"}, "rollout": {"samples_per_prompt": 4, "batch_size": 4},
             "ptx": {"coef": 0.0}, "kl": {"coef": 0.04}},
    "reinforce_pp": {"algo": {"estimator": "reinforce_pp"}, "ptx": {"coef": 0.0}},
    # Online DPO: RLOO's episodes (4 prompts x k = 4), the best and worst of each prompt's 4 as the pair.
    "online_dpo": {"algo": {"estimator": "online_dpo"}, "rollout": {"samples_per_prompt": 4, "batch_size": 4},
                   "ptx": {"coef": 0.0}},
}
RLMethod = Literal["ppo", "ppo_ptx", "rloo", "grpo", "reinforce_pp", "online_dpo"]


class SuiteSection(Section):
    prompts: str | None = Field(None, description="Your own prompt JSONL in the suite format (None: built-in suite).")
    seed: int = 0
    n: int = Field(3200, ge=100, description="Prompts in the built-in suite.")


class DemosSection(Section):
    mode: Literal["mixed", "best_of_n", "reference"] = Field(
        "reference", description="reference: constraint-satisfying templated answers (and templated refusals); "
                                 "best_of_n: the gold judge's best of n base-model samples; mixed: best of n, "
                                 "reference when no sample is good enough.")
    limit: int = Field(400, ge=8, description="SFT-split prompts that get a demonstration.")
    n: int = Field(4, ge=1, description="Samples per prompt for best_of_n/mixed.")
    extra: str | None = Field(None, description="Your own demonstrations JSONL, added to the generated ones.")


class LabelingSection(Section):
    k: int = Field(4, ge=2, le=9, description="Samples per RM prompt (InstructGPT: 4 to 9).")
    limit: int = Field(300, ge=8, description="RM-split prompts to rank (300 x C(4,2) = 1,800 comparisons, "
                                              "2,340 with the overlap slice's extra rankings).")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, gt=0)
    overlap: float = Field(0.15, ge=0, le=1, description="Fraction ranked by three labelers (agreement slice).")
    batch_size: int = Field(32, ge=1, description="Sequences per generate() call (K samples of a prompt together).")
    bf16: bool = Field(True, description="bf16 autocast while sampling.")


class EvalSection(Section):
    limit: int = Field(300, ge=4, description="Held-out eval-split prompts.")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, gt=0)
    batch_size: int = Field(32, ge=1, description="Sequences per generate() and scoring call.")
    bf16: bool = Field(True, description="bf16 weights and autocast for sampling and scoring (about 2x faster "
                                         "on CPU; log-softmax stays fp32).")
    models: list[str] | None = Field(
        None, description="Models to evaluate: base, sft and trained RL methods (None: base, sft and every "
                          "method of `rl`). SFT is the reference.")
    ifeval: str | None = Field(
        None, description="An IFEval-format prompt file (e.g. the 541 public IFEval prompts): every evaluated model "
                          "also answers these, greedy, and the report shows strict/loose accuracy and answer "
                          "length beside the suite's numbers (needs the ifeval extra; None: off).")
    ifeval_max_new_tokens: int = Field(512, ge=1, description="Token budget of an IFEval answer.")


class RoundsSection(Section):
    """Rounds 2..n of the main job (InstructGPT's iteration): rank fresh samples of the current policy,
    refit the RM on every ranking so far, train the policy a little further from where it is."""

    method: str | None = Field(None, description="Trainer of rounds 2..n: a method of `rl` or `preference` (None: "
                                                 "the first of `rl`, else of `preference`).")
    prompts: int = Field(150, ge=8, description="Fresh RM-split prompts ranked per round (never ranked before), "
                                                "K samples each from the current policy.")
    heldout: int = Field(40, ge=0, description="Further fresh prompts per round ranked by three labelers and kept "
                                               "out of the RM: its on-policy accuracy and the labelers' agreement "
                                               "on the same samples (0: off).")
    kl_anchor: Literal["sft", "previous"] = Field(
        "sft", description="KL reference of a round's trainer: the SFT model (the leash never moves, so the "
                           "total drift stays bounded) or the previous round's policy (a trust region per round).")
    rm_init: Literal["sft", "previous"] = Field(
        "sft", description="A round's RM starts from the SFT model (every ranking weighs the same) or from the "
                           "previous round's RM (warm start).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the round trainer's config in rounds 2..n, applied after "
                                          "`rl_overrides` (e.g. train.steps).")


class PipelineConfig(Section):
    """`preflab pipeline`: base -> demonstrations -> SFT -> rankings -> RM -> PPO, PPO-ptx -> eval -> report.

    The ``sft``, ``rm``, ``ppo`` and ``ppo_ptx`` sections are overrides of those stages' own
    configs (same keys as `preflab sft` etc.); the pipeline fills in models, data and run
    directories. They are validated against the stage configs before anything starts.
    """

    base_model: str = Field("bundled:smollm2-135m-instruct", description="The pretrained policy to post-train.")
    threads: int | None = Field(None, ge=1, description="torch threads for every stage (None: auto, one per core "
                                                        "that other processes leave free, checked at each step's "
                                                        "start, with a warning when the machine is busy).")
    seed: int = 0
    keep_checkpoints: bool = Field(False, description="Keep each training stage's checkpoints after it has finished "
                                                      "and exported its model (the demo's hold ~9 GiB of optimizer "
                                                      "state; only an unfinished stage needs them, to resume).")
    suite: SuiteSection = Field(default_factory=SuiteSection)
    demos: DemosSection = Field(default_factory=DemosSection)
    labeling: LabelingSection = Field(default_factory=LabelingSection)
    rl: list[RLMethod] = Field(
        ["ppo_ptx", "rloo"], description="Online RL methods trained after the RM, each its own step and run directory "
        "(RUN/<method>). The demo trains InstructGPT's PPO-ptx and RLOO (k = 4 samples per prompt, no critic), "
        "which beat SFT on the gold judge in the measurements in the README.")
    preference: list[Literal["dpo", "ipo", "rs"]] = Field(
        [], description="Offline preference trainers run after the RL methods, each its own step and run directory: "
                        "dpo, ipo (on the store's rankings), rs (rejection-sampling fine-tuning with the RM).")
    rl_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-method overrides of the RL stage config, applied after `ppo`, the "
                                          "method's preset and (for ppo_ptx) `ppo_ptx`.")
    # Stage overrides. The defaults size the main job for about 30 minutes on 2 CPU cores.
    sft: dict[str, Any] = Field(
        default_factory=lambda: {"optim": {"lr": 3e-5}, "train": {"epochs": 1.25, "batch_size": 8},
                                 "data": {"max_length": 320}},
        description="Overrides of the SFT config.")
    rm: dict[str, Any] = Field(
        default_factory=lambda: {"train": {"batch_prompts": 8}, "optim": {"lr": 5e-5}, "data": {"max_length": 320}},
        description="Overrides of the RM config (lr 5e-5, not InstructGPT's 9e-6: 30 steps, not thousands).")
    ppo: dict[str, Any] = Field(
        default_factory=lambda: {"train": {"steps": 15}, "rollout": {"batch_size": 16, "max_new_tokens": 64},
                                 "ppo": {"epochs": 1, "minibatch_size": 8}, "kl": {"coef": 0.02},
                                 "optim": {"lr": 2e-5, "warmup_steps": 4}},
        description="Overrides of the PPO config (InstructGPT: beta 0.02, one PPO epoch).")
    ppo_ptx: dict[str, Any] = Field(
        default_factory=lambda: {"ptx": {"coef": 1.0, "batch_size": 2}},
        description="Overrides of the PPO config for PPO-ptx (applied after `ppo`). gamma is 1 here, not "
                    "InstructGPT's 27.8: the mix is the demonstrations (the per-token NLL, ~1 nat) against "
                    "a per-token PPO loss of ~0.01-0.1, so 27.8 would drown the PPO signal.")
    eval: EvalSection = Field(default_factory=EvalSection)
    rm_ensemble: int = Field(1, ge=1, description="Reward models trained on the rankings (RUN/rm, RUN/rm-2, ...; "
                                                  "seeds seed, seed + 1, ...): with more than one, the online RL "
                                                  "methods optimise `rewards.ensemble` over them (conservative where "
                                                  "they disagree). Rounds 2..n refit one RM.")
    rounds: int = Field(1, ge=1, description="Rounds of the recipe: 1 is the graph above; each further round "
                                             "ranks fresh samples of the current policy, refits the RM and "
                                             "trains on (`round`).")
    round: RoundsSection = Field(default_factory=RoundsSection)


# ---------------------------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------------------------

C = TypeVar("C", bound=BaseModel)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base`` key by key (nested dicts merge; anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-5"`` -> (["optim", "lr"], 1e-5). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({e})") from None
    if isinstance(value, dict) and not raw.strip().startswith("{"):
        value = raw.strip()  # `model.path=tiny:` is a string, not the mapping {tiny: None}
    elif isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value  # YAML 1.1 misses 3e-3
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating sections as needed); returns ``data``."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a check across keys (model validator): its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
            continue
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{key}: {msg}{shown}")
    return f"{source}: " + "; ".join(lines)


def validate(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults < YAML file < dotted overrides; one ConfigError naming every bad key."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, list(overrides or []))
    return validate(cls, data, source=str(path) if path else "config")


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Offline preference optimisation (DPO, cDPO, IPO, SimPO) and rejection-sampling fine-tuning
# ---------------------------------------------------------------------------------------------


class DPOModel(ModelSection):
    reference: str | None = Field(None, description="Reference model (None: the initial policy; with LoRA, the "
                                                    "policy with adapters disabled). Its log-probs of the training "
                                                    "responses are computed once and cached in the run directory.")


DPOData = RankingData


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
