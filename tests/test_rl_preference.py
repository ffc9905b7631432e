"""DPO, cDPO, IPO and SimPO against hand-computed values; K-way pairs with ties and padding.

softplus(x) = log(1 + e^x) and -log sigmoid(h) = softplus(-h) throughout.
"""

import math

import pytest
import torch

from preflab.rl.preference import dpo_loss, implicit_rewards, ipo_loss, pair_mask, preference_loss, simpo_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dpo_against_hand_computed():
    """logratio(y_w) = -1, logratio(y_l) = -3, beta = 0.1: h = 0.1 * (-1 - -3) = 0.2,
    loss = softplus(-0.2) = log(1 + e^-0.2) = 0.5981388693815918.
    Swapped winner and loser: softplus(0.2) = 0.7981388693815918; beta dropped (1): softplus(-2) = 0.1269."""
    w, lo = torch.tensor([-1.0]), torch.tensor([-3.0])
    assert dpo_loss(w, lo, 0.1).item() == pytest.approx(0.5981388693815918, abs=1e-7)
    assert dpo_loss(lo, w, 0.1).item() == pytest.approx(0.7981388693815918, abs=1e-7)
    assert dpo_loss(w, lo, 1.0).item() == pytest.approx(0.1269280110429725, abs=1e-7)
    # policy == reference: h = 0, loss = log 2 whatever beta
    assert dpo_loss(torch.zeros(3), torch.zeros(3), 0.37).tolist() == pytest.approx([math.log(2)] * 3)


def test_conservative_dpo_against_hand_computed():
    """eps = 0.1, h = 0.2: (1 - eps) softplus(-h) + eps softplus(h)
    = 0.9 * 0.5981388693815918 + 0.1 * 0.7981388693815918 = 0.6181388693815918; eps = 0 is DPO."""
    w, lo = torch.tensor([-1.0]), torch.tensor([-3.0])
    assert dpo_loss(w, lo, 0.1, label_smoothing=0.1).item() == pytest.approx(0.6181388693815918, abs=1e-7)
    assert dpo_loss(w, lo, 0.1, 0.0).item() == pytest.approx(0.5981388693815918, abs=1e-7)
    # eps = 0.5 makes the label a coin flip: the loss is symmetric in w and l
    assert dpo_loss(w, lo, 0.1, 0.5).item() == pytest.approx(dpo_loss(lo, w, 0.1, 0.5).item())


def test_ipo_against_hand_computed():
    """h = 0.5 - (-0.5) = 1, beta = 0.25: target 1 / (2 * 0.25) = 2, loss (1 - 2)^2 = 1.
    Swapped: (-1 - 2)^2 = 9. beta = 0.5: target 1, loss 0 (the optimum IPO regresses to)."""
    w, lo = torch.tensor([0.5]), torch.tensor([-0.5])
    assert ipo_loss(w, lo, 0.25).item() == pytest.approx(1.0)
    assert ipo_loss(lo, w, 0.25).item() == pytest.approx(9.0)
    assert ipo_loss(w, lo, 0.5).item() == pytest.approx(0.0)


def test_simpo_against_hand_computed():
    """avg logp(y_w) = -1, avg logp(y_l) = -2, beta = 2, gamma = 1:
    softplus(-(2 * (-1 - -2) - 1)) = softplus(-1) = 0.31326168751822286.
    Swapped: softplus(3) = 3.0485873515737420; gamma = 0: softplus(-2) = 0.1269280110429725."""
    w, lo = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert simpo_loss(w, lo, 2.0, 1.0).item() == pytest.approx(0.31326168751822286, abs=1e-7)
    assert simpo_loss(lo, w, 2.0, 1.0).item() == pytest.approx(softplus(3.0), abs=1e-6)
    assert simpo_loss(w, lo, 2.0, 0.0).item() == pytest.approx(0.1269280110429725, abs=1e-7)


