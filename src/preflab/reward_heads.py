"""A reward-model ensemble on one trunk: M linear heads, each trained on its own bootstrap
resample of the rankings (``rm.train.heads``; Osband et al. 2016's bootstrapped heads).

The members share every trunk weight, so the ensemble costs one forward pass of one model where
M separate reward models (the pipeline's ``rm_ensemble``) cost M. Each head ``m`` has its own
normalisation (gain g_m, bias b_m from the RM stage, stored in the config as
``preflab_reward_head_gain`` / ``preflab_reward_head_bias``), so the members' spread is not the
arbitrary offsets a ranking loss leaves them.

``RewardHeads`` replaces the model's ``score`` head and answers in one of three modes:

- ``mean`` (the default): ``mean_m(g_m * raw_m + b_m)``, one output: the reward model's score
  wherever one number is read (evaluation, best-of-N, rejection sampling, the critic's start);
- ``members``: the (..., M) normalised member scores (the RL reward under ``rewards.ensemble``,
  the ensemble's uncertainty);
- ``raw``: the (..., M) raw head outputs (the RM stage's bootstrap loss and its normalisation).

A saved checkpoint holds a plain ``Linear(hidden, M)`` ``score`` (``save_model`` puts it back), so
``AutoModelForSequenceClassification`` loads it and returns the M raw scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from preflab.lm import unwrap

HEADS_KEY = "preflab_reward_heads"
GAIN_KEY, BIAS_KEY = "preflab_reward_head_gain", "preflab_reward_head_bias"
MODES = ("mean", "members", "raw")


class RewardHeads(nn.Module):
    """M reward heads on one trunk in place of a one-output ``score`` (see the module's docstring)."""

    def __init__(self, linear: nn.Linear, gain: list[float] | None = None, bias: list[float] | None = None):
        super().__init__()
        m = linear.out_features
        self.linear = linear
        self.register_buffer("gain", torch.tensor(gain or [1.0] * m, dtype=torch.float32), persistent=False)
        self.register_buffer("offset", torch.tensor(bias or [0.0] * m, dtype=torch.float32), persistent=False)
        self.mode = "mean"

    @property
    def weight(self) -> torch.Tensor:  # scoring.scalar_head reads the head's precision from it
        return self.linear.weight

    @property
    def heads(self) -> int:
        return self.linear.out_features

    def set_norm(self, gain: list[float], bias: list[float]) -> None:
        self.gain.copy_(torch.tensor(gain, dtype=torch.float32))
        self.offset.copy_(torch.tensor(bias, dtype=torch.float32))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raw = self.linear(hidden)
        if self.mode == "raw":
            return raw
        members = raw * self.gain.to(raw.dtype) + self.offset.to(raw.dtype)
        return members if self.mode == "members" else members.mean(-1, keepdim=True)


def head_attr(model: Any) -> str:
    """Name of a sequence-classification model's head attribute (``score``, or ``classifier``)."""
    return "score" if hasattr(unwrap(model), "score") else "classifier"


def heads_of(model: Any) -> RewardHeads | None:
    """The model's ``RewardHeads``, or None for a one-head scorer."""
    head = getattr(unwrap(model), head_attr(model), None)
    return head if isinstance(head, RewardHeads) else None


def head_count(model: Any) -> int:
    """How many reward heads the model has (1 for a one-output scorer)."""
    heads = heads_of(model)
    return 1 if heads is None else heads.heads


def attach(model: Any) -> Any:
    """Put ``RewardHeads`` in place of a several-output linear head, with the normalisation the
    config stores (identity for a model the RM stage has not normalised yet); a one-output model is
    left as it is. Returns the model."""
    base = unwrap(model)
    name = head_attr(model)
    head = getattr(base, name)
    if isinstance(head, nn.Linear) and head.out_features > 1:
        cfg = base.config
        setattr(base, name, RewardHeads(head, getattr(cfg, GAIN_KEY, None), getattr(cfg, BIAS_KEY, None)))
        setattr(cfg, HEADS_KEY, head.out_features)
    return model


@contextlib.contextmanager
def plain_head(model: Any) -> Iterator[None]:
    """Within: the model's head is the plain ``Linear`` (what ``save_pretrained`` writes)."""
    heads = heads_of(model)
    if heads is None:
        yield
        return
    base, name = unwrap(model), head_attr(model)
    setattr(base, name, heads.linear)
    try:
        yield
    finally:
        setattr(base, name, heads)


@contextlib.contextmanager
def head_mode(model: Any, mode: str) -> Iterator[int]:
    """Within: the model's ``RewardHeads`` answer in ``mode``; yields the number of heads (1 for a
    one-head model, which is left as it is)."""
    if mode not in MODES:
        raise ValueError(f"head mode must be one of {MODES}, got {mode!r}")
    heads = heads_of(model)
    if heads is None:
        yield 1
        return
    before, heads.mode = heads.mode, mode
    try:
        yield heads.heads
    finally:
        heads.mode = before


def store_norm(model: Any, gain: list[float], bias: list[float]) -> None:
    """Each head's normalisation into the heads and the config (saved with the model); the scalar
    ``preflab_reward_gain`` / ``_bias`` become the identity, so nothing applies a second one."""
    heads = heads_of(model)
    heads.set_norm(gain, bias)
    cfg = unwrap(model).config
    setattr(cfg, GAIN_KEY, [float(g) for g in gain])
    setattr(cfg, BIAS_KEY, [float(b) for b in bias])
    cfg.preflab_reward_gain, cfg.preflab_reward_bias = 1.0, 0.0


def mean_linear(model: Any) -> nn.Linear:
    """One ``Linear(hidden, 1)`` with a bias that gives the heads' ``mean`` score: the mean of the
    normalised heads is linear in the hidden state (``models.apply_reward_norm`` folds it in)."""
    heads = heads_of(model)
    lin = heads.linear
    g, b = heads.gain.to(lin.weight.dtype), heads.offset.to(lin.weight.dtype)
    new = nn.Linear(lin.in_features, 1, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_((lin.weight * g[:, None]).mean(0, keepdim=True))
        own = lin.bias if lin.bias is not None else torch.zeros_like(g)
        new.bias.fill_(float((own * g + b).mean()))
    return new


def bootstrap_weights(n: int, heads: int, seed: int) -> list[list[float]] | None:
    """Each ranking's weight in each head's loss: Poisson(1) draws (the bootstrap's counts, a
    ranking left out of about a third of the heads), fixed by the seed and the ranking's index, so
    batch layout and ranks do not change them. None for one head (plain training)."""
    if heads < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.ones(n, heads), generator=g).tolist()
