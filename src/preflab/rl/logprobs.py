"""Token log-probabilities, entropy and masked statistics.

Shapes: B = batch rows, T = sequence positions, V = vocabulary size.
Masks are (B, T) tensors; a nonzero entry marks a real token, zero marks padding
or a position that must not count. Values at masked-out positions never reach a
result, even when they are ``inf`` or ``nan`` (they are selected away, not multiplied
by zero).
"""

from __future__ import annotations

import torch

__all__ = [
    "entropy_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "selective_log_softmax",
    "token_logprobs",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)`` gathered at ``index``, without a (B, T, V) log-softmax copy.

    Same result as ``torch.gather(logits.log_softmax(-1), -1, index[..., None])[..., 0]``
    but the full log-softmax is never materialised for the whole batch: one row at a time,
    so the peak extra memory is (T, V) instead of (B, T, V) (the trick of TRL's
    ``selective_log_softmax``).

    - fp32 / fp64: ``logit[index] - logsumexp(logits)`` per row, in the input dtype.
    - fp16 / bf16: ``logsumexp`` in half precision loses several bits, so each row is
      upcast to fp32 and log-softmaxed there; the result is **float32** (log-probs
      rounded to bf16 would put ~1e-2 noise into the PPO ratio exp(logp - old_logp)).

    Args:
        logits: (B, T, V) unnormalised scores.
        index: (B, T) int64 token ids to pick.

    Returns:
        (B, T) log-probabilities; dtype of ``logits``, or float32 for fp16/bf16.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and index {tuple(index.shape)} disagree")
    rows = []
    if logits.dtype in _LOW_PRECISION:
        for row_logits, row_index in zip(logits, index):
            row_logp = torch.log_softmax(row_logits.float(), dim=-1)
            rows.append(row_logp.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    else:
        for row_logits, row_index in zip(logits, index):
            picked = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)
            rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    if not rows:  # B == 0
        out_dtype = torch.float32 if logits.dtype in _LOW_PRECISION else logits.dtype
        return logits.new_zeros(index.shape, dtype=out_dtype)
    return torch.stack(rows)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token under temperature-scaled logits.

    The logits at position t predict token t+1, so the output has one column fewer
    than the input. Logits are divided by the *sampling* temperature before the
    softmax, for the policy and the reference alike (lm-human-preferences policy.py
    ``analyze_responses_op``: ``logits /= temperature``; docs/reference.md §2.3): the
    log-probs must be those of the distribution the responses were drawn from, or the
    KL "would rise faster than expected".

    Args:
        logits: (B, T, V) model outputs for ``input_ids``.
        input_ids: (B, T) the tokens fed to the model.
        temperature: sampling temperature, > 0.

    Returns:
        (B, T-1): ``out[b, t] = log softmax(logits[b, t] / temperature)[input_ids[b, t+1]]``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shifted = logits[:, :-1, :]
    if temperature != 1.0:
        shifted = shifted / temperature
    return selective_log_softmax(shifted, input_ids[:, 1:])


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Exact entropy of the categorical distribution at every position.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v (equal to -sum p log p, without forming
    log p). fp16/bf16 inputs are computed in fp32 and returned as float32. Divide the
    logits by the sampling temperature first if that distribution is wanted.

    Args:
        logits: (B, T, V).

    Returns:
        (B, T) entropies in nats.
    """
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is nonzero.

    Args:
        x: (...) values.
        mask: same shape as ``x``; nonzero = counts.
        dim: reduce this dimension only; ``None`` reduces all of them to a scalar.
    """
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is nonzero.

    Every counted element has equal weight (a token-level mean when ``dim`` is None).
    A slice with no counted element gives ``nan`` (0/0), never a silent 0.

    Args:
        x: (...) values.
        mask: same shape as ``x``; nonzero = counts.
        dim: reduce this dimension only; ``None`` reduces all of them to a scalar.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(x, mask, dim) / count.to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of the counted elements of ``x`` (all dimensions reduced).

    Biased (divide by n) by default, as ``tf.nn.moments`` in lm-human-preferences
    ``whiten``; PyTorch ports must match it (docs/reference.md §2.5). ``unbiased=True``
    divides by n - 1 (TRL's ``masked_var``) and needs n >= 2.

    Args:
        x: (...) values.
        mask: same shape as ``x``; nonzero = counts.

    Returns:
        scalar tensor.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = int(mask.bool().sum())
        if n < 2:
            raise ValueError(f"unbiased variance needs at least 2 counted elements, got {n}")
        var = var * (n / (n - 1))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the counted elements of ``x`` to unit variance, with statistics over all axes.

    lm-human-preferences utils/core.py ``whiten`` (docs/reference.md §2.5)::

        mean, var = moments(x)                    # biased variance
        w = (x - mean) * rsqrt(var + 1e-8)
        if not shift_mean: w += mean              # rescale the variance, keep the mean

    ``shift_mean=True`` is used for advantages, ``shift_mean=False`` for rewards.
    Masked-out positions are 0 in the output.

    Args:
        x: (...) values, e.g. (B, T).
        mask: same shape as ``x``; nonzero = counts.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance before the square root.

    Returns:
        same shape as ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))
