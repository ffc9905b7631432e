"""Simulated labelers: rank K candidates from the gold judge's scores, with noise and biases.

A labeler perceives each candidate as a Thurstone utility (Thurstone 1927; the random-utility
model behind Bradley-Terry / Plackett-Luce)::

    u_i = gold_total_i + length_bias * log(1 + words_i) + position_bias * (1 - i / (K - 1))
          - refusal_penalty * is_refusal_i + noise * eps_i

with eps ~ N(0, 1) (``noise_kind="gaussian"``) or a standard Gumbel, centred (``"gumbel"``;
then the ranking is a Plackett-Luce sample). Candidates are sorted by u, best first, and a
candidate whose u lies within ``tie_threshold`` of the top of the current tier joins that
tier (a declared tie). See docs/reference.md §9.1 (the gold judge) and §9.2 (the labelers).

Determinism: the noise of a candidate comes from an RNG seeded by a hash of (labeler name,
prompt id, seed, candidate text), so a ranking never depends on call order, and a labeler
perceives the same text the same way wherever it is listed (only ``position_bias`` looks at
positions). Two copies of the same text therefore tie.

Calibration: InstructGPT's training labelers agreed on 72.6 +/- 1.5% of pairs (Ouyang et al.
2022, sec. 5.1; docs/reference.md §1.5 and §7.5). ``default_panel`` is tuned so two of its
labelers agree on about 73% of the pairs both order strictly on ``synthetic_candidates``,
a fixed, model-free candidate set whose gold scores spread like SFT samples
(``tests/test_labelers.py`` holds it to 73 +/- 5%).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from preflab.constraints import count_words
from preflab.data.schema import Order
from preflab.data.suite.reference import reference_answer, templated_refusal
from preflab.data.suite.schema import SuitePrompt, as_prompt
from preflab.feedback.rubric import is_refusal, judge

NoiseKind = Literal["gaussian", "gumbel"]
_EULER_GAMMA = 0.5772156649015329


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from a hash of ``parts`` (independent of PYTHONHASHSEED and call order)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def tiers_from_scores(scores: Sequence[float], tie_threshold: float) -> Order:
    """Tiers, best first: sort by score; a candidate within ``tie_threshold`` of its tier's top joins it.

    Measuring from the tier's top (not the previous candidate) keeps ties from chaining
    across a whole ranking. ``tie_threshold=0`` ties only exactly equal scores. Stable: equal
    scores keep position order inside a tier (tiers are sorted anyway).
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    tiers: Order = []
    top = math.inf
    for i in order:
        if tiers and top - scores[i] <= tie_threshold:
            tiers[-1].append(i)
        else:
            tiers.append([i])
            top = scores[i]
    return [sorted(t) for t in tiers]


@dataclass(frozen=True)
class LabelResult:
    """One simulated ranking: ``order`` (tiers of positions, best first, for
    ``PreferenceStore.add_ranking``), simulated seconds spent, and the perceived utilities."""

    order: Order
    time_s: float
    perceived: tuple[float, ...]
    gold: tuple[float, ...]


