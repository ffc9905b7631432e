"""Token choice for the engine: logits processing (temperature, top-k, top-p, min-new-tokens) and
counter-based random draws.

RNG contract. A ``generate`` call takes one 62-bit seed from the global torch RNG (so
``torch.manual_seed`` makes a call repeatable, as before). The uniform that picks the token of
output row ``r`` at response step ``t`` is a hash of ``(seed, r, t)``: it does not depend on which
other rows share the batch, on the order rows are bucketed in, on rows dropped after EOS, or on
whether the ``n`` samples of a prompt share one prefill. So a prefix-shared call and an unshared
call with the same seed draw the same tokens (up to float rounding of the logits themselves).
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_ROW = _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic = uint64 bit patterns)."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def new_seed() -> int:
    """One seed per ``generate`` call, from the global torch RNG."""
    return int(torch.randint(0, 1 << 62, (1,)).item())


def uniforms(seed: int, rows: torch.Tensor, step: int) -> torch.Tensor:
    """(B,) float64 uniforms in [0, 1) for output rows ``rows`` (int64) at response step ``step``."""
    key = _splitmix64(torch.full_like(rows, _signed(seed * _GOLDEN)) ^ (rows * _ROW))
    x = _splitmix64(key + _signed((step + 1) * 0x9E3779B97F4A7C15))
    return _shr(x, 11).double() * (1.0 / (1 << 53))


def process(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """float32 logits / T restricted to the top ``top_k`` (0: off) and the smallest set with mass
    >= ``top_p`` (1: off); the rest -inf. Same rules as ``rollout.InverseCDFSampler``."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # the mass above a token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) tokens by inverse CDF: the first index whose cumulative softmax mass exceeds ``u``
    (so a token of zero probability is never drawn). ``u``: (B,) float64 in [0, 1)."""
    cdf = logits.softmax(-1).double().cumsum(-1)
    target = u.to(cdf.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)[:, 0]
