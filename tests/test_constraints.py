"""Each constraint checker on a response that satisfies it and one that does not."""

import pytest

from preflab.constraints import (
    CONSTRAINT_TYPES,
    check,
    compatible,
    count_paragraphs,
    count_words,
    describe,
    split_sentences,
    validate_constraint,
)

# (constraint, passing response, failing response)
CASES = [
    ({"type": "max_words", "n": 5}, "Bees make honey in hives.", "Bees make honey in their hives."),
    ({"type": "min_words", "n": 5}, "Bees make honey in hives.", "Bees make honey."),
    ({"type": "max_sentences", "n": 2}, "Bees fly. They make honey!", "Bees fly. They make honey! Yum."),
    ({"type": "bullet_count", "n": 3}, "Ideas:\n- one\n- two\n* three", "- one\n- two"),
    ({"type": "paragraph_count", "n": 2}, "<<Bees>>\n\nFirst part.\n\nSecond part.\n\nP.S. bye", "One block only."),
    ({"type": "lowercase"}, "all small letters here.", "Not all small."),
    ({"type": "uppercase"}, "ALL CAPS HERE!", "ALL CAPS except this."),
    ({"type": "include_keywords", "keywords": ["honey", "hive"]}, "The Hive stores HONEY.", "The hive stores nectar."),
    ({"type": "avoid_words", "words": ["very"]}, "Everything is fine.", "It is Very fine."),
    ({"type": "start_with", "phrase": "Sure thing."}, "  sure thing. Bees fly.", "Bees fly. Sure thing."),
    ({"type": "end_with", "phrase": "Is there anything else?"}, "Bees fly. Is there anything else?\n",
     "Is there anything else? Bees fly."),
    ({"type": "json_output"}, '```json\n{"answer": "bees"}\n```', 'Here you go: {"answer": "bees"}'),
    ({"type": "title"}, "<<Bee Facts>>\nBees fly.", "<Bee Facts>\nBees fly."),
    ({"type": "no_commas"}, "Bees fly and sting.", "Bees fly, and sting."),
    ({"type": "postscript", "marker": "P.S."}, "Bees fly.\n\nP.S. I love bees.", "Bees fly. PS I love bees."),
    ({"type": "quoted"}, '"Bees fly."', 'Bees "fly."'),
    ({"type": "keyword_frequency", "word": "bee", "n": 2}, "A bee met a Bee.", "A bee met a beehive."),
]


def test_cases_cover_every_type():
    assert {c["type"] for c, _, _ in CASES} == set(CONSTRAINT_TYPES)
    assert len(CONSTRAINT_TYPES) >= 15


@pytest.mark.parametrize(("constraint", "good", "bad"), CASES, ids=[c["type"] for c, _, _ in CASES])
def test_checker(constraint, good, bad):
    validate_constraint(constraint)
    assert check(constraint, good) is True
    assert check(constraint, bad) is False


@pytest.mark.parametrize("ctype", sorted(CONSTRAINT_TYPES))
def test_phrasings_vary_and_fill_params(ctype):
    c = dict(next(c for c, _, _ in CASES if c["type"] == ctype))
    texts = {describe(c, v) for v in range(len(CONSTRAINT_TYPES[ctype].phrasings))}
    assert len(texts) >= 3
    assert not any("{" in t or t.endswith((".'.", "?'.", "!'.")) for t in texts)


def test_empty_response_fails_length_and_case():
    for c in ({"type": "max_words", "n": 5}, {"type": "lowercase"}, {"type": "max_sentences", "n": 3},
              {"type": "no_commas"}):
        assert check(c, "") is False


def test_counters():
    assert count_words("It's a bee's life, 100 times.") == 6
    assert split_sentences("One. Two! Three? four") == ["One.", "Two!", "Three?", "four"]
    assert count_paragraphs("<<T>>\n\na\n\nb\n \nP.S. c") == 2


def test_compatible_rejects_shared_slots():
    assert not compatible("json_output", "bullet_count")
    assert not compatible("lowercase", "uppercase")
    assert not compatible("quoted", "end_with")
    assert compatible("lowercase", "end_with")
    assert not compatible("max_words", "max_words")


@pytest.mark.parametrize("bad", [
    {"type": "nope"}, {"type": "max_words"}, {"type": "max_words", "n": 0}, {"type": "max_words", "n": "5"},
    {"type": "include_keywords", "keywords": []}, {"type": "start_with", "phrase": " "}, "max_words",
])
def test_validate_rejects(bad):
    with pytest.raises(ValueError):
        validate_constraint(bad)
