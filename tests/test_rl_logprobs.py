"""preflab.rl.logprobs against hand-computed values and the naive formulas."""

import math

import pytest
import torch

from preflab.rl.logprobs import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    selective_log_softmax,
    token_logprobs,
)

LN3 = math.log(3.0)


def _naive(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)


def test_selective_log_softmax_hand_computed():
    """logits [0, ln 3]: softmax = [1/4, 3/4], so index 1 -> ln(3/4) = -0.287682 and
    index 0 -> ln(1/4) = -1.386294. logits [0, 0, 0, 0]: every token ln(1/4)."""
    logits = torch.tensor([[[0.0, LN3, -1e9, -1e9], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    out = selective_log_softmax(logits, torch.tensor([[1, 2]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=torch.float64))
    out = selective_log_softmax(logits, torch.tensor([[0, 3]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.25), math.log(0.25)]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_matches_naive_full_precision(dtype):
    """Same values and same gradients as gather(log_softmax(logits)) in the input dtype."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 17, generator=g)).to(dtype)
    index = torch.randint(0, 17, (3, 5), generator=g)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    fast, naive = selective_log_softmax(a, index), _naive(b, index)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, naive)
    weights = torch.randn(3, 5, generator=g).to(dtype)
    (fast * weights).sum().backward()
    (naive * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_selective_log_softmax_bf16_is_computed_in_fp32():
    """bf16 logits: each row is log-softmaxed in fp32, so the result equals the fp32 naive
    formula on the same (bf16-rounded) logits to fp32 precision, and is float32. The naive
    formula run in bf16 is only within bf16 rounding (~2^-8 relative) of it."""
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 6, 33, generator=g)).to(torch.bfloat16)
    index = torch.randint(0, 33, (2, 6), generator=g)
    out = selective_log_softmax(logits, index)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _naive(logits.float(), index), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, _naive(logits, index).float(), atol=0.1, rtol=0.02)


def test_selective_log_softmax_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        selective_log_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_token_logprobs_divides_by_temperature():
    """input_ids [5, 1, 0] (vocab 2 after the first, which only feeds the model).
    Position 0 logits [0, 2 ln 3] predict token 1; position 1 logits [0, 0] predict token 0;
    position 2 has no next token and is dropped, so the output has T-1 = 2 columns.

    temperature 2: [0, 2 ln 3]/2 = [0, ln 3] -> p(1) = 3/4 -> ln 0.75 = -0.287682;
                   [0, 0]/2 -> p(0) = 1/2 -> ln 0.5 = -0.693147.
    temperature 1 (i.e. if the temperature were ignored): [0, 2 ln 3] -> p(1) = 9/10 ->
                   ln 0.9 = -0.105361, which differs from ln 0.75."""
    logits = torch.tensor([[[0.0, 2 * LN3], [0.0, 0.0], [7.0, -7.0]]], dtype=torch.float64)
    input_ids = torch.tensor([[0, 1, 0]])
    at_t2 = token_logprobs(logits, input_ids, temperature=2.0)
    assert at_t2.shape == (1, 2)
    torch.testing.assert_close(at_t2, torch.tensor([[math.log(0.75), math.log(0.5)]], dtype=torch.float64))
    at_t1 = token_logprobs(logits, input_ids, temperature=1.0)
    torch.testing.assert_close(at_t1, torch.tensor([[math.log(0.9), math.log(0.5)]], dtype=torch.float64))
    assert not torch.allclose(at_t1, at_t2)


def test_token_logprobs_equals_log_softmax_of_scaled_logits():
    """token_logprobs(T=2)[b, t] == log_softmax(logits[b, t] / 2)[input_ids[b, t+1]] for random data."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 11, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, 11, (2, 7), generator=g)
    expected = _naive(logits[:, :-1] / 2.0, input_ids[:, 1:])
    torch.testing.assert_close(token_logprobs(logits, input_ids, temperature=2.0), expected)
    with pytest.raises(ValueError):
        token_logprobs(logits, input_ids, temperature=0.0)


def test_entropy_from_logits_hand_computed():
    """Uniform over 4 tokens: H = ln 4 = 1.386294.
    logits [0, ln 3]: p = [1/4, 3/4], H = 1/4 ln 4 + 3/4 ln(4/3) = 0.346574 + 0.215762 = 0.562335."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -1e9, -1e9]]], dtype=torch.float64)
    expected = torch.tensor(
        [[math.log(4.0), 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0)]], dtype=torch.float64
    )
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    bf16 = entropy_from_logits(logits.to(torch.bfloat16)[:, :1])
    assert bf16.dtype == torch.float32


def test_masked_sum_mean_var_hand_computed():
    """Counted: x = 1, 2 (row 0) and 4 (row 1); the rest, inf and nan included, is ignored.
    sum = 7, mean = 7/3. Deviations -4/3, -1/3, 5/3, squares 16/9 + 1/9 + 25/9 = 42/9.
    Biased variance = 42/9 / 3 = 14/9 = 1.555556; unbiased = 42/9 / 2 = 7/3.
    Per row (dim=1): sums [3, 4], means [1.5, 4]."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("inf"), float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor(7.0, dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(7.0 / 3.0, dtype=torch.float64))
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(14.0 / 9.0, dtype=torch.float64))
    torch.testing.assert_close(
        masked_var(x, mask, unbiased=True), torch.tensor(7.0 / 3.0, dtype=torch.float64)
    )
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0], dtype=torch.float64))


def test_masked_mean_of_empty_mask_is_nan_and_unbiased_var_needs_two():
    x = torch.tensor([1.0, 2.0])
    assert torch.isnan(masked_mean(x, torch.tensor([0, 0])))
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([1, 0]), unbiased=True)


def test_masked_whiten_with_and_without_shifting_the_mean():
    """Counted x = [1, 2, 3], padding last. mean = 2, biased var = (1 + 0 + 1)/3 = 2/3,
    1/sqrt(2/3) = 1.224745.
    shift_mean=True:  (x - 2) * 1.224745       = [-1.224745, 0, 1.224745], padding 0.
    shift_mean=False: (x - 2) * 1.224745 + 2   = [0.775255, 2, 3.224745], padding 0
    (lm-human-preferences whiten: variance rescaled to 1, mean kept)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    s = 1.0 / math.sqrt(2.0 / 3.0 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-s, 0.0, s, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False),
        torch.tensor([[2.0 - s, 2.0, 2.0 + s, 0.0]], dtype=torch.float64),
    )


def test_masked_whiten_statistics_on_random_data():
    """Whitened: mean 0 and biased variance 1 over counted entries. Unshifted: same
    variance, original mean."""
    g = torch.Generator().manual_seed(3)
    x = 5 + 3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    w = masked_whiten(x, mask)
    torch.testing.assert_close(masked_mean(w, mask), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(masked_var(w, mask), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    u = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(masked_mean(u, mask), masked_mean(x, mask))
    torch.testing.assert_close(masked_var(u, mask), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert bool((w[~mask] == 0).all()) and bool((u[~mask] == 0).all())
