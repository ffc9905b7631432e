"""preflab.rl.ranking: InstructGPT's K-way loss, Bradley-Terry and Plackett-Luce."""

import math

import pytest
import torch
import torch.nn.functional as F

from preflab.rl.ranking import (
    batched_kway_ranking_loss,
    batched_plackett_luce_loss,
    bradley_terry_loss,
    kway_ranking_loss,
    plackett_luce_loss,
    ranks_from_tiers,
)

F64 = torch.float64


def softplus(x: float) -> float:
    """softplus(x) = log(1 + e^x); -log sigmoid(m) = softplus(-m)."""
    return math.log1p(math.exp(x))


def test_kway_loss_three_responses_with_one_tie():
    """K = 3, ranks [0, 0, 1]: responses 0 and 1 tie for best, response 2 is worst.
    C(3,2) = 3 pairs; (0,1) is tied and dropped, so C_eff = 2: (0 > 2) and (1 > 2).
    rewards [2, 1, 0]: margins 2 and 1.
    loss = -(log sigmoid(2) + log sigmoid(1)) / 2 = (softplus(-2) + softplus(-1)) / 2
         = (0.126928 + 0.313262) / 2 = 0.220095."""
    rewards = torch.tensor([2.0, 1.0, 0.0], dtype=F64)
    loss = kway_ranking_loss(rewards, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(loss, torch.tensor((softplus(-2) + softplus(-1)) / 2, dtype=F64))
    assert abs(loss.item() - 0.220095) < 1e-6


def test_kway_loss_wrong_order_and_accuracy_counts():
    """ranks [0, 1, 1] (response 0 best, 1 and 2 tied), rewards [0, 1, 2]: pairs (0 > 1) and
    (0 > 2) with margins -1 and -2. loss = (softplus(1) + softplus(2))/2 = (1.313262 + 2.126928)/2
    = 1.720095; no pair is correct."""
    out = batched_kway_ranking_loss(
        torch.tensor([[0.0, 1.0, 2.0]], dtype=F64), torch.tensor([[0, 1, 1]]), torch.ones(1, 3)
    )
    torch.testing.assert_close(out.loss, torch.tensor((softplus(1) + softplus(2)) / 2, dtype=F64))
    assert out.n_pairs.tolist() == [2] and out.n_correct.tolist() == [0]


def test_kway_gradient_equals_mean_of_pairwise_gradients():
    """Eq. 1 is the mean over untied pairs of -log sigmoid(r_w - r_l): the same loss and the
    same gradient as Bradley-Terry on the list of those pairs."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, generator=g, dtype=F64)
    ranks = torch.tensor([2, 0, 1, 0, 3])
    pairs = [(w, lo) for w in range(5) for lo in range(5) if ranks[w] < ranks[lo]]
    assert len(pairs) == 9  # C(5,2) = 10 minus the one tie (1, 3)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    kway = kway_ranking_loss(a, ranks)
    winners, losers = zip(*pairs)
    bt = bradley_terry_loss(b[list(winners)], b[list(losers)])
    torch.testing.assert_close(kway, bt)
    kway.backward()
    bt.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_batched_kway_pads_and_skips_prompts_without_pairs():
    """Prompt 0: the K=3 tie example, loss 0.220095, 2 pairs, both correct.
    Prompt 1: K=2 padded to 3 (the padded reward 100 and rank 0 must be ignored):
              rewards [0.5, 0], loss softplus(-0.5) = 0.474077, 1 pair, correct.
    Prompt 2: all tied: no pair, excluded from the mean, per-prompt loss 0.
    batch loss = (0.220095 + 0.474077) / 2 = 0.347086 (each prompt weighs the same)."""
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.0, 100.0], [3.0, 1.0, 2.0]], dtype=F64)
    ranks = torch.tensor([[0, 0, 1], [0, 1, 0], [0, 0, 0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    out = batched_kway_ranking_loss(rewards, ranks, valid)
    p0 = (softplus(-2) + softplus(-1)) / 2
    p1 = softplus(-0.5)
    torch.testing.assert_close(out.per_prompt_loss, torch.tensor([p0, p1, 0.0], dtype=F64))
    torch.testing.assert_close(out.loss, torch.tensor((p0 + p1) / 2, dtype=F64))
    assert abs(out.loss.item() - 0.347086) < 1e-6
    assert out.n_pairs.tolist() == [2, 1, 0] and out.n_correct.tolist() == [2, 1, 0]


def test_kway_all_tied_raises_and_batched_all_tied_is_attached_zero():
    with pytest.raises(ValueError):
        kway_ranking_loss(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
    rewards = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = batched_kway_ranking_loss(rewards, torch.tensor([[0, 0]]), torch.ones(1, 2))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert rewards.grad.tolist() == [[0.0, 0.0]]


def test_ranks_from_tiers():
    """Tiers best first [[2], [0, 3], [1]]: response 2 has rank 0, responses 0 and 3 rank 1,
    response 1 rank 2."""
    assert ranks_from_tiers([[2], [0, 3], [1]]).tolist() == [1, 2, 0, 1]
    with pytest.raises(ValueError):
        ranks_from_tiers([[0], [0, 1]])
    with pytest.raises(ValueError):
        ranks_from_tiers([[0], [2]], k=3)


def test_bradley_terry_hand_computed():
    """Pairs (1 vs 0) and (0 vs 0): (softplus(-1) + ln 2)/2 = (0.313262 + 0.693147)/2 = 0.503204."""
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 0.0], dtype=F64))
    torch.testing.assert_close(loss, torch.tensor((softplus(-1) + math.log(2)) / 2, dtype=F64))


def test_plackett_luce_with_two_responses_is_bradley_terry():
    """K = 2: r_w - logsumexp(r_w, r_l) = log sigmoid(r_w - r_l), so PL NLL = BT loss."""
    r = torch.tensor([0.3, 1.7], dtype=F64)
    torch.testing.assert_close(plackett_luce_loss(r, torch.tensor([1, 0])), bradley_terry_loss(r[1:], r[:1]))


def test_plackett_luce_three_responses_hand_computed():
    """rewards [2, 1, 0], strict order 0 > 1 > 2:
    NLL = -(2 - ln(e^2 + e + 1)) - (1 - ln(e + 1)) = -(2 - 2.407606) - (1 - 1.313262)
        = 0.407606 + 0.313262 = 0.720868.
    Ties, Breslow convention: ranks [0, 0, 1]: both best items choose from {0, 1, 2}:
        NLL = -(2 - 2.407606) - (1 - 2.407606) = 0.407606 + 1.407606 = 1.815212.
    ranks [0, 1, 1]: only the best item chooses; the tied last tier adds nothing: 0.407606.
    Adding a constant to every reward changes nothing."""
    r = torch.tensor([2.0, 1.0, 0.0], dtype=F64)
    lse3 = math.log(math.e**2 + math.e + 1)
    lse2 = math.log(math.e + 1)
    strict = plackett_luce_loss(r, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(strict, torch.tensor(-(2 - lse3) - (1 - lse2), dtype=F64))
    assert abs(strict.item() - 0.720868) < 1e-6
    torch.testing.assert_close(
        plackett_luce_loss(r, torch.tensor([0, 0, 1])), torch.tensor(2 * lse3 - 3, dtype=F64)
    )
    torch.testing.assert_close(
        plackett_luce_loss(r, torch.tensor([0, 1, 1])), torch.tensor(lse3 - 2, dtype=F64)
    )
    torch.testing.assert_close(plackett_luce_loss(r + 5, torch.tensor([0, 1, 2])), strict)


def test_plackett_luce_first_factor_is_pick_best():
    """With the last K-1 responses tied, PL keeps only "choose the best of all K": the
    softmax cross-entropy of Ziegler's PickBest loss."""
    r = torch.tensor([0.2, -1.0, 0.7, 0.1], dtype=F64)
    ranks = torch.tensor([1, 1, 0, 1])
    torch.testing.assert_close(plackett_luce_loss(r, ranks), F.cross_entropy(r[None], torch.tensor([2])))


def test_batched_plackett_luce_pads_and_has_finite_gradients():
    """Mean over prompts of the per-prompt NLL; padding (even with a rank that leaves its
    choice set empty) neither changes the value nor puts nan into the gradient."""
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.3, 1.7, -50.0]], dtype=F64, requires_grad=True)
    ranks = torch.tensor([[0, 1, 2], [1, 0, 9]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss = batched_plackett_luce_loss(rewards, ranks, valid)
    first = plackett_luce_loss(rewards[0].detach(), ranks[0])
    second = plackett_luce_loss(rewards[1, :2].detach(), ranks[1, :2])
    torch.testing.assert_close(loss, (first + second) / 2)
    loss.backward()
    assert bool(torch.isfinite(rewards.grad).all()) and rewards.grad[1, 2].item() == 0.0
