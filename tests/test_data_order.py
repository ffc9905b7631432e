"""Which examples each optimizer step sees: random steps, and length groups."""

import pytest

from preflab import loop
from preflab.data.order import rank_slice, step_indices


def test_without_length_groups_steps_are_slices_of_one_permutation_per_epoch():
    steps = [step_indices(s, 50, 4, seed=3) for s in range(12)]
    flat = [i for s in steps for i in s]
    assert len(flat) == len(set(flat)) == 48  # 12 full steps, the last 2 examples wait for the next epoch
    assert step_indices(12, 50, 4, seed=3) != steps[0]  # a fresh permutation for epoch 2
    lengths = list(range(50))
    assert [step_indices(s, 50, 4, 3, lengths, group=0) for s in range(12)] == steps
    assert [step_indices(s, 50, 4, 3, lengths, group=1) for s in range(12)] == steps


def test_a_length_group_is_its_steps_examples_sorted_and_cut_again():
    """8 examples of lengths 1..8, steps of 2, one group of all 4 steps: the steps are the pairs of
    neighbours in length, {1,2} {3,4} {5,6} {7,8}, in some order; the epoch's examples are the same."""
    lengths = [5, 2, 8, 1, 7, 3, 6, 4]
    steps = [step_indices(s, 8, 2, 0, lengths, group=4) for s in range(4)]
    assert sorted(sorted(lengths[i] for i in s) for s in steps) == [[1, 2], [3, 4], [5, 6], [7, 8]]
    # padded tokens of the epoch (2 x the longest of each step): 2 x (2 + 4 + 6 + 8) = 40
    assert sum(2 * max(lengths[i] for i in s) for s in steps) == 40


@pytest.mark.parametrize("group", [2, 3, 5])
def test_length_groups_keep_the_epoch_and_are_a_function_of_the_step(group):
    n, gb, per_epoch = 50, 4, 12
    lengths = [(7 * i) % 31 + 1 for i in range(n)]
    plain = {i for s in range(per_epoch) for i in step_indices(s, n, gb, 1)}
    steps = [step_indices(s, n, gb, 1, lengths, group) for s in range(per_epoch)]
    assert {i for s in steps for i in s} == plain and sum(map(len, steps)) == 48  # same examples, once each
    for first in range(0, per_epoch, group):  # within a group, steps do not interleave in length
        chunk = sorted(sorted(lengths[i] for i in s) for s in steps[first:first + group])
        assert all(a[-1] <= b[0] for a, b in zip(chunk, chunk[1:]))
    assert step_indices(7, n, gb, 1, lengths, group) == steps[7]  # no state: a resumed run sees the same
    padded = sum(gb * max(lengths[i] for i in s) for s in steps)
    padded_plain = sum(gb * max(lengths[i] for i in step_indices(s, n, gb, 1)) for s in range(per_epoch))
    assert padded < padded_plain


def test_length_groups_over_several_epochs_and_groups_longer_than_an_epoch():
    """1.25 epochs of 5 steps with groups of 2 (the last group of an epoch has one step), and groups
    of 8 (longer than the epoch: one group): each epoch's steps hold that epoch's examples once."""
    lengths = [(5 * i) % 17 + 1 for i in range(21)]
    for group in (2, 8):
        for epoch in (0, 1):
            plain = {i for s in range(5 * epoch, 5 * epoch + 5) for i in step_indices(s, 21, 4, 0)}
            steps = [step_indices(s, 21, 4, 0, lengths, group) for s in range(5 * epoch, 5 * epoch + 5)]
            assert {i for s in steps for i in s} == plain and sum(map(len, steps)) == 20
        assert step_indices(5, 21, 4, 0, lengths, group) != step_indices(0, 21, 4, 0, lengths, group)
    solo = [step_indices(s, 21, 4, 0, lengths, 2) for s in range(4, 5)]  # the epoch's last group: one step
    assert solo == [sorted(step_indices(4, 21, 4, 0), key=lambda i: lengths[i])]


def test_the_steps_of_a_group_come_in_random_order():
    lengths = list(range(40))
    orders = {tuple(min(step_indices(s, 40, 4, seed, lengths, group=5)) for s in range(5)) for seed in range(6)}
    assert len(orders) > 1 and any(list(o) != sorted(o) for o in orders)


def test_wrong_lengths_are_refused():
    with pytest.raises(ValueError, match="3 lengths for 8 examples"):
        step_indices(0, 8, 2, 0, [1, 2, 3], group=2)


def test_the_trainers_pass_their_length_groups(tmp_path, monkeypatch):
    """SFT with train.length_groups=3: run_steps asks for each step with every example's width."""
    from helpers import write_demos
    from preflab.config import SFTConfig, load_config
    from preflab.stages import sft

    seen = []
    real = loop.step_indices

    def spy(step, n, global_batch, seed, lengths=None, group=0):
        seen.append((lengths, group))
        return real(step, n, global_batch, seed, lengths, group)

    monkeypatch.setattr(loop, "step_indices", spy)
    demos = write_demos(tmp_path / "demos.jsonl", 16)
    sft.train(load_config(SFTConfig, None, [
        "model.path=tiny:", f"data.train={demos}", "data.val_fraction=0", "train.bf16=false", "run.progress=false",
        f"run.out={tmp_path / 'run'}", "train.batch_size=4", "train.max_steps=2", "train.length_groups=3"]))
    assert [g for _, g in seen] == [3, 3]
    assert seen[0][0] is not None and len(seen[0][0]) == 16 and len(set(seen[0][0])) > 1


def test_ranks_share_a_sorted_step_alike():
    """A step of 8 examples sorted by length over 2 ranks: each rank takes every other one, so both get
    short and long ones (a contiguous half would give rank 0 the four shortest); 3 ranks drop the rest."""
    idx = [10, 11, 12, 13, 14, 15, 16, 17]
    assert rank_slice(idx, 0, 2) == [10, 12, 14, 16]
    assert rank_slice(idx, 1, 2) == [11, 13, 15, 17]
    assert sorted(rank_slice(idx, 0, 2) + rank_slice(idx, 1, 2)) == idx
    assert [rank_slice(idx, r, 3) for r in range(3)] == [[10, 13], [11, 14], [12, 15]]
    assert rank_slice(idx, 0, 1) == idx
