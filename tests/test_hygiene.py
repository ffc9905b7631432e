import random

import pytest

from preflab.data.hygiene import (
    exact_duplicates,
    jaccard,
    luhn_valid,
    minhash_signatures,
    near_duplicates,
    normalize_text,
    scrub_pii,
    shingles,
)


@pytest.mark.parametrize(
    "text, kind, scrubbed",
    [
        ("write to john.doe+news@mail.example.co.uk today", "email", "write to [EMAIL] today"),
        ("call (555) 123-4567 now", "phone", "call [PHONE] now"),
        ("or +44 20 7946 0958.", "phone", "or [PHONE]."),
        ("card 4111 1111 1111 1111 exp 12/29", "credit_card", "card [CREDIT_CARD] exp 12/29"),
        ("amex 378282246310005", "credit_card", "amex [CREDIT_CARD]"),
        ("server at 192.168.10.254.", "ipv4", "server at [IPV4]."),
        ("v6 2001:db8:85a3::8a2e:370:7334 up", "ipv6", "v6 [IPV6] up"),
        ("mapped ::ffff:10.0.0.1 here", "ipv6", "mapped [IPV6] here"),
        ("https://api.x.com/v1?id=3&token=abc123XYZ&x=1", "url_secret", "https://api.x.com/v1?id=3&token=[SECRET]&x=1"),
        ("GET /q?api_key=sk-live-99", "url_secret", "GET /q?api_key=[SECRET]"),
        ("clone https://bob:hunter2@git.example.com/r.git", "url_secret", "clone https://[SECRET]@git.example.com/r.git"),
    ],
)
def test_each_pii_kind_found_and_scrubbed(text, kind, scrubbed):
    out = scrub_pii(text)
    assert out.text == scrubbed
    assert out.counts[kind] == 1
    assert sum(out.counts.values()) == 1


def test_not_pii_left_alone():
    text = "Version 1.2.3 shipped on 2023-01-05 at 12:30:45; order #1234567890123; 999.999.1.1"
    out = scrub_pii(text)
    assert out.text == text and sum(out.counts.values()) == 0


def test_luhn_rejects_random_16_digit_number():
    rng = random.Random(0)
    body = [rng.randrange(10) for _ in range(15)]
    # the one check digit that makes it valid, then any other digit
    total = sum((d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d for i, d in enumerate(reversed(body)))
    check = (10 - total % 10) % 10
    valid = "".join(map(str, body)) + str(check)
    invalid = "".join(map(str, body)) + str((check + 1) % 10)
    assert luhn_valid(valid) and not luhn_valid(invalid)
    assert luhn_valid("4111-1111-1111-1111") and not luhn_valid("4111 1111 1111 1112") and not luhn_valid("")
    assert scrub_pii(f"card {invalid}").counts["credit_card"] == 0
    assert scrub_pii(f"card {valid}").counts["credit_card"] == 1


def test_scrub_only_selected_kinds():
    out = scrub_pii("a@b.com 10.0.0.1", kinds=["ipv4"])
    assert out.text == "a@b.com [IPV4]"
    with pytest.raises(ValueError, match="unknown"):
        scrub_pii("x", kinds=["ssn"])


def test_exact_duplicates_after_normalisation():
    texts = ["Hello,  World!", "write a poem", "hello world", "HELLO WORLD?", "Write a poem."]
    assert normalize_text(texts[0]) == "hello world"
    assert exact_duplicates(texts) == [[0, 2, 3], [1, 4]]


_TOPICS = ["a cat", "the ocean", "a mountain", "bread", "winter", "a robot", "jazz", "a train", "coffee", "rain"]


def _corpus(n):
    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    return [" ".join(rng.choice(words) for _ in range(12)) + f" {i}" for i in range(n)]


def test_near_duplicates_found_exact_and_lsh_paths_agree():
    base = _corpus(240)
    texts = base + [base[5] + " please", base[17].replace("alpha", "alpah", 1), "totally different text here"]
    n = len(base)
    expected = {(5, n), (17, n + 1)}
    exact_path = near_duplicates(texts, 0.8, exact_below=10_000)
    lsh_path = near_duplicates(texts, 0.8, exact_below=0)
    assert {(i, j) for i, j, _ in exact_path} >= expected
    assert {(i, j) for i, j, _ in lsh_path} == {(i, j) for i, j, _ in exact_path}
    for i, j, s in lsh_path:
        assert s == pytest.approx(jaccard(shingles(texts[i]), shingles(texts[j]))) and s >= 0.8


def test_minhash_estimates_jaccard_like_datasketch():
    datasketch = pytest.importorskip("datasketch")
    a, b = shingles("the quick brown fox jumps over the lazy dog"), shingles("the quick brown fox jumped over a lazy dog")
    sig = minhash_signatures([a, b], num_perm=256)
    est = float((sig[0] == sig[1]).mean())
    true = jaccard(a, b)
    m1, m2 = datasketch.MinHash(num_perm=256), datasketch.MinHash(num_perm=256)
    for s in a:
        m1.update(s.encode())
    for s in b:
        m2.update(s.encode())
    assert abs(est - true) < 0.1 and abs(m1.jaccard(m2) - true) < 0.1
