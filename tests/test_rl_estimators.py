"""RLOO, GRPO (Dr. GRPO) and REINFORCE++ against hand-computed tensors, with padding.

Rows are k contiguous samples per prompt; masks mix right padding (row ends early) and left
padding (a leading 0), which must not change any real position's value.
"""

import math

import pytest
import torch

from preflab.rl.estimators import (
    ESTIMATORS,
    grpo_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    sequence_rewards,
)
from preflab.rl.kl import kl_k1

MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 0, 0]])  # 2 prompts x k = 2


def test_sequence_reward_folds_the_summed_kl_of_real_tokens_only():
    scores = torch.tensor([1.0, 2.0, 0.5, -1.0])
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.0, 0.1, 0.1], [9.0, 0.3, 0.3], [0.4, 9.0, 9.0]])  # 9: padding
    got = sequence_rewards(scores, kl, MASK, kl_coef=0.5)
    # 1 - .5*.3 = .85; 2 - .5*.2 = 1.9; .5 - .5*.6 = .2; -1 - .5*.4 = -1.2
    torch.testing.assert_close(got, torch.tensor([0.85, 1.9, 0.2, -1.2]))
    torch.testing.assert_close(sequence_rewards(scores, kl, MASK, 0.0), scores)


def test_rloo_leave_one_out_baseline_hand_computed():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 4.0, 0.0])  # k = 3: prompts [1, 3, 2] and [2, 4, 0]
    mask = torch.ones(6, 2)
    out = rloo_advantages(r, mask, k=3)
    # prompt 0: 1 - (3+2)/2 = -1.5; 3 - (1+2)/2 = 1.5; 2 - (1+3)/2 = 0
    # prompt 1: 2 - (4+0)/2 = 0;    4 - (2+0)/2 = 3;   0 - (2+4)/2 = -3
    torch.testing.assert_close(out.per_sequence, torch.tensor([-1.5, 1.5, 0.0, 0.0, 3.0, -3.0]))
    torch.testing.assert_close(out.advantages[:, 0], out.per_sequence)
    # = k/(k-1) (R_i - mean): 1.5 * (1 - 2) = -1.5
    mean = r.view(2, 3).mean(1, keepdim=True)
    torch.testing.assert_close(out.per_sequence, (1.5 * (r.view(2, 3) - mean)).reshape(-1))


def test_rloo_broadcasts_over_real_tokens_only():
    out = rloo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), MASK, k=2)
    # prompt 0: 1 - 3 = -2, 3 - 1 = 2; prompt 1: 0, 0
    assert out.advantages.tolist() == [[-2.0, -2.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_grpo_normalises_within_the_group_with_the_sample_std():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 4.0, 0.0])
    out = grpo_advantages(r, torch.ones(6, 1), k=3, eps=0.0)
    # group [1, 3, 2]: mean 2, sample std sqrt(((1)^2 + 1^2 + 0)/2) = 1 -> [-1, 1, 0]
    # group [2, 4, 0]: mean 2, sample std sqrt((0 + 4 + 4)/2) = 2 -> [0, 1, -1]
    torch.testing.assert_close(out.per_sequence, torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0]))
    # Dr. GRPO: centred, not scaled
    dr = grpo_advantages(r, torch.ones(6, 1), k=3, scale=False)
    torch.testing.assert_close(dr.per_sequence, torch.tensor([-1.0, 1.0, 0.0, 0.0, 2.0, -2.0]))
    # equal rewards in a group -> 0, not nan (eps)
    flat = grpo_advantages(torch.tensor([2.0, 2.0, 5.0, 1.0]), MASK, k=2)
    assert flat.per_sequence[:2].tolist() == [0.0, 0.0]
    assert flat.advantages[1].tolist() == [0.0, 0.0, 0.0]
    # the second group: [5, 1], mean 3, std sqrt(8) -> +-2/sqrt(8) (eps 1e-4)
    assert math.isclose(float(flat.per_sequence[2]), 2 / (math.sqrt(8) + 1e-4), rel_tol=1e-6)
    assert flat.advantages[3].tolist()[1:] == [0.0, 0.0]


def test_group_estimators_reject_k_below_two_and_ragged_batches():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.zeros(4), torch.ones(4, 1), k=1)
    with pytest.raises(ValueError, match="multiple of k"):
        grpo_advantages(torch.zeros(5), torch.ones(5, 1), k=2)


def test_reinforce_pp_returns_are_reward_to_go_on_real_tokens():
    # per-token rewards: -beta*kl on every real token, the score added on the last real one
    rewards = torch.tensor([[-0.1, 1.8, 0.0], [0.0, -0.2, 0.9]])  # row 1 is left-padded
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    g = reinforce_pp_returns(rewards, mask)
    # row 0: G0 = -0.1 + 1.8 = 1.7, G1 = 1.8, pad 0; row 1: pad 0, G1 = 0.7, G2 = 0.9
    torch.testing.assert_close(g, torch.tensor([[1.7, 1.8, 0.0], [0.0, 0.7, 0.9]]))
    gd = reinforce_pp_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(gd, torch.tensor([[-0.1 + 0.9, 1.8, 0.0], [0.0, -0.2 + 0.45, 0.9]]))
    # a junk value at a padded position never leaks into a real one
    junk = rewards.clone()
    junk[0, 2] = 100.0
    junk[1, 0] = 100.0
    torch.testing.assert_close(reinforce_pp_returns(junk, mask), g)


def test_reinforce_pp_with_k1_rewards_matches_the_sequence_kl_return_at_the_first_token():
    """With gamma = 1, G_0 = score - beta * sum_t kl_t: the same number RLOO calls R_i."""
    from preflab.rl.advantages import ppo_rewards

    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    kl = kl_k1(logp, ref)
    mask = torch.ones(1, 3)
    rw = ppo_rewards(kl, torch.tensor([2.0]), mask, kl_coef=0.1)
    g = reinforce_pp_returns(rw.rewards, mask)
    torch.testing.assert_close(g[:, 0], sequence_rewards(torch.tensor([2.0]), kl, mask, 0.1))


def test_registry_names_the_critic_and_group_needs():
    assert ESTIMATORS["gae"].needs_critic and not ESTIMATORS["gae"].group
    assert {n for n, e in ESTIMATORS.items() if e.group} == {"rloo", "grpo", "online_dpo"}
    assert not any(e.needs_critic for n, e in ESTIMATORS.items() if n != "gae")


def test_whitening_is_what_the_registry_says():
    """rloo, gae and reinforce_pp are whitened over the batch by the stage; grpo and online DPO's tags are not."""
    assert {n for n, e in ESTIMATORS.items() if e.whiten} == {"gae", "rloo", "reinforce_pp"}
