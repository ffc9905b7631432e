"""Every key a training stage writes to ``metrics.jsonl``, named once.

``RunDir.log_metrics`` appends one JSON row per logged step: ``{"step": N, KEY: value, ...}``; the
run's manifest keeps the stage's final metrics under the same names.
The keys are namespaced by what they measure (``train/`` the optimisation step, ``val/`` held-out
data, ``perf/`` speed and memory, ``objective/``, ``policy/``, ``value/``, ``loss/`` and
``response/`` the online RL stage, ``rm/`` the reward model's held-out evaluation). Readers (the
report, benchmarks, a release gate comparing two runs) use these names instead of spelling the
strings again; ``tests/test_metric_keys.py`` runs every stage on its tiny config and fails when a
stage logs a key that is not named here.

Most keys are fixed strings (the constants below, and ``KEYS``). A few are built per run:

- ``rm/accuracy/{attr}/{name}``: held-out RM accuracy per prompt ``category`` or ``slice``
  (``rm_accuracy_by``);
- ``{split}/rewards/...`` and ``{split}/logps/...`` of the preference trainers, ``split`` being
  ``train`` or ``val`` (``PREFERENCE_KEYS``);
- ``round{r}/...``: rejection sampling's per-round statistics (``rs_round``).

``is_known(key)`` says whether a key is one of them.
"""

from __future__ import annotations

import re

__all__ = ["KEYS", "is_known", "rm_accuracy_by", "rs_round"]

STEP = "step"  # added to every row by RunDir.log_metrics

# --- the optimisation step (every trainer) ---------------------------------------------------
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_TOKENS = "train/tokens"  # SFT: response tokens in the step
TRAIN_PROMPTS = "train/prompts"  # RM, DPO: prompts (K-way groups) in the step
TRAIN_PAIRS = "train/pairs"  # RM: comparisons in the step
TRAIN_ACCURACY = "train/accuracy"  # RM: fraction of the step's pairs ranked right

# --- held-out data ----------------------------------------------------------------------------
VAL_LOSS = "val/loss"
VAL_KL = "val/kl"  # DPO: sampled KL to the reference (nats per response)
VAL_KL_SAMPLES = "val/kl_samples"
BEST_STEP = "best/step"  # SFT and RM with select_best: the exported step (the manifest's final metrics)
BEST_VAL_LOSS = "best/val_loss"

# --- speed and memory ---------------------------------------------------------------------------
PERF_STEP_S = "perf/step_s"
PERF_TOKENS_PER_S = "perf/tokens_per_s"
PERF_PAIRS_PER_S = "perf/pairs_per_s"
PERF_PEAK_RSS_MB = "perf/peak_rss_mb"
PERF_GEN_S = "perf/gen_s"  # online RL: sampling
PERF_SCORE_S = "perf/score_s"  # online RL: reward, reference and value forward passes
PERF_TRAIN_S = "perf/train_s"  # online RL: the policy/critic update

# --- online RL (PPO, RLOO, GRPO, REINFORCE++) -------------------------------------------------
OBJECTIVE_KL = "objective/kl"  # mean summed per-token KL of the rollout to the reference
OBJECTIVE_KL_COEF = "objective/kl_coef"
OBJECTIVE_SCORE = "objective/score"  # mean reward (RM and reward functions)
OBJECTIVE_NON_SCORE_REWARD = "objective/non_score_reward"  # the KL penalty part of the reward
OBJECTIVE_RLHF_REWARD = "objective/rlhf_reward"  # score + non-score reward
OBJECTIVE_ENTROPY = "objective/entropy"  # minus the sampled sequence log-prob
OBJECTIVE_PROMPT_SHARE = "objective/prompt_share"  # k >= 2: share of the sequence reward's variance between prompts
OBJECTIVE_RM_STD = "objective/rm_std"  # with an RM ensemble: the members' mean spread (population std) over the rollout
OBJECTIVE_LENGTH_SLOPE = "objective/length_slope"  # k >= 2: the score's slope on response length within prompts (per token)
LOSS_POLICY = "loss/policy"
LOSS_VALUE = "loss/value"
LOSS_KL = "loss/kl"  # the KL term when the KL is in the loss (GRPO's k3)
LOSS_PTX = "loss/ptx"  # PPO-ptx: pretraining LM loss
POLICY_APPROXKL = "policy/approxkl"
POLICY_CLIPFRAC = "policy/clipfrac"
POLICY_ENTROPY = "policy/entropy"
POLICY_RATIO = "policy/ratio"
VALUE_CLIPFRAC = "value/clipfrac"
VALUE_EXPLAINED_VARIANCE = "value/explained_variance"  # with a critic only
ADVANTAGE_MEAN = "advantage/mean"  # online RL: over the rollout's real response tokens, before the update
ADVANTAGE_STD = "advantage/std"
RETURN_MEAN = "return/mean"  # the critic's targets (gae), the raw advantages otherwise
RETURN_STD = "return/std"
SELECT_SCORE = "select/score"  # online RL with select.every: the dev score of the policy at this step
SELECT_BEST_STEP = "select/best_step"  # the exported step (the manifest's final metrics)
RESPONSE_LENGTH_MEAN = "response/length_mean"
RESPONSE_NO_EOS_FRACTION = "response/no_eos_fraction"

