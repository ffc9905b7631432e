"""`preflab rl`: the online RL stage (PPO-ptx, RLOO, GRPO, REINFORCE++, online DPO), and its methods.

The stage was called `ppo` before 0.3.0; its config classes were ``PPOConfig``, ``PPOModels``,
``PPOData``, ``PPOOptim``, ``PPOTrain`` and ``PPORun``. Those names still import, with a
``DeprecationWarning`` (``RENAMED``). ``PPOHyper`` keeps its name: the ``ppo`` section holds
PPO's own hyper-parameters (epochs, minibatches, clipping, GAE), which the group estimators
read too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from preflab.config.base import PARALLEL_HELP, ModelSection, OptimSection, RecipeInputs, RunSection, Section


class RLModels(Section):
    policy: ModelSection = Field(default_factory=ModelSection)
    reward_model: str = Field(..., description="Reward model directory (from `preflab rm`).")
    reward_ensemble: list[str] = Field(
        default_factory=list, description="Further reward models (e.g. the same data, other seeds): with any, the "
        "reward is `rewards.ensemble` over all of them (the critic still starts from `reward_model`).")
    critic: Literal["reward_model", "reward_trunk", "policy_head"] = Field(
        "reward_model", description="reward_model: a separate critic initialised from the RM (InstructGPT); "
                                    "reward_trunk: the RM's trunk with a zero-initialised head (values start "
                                    "constant, explained variance 0, and learn from the RM's features); "
                                    "policy_head: a zero-initialised value head on the policy trunk (less memory).")
    reference: str | None = Field(None, description="Reference model (None: the initial policy; with LoRA, "
                                                    "the policy with adapters disabled).")
    frozen_dtype: Literal["fp32", "bf16"] = Field(
        "bf16", description="Weights of the frozen reference and reward model. bf16 halves their memory and is "
                            "what bf16 autocast feeds the matmuls anyway; the trained models stay fp32.")


class RLData(Section):
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
                            "weight 2 each: what SFT taught, kept while the RM is optimised.")
    length_debias: bool = Field(
        False, description="Take out the score's linear dependence on response length within each prompt's samples "
                           "(one slope a rollout, fitted on the answers whose score stands: finished ones where "
                           "rollout.missing_eos_penalty is set): answers gain nothing by being shorter or longer "
                           "alone. Needs rollout.samples_per_prompt >= 2. objective/length_slope logs the slope "
                           "either way.")


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


class RLOptim(OptimSection):
    lr: float = Field(3e-6, gt=0)
    eps: float = Field(1e-5, gt=0, description="Adam eps (lm-human-preferences: 1e-5).")
    schedule: Literal["cosine", "constant", "linear"] = Field("constant")
    warmup_steps: int = Field(10, ge=0, description="InstructGPT: 10 iterations from 0.1x.")
    warmup_start: float = Field(0.1, ge=0, le=1)


class RLTrain(Section):
    steps: int = Field(20, ge=1, description="Rollout + update iterations.")
    bf16: bool = True
    save_every: int = Field(0, ge=0)
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=PARALLEL_HELP)


class RLRun(RunSection):
    out: str = Field("runs/rl", description="Run directory.")


class RLConfig(Section):
    """`preflab rl`: online RL against a reward model with a KL penalty to the SFT model: PPO(-ptx) with
    GAE, or RLOO, GRPO, REINFORCE++, online DPO (``algo.estimator``)."""

    models: RLModels
    data: RLData
    rollout: Rollout = Field(default_factory=Rollout)
    algo: AlgoSection = Field(default_factory=AlgoSection)
    rewards: RewardsSection = Field(default_factory=RewardsSection)
    ppo: PPOHyper = Field(default_factory=PPOHyper)
    kl: KLSection = Field(default_factory=KLSection)
    ptx: PTXSection = Field(default_factory=PTXSection)
    select: SelectSection = Field(default_factory=SelectSection)
    optim: RLOptim = Field(default_factory=RLOptim)
    train: RLTrain = Field(default_factory=RLTrain)
    run: RLRun = Field(default_factory=RLRun)

    @model_validator(mode="after")
    def _episodes_fit(self) -> RLConfig:
        k, est = self.rollout.samples_per_prompt, self.algo.estimator
        if est == "online_dpo" and (self.ppo.minibatch_size % k or (self.ppo.minibatch_size // self.ppo.grad_accum) % k):
            raise ValueError(f"algo.estimator=online_dpo pairs a prompt's samples within a micro-batch: "
                             f"ppo.minibatch_size / ppo.grad_accum must be a multiple of rollout.samples_per_prompt "
                             f"({k})")
        if self.rewards.length_debias and k < 2:
            raise ValueError(f"rewards.length_debias compares each prompt's samples: rollout.samples_per_prompt "
                             f"must be >= 2 (got {k})")
        if est in ("rloo", "grpo", "online_dpo") and k < 2:
            raise ValueError(f"rollout.samples_per_prompt must be >= 2 for algo.estimator={est} (got {k})")
        episodes = self.rollout.batch_size * k
        if episodes % self.ppo.minibatch_size:
            raise ValueError(f"ppo.minibatch_size ({self.ppo.minibatch_size}) must divide the episodes of a rollout "
                             f"(rollout.batch_size x rollout.samples_per_prompt = {episodes})")
        return self


def rl_recipe(run: RecipeInputs) -> dict[str, Any]:
    """The RL stage on a pipeline run: from the run's policy against its RM (and the RM's ensemble),
    on the suite's ``ppo`` split, the demonstrations as the pretraining mix (used where ``ptx.coef``
    > 0). The pipeline's ``rl_stage`` section and the method's preset go on top."""
    return {"models": {"policy": {"path": run.policy, **run.model}, "reward_model": run.reward_model,
                       **({"reward_ensemble": run.reward_ensemble} if run.reward_ensemble else {}),
                       **({"reference": run.reference} if run.reference else {})},
            "data": {"prompts": run.prompts, "split": "ppo", "ptx": run.demos},
            "run": {"out": run.out, "seed": run.seed, "progress": True}}


# The online RL methods the pipeline and `preflab compare` know: overrides of the RL stage config
# on top of the pipeline's `rl_stage` section (ppo_ptx also gets the pipeline's `ppo_ptx` section). The
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
RLMethod = Literal[tuple(RL_METHODS)]  # the methods above, one place

# The names of 0.2 (when the stage was `preflab ppo`): importable, with one DeprecationWarning each.
RENAMED: dict[str, str] = {"PPOConfig": "RLConfig", "PPOModels": "RLModels", "PPOData": "RLData",
                           "PPOOptim": "RLOptim", "PPOTrain": "RLTrain", "PPORun": "RLRun"}


def renamed(module_globals: dict[str, Any], name: str) -> Any:
    """The new class an old name stands for, with a DeprecationWarning the first time; the name is
    then bound here and in ``module_globals`` (``preflab.config``), so the warning comes once
    however it is imported (``from m import X`` alone looks the name up twice)."""
    import warnings

    if name not in RENAMED:
        raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")
    if name not in globals():
        warnings.warn(f"preflab.config.{name} is now {RENAMED[name]} (the online RL stage is `preflab rl`); "
                      f"the old name will be removed", DeprecationWarning, stacklevel=3)
        globals()[name] = globals()[RENAMED[name]]
    module_globals[name] = value = globals()[name]
    return value


def __getattr__(name: str) -> Any:
    return renamed(globals(), name)


__all__ = ["rl_recipe", "RLModels", "RLData", "Rollout", "PPOHyper", "AlgoSection", "RewardFunc", "RewardsSection", "KLSection", "PTXSection", "SelectSection", "RLOptim", "RLTrain", "RLRun", "RLConfig", "RL_METHODS", "RLMethod"]
