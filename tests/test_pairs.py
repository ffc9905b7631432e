import pytest

from preflab.data.schema import KWay, Pair, Ranking, order_from_scores, ranks_from_order, validate_order
from preflab.errors import DataError
from preflab.feedback.pairs import (
    count_pairs,
    kway_record,
    kway_to_pairs,
    pair_to_kway,
    ranking_to_pairs,
    rankings_to_pairs,
    read_kway,
    write_kway,
)


def test_k4_with_a_tie_gives_5_pairs():
    """order [[2], [0, 3], [1]]: 2 best, 0 and 3 tied, 1 worst.

    C(4,2) = 6 pairs, minus the tied pair (0,3) = 5:
    2>0, 2>3, 2>1 (tier 0 over tiers 1, 2), 0>1, 3>1 (tier 1 over tier 2).
    """
    pairs = ranking_to_pairs([[2], [0, 3], [1]])
    assert pairs == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]
    assert count_pairs([[2], [0, 3], [1]]) == 5


def test_strict_order_gives_all_pairs_and_all_tied_none():
    assert len(ranking_to_pairs([[i] for i in range(9)])) == 36  # C(9,2)
    assert ranking_to_pairs([[0, 1, 2]]) == []
    assert count_pairs([[0, 1, 2]]) == 0


def test_validate_order_reasons():
    assert validate_order([[3, 1], [0], [2]], 4) == [[1, 3], [0], [2]]
    with pytest.raises(ValueError, match="ranked twice"):
        validate_order([[0], [1, 0]], 2)
    with pytest.raises(ValueError, match="missing positions"):
        validate_order([[0], [1]], 3)
    with pytest.raises(ValueError, match="outside"):
        validate_order([[0], [5]], 2)
    with pytest.raises(ValueError, match="empty"):
        validate_order([[0], [], [1]], 2)
    assert validate_order([], 3, allow_empty=True) == []


def test_ranks_and_scores_helpers():
    assert ranks_from_order([[2], [0, 3], [1]]) == [1, 2, 0, 1]
    assert order_from_scores([7.5, 3.0, 7.5, 1.0]) == [[0, 2], [1], [3]]
    assert order_from_scores([1, 2], higher_is_better=False) == [[0], [1]]


def test_kway_pairs_grouped_and_normalised():
    g = KWay("p", ["a", "b", "c"], [[1], [0, 2]])
    pairs = kway_to_pairs(g, normalize=True)
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a"), ("b", "c")]
    assert all(p.weight == pytest.approx(0.5) for p in pairs)
    r1 = Ranking("p", ["a", "b"], [[0], [1]], "x", id=1)
    r2 = Ranking("q", ["a", "b"], [[0, 1]], "y", id=2)  # all tied: no pairs, dropped
    groups = rankings_to_pairs([r1, r2])
    assert len(groups) == 1 and groups[0][0].meta["ranking_id"] == 1


def test_pair_to_kway_and_kway_file_round_trip(tmp_path):
    g = pair_to_kway(Pair("p", "good", "bad"))
    assert g.responses == ["good", "bad"] and g.order == [[0], [1]]
    path = tmp_path / "k.jsonl"
    rec = kway_record("q", ["x", "y", "z"], [[2], [0, 1]], {"labeler": "l"})
    assert write_kway(path, [g, rec]) == 2
    back = read_kway(path)
    assert back[1] == KWay("q", ["x", "y", "z"], [[2], [0, 1]], {"labeler": "l"})


def test_bad_kway_row_reports_line(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b"], "order": [[0], [1]]}\n'
                    '{"prompt": "p", "responses": ["a", "b"], "order": [[0], [0]]}\n')
    with pytest.raises(DataError, match=r"k\.jsonl:2: .*ranked twice"):
        read_kway(path)
