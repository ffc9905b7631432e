"""Data hygiene: exact and near-duplicate prompts, and PII scrubbing.

Duplicates. Exact: the same text after ``normalize_text`` (Unicode NFKC, lower case,
punctuation dropped, whitespace collapsed), found by hash. Near: Jaccard similarity of
character 5-gram shingle sets (of the normalised text) at or above a threshold. Candidate
pairs come from MinHash with LSH banding (Broder 1997; Leskovec et al., *Mining of Massive
Datasets*, ch. 3), then every candidate's exact Jaccard is checked, so reported pairs
are never false positives (a few true pairs just under the LSH curve may be missed).
Near-duplicate prompts across splits leak training data into evaluation (InstructGPT
deduplicates prompts by long common prefix and splits by user id for this reason).

PII. Regexes for e-mail addresses, phone numbers, credit-card numbers (13-19 digits that
pass the Luhn check), IPv4 and IPv6 addresses (IPv6 confirmed with ``ipaddress``), and
secrets in URLs (``user:pass@host`` credentials and ``?token=``/``api_key=``-like
parameters). Each match is replaced by a tag such as ``[EMAIL]``; counts per kind are returned.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# -- duplicates -----------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC, lower case, punctuation removed, whitespace collapsed: ``"Hi,  World!" -> "hi world"``."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = _PUNCT.sub(" ", t)
    return _SPACE.sub(" ", t).strip()


def text_key(text: str) -> str:
    """Hash of the normalised text; equal keys = exact duplicates."""
    return hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()


def exact_duplicates(texts: Sequence[str]) -> list[list[int]]:
    """Groups (size >= 2) of indices whose normalised texts are equal, each sorted, by first index."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        groups.setdefault(text_key(t), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def shingles(text: str, n: int = 5) -> set[str]:
    """Character n-grams of the normalised text; a text shorter than n is one shingle."""
    t = normalize_text(text)
    if len(t) <= n:
        return {t} if t else set()
    return {t[i : i + n] for i in range(len(t) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets count as identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


_PRIME = (1 << 31) - 1  # Mersenne prime; a*x + b stays below 2**63 for x < 2**32


def minhash_signatures(shingle_sets: Sequence[set[str]], num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash signatures, shape (N, num_perm) uint64: h_j(S) = min over s in S of (a_j*crc32(s) + b_j) mod p.

    The fraction of equal columns of two rows estimates their Jaccard similarity.
    An empty set gets the all-``p`` signature.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)
    out = np.full((len(shingle_sets), num_perm), _PRIME, dtype=np.uint64)
    for i, s in enumerate(shingle_sets):
        if not s:
            continue
        x = np.fromiter((zlib.crc32(g.encode("utf-8")) for g in s), dtype=np.uint64, count=len(s))
        out[i] = ((a[:, None] * x[None, :] + b[:, None]) % np.uint64(_PRIME)).min(axis=1)
    return out


def _lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm whose S-curve midpoint (1/b)^(1/r) is just below threshold."""
    best = (num_perm, 1)
    best_err = float("inf")
    for r in range(1, num_perm + 1):
        b = num_perm // r
        mid = (1.0 / b) ** (1.0 / r)
        # prefer a midpoint below the threshold (fewer misses); verification removes false positives
        err = abs(mid - (threshold - 0.1))
        if err < best_err:
            best, best_err = (b, r), err
    return best


def near_duplicates(
    texts: Sequence[str], threshold: float = 0.8, *, n: int = 5, num_perm: int = 128, seed: int = 0,
    exact_below: int = 200,
) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, jaccard)`` with i < j whose shingle-set Jaccard is >= threshold, sorted by (i, j).

    Exact duplicates are included (Jaccard 1.0). Under ``exact_below`` texts every pair is
    compared directly; above it MinHash LSH proposes candidates, which are then verified.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    sets = [shingles(t, n) for t in texts]
    N = len(sets)
    if N < exact_below:
        cand = {(i, j) for i in range(N) for j in range(i + 1, N)}
    else:
        sig = minhash_signatures(sets, num_perm, seed)
        bands, rows = _lsh_bands(threshold, num_perm)
        cand = set()
        for band in range(bands):
            buckets: dict[bytes, list[int]] = {}
            block = np.ascontiguousarray(sig[:, band * rows : (band + 1) * rows])
            for i in range(N):
                buckets.setdefault(block[i].tobytes(), []).append(i)
            for members in buckets.values():
                if len(members) > 1:
                    cand.update((members[x], members[y]) for x in range(len(members))
                                for y in range(x + 1, len(members)))
    out = []
    for i, j in sorted(cand):
        s = jaccard(sets[i], sets[j])
        if s >= threshold:
            out.append((i, j, s))
    return out


# -- PII --------------------------------------------------------------------------------------

PII_KINDS = ("url_secret", "email", "credit_card", "ipv6", "ipv4", "phone")
PII_TAGS = {"url_secret": "[SECRET]", "email": "[EMAIL]", "credit_card": "[CREDIT_CARD]",
         "ipv6": "[IPV6]", "ipv4": "[IPV4]", "phone": "[PHONE]"}

_SECRET_PARAMS = (
    "access_token|refresh_token|id_token|auth_token|token|api_key|apikey|api-key|x-api-key|key|secret|"
    "client_secret|password|passwd|pwd|pass|auth|sig|signature|session|sessionid|session_id|private_token|"
    "aws_secret_access_key|x-amz-signature|x-amz-credential"
)
_URL_CRED = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s/?#@:]+):([^\s/?#@]+)@")
_URL_PARAM = re.compile(rf"(?i)(?<![\w-])({_SECRET_PARAMS})=([^&#\s\"'<>]+)")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:.]*:[0-9A-Fa-f.]*:)[0-9A-Fa-f:.]{2,45}(?:%[\w.]+)?(?![\w:])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\w)")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"               # international: +44 20 7946 0958
    r"|(?:\(\d{3}\)\s?|\d{3}[ .-]?)\d{3}[ .-]?\d{4}"        # North American: (555) 123-4567
    r")(?![\w])"
)


def luhn_valid(number: str) -> bool:
    """Luhn (mod 10) check of a string of digits (spaces and dashes ignored); False if no digits."""
    digits = [int(c) for c in number if c.isdigit()]
    if not digits or any(not (c.isdigit() or c in " -") for c in number):
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class Scrubbed(NamedTuple):
    """``text`` with PII replaced by tags; ``counts[kind]`` = matches replaced (every kind present, maybe 0)."""

    text: str
    counts: dict[str, int]


def _sub_url_cred(m: re.Match) -> str:
    return f"{m.group(1)}{PII_TAGS['url_secret']}@"


def _sub_url_param(m: re.Match) -> str:
    return f"{m.group(1)}={PII_TAGS['url_secret']}"


def _sub_card(m: re.Match) -> str | None:
    digits = re.sub(r"\D", "", m.group(0))
    return PII_TAGS["credit_card"] if 13 <= len(digits) <= 19 and luhn_valid(m.group(0)) else None


def _sub_ipv6(m: re.Match) -> str | None:
    s = m.group(0)
    try:
        ipaddress.IPv6Address(s.split("%", 1)[0])
    except ValueError:
        return None
    return PII_TAGS["ipv6"]


def _sub_phone(m: re.Match) -> str | None:
    n = sum(c.isdigit() for c in m.group(0))
    return PII_TAGS["phone"] if 7 <= n <= 15 else None


_RULES: list[tuple[str, re.Pattern, object]] = [
    # Order matters: URL credentials before e-mail (``user:pw@host`` looks like one),
    # cards before phones, IPv6 before IPv4 (``::ffff:1.2.3.4``).
    ("url_secret", _URL_CRED, _sub_url_cred),
    ("url_secret", _URL_PARAM, _sub_url_param),
    ("email", _EMAIL, None),
    ("credit_card", _CARD, _sub_card),
    ("ipv6", _IPV6, _sub_ipv6),
    ("ipv4", _IPV4, None),
    ("phone", _PHONE, _sub_phone),
]


def scrub_pii(text: str, kinds: Sequence[str] = PII_KINDS) -> Scrubbed:
    """Replace PII of the given kinds with tags (``[EMAIL]``, ``[PHONE]``, ``[CREDIT_CARD]``,
    ``[IPV4]``, ``[IPV6]``, ``[SECRET]``); return the new text and counts per kind."""
    unknown = set(kinds) - set(PII_KINDS)
    if unknown:
        raise ValueError(f"unknown PII kind(s) {sorted(unknown)}; known: {list(PII_KINDS)}")
    counts = {k: 0 for k in PII_KINDS}
    for kind, pattern, fn in _RULES:
        if kind not in kinds:
            continue

        def repl(m: re.Match, kind=kind, fn=fn) -> str:
            new = PII_TAGS[kind] if fn is None else fn(m)  # type: ignore[operator]
            if new is None:
                return m.group(0)
            counts[kind] += 1
            return new

        text = pattern.sub(repl, text)
    return Scrubbed(text, counts)


def find_pii(text: str, kinds: Sequence[str] = PII_KINDS) -> dict[str, int]:
    """Counts per kind of the PII ``scrub_pii`` would replace."""
    return scrub_pii(text, kinds).counts
