"""``lm.TokenNLL`` (the SFT loss and the PPO-ptx term) against the naive formula: a full forward,
log-softmax over every position, the label token's log-prob gathered, -100 skipped."""

import pytest
import torch

from preflab.data.chat import IGNORE
from preflab.lm import TokenNLL


def naive_nll(model, input_ids, attention_mask, labels):
    """sum over counted tokens of -log p(label_t+1 | tokens <= t), and the count (position t predicts t+1)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum(), keep.sum()


@pytest.mark.parametrize("bf16", [False, True])
def test_token_nll_equals_the_naive_formula_and_skips_ignored_labels(tiny, bf16):
    model, _ = tiny
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # right padding on one row
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt is not trained on
    labels[2, 6:] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got, n = TokenNLL(model)(ids, mask, labels)
        want, n_want = naive_nll(model, ids, mask, labels)
    assert int(n) == int(n_want) == 5 + 5 + 2  # labels 4..8 count on full rows; row 2 only 4 and 5
    torch.testing.assert_close(got, want, rtol=1e-2 if bf16 else 1e-5, atol=1e-2 if bf16 else 1e-5)
    # Dropping a label removes exactly its term.
    fewer = labels.clone()
    fewer[0, 8] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got_fewer, n_fewer = TokenNLL(model)(ids, mask, fewer)
    assert int(n_fewer) == int(n) - 1
    assert float(got_fewer) < float(got)


def test_token_nll_gradient_equals_the_naive_formula(tiny):
    model, _ = tiny
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = IGNORE
    TokenNLL(model)(ids, mask, labels)[0].backward()
    ours = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    naive_nll(model, ids, mask, labels)[0].backward()
    naive = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    assert len(ours) == len(naive) > 0
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