def test_pair_mask_drops_ties_and_padding():
    ranks = torch.tensor([[0, 1, 1], [1, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    m = pair_mask(ranks, valid)
    assert m[0].nonzero().tolist() == [[0, 1], [0, 2]]  # the tie (1, 2) gives no pair
    assert m[1].nonzero().tolist() == [[1, 0]]  # response 2 is padding


def kway_batch():
    """Prompt A: K = 3, ranks [0, 1, 1] (a tie), logps [-4, -6, -5], ref [-5, -4, -5], lengths [2, 4, 1].
    Prompt B: K = 2 padded to 3, ranks [1, 0], logps [-2, -3], ref [-2, -2.5], lengths [1, 2]."""
    logps = torch.tensor([[-4.0, -6.0, -5.0], [-2.0, -3.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-5.0, -4.0, -5.0], [-2.0, -2.5, 0.0]])
    lengths = torch.tensor([[2, 4, 1], [1, 2, 0]])
    ranks = torch.tensor([[0, 1, 1], [1, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    return logps, ref, lengths, ranks, valid


def test_kway_dpo_is_the_mean_over_each_prompts_pairs_summed_over_prompts():
    """beta = 0.5. A: logratios [1, -2, 0]; pairs (0, 1): h = 0.5 * 3 = 1.5, (0, 2): h = 0.5;
    per-prompt (softplus(-1.5) + softplus(-0.5)) / 2 = 0.33774513108142956.
    B: logratios [0, -0.5]; the winner is response 1: h = 0.5 * (-0.5 - 0) = -0.25, softplus(0.25) = 0.8259394198788436.
    Sum over prompts: 1.1636845509602731. Rewards beta * logratio: winners 0.5, 0.5, -0.25 (sum 0.75),
    losers -1, 0, 0 (sum -1); correct pairs: A's two.
    Without the reference (ref = 0) the sum would be 1.3677463200292714; with the ranks swapped, larger."""
    logps, ref, lengths, ranks, valid = kway_batch()
    parts = preference_loss(logps, ref, lengths, ranks, valid, loss="dpo", beta=0.5)
    assert parts.total.item() == pytest.approx(1.1636845509602731, abs=1e-6)
    assert (parts.n_prompts, parts.n_pairs, parts.n_correct) == (2, 3, 2)
    assert parts.chosen_reward == pytest.approx(0.75) and parts.rejected_reward == pytest.approx(-1.0)
    assert parts.chosen_logps == pytest.approx(-4 - 4 - 3) and parts.rejected_logps == pytest.approx(-6 - 5 - 2)
    parts.total.backward()
    assert logps.grad[0, 0] < 0 and logps.grad[0, 1] > 0 and logps.grad[1, 2] == 0  # pad gets nothing
    # Using no reference (ref = 0) or swapping the ranks gives other values.
    other = preference_loss(logps, torch.zeros_like(ref), lengths, ranks, valid, loss="dpo", beta=0.5)
    swapped = preference_loss(logps, ref, lengths, 1 - ranks, valid, loss="dpo", beta=0.5)
    assert other.total.item() == pytest.approx(1.3677463200292714, abs=1e-6)
    assert swapped.total.item() > 1.1636845509602731 + 0.5


def test_kway_cdpo_ipo_simpo_against_hand_computed():
    """Same batch, beta = 0.5.
    cDPO eps = 0.2: A (0.8 sp(-1.5) + 0.2 sp(1.5) + 0.8 sp(-0.5) + 0.2 sp(0.5)) / 2, B 0.8 sp(0.25) + 0.2 sp(-0.25).
    IPO (per-token logratios: A [1/2, -2/4, 0], B [0, -1/4]; target 1/(2 * 0.5) = 1):
       A ((1 - 1)^2 + (0.5 - 1)^2) / 2 = 0.125; B (-0.25 - 1)^2 = 1.5625; total 1.6875.
    SimPO gamma = 0.25 (per-token logps: A [-2, -1.5, -5], B [-2, -1.5]):
       A (sp(-(0.5 * (-2 + 1.5) - 0.25)) + sp(-(0.5 * 3 - 0.25))) / 2 = (sp(0.5) + sp(-1.25)) / 2;
       B: winner 1 (-1.5), loser 0 (-2): sp(-(0.25 - 0.25)) = log 2."""
    logps, ref, lengths, ranks, valid = kway_batch()
    sp = softplus
    cdpo = preference_loss(logps, ref, lengths, ranks, valid, loss="cdpo", beta=0.5, label_smoothing=0.2)
    want = (0.8 * sp(-1.5) + 0.2 * sp(1.5) + 0.8 * sp(-0.5) + 0.2 * sp(0.5)) / 2 + 0.8 * sp(0.25) + 0.2 * sp(-0.25)
    assert cdpo.total.item() == pytest.approx(want, abs=1e-6)
    # label_smoothing is cDPO's alone: plain DPO ignores it
    dpo = preference_loss(logps, ref, lengths, ranks, valid, loss="dpo", beta=0.5, label_smoothing=0.2)
    assert dpo.total.item() == pytest.approx(1.1636845509602731, abs=1e-6)
    ipo = preference_loss(logps, ref, lengths, ranks, valid, loss="ipo", beta=0.5)
    assert ipo.total.item() == pytest.approx(1.6875, abs=1e-6)
    simpo = preference_loss(logps, None, lengths, ranks, valid, loss="simpo", beta=0.5, simpo_gamma=0.25)
    assert simpo.total.item() == pytest.approx((sp(0.5) + sp(-1.25)) / 2 + math.log(2), abs=1e-6)
    assert simpo.n_correct == 2  # A: -2 > -1.5 is false for (0, 1); (0, 2) true; B: -1.5 > -2 true
    with pytest.raises(ValueError, match="reference"):
        preference_loss(logps, None, lengths, ranks, valid, loss="dpo", beta=0.5)


def test_implicit_rewards():
    logps, ref, lengths = torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0]), torch.tensor([2, 4])
    assert implicit_rewards(logps, ref, lengths, "dpo", 0.1).tolist() == pytest.approx([0.1, -0.1])
    assert implicit_rewards(logps, ref, lengths, "ipo", 0.1).tolist() == pytest.approx([0.05, -0.025])
    assert implicit_rewards(logps, None, lengths, "simpo", 2.0).tolist() == pytest.approx([-4.0, -3.0])


def test_nll_term_adds_the_best_responses_per_token_nll():
    """Prompt 0: best is response 1 (logp -6 over 3 tokens): NLL 2. Prompt 1: a tied top (responses
    0 and 2: -4/2 and -9/3): NLL (2 + 3) / 2 = 2.5; its padded response never counts."""
    logps = torch.tensor([[-4.0, -6.0, -9.0], [-4.0, -1.0, -9.0]])
    ref = torch.tensor([[-5.0, -5.0, -5.0], [-5.0, -5.0, -5.0]])
    lengths = torch.tensor([[2, 3, 3], [2, 1, 3]])
    ranks = torch.tensor([[1, 0, 2], [0, 1, 0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 1]])
    base = preference_loss(logps, ref, lengths, ranks, valid, loss="dpo", beta=0.1)
    with_nll = preference_loss(logps, ref, lengths, ranks, valid, loss="dpo", beta=0.1, nll_coef=0.5)
    assert float(with_nll.total - base.total) == pytest.approx(0.5 * (2.0 + 2.5))
    padded = preference_loss(logps, ref, lengths, torch.tensor([[1, 0, 2], [0, 1, 0]]),
                             torch.tensor([[1, 1, 1], [0, 1, 1]]), loss="dpo", beta=0.1, nll_coef=1.0)
    no_nll = preference_loss(logps, ref, lengths, torch.tensor([[1, 0, 2], [0, 1, 0]]),
                             torch.tensor([[1, 1, 1], [0, 1, 1]]), loss="dpo", beta=0.1)
    assert float(padded.total - no_nll.total) == pytest.approx(2.0 + 3.0)  # prompt 1's top is response 2 alone
