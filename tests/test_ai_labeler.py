"""AI labeler (RLAIF) on a tiny random model: valid order, determinism, position-bias symmetrisation."""

from __future__ import annotations

import numpy as np
import pytest

from preflab import models
from preflab.data.schema import ranks_from_order, validate_order
from preflab.feedback.ai_labeler import AILabeler

CANDS = ["Coffee is made from roasted beans.", "I like tea.", "Coffee beans are roasted, ground and brewed.",
         "No."]


@pytest.fixture(scope="module")
def ai() -> AILabeler:
    tok = models.load_tokenizer("tiny:")
    model = models.load_policy("tiny:", device="cpu")
    return AILabeler(model, tok, name="ai-tiny", tie_margin=0.0)


def test_returns_a_valid_deterministic_order(ai):
    a = ai.rank("Tell me about coffee.", CANDS)
    b = ai.rank("Tell me about coffee.", CANDS)
    validate_order(a.order, len(CANDS))
    assert a.order == b.order and a.perceived == b.perceived
    w = ai.win_matrix("Tell me about coffee.", CANDS)
    assert np.allclose(w + w.T, 1.0) and np.allclose(np.diag(w), 0.5)
    assert np.isclose(sum(a.perceived), len(CANDS) * (len(CANDS) - 1) / 2)  # Borda: expected wins sum to C(K,2)


def test_swapping_candidate_order_mirrors_the_result(ai):
    """P(i > j) averages both orders, so listing the candidates in reverse reverses the ranks exactly."""
    fwd = ai.rank("Tell me about coffee.", CANDS)
    rev = ai.rank("Tell me about coffee.", CANDS[::-1])
    assert ranks_from_order(rev.order, 4) == ranks_from_order(fwd.order, 4)[::-1]
    assert rev.perceived == fwd.perceived[::-1]
    perm = [2, 0, 3, 1]
    got = ai.rank("Tell me about coffee.", [CANDS[i] for i in perm])
    assert got.perceived == tuple(fwd.perceived[i] for i in perm)


def test_identical_candidates_tie(ai):
    res = ai.rank("Say hi.", ["Hi there.", "Hi there."])
    assert res.order == [[0, 1]]