@dataclass(frozen=True)
class Labeler:
    """A simulated labeler. See the module docstring for the perception model.

    Attributes:
        name: labeler id stored with its rankings (and part of its RNG seed).
        noise: scale of the perception noise, in gold-total units (std for gaussian, beta for gumbel).
        noise_kind: ``"gaussian"`` (Thurstone case V) or ``"gumbel"`` (Plackett-Luce).
        length_bias: + length_bias * log(1 + words): prefers longer answers if > 0.
        position_bias: + position_bias for the first candidate, falling linearly to 0 for the last.
        refusal_penalty: subtracted from any refusal (harmful prompts included): a labeler who
            dislikes unhelpful answers.
        tie_threshold: perceived utilities this close to a tier's top are declared a tie.
        seconds_base, seconds_per_word: simulated time on a task (read every candidate once),
            times a log-normal factor with sigma ``time_sigma``.
    """

    name: str
    noise: float = 0.2
    noise_kind: NoiseKind = "gaussian"
    length_bias: float = 0.0
    position_bias: float = 0.0
    refusal_penalty: float = 0.0
    tie_threshold: float = 0.02
    seconds_base: float = 20.0
    seconds_per_word: float = 0.3
    time_sigma: float = 0.3

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a labeler needs a non-empty name")
        if self.noise < 0 or self.tie_threshold < 0:
            raise ValueError(f"labeler {self.name}: noise and tie_threshold must be >= 0")
        if self.noise_kind not in ("gaussian", "gumbel"):
            raise ValueError(f"labeler {self.name}: noise_kind must be 'gaussian' or 'gumbel'")

    def _eps(self, prompt_id: str, seed: int, text: str) -> float:
        rng = np.random.default_rng(stable_seed(self.name, prompt_id, seed, text))
        if self.noise_kind == "gaussian":
            return float(rng.standard_normal())
        return float(rng.gumbel()) - _EULER_GAMMA  # centred Gumbel

    def perceive(self, prompt: SuitePrompt, candidates: Sequence[str], gold: Sequence[float], *,
                 seed: int = 0) -> list[float]:
        """Perceived utility of each candidate (higher = better); see the module docstring."""
        k = len(candidates)
        out = []
        for i, text in enumerate(candidates):
            u = float(gold[i])
            if self.length_bias:
                u += self.length_bias * math.log1p(count_words(text))
            if self.position_bias and k > 1:
                u += self.position_bias * (1.0 - i / (k - 1))
            if self.refusal_penalty and is_refusal(text):
                u -= self.refusal_penalty
            if self.noise:
                u += self.noise * self._eps(prompt.id, seed, text)
            out.append(u)
        return out

    def rank(self, prompt: SuitePrompt | Mapping[str, Any], candidates: Sequence[str], *,
             gold: Sequence[float] | None = None, seed: int = 0) -> LabelResult:
        """Rank ``candidates`` of ``prompt``; ``gold`` (totals) is computed with the judge when not given."""
        p = as_prompt(dict(prompt) if isinstance(prompt, Mapping) else prompt)
        if len(candidates) < 2:
            raise ValueError(f"a ranking needs at least 2 candidates, got {len(candidates)}")
        if gold is None:
            gold = [judge(p, c).total for c in candidates]
        u = self.perceive(p, candidates, gold, seed=seed)
        order = tiers_from_scores(u, self.tie_threshold)
        rng = random.Random(stable_seed("time", self.name, p.id, seed))
        words = sum(count_words(c) for c in candidates) + count_words(p.prompt)
        t = (self.seconds_base + self.seconds_per_word * words) * math.exp(rng.gauss(0.0, self.time_sigma))
        return LabelResult(order=order, time_s=round(t, 2), perceived=tuple(u), gold=tuple(float(g) for g in gold))


@dataclass(frozen=True)
class Panel:
    """Named simulated labelers. ``panel[name]`` or ``panel[i]`` (round robin: ``panel.at(i)``)."""

    labelers: tuple[Labeler, ...]
    _by_name: dict[str, Labeler] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {lab.name: lab for lab in self.labelers}
        if len(by_name) != len(self.labelers):
            raise ValueError("labeler names in a panel must be unique")
        if not self.labelers:
            raise ValueError("a panel needs at least one labeler")
        object.__setattr__(self, "_by_name", by_name)

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labelers]

    def __len__(self) -> int:
        return len(self.labelers)

    def __iter__(self):
        return iter(self.labelers)

    def __getitem__(self, key: str | int) -> Labeler:
        return self.labelers[key] if isinstance(key, int) else self._by_name[key]

    def at(self, i: int) -> Labeler:
        """The i-th labeler in round-robin order."""
        return self.labelers[i % len(self.labelers)]

    def rank_all(self, prompt: SuitePrompt | Mapping[str, Any], candidates: Sequence[str], *,
                 gold: Sequence[float] | None = None, seed: int = 0) -> dict[str, LabelResult]:
        """Every labeler's ranking of the same candidates (the gold judge runs once)."""
        p = as_prompt(dict(prompt) if isinstance(prompt, Mapping) else prompt)
        if gold is None:
            gold = [judge(p, c).total for c in candidates]
        return {lab.name: lab.rank(p, candidates, gold=gold, seed=seed) for lab in self.labelers}


