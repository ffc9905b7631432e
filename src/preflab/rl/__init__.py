"""preflab.rl: the maths of RLHF as pure functions.

Tensors (or numpy arrays) in, tensors out; shapes in each docstring; no config objects,
no I/O, no distributed code. Nothing here imports the rest of preflab. Docstrings cite
the section of docs/reference.md (and through it the paper or code) they follow.

- ``logprobs``: token log-probs with the sampling temperature, entropy, masked statistics.
- ``kl``: per-token KL estimators k1/k2/k3, fixed and adaptive KL controllers.
- ``advantages``: per-token rewards (score on the last real token), GAE, whitening.
- ``ppo``: clipped policy and value losses, explained variance, the LM loss of SFT/ptx.
- ``ranking``: InstructGPT's K-way loss, Bradley-Terry, Plackett-Luce.
- ``calibration``: ECE/MCE, reliability by reward margin, temperature scaling (numpy).
- ``stats``: Wilson interval, win rate, bootstrap interval (numpy).
"""

from .advantages import GAE, PPORewards, gae, last_token_index, ppo_rewards, whiten_advantages, whiten_rewards
from .calibration import (
    Calibration,
    CalibrationBin,
    MarginBin,
    expected_calibration_error,
    fit_temperature,
    reliability_by_margin,
)
from .kl import AdaptiveKLController, FixedKLController, KLController, kl_k1, kl_k2, kl_k3
from .logprobs import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    selective_log_softmax,
    token_logprobs,
)
from .ppo import (
    PolicyLoss,
    ValueLoss,
    explained_variance,
    policy_loss,
    value_loss,
)
from .ranking import (
    KWayRankingLoss,
    batched_kway_ranking_loss,
    batched_plackett_luce_loss,
    bradley_terry_loss,
    kway_ranking_loss,
    plackett_luce_loss,
    ranks_from_tiers,
)
from .stats import Interval, WinRate, bootstrap_ci, difference_interval, wilson_interval, win_rate

__all__ = [
    "AdaptiveKLController",
    "Calibration",
    "CalibrationBin",
    "FixedKLController",
    "GAE",
    "Interval",
    "KLController",
    "KWayRankingLoss",
    "MarginBin",
    "PPORewards",
    "PolicyLoss",
    "ValueLoss",
    "WinRate",
    "batched_kway_ranking_loss",
    "batched_plackett_luce_loss",
    "bootstrap_ci",
    "bradley_terry_loss",
    "entropy_from_logits",
    "expected_calibration_error",
    "explained_variance",
    "fit_temperature",
    "gae",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kway_ranking_loss",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "plackett_luce_loss",
    "policy_loss",
    "ppo_rewards",
    "ranks_from_tiers",
    "reliability_by_margin",
    "selective_log_softmax",
    "token_logprobs",
    "value_loss",
    "whiten_advantages",
    "whiten_rewards",
    "win_rate",
    "wilson_interval",
    "difference_interval",
]