# --- the reward model's held-out evaluation (evals.rm_eval.report_metrics) --------------------
RM_ACCURACY = "rm/accuracy"
RM_LOSS = "rm/loss"
RM_PAIRS = "rm/pairs"
RM_ECE = "rm/ece"
RM_MCE = "rm/mce"
RM_TEMPERATURE = "rm/temperature"
RM_ECE_TEST_BEFORE = "rm/ece_test_before"
RM_ECE_TEST_AFTER = "rm/ece_test_after"
RM_LABELER_AGREEMENT = "rm/labeler_agreement"
RM_ACCURACY_MULTI_LABELED = "rm/accuracy_multi_labeled"
RM_NORM_GAIN = "rm/norm_gain"
RM_NORM_BIAS = "rm/norm_bias"
RM_DEMO_SCORE_MEAN = "rm/demo_score_mean"

# --- preference trainers (DPO, IPO, cDPO, SimPO): "{split}/..." with split train or val --------
PREFERENCE_SPLITS = ("train", "val")
PREFERENCE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                   "logps/chosen", "logps/rejected")
TRAIN_REWARDS_ACCURACY = "train/rewards/accuracy"
TRAIN_PTX_NLL = "train/ptx_nll"  # with dpo.ptx_coef: the paired demonstrations' mean per-token NLL

# --- rejection sampling: "round{r}/..." ----------------------------------------------------------
RS_ROUND_KEYS = ("reward_mean", "best_reward_mean", "ended", "picks", "kept", "pick_reward_mean")

# --- the keys of the report's PPO curves -----------------------------------------------------
PPO_CURVES = (OBJECTIVE_SCORE, OBJECTIVE_KL, OBJECTIVE_KL_COEF, RESPONSE_LENGTH_MEAN, RESPONSE_NO_EOS_FRACTION,
              OBJECTIVE_ENTROPY, VALUE_EXPLAINED_VARIANCE, LOSS_VALUE, POLICY_CLIPFRAC, POLICY_APPROXKL, ADVANTAGE_STD,
              SELECT_SCORE, OBJECTIVE_PROMPT_SHARE, OBJECTIVE_RM_STD,
              OBJECTIVE_LENGTH_SLOPE)

KEYS: frozenset[str] = frozenset(
    [v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and "/" in v]
    + [STEP]
    + [f"{split}/{key}" for split in PREFERENCE_SPLITS for key in PREFERENCE_KEYS]
)
"""Every fixed key (the per-category, per-slice and per-round keys are patterns: ``is_known``)."""

RM_ACCURACY_BY_ATTRS = ("category", "slice")


def rm_accuracy_by(attr: str, name: str) -> str:
    """``rm/accuracy/{attr}/{name}``: held-out RM accuracy of one prompt category or slice."""
    if attr not in RM_ACCURACY_BY_ATTRS:
        raise ValueError(f"attr must be one of {RM_ACCURACY_BY_ATTRS}, got {attr!r}")
    return f"{RM_ACCURACY}/{attr}/{name}"


def rs_round(r: int, key: str) -> str:
    """``round{r}/{key}``: a statistic of rejection sampling's round ``r`` (1-based)."""
    if key not in RS_ROUND_KEYS:
        raise ValueError(f"unknown rejection-sampling key {key!r} (known: {', '.join(RS_ROUND_KEYS)})")
    return f"round{r}/{key}"


_PATTERNS = (
    re.compile(rf"{re.escape(RM_ACCURACY)}/(?:{'|'.join(RM_ACCURACY_BY_ATTRS)})/.+"),
    re.compile(rf"round[1-9][0-9]*/(?:{'|'.join(RS_ROUND_KEYS)})"),
)


def is_known(key: str) -> bool:
    """Whether ``key`` is a fixed key of ``KEYS`` or one of the per-category/slice/round patterns."""
    return key in KEYS or any(p.fullmatch(key) for p in _PATTERNS)