# Calibrated on real SFT-model samples, as InstructGPT's figure is about labelers ranking model
# samples: tests/fixtures/smollm2_rm_samples.jsonl holds K=4 SmolLM2-135M-Instruct samples
# (T=0.7, 64 tokens) for 60 rm prompts of the seed-0 suite. There the default panel agrees on
# 0.731 of untied pairs (InstructGPT: 72.6 +/- 1.5%) and 0.877 with gold. Sweep (noise: pairwise):
# 0.09: 0.763, 0.10: 0.749, 0.11: 0.731, 0.12: 0.719, 0.13: 0.705. On the synthetic candidate set,
# whose candidates are further apart under the gold judge (mean within-prompt range 0.63 vs
# 0.28), the same panel agrees on 0.854. Reproduce: tests/test_labelers.py.
DEFAULT_NOISE = 0.11


def default_panel(noise: float = DEFAULT_NOISE) -> Panel:
    """Five labelers with different noise and bias profiles (``noise`` scales all of them).

    - ``careful``: Gaussian noise, no bias;
    - ``verbose``: prefers longer answers (+0.04 per unit of log words);
    - ``first``: position bias (+0.04 for the first candidate, 0 for the last);
    - ``strict``: dislikes refusals (-0.1), slightly less noisy;
    - ``gumbel``: Plackett-Luce (Gumbel) noise, more willing to declare ties.
    """
    return Panel((
        Labeler("careful", noise=noise),
        Labeler("verbose", noise=noise, length_bias=0.04),
        Labeler("first", noise=noise, position_bias=0.04),
        Labeler("strict", noise=0.9 * noise, refusal_penalty=0.1),
        # a Gumbel's std is pi/sqrt(6) ~ 1.28 times its scale: scale it to the same spread
        Labeler("gumbel", noise=noise * math.sqrt(6) / math.pi, noise_kind="gumbel", tie_threshold=0.04),
    ))


# ---------------------------------------------------------------------------------------------
# A fixed, model-free candidate set for calibration
# ---------------------------------------------------------------------------------------------

GENERIC = ("That is a good question. There are many things to consider, and the answer depends on the "
           "situation. It is always a good idea to do some research and think about what matters most to you.")
FILLER = ("It is also worth keeping in mind that every situation is a little different.",
          "Many people find that it helps to take things one step at a time.",
          "In the end, what matters most is what works for you.",
          "There is always more to learn, so stay curious and keep asking questions.",
          "Of course, opinions on this vary from person to person.",
          "I hope this gives you a helpful starting point.")
COMPLIANCE = "Sure, here is how you can do that. First, gather what you need. Then follow these steps carefully."
P_REFERENCE = 0.5  # chance that a set holds the flawless reference answer
P_SECOND_FLAW = 0.3
DEGRADATIONS = ("violate", "truncate", "repeat", "refuse", "false", "generic", "filler", "comply", "ramble")


def _violate_one(p: SuitePrompt, text: str, rng: random.Random) -> str:
    """Break one of the prompt's constraints while keeping the content (falls back to filler)."""
    base = judge(p, text)
    edits = [
        lambda t: t.swapcase() if t.upper() == t or t.lower() == t else t.upper(),
        lambda t: t.split("\n", 1)[1] if "\n" in t else t.split(" ", 2)[-1],  # drop the opening
        lambda t: t.rsplit("\n", 1)[0] if "\n" in t else t.rsplit(" ", 3)[0] + ".",  # drop the ending
        lambda t: t.replace(". ", ", and ", 2),
        lambda t: t.strip('"').replace("\n- ", " ").lstrip("- "),
        lambda t: t + " " + FILLER[0],
    ]
    rng.shuffle(edits)
    for edit in edits:
        out = edit(text)
        if out.strip() and out != text and judge(p, out).constraints < base.constraints:
            return out
    return text + " " + FILLER[0]


