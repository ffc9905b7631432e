"""Best-of-N on tiny random models: the pick is the reward model's argmax among a prompt's own n
samples (checked by rescoring the texts independently), seeded sampling is reproducible,
require_eos, and reranking of given candidates."""

import math

import pytest
import torch

from preflab import models
from preflab.evals.best_of_n import argbest, best_of_n, pick_best
from preflab.scoring import score_texts

PROMPTS = ["Say something.", "Name a colour.", [{"role": "user", "content": "Count to three."}]]


@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(1)
    return models.load_scorer("tiny:").eval()


def test_pick_is_the_rm_argmax_of_each_prompts_own_samples(tiny, rm):
    policy, tok = tiny
    res = best_of_n(policy, rm, tok, PROMPTS, n=4, max_new_tokens=12, temperature=1.0, batch_prompts=2,
                    bf16=False, seed=3)
    assert len(res.texts) == len(PROMPTS) and all(len(c) == 4 for c in res.candidates)
    assert len({t for c in res.candidates for t in c}) > 4  # they really are samples
    for i, prompt in enumerate(PROMPTS):
        # rescoring the texts as (prompt, response, EOS) gives the same rewards where the sample ended
        again = score_texts(rm, tok, [prompt] * 4, res.candidates[i], max_length=256, normalise=True)
        for j in range(4):
            if res.candidate_ended[i][j]:
                assert again[j] == pytest.approx(res.candidate_scores[i][j], abs=1e-4)
        j = max(range(4), key=lambda k: res.candidate_scores[i][k])
        assert res.texts[i] == res.candidates[i][j] and res.scores[i] == max(res.candidate_scores[i])
    assert res.kl_bound == pytest.approx(math.log(4) - 3 / 4)
    # seeded: the same samples again, and the global RNG untouched
    state = torch.random.get_rng_state()
    again = best_of_n(policy, rm, tok, PROMPTS, n=4, max_new_tokens=12, temperature=1.0, batch_prompts=2,
                      bf16=False, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert again.candidates == res.candidates and again.texts == res.texts


def test_n1_is_the_plain_sample_and_require_eos_prefers_ended(tiny, rm):
    policy, tok = tiny
    one = best_of_n(policy, rm, tok, PROMPTS[:2], n=1, max_new_tokens=6, temperature=1.0, bf16=False, seed=0)
    assert one.texts == [c[0] for c in one.candidates]
    assert argbest([1.0, 3.0, 2.0]) == 1
    assert argbest([1.0, 3.0, 2.0], [True, False, True], require_eos=True) == 2
    assert argbest([1.0, 3.0], [False, False], require_eos=True) is None
    assert argbest([2.0, 2.0]) == 0  # ties: the first


def test_pick_best_reranks_given_candidates(tiny, rm):
    _, tok = tiny
    cands = [["a", "bb", "ccc"], ["zebra", "stone"]]
    best, scores, all_scores = pick_best(rm, tok, ["p1", "p2"], cands, max_length=64)
    for c, b, s, alls in zip(cands, best, scores, all_scores):
        assert s == max(alls) and b == c[alls.index(s)]
    assert all_scores[0] == pytest.approx(score_texts(rm, tok, ["p1"] * 3, cands[0], max_length=64, normalise=True))