def degrade(p: SuitePrompt, text: str, kind: str, rng: random.Random) -> str:
    """One realistic flaw applied to a good answer (``kind`` in ``DEGRADATIONS``)."""
    words = text.split(" ")
    if kind == "violate":
        return _violate_one(p, text, rng)
    if kind == "truncate":  # cut off mid-sentence, as a sample hitting max_new_tokens
        cut = max(2, int(len(words) * rng.uniform(0.3, 0.7)))
        return " ".join(words[:cut]).rstrip(".!?,;:")
    if kind == "repeat":  # a degenerate loop
        tail = " ".join(words[-min(len(words), rng.randint(4, 8)):])
        return text + (" " + tail) * rng.randint(2, 5)
    if kind == "refuse":
        return templated_refusal(p) if rng.random() < 0.5 else "I'm sorry, but I can't help with that."
    if kind == "false" and p.false_answers:
        return f"Yes, {rng.choice(p.false_answers)}. " + " ".join(words[: len(words) // 2]).rstrip(".") + "."
    if kind == "comply":  # answering a harmful prompt
        return COMPLIANCE
    if kind == "ramble":  # on topic but ignores the instructions' format, a bit long
        return (text.replace("\n", " ").strip('"') + " " + " ".join(FILLER[:2])).lower()
    if kind == "filler":  # padded with polite, empty sentences
        return text + " " + " ".join(rng.sample(FILLER, rng.randint(2, len(FILLER))))
    return GENERIC  # "generic", and "false" without known false answers


def synthetic_candidates(prompt: SuitePrompt | Mapping[str, Any], k: int = 4, seed: int = 0) -> list[str]:
    """K candidates for a suite prompt, built from its reference answer with realistic flaws.

    Deterministic in (prompt id, k, seed); no model. About half the sets include the
    reference itself; the rest are flawed versions (constraint broken, cut off, repetition,
    refusal, false answer on misconception prompts, generic, filler), sometimes two flaws
    stacked, so the gold totals spread roughly like samples of a small SFT model.
    """
    p = as_prompt(dict(prompt) if isinstance(prompt, Mapping) else prompt)
    rng = random.Random(stable_seed("synthetic", p.id, k, seed))
    ref = reference_answer(p) or GENERIC
    harmful = p.slice == "harmful"
    if harmful:  # the good answer is a refusal; flaws answer it, or refuse badly
        kinds = ["comply", "comply", "truncate", "repeat", "generic", "filler"]
    else:
        kinds = ["violate", "violate", "truncate", "repeat", "refuse", "generic", "filler", "ramble"]
        if p.slice == "misconception":
            kinds += ["false", "false"]
    out: list[str] = [ref] if rng.random() < P_REFERENCE else []
    while len(out) < k:
        text = degrade(p, ref, rng.choice(kinds), rng)
        if rng.random() < P_SECOND_FLAW:  # a second flaw
            text = degrade(p, text, rng.choice(("truncate", "repeat", "filler", "violate")), rng)
        out.append(text)
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------
# Measuring agreement
# ---------------------------------------------------------------------------------------------


@dataclass
class RatedGroup:
    """Several labelers' rankings of the same K candidates (positions aligned across labelers).

    ``ranks[labeler]`` is a rank vector (tier index per candidate, 0 = best); ``gold`` the gold
    totals of the candidates when known.
    """

    ranks: dict[str, list[int]]
    gold: list[float] | None = None
    key: Any = None

    @property
    def k(self) -> int:
        return len(next(iter(self.ranks.values())))


def agreement_summary(groups: Iterable[RatedGroup]) -> dict[str, Any]:
    """Inter-labeler agreement of ranking groups, with the metrics of ``preflab.feedback.agreement``.

    Returns a dict:
      ``groups``, ``rankings``, ``labelers``: counts (groups with >= 2 labelers count for agreement);
      ``pairwise`` / ``pairwise_ties``: pooled agreement over every labeler pair and every candidate
      pair, ties excluded / ties as a third label, and ``pairs`` compared (ties excluded);
      ``pairwise_by_labeler_pair``: {"a|b": agreement};
      ``loo_majority``: mean over labelers of agreement with the majority of the others;
      ``fleiss_kappa``: over (group, pair) subjects with categories (i better, tie, j better),
      using the groups with the most common number of labelers;
      ``krippendorff_alpha``: ordinal, units = (group, candidate), values = tier index;
      ``kendalls_w``: mean over groups;
      ``gold``: pooled agreement of every ranking with the order of the gold totals (ties
      excluded), ``gold_by_labeler``; ``tie_rate``: fraction of candidate pairs declared tied.
    """
    from preflab.feedback.agreement import (
        agreement_from_labels,
        fleiss_kappa,
        kendalls_w,
        krippendorff_alpha_ordinal,
        loo_majority_agreement,
        pair_category_counts,
        pair_labels,
        ranks_from_scores,
    )

    groups = list(groups)
    labelers = sorted({name for g in groups for name in g.ranks})
    multi = [g for g in groups if len(g.ranks) >= 2]
    out: dict[str, Any] = {"groups": len(multi), "rankings": sum(len(g.ranks) for g in groups),
                           "labelers": len(labelers)}

    # pairwise: pool labels over labeler pairs
    la_ex, lb_ex = [], []
    by_pair: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for g in multi:
        for a, b in itertools.combinations(sorted(g.ranks), 2):
            x, y = pair_labels(np.array(g.ranks[a], float)), pair_labels(np.array(g.ranks[b], float))
            la_ex.append(x)
            lb_ex.append(y)
            d = by_pair.setdefault(f"{a}|{b}", ([], []))
            d[0].append(x)
            d[1].append(y)
    if la_ex:
        A, B = np.concatenate(la_ex), np.concatenate(lb_ex)
        out["pairwise"], out["pairs"] = agreement_from_labels(A, B, "exclude")
        out["pairwise_ties"] = agreement_from_labels(A, B, "label")[0]
        out["pairwise_by_labeler_pair"] = {
            k: agreement_from_labels(np.concatenate(x), np.concatenate(y), "exclude")[0] for k, (x, y) in by_pair.items()}
    else:
        out.update(pairwise=float("nan"), pairs=0, pairwise_ties=float("nan"), pairwise_by_labeler_pair={})

    # leave-one-out majority, per K (the array needs one K); NaN rows for absent labelers
    loo_num = np.zeros(len(labelers))
    loo_den = np.zeros(len(labelers))
    for k in sorted({g.k for g in multi}):
        gs = [g for g in multi if g.k == k]
        arr = np.full((len(gs), len(labelers), k), np.nan)
        for n, g in enumerate(gs):
            for r, name in enumerate(labelers):
                if name in g.ranks:
                    arr[n, r] = g.ranks[name]
        if len(gs) and min(len(g.ranks) for g in gs) >= 2:
            per = loo_majority_agreement(arr)
            w = np.array([sum(1 for g in gs if name in g.ranks) for name in labelers], float)
            ok = ~np.isnan(per)
            loo_num[ok] += per[ok] * w[ok]
            loo_den[ok] += w[ok]
    out["loo_majority"] = float(loo_num.sum() / loo_den.sum()) if loo_den.sum() else float("nan")

    # Fleiss: the same number of raters per subject
    if multi:
        sizes = [len(g.ranks) for g in multi]
        m = max(set(sizes), key=lambda s: (sizes.count(s), s))
        tables = [pair_category_counts(np.array(list(g.ranks.values()), float)) for g in multi if len(g.ranks) == m]
        out["fleiss_kappa"] = fleiss_kappa(np.concatenate(tables))
        out["fleiss_raters"] = m
        units = [(g, i) for g in multi for i in range(g.k)]
        data = np.full((len(labelers), len(units)), np.nan)
        col = 0
        for g in multi:
            for i in range(g.k):
                for r, name in enumerate(labelers):
                    if name in g.ranks:
                        data[r, col] = g.ranks[name][i]
                col += 1
        out["krippendorff_alpha"] = krippendorff_alpha_ordinal(data)
        ws = [kendalls_w(np.array(list(g.ranks.values()), float)) for g in multi]
        ws = [w for w in ws if not math.isnan(w)]
        out["kendalls_w"] = float(np.mean(ws)) if ws else float("nan")
    else:
        out.update(fleiss_kappa=float("nan"), fleiss_raters=0, krippendorff_alpha=float("nan"),
                   kendalls_w=float("nan"))

    # against gold (every ranking, overlapping or not)
    g_all: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    g_by: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    ties = total = 0
    for g in groups:
        gold_l = pair_labels(ranks_from_scores(np.array(g.gold, float))) if g.gold is not None else None
        for name, r in g.ranks.items():
            lab = pair_labels(np.array(r, float))
            ties += int((lab == 0).sum())
            total += lab.size
            if gold_l is not None:
                g_all[0].append(lab)
                g_all[1].append(gold_l)
                d = g_by.setdefault(name, ([], []))
                d[0].append(lab)
                d[1].append(gold_l)
    out["gold"] = agreement_from_labels(np.concatenate(g_all[0]), np.concatenate(g_all[1]))[0] if g_all[0] else float("nan")
    out["gold_by_labeler"] = {k: agreement_from_labels(np.concatenate(x), np.concatenate(y))[0]
                              for k, (x, y) in sorted(g_by.items())}
    out["tie_rate"] = ties / total if total else float("nan")
    return out


def panel_groups(panel: Panel, prompts: Iterable[SuitePrompt], candidate_sets: Iterable[Sequence[str]], *,
                 seed: int = 0) -> list[RatedGroup]:
    """Every labeler of ``panel`` ranks every candidate set: one ``RatedGroup`` per prompt."""
    from preflab.data.schema import ranks_from_order

    out = []
    for p, cands in zip(prompts, candidate_sets):
        res = panel.rank_all(p, list(cands), seed=seed)
        gold = next(iter(res.values())).gold
        out.append(RatedGroup(ranks={n: ranks_from_order(r.order, len(cands)) for n, r in res.items()},
                              gold=list(gold), key=p.id))
    return out


def synthetic_agreement(prompts: Iterable[SuitePrompt], panel: Panel | None = None, *, k: int = 4,
                        seed: int = 0) -> dict[str, Any]:
    """``agreement_summary`` of ``panel`` (default: ``default_panel()``) on ``synthetic_candidates``."""
    panel = panel or default_panel()
    prompts = list(prompts)
    sets = [synthetic_candidates(p, k=k, seed=seed) for p in prompts]
    return agreement_summary(panel_groups(panel, prompts, sets, seed=seed))


def gold_totals(prompt: SuitePrompt, candidates: Sequence[str]) -> list[float]:
    """Gold totals of candidates (a convenience over ``judge``)."""
    return [judge(prompt, c).total for c in candidates]


__all__ = [
    "DEFAULT_NOISE", "DEGRADATIONS", "LabelResult", "Labeler", "Panel", "RatedGroup", "agreement_summary",
    "default_panel", "degrade", "gold_totals", "panel_groups", "stable_seed", "synthetic_agreement",
    "synthetic_candidates", "tiers_from_scores",
]
