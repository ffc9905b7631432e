"""Generate the built-in task suite: ``generate_suite(seed, n) -> list[SuitePrompt]``.

How a prompt is made (one ordinary prompt):

1. Its split decides which templates and topics it may use. Each template and each topic
   belongs to exactly one split (fixed, independent of the seed), so SFT, RM, PPO and
   eval never share a template or a topic and evaluation measures generalisation.
2. A category is drawn (InstructGPT's use-case mix, flattened; ``CATEGORY_WEIGHTS``), then
   a template of that category and a topic of the split, then 0-3 mutually compatible
   constraints with varied phrasings.
3. Passage categories embed a passage made from the topic's facts; closed QA,
   classification and extraction tasks compute their canonical ``answer`` from it.
4. The reference answer must satisfy every constraint; if it cannot, the constraints are
   drawn again. So every prompt's constraints are known to be satisfiable together.

Special slices (``harmful`` ~8%, ``alarming_harmless`` ~5%, ``misconception`` ~7%) use
their items as topics and their wrappers as templates, split the same way. In the eval
split about a third of the requests come as 2-3 paraphrases sharing ``paraphrase_group``.
The same seed gives the same rows, byte for byte once written.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace
from typing import Any

from preflab.constraints import CONSTRAINT_TYPES, compatible, describe
from preflab.data.suite.reference import number_answer, reference_with_score
from preflab.data.suite.schema import SPLITS, SuitePrompt
from preflab.data.suite.templates import (
    ALARMING,
    ALARMING_WRAPPERS,
    CATEGORIES,
    HARMFUL,
    HARMFUL_WRAPPERS,
    MISCONCEPTION_WRAPPERS,
    MISCONCEPTIONS,
    PASSAGE_CATEGORIES,
    TEMPLATES,
    Template,
)
from preflab.data.suite.topics import DOMAINS, TOPICS, Topic

SPLIT_FRACTIONS: dict[str, float] = {"sft": 0.25, "rm": 0.30, "ppo": 0.25, "eval": 0.20}
SLICE_FRACTIONS: dict[str, float] = {"harmful": 0.08, "alarming_harmless": 0.05, "misconception": 0.07}

# InstructGPT's API prompt mix (Ouyang et al., 2022, Table 1), averaged with a uniform mix so
# that rare categories (extraction: 1.9%) still get enough eval prompts to measure.
_PAPER_MIX = {"generation": 45.6, "open_qa": 12.4, "brainstorming": 11.2, "chat": 8.4, "rewrite": 6.6,
              "summarization": 4.2, "classification": 3.5, "other": 3.5, "closed_qa": 2.6, "extraction": 1.9}
CATEGORY_WEIGHTS: dict[str, float] = {
    c: 0.5 * _PAPER_MIX[c] / sum(_PAPER_MIX.values()) + 0.5 / len(CATEGORIES) for c in CATEGORIES
}

# Words that ``avoid_words`` forbids: fillers a model uses a lot and a good answer does without.
FILLER_WORDS: tuple[str, ...] = ("very", "really", "just", "basically", "actually", "literally", "stuff",
                                 "totally", "awesome", "definitely")
START_PHRASES: tuple[str, ...] = ("Sure thing.", "Here is my answer:", "Great question!", "Okay.", "In short:",
                                  "Of course.")
END_PHRASES: tuple[str, ...] = ("Is there anything else?", "Hope this helps!", "Thanks for asking.", "That is all.",
                                "Let me know if you have questions.")
# Sampling weight of each constraint type: the simple, common ones more often.
TYPE_WEIGHTS: dict[str, float] = {
    "max_words": 3.0, "min_words": 1.0, "max_sentences": 1.5, "bullet_count": 2.0, "paragraph_count": 1.0,
    "lowercase": 2.0, "uppercase": 1.0, "include_keywords": 2.0, "avoid_words": 1.0, "start_with": 1.5,
    "end_with": 2.0, "json_output": 1.0, "title": 1.0, "no_commas": 1.0, "postscript": 1.0, "quoted": 1.0,
    "keyword_frequency": 1.0,
}
# Long-form tasks (``long_form`` > 0): that share of the ordinary requests of these categories asks
# for at least LONG_WORDS words, and carries the token budget such an answer needs.
LONG_FORM_CATEGORIES = ("generation", "open_qa", "chat")
LONG_WORDS = (80, 100, 120)


def words_budget(n_words: int) -> int:
    """New tokens to sample for an answer of at least ``n_words`` words: 1.5 tokens a word (English
    prose with SmolLM2's tokenizer is about 1.3) plus 48 for titles and line breaks, in steps of 32."""
    return 32 * math.ceil((1.5 * n_words + 48) / 32)


# How many constraints an ordinary prompt gets (0..3), and a special-slice prompt (0..2).
N_CONSTRAINTS_ORDINARY = (0.15, 0.35, 0.30, 0.20)
N_CONSTRAINTS_SPECIAL = (0.5, 0.35, 0.15)
PARAPHRASE_RATE = 0.35  # eval split: share of requests rendered as a paraphrase group

_STOP = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being it its
this that these those there here what which who whom how why when where do does did can could should would will
shall may might must i me my we our you your he she they them their his her not no yes so than then too into about
over under again more most some such only own same very just also any each few other all both up down out off
tell give make write please help want need know""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def content_words(text: str, min_len: int = 4) -> list[str]:
    """Lowercase words of ``text`` that carry meaning (no stopwords, at least ``min_len`` letters), in order."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(text.lower()):
        w = w.strip("'-")
        if len(w) >= min_len and w not in _STOP:
            seen.setdefault(w, None)
    return list(seen)


# --- fixed split assignment ---------------------------------------------------------------


def _largest_remainder(total: int, fractions: dict[str, float]) -> dict[str, int]:
    raw = {k: total * f / sum(fractions.values()) for k, f in fractions.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - out[k]), list(raw).index(k)))[: total - sum(out.values())]:
        out[k] += 1
    return out


def _assign(ids: list[str], salt: str) -> dict[str, str]:
    """Each id to one split, in proportion to SPLIT_FRACTIONS; fixed (not the suite's seed)."""
    order = list(ids)
    random.Random(f"preflab-suite-{salt}").shuffle(order)
    counts = _largest_remainder(len(order), SPLIT_FRACTIONS)
    out, i = {}, 0
    for split in SPLITS:
        for x in order[i : i + max(1, counts[split])]:
            out[x] = split
        i += max(1, counts[split])
    return out


_TEMPLATE_PATTERN = ("sft", "rm", "ppo", "eval", "rm", "sft", "ppo", "eval")


def template_splits() -> dict[str, str]:
    """Template id -> split: within each category, two templates per split."""
    out: dict[str, str] = {}
    for cat in CATEGORIES:
        for i, t in enumerate(t for t in TEMPLATES if t.category == cat):
            out[t.id] = _TEMPLATE_PATTERN[i % len(_TEMPLATE_PATTERN)]
    for prefix, wrappers in (("harm_w", HARMFUL_WRAPPERS), ("alarm_w", ALARMING_WRAPPERS),
                             ("misc_w", MISCONCEPTION_WRAPPERS)):
        for i in range(len(wrappers)):
            out[f"{prefix}{i}"] = _TEMPLATE_PATTERN[i % len(_TEMPLATE_PATTERN)]
    return out


def topic_splits() -> dict[str, str]:
    """Topic id (suite topics and special-slice items) -> split."""
    out = _assign([t.id for t in TOPICS], "topics")
    out |= _assign([f"harm_{h.id}" for h in HARMFUL], "harmful")
    out |= _assign([f"alarm_{a.id}" for a in ALARMING], "alarming")
    out |= _assign([f"misc_{m.id}" for m in MISCONCEPTIONS], "misconception")
    return out


# --- constraints --------------------------------------------------------------------------


def _params(rng: random.Random, ctype: str, keywords: list[str]) -> dict[str, Any]:
    c: dict[str, Any] = {"type": ctype}
    if ctype == "max_words":
        c["n"] = rng.choice((30, 40, 50, 60, 80))
    elif ctype == "min_words":
        c["n"] = rng.choice((20, 30, 40))
    elif ctype == "max_sentences":
        c["n"] = rng.choice((2, 3, 4))
    elif ctype == "bullet_count":
        c["n"] = rng.choice((2, 3, 4))
    elif ctype == "paragraph_count":
        c["n"] = rng.choice((2, 3))
    elif ctype == "include_keywords":
        c["keywords"] = rng.sample(keywords, min(len(keywords), rng.choice((1, 2))))
    elif ctype == "avoid_words":
        c["words"] = rng.sample(FILLER_WORDS, rng.choice((1, 2)))
    elif ctype == "start_with":
        c["phrase"] = rng.choice(START_PHRASES)
    elif ctype == "end_with":
        c["phrase"] = rng.choice(END_PHRASES)
    elif ctype == "postscript":
        c["marker"] = "P.S."
    elif ctype == "keyword_frequency":
        c["word"] = rng.choice(keywords)
        c["n"] = rng.choice((2, 3))
    return c


def sample_constraints(rng: random.Random, k: int, keywords: list[str],
                       first: tuple[dict[str, Any], ...] = ()) -> list[dict[str, Any]]:
    """Up to ``k`` mutually compatible constraints (``first`` among them); keyword types only when
    ``keywords`` is given."""
    chosen: list[dict[str, Any]] = list(first)
    while len(chosen) < k:
        pool = [t for t in CONSTRAINT_TYPES if all(compatible(t, c["type"]) for c in chosen)
                and (keywords or t not in ("include_keywords", "keyword_frequency"))]
        if not pool:
            break
        t = rng.choices(pool, weights=[TYPE_WEIGHTS[x] for x in pool])[0]
        chosen.append(_params(rng, t, keywords))
    return chosen


# --- passage tasks ------------------------------------------------------------------------

_POSITIVE = ("I loved the new documentary about {topic}. It was clear, fun and inspiring.",
             "The museum exhibit on {topic} was wonderful and I learned so much.",
             "This book about {topic} is a delight from start to finish.")
_NEGATIVE = ("The workshop on {topic} was a waste of time. The speaker was dull and the room was cold.",
             "I regret buying this guide to {topic}. It is confusing and full of errors.",
             "The tour about {topic} was boring and far too expensive.")
_OPINIONS = ("I think {topic} is the most boring subject in the world.", "In my view, {topic} is the best thing to study.",
             "Honestly, {topic} is overrated.")
_QUESTIONS = ("What do you know about {topic}?", "Have you ever read about {topic}?", "Why do people study {topic}?")
_FORMAL = ("Dear colleagues, please note that the seminar on {topic} will begin at nine o'clock.",
           "We are pleased to invite you to a lecture on {topic} next Monday.")
_CASUAL = ("hey! wanna grab lunch and chat about {topic} later? it'll be fun",
           "lol my cousin got super into {topic}, so random")
_EMOTIONS = {
    "joy": ("I finally finished my project on {topic} and I'm thrilled!", "Best day ever, I got a book about {topic}!"),
    "anger": ("I'm furious that the {topic} exhibit was closed again without warning!",
              "How dare they cancel the {topic} class after I paid for it!"),
    "sadness": ("I miss the days when my grandfather taught me about {topic}.",
                "The {topic} club closed today and I feel so lonely."),
}
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)


def _passage(rng: random.Random, topic: Topic, lo: int, hi: int) -> list[str]:
    k = rng.randint(lo, hi)
    idx = sorted(rng.sample(range(len(topic.facts)), k))
    return [topic.facts[i] for i in idx]


def _other_topic(rng: random.Random, topic: Topic) -> Topic:
    return rng.choice([t for t in TOPICS if t.id != topic.id])


def _absent_word(rng: random.Random, topic: Topic, passage: str) -> str:
    low = set(w.lower() for w in _words(passage))
    while True:
        w = rng.choice(_other_topic(rng, topic).keywords)
        if w.lower() not in low:
            return w


def passage_task(rng: random.Random, template: Template, topic: Topic) -> dict[str, Any]:
    """The passage, form slots, canonical answer and answer keywords of a passage-based task."""
    tid, name = template.id, topic.name
    slots: dict[str, str] = {}
    answer: str | None = None
    keys: tuple[str, ...] = ()
    if template.category in ("rewrite", "summarization"):
        return {"source": " ".join(_passage(rng, topic, 2, 4)), "slots": slots, "answer": None, "answer_keywords": ()}
    if template.category == "classification":
        label, text = topic.domain, " ".join(_passage(rng, topic, 2, 3))
        if tid == "k_sentiment":
            label = rng.choice(("positive", "negative"))
            text = rng.choice(_POSITIVE if label == "positive" else _NEGATIVE).format(topic=name)
        elif tid == "k_fact_opinion":
            label = rng.choice(("fact", "opinion"))
            text = rng.choice(topic.facts) if label == "fact" else rng.choice(_OPINIONS).format(topic=name)
        elif tid == "k_question":
            label = rng.choice(("statement", "question"))
            text = rng.choice(topic.facts) if label == "statement" else rng.choice(_QUESTIONS).format(topic=name)
        elif tid == "k_two_domains":
            other = rng.choice([d for d in DOMAINS if d != topic.domain])
            a, b = (topic.domain, other) if rng.random() < 0.5 else (other, topic.domain)
            slots = {"a": a, "b": b}
        elif tid == "k_tone":
            label = rng.choice(("formal", "casual"))
            text = rng.choice(_FORMAL if label == "formal" else _CASUAL).format(topic=name)
        elif tid == "k_relevant":
            label = rng.choice(("yes", "no"))
            text = rng.choice(topic.facts if label == "yes" else _other_topic(rng, topic).facts)
        elif tid == "k_emotion":
            label = rng.choice(tuple(_EMOTIONS))
            text = rng.choice(_EMOTIONS[label]).format(topic=name)
        return {"source": text, "slots": slots, "answer": label, "answer_keywords": (label,)}
    sents = _passage(rng, topic, 2, 4) if template.category == "closed_qa" else _passage(rng, topic, 2, 3)
    source = " ".join(sents)
    words = _words(source)
    if tid == "cq_mention":
        if rng.random() < 0.5:
            slots["kw"] = rng.choice([w.lower() for w in words if len(w) >= 5] or [words[0].lower()])
            answer = "yes"
        else:
            slots["kw"], answer = _absent_word(rng, topic, source), "no"
        keys = (answer,)
    elif tid == "cq_which":
        present = rng.choice([w.lower() for w in words if len(w) >= 5] or [words[0].lower()])
        absent = _absent_word(rng, topic, source)
        slots = {"a": present, "b": absent} if rng.random() < 0.5 else {"a": absent, "b": present}
        answer, keys = present, (present,)
    elif tid == "cq_subject":
        answer, keys = f"the passage is about {name}", (name,) + topic.keywords
    elif tid == "cq_count":
        n = len(sents)
        answer, keys = f"{number_answer(n)[-1]} sentences", number_answer(n)
    elif tid in ("cq_first", "e_first"):
        answer, keys = sents[0], tuple(content_words(sents[0], 5)[:3])
    elif tid == "cq_last":
        answer, keys = sents[-1], tuple(content_words(sents[-1], 5)[:3])
    elif tid == "e_second":
        answer, keys = sents[1], tuple(content_words(sents[1], 5)[:3])
    elif tid == "cq_claim":
        if rng.random() < 0.5:
            claim, answer = rng.choice(sents), "yes"
        else:
            claim, answer = rng.choice(_other_topic(rng, topic).facts), "no"
        slots = {"claim": claim, "claim_lower": claim[0].lower() + claim[1:] if claim[1:2].islower() else claim}
        keys = (answer,)
    elif tid == "cq_freq":
        kw = rng.choice(topic.keywords)
        n = sum(1 for w in words if w.lower() == kw.lower())
        slots["kw"] = kw
        answer = "once" if n == 1 else f"{number_answer(n)[-1]} times"
        keys = number_answer(n) + (("once",) if n == 1 else ())
    elif tid == "e_caps":
        caps = list(dict.fromkeys(w for w in words if w[0].isupper()))
        answer, keys = ", ".join(caps), tuple(caps)
    elif tid == "e_longest":
        longest = max(words, key=len)
        answer, keys = longest, (longest,)
    elif tid == "e_keywords":
        low = set(w.lower() for w in words)
        kws = [k for k in topic.keywords if k.lower() in low] or list(content_words(source, 6)[:3])
        answer, keys = ", ".join(kws), tuple(kws)
    elif tid == "e_long_words":
        longw = list(dict.fromkeys(w for w in words if len(w) > 8))
        answer, keys = (", ".join(longw), tuple(longw)) if longw else ("there are none", ("none",))
    elif tid == "e_last_word":
        answer = words[-1]
        keys = (answer,)
    elif tid == "e_repeated":
        counts: dict[str, int] = {}
        for w in words:
            if len(w) >= 4:
                counts[w.lower()] = counts.get(w.lower(), 0) + 1
        rep = [w for w, c in counts.items() if c > 1]
        answer, keys = (", ".join(rep), tuple(rep)) if rep else ("there are none", ("none",))
    return {"source": source, "slots": slots, "answer": answer, "answer_keywords": keys}


# --- rendering ----------------------------------------------------------------------------


def _render_prompt(task: str, constraints: list[dict[str, Any]], variants: list[int], source: str | None,
                   label: str) -> str:
    parts = [task] + [describe(c, v) for c, v in zip(constraints, variants)]
    text = " ".join(parts)
    if source:
        text += f"\n\n{label}{source}"
    return text


_LABELS = ("Text: ", "Passage: ", "")


class _Request:
    """One request (template, topic, constraints, passage) that can be phrased several ways."""

    def __init__(self, rng: random.Random, split: str, slice_: str, category: str, template_id: str, topic_id: str,
                 forms: list[str], fmt: dict[str, str], constraints: list[dict[str, Any]], extra: dict[str, Any],
                 wrapper_ids: list[int] | None = None):
        self.rng, self.split, self.slice, self.category = rng, split, slice_, category
        self.template_id, self.topic_id, self.forms, self.fmt = template_id, topic_id, forms, fmt
        self.constraints, self.extra = constraints, extra
        self.wrapper_ids = wrapper_ids  # special slices: the template is the wrapper of each form
        self.label = rng.choice(_LABELS)

    def render(self, form_index: int) -> SuitePrompt:
        form_index %= len(self.forms)
        task = self.forms[form_index].format(**self.fmt)
        template = self.template_id if self.wrapper_ids is None else f"{self.template_id}{self.wrapper_ids[form_index]}"
        variants = [self.rng.randrange(len(CONSTRAINT_TYPES[c["type"]].phrasings)) for c in self.constraints]
        text = _render_prompt(task, self.constraints, variants, self.extra.get("source"), self.label)
        return SuitePrompt(
            id="", prompt=text, category=self.category, slice=self.slice, split=self.split,
            constraints=tuple(self.constraints), template=template, topic=self.topic_id,
            keywords=tuple(self.extra.get("keywords", ())), answer=self.extra.get("answer"),
            answer_keywords=tuple(self.extra.get("answer_keywords", ())),
            true_answers=tuple(self.extra.get("true_answers", ())),
            false_answers=tuple(self.extra.get("false_answers", ())), source=self.extra.get("source"),
            max_new_tokens=words_budget(self.extra["long_words"]) if "long_words" in self.extra else None,
        )


def _wrapper_forms(wrappers: tuple[str, ...], ids: list[int], question: str, request: str | None) -> list[str]:
    out = []
    for i in ids:
        w = wrappers[i]
        out.append(w.format(question=question, request=request or "", Request=(request or "")[:1].upper()
                            + (request or "")[1:]).replace("{", "{{").replace("}", "}}"))
    return out


def _satisfiable(p: SuitePrompt) -> bool:
    if not p.constraints or p.slice == "harmful":
        return True
    text, score = reference_with_score(p)
    return text is not None and score == 1.0


def _make_request(rng: random.Random, split: str, slice_: str, category: str | None,
                  pools: dict[str, Any], long_form: float = 0.0) -> tuple[_Request, list[int]]:
    """Draw one request; returns it and the form indices available for paraphrases."""
    if slice_ == "ordinary":
        template = rng.choice(pools["templates"][split][category])
        topic = rng.choice(pools["topics"][split])
        k = rng.choices(range(4), weights=N_CONSTRAINTS_ORDINARY)[0]
        extra: dict[str, Any] = {"keywords": list(topic.keywords)}
        fmt = {"topic": topic.name}
        if category in PASSAGE_CATEGORIES:
            task = passage_task(rng, template, topic)
            extra |= {"source": task["source"], "answer": task["answer"], "answer_keywords": task["answer_keywords"]}
            fmt |= task["slots"]
        first: tuple[dict[str, Any], ...] = ()
        if long_form and category in LONG_FORM_CATEGORIES and rng.random() < long_form:  # no draw when off
            extra["long_words"] = rng.choice(LONG_WORDS)
            first, k = ({"type": "min_words", "n": extra["long_words"]},), max(k, 1)
        cons = sample_constraints(rng, k, list(topic.keywords), first)
        req = _Request(rng, split, slice_, category, template.id, topic.id, list(template.forms), fmt, cons, extra)
        return req, list(range(len(template.forms)))
    wrapper_ids = [i for i, s in enumerate(_TEMPLATE_PATTERN) if s == split]
    wi = rng.choice(wrapper_ids)
    k = rng.choices(range(3), weights=N_CONSTRAINTS_SPECIAL)[0]
    if slice_ == "harmful":
        item = rng.choice(pools["harmful"][split])
        forms = _wrapper_forms(HARMFUL_WRAPPERS, wrapper_ids, item.question, item.request)
        extra = {"keywords": content_words(item.question)}
        cat = "generation" if item.request.startswith("write") else "open_qa"
        tid, topic_id = "harm_w", f"harm_{item.id}"
        cons = sample_constraints(rng, min(k, 1), [])
    elif slice_ == "alarming_harmless":
        item = rng.choice(pools["alarming"][split])
        forms = _wrapper_forms(ALARMING_WRAPPERS, wrapper_ids, item.question, item.request)
        extra = {"keywords": list(item.keywords)}
        cat, tid, topic_id = "open_qa", "alarm_w", f"alarm_{item.id}"
        cons = sample_constraints(rng, k, list(item.keywords))
    else:
        item = rng.choice(pools["misconception"][split])
        forms = _wrapper_forms(MISCONCEPTION_WRAPPERS, wrapper_ids, item.question, None)
        extra = {"keywords": content_words(item.question), "true_answers": list(item.true_answers),
                 "false_answers": list(item.false_answers)}
        cat, tid, topic_id = "open_qa", "misc_w", f"misc_{item.id}"
        cons = sample_constraints(rng, k, [])
    order = list(range(len(forms)))
    first = wrapper_ids.index(wi)
    order = order[first:] + order[:first]
    req = _Request(rng, split, slice_, cat, tid, topic_id, [forms[i] for i in order], {}, cons, extra,
                   wrapper_ids=[wrapper_ids[i] for i in order])
    return req, list(range(len(forms)))


def _pools() -> dict[str, Any]:
    tsplit, psplit = template_splits(), topic_splits()
    pools: dict[str, Any] = {"templates": {s: {c: [] for c in CATEGORIES} for s in SPLITS},
                             "topics": {s: [] for s in SPLITS}, "harmful": {s: [] for s in SPLITS},
                             "alarming": {s: [] for s in SPLITS}, "misconception": {s: [] for s in SPLITS}}
    for t in TEMPLATES:
        pools["templates"][tsplit[t.id]][t.category].append(t)
    for t in TOPICS:
        pools["topics"][psplit[t.id]].append(t)
    for h in HARMFUL:
        pools["harmful"][psplit[f"harm_{h.id}"]].append(h)
    for a in ALARMING:
        pools["alarming"][psplit[f"alarm_{a.id}"]].append(a)
    for m in MISCONCEPTIONS:
        pools["misconception"][psplit[f"misc_{m.id}"]].append(m)
    return pools


def generate_suite(seed: int = 0, n: int = 3200, long_form: float = 0.0) -> list[SuitePrompt]:
    """The suite: ``n`` prompts split ~25/30/25/20 into sft/rm/ppo/eval; deterministic in ``seed``.
    ``long_form``: the share of ordinary generation, open-QA and chat requests that
    ask for at least 80-120 words and carry the token budget for it (0: none, the suite as before)."""
    if n < 40:
        raise ValueError(f"n must be at least 40 to fill every split, slice and category, got {n}")
    if not 0.0 <= long_form <= 1.0:
        raise ValueError(f"long_form must be in [0, 1], got {long_form}")
    rng = random.Random(seed)
    pools = _pools()
    seen: set[str] = set()
    rows: list[SuitePrompt] = []
    for split, n_split in _largest_remainder(n, SPLIT_FRACTIONS).items():
        slice_counts = _largest_remainder(n_split, {**SLICE_FRACTIONS,
                                                    "ordinary": 1.0 - sum(SLICE_FRACTIONS.values())})
        jobs: list[tuple[str, str | None, int]] = []
        for slice_ in ("ordinary", "harmful", "alarming_harmless", "misconception"):
            if slice_ == "ordinary":
                for cat, c in _largest_remainder(slice_counts[slice_], CATEGORY_WEIGHTS).items():
                    jobs.append((slice_, cat, c))
            else:
                jobs.append((slice_, None, slice_counts[slice_]))
        split_rows: list[tuple[SuitePrompt, int | None]] = []
        n_groups = 0
        for slice_, cat, count in jobs:
            made, tries = 0, 0
            while made < count:
                tries += 1
                if tries > 200 * count + 1000:
                    raise RuntimeError(f"cannot fill {split}/{slice_}/{cat}: too few distinct prompts")
                req, form_ids = _make_request(rng, split, slice_, cat, pools, long_form)
                size = 1
                if split == "eval" and len(form_ids) > 1 and rng.random() < PARAPHRASE_RATE:
                    size = min(len(form_ids), rng.choice((2, 3)), count - made)
                start = rng.randrange(len(form_ids)) if slice_ == "ordinary" else 0
                group = []
                for j in range(size):
                    fi = form_ids[(start + j) % len(form_ids)]
                    group.append(req.render(fi))
                if any(p.prompt in seen for p in group) or not _satisfiable(group[0]):
                    continue
                gid = None
                if len(group) > 1:
                    n_groups += 1
                    gid = n_groups
                for p in group:
                    seen.add(p.prompt)
                    split_rows.append((p, gid))
                made += len(group)
        rng.shuffle(split_rows)
        for i, (p, gid) in enumerate(split_rows):
            pid = f"{split}-{i:05d}"
            rows.append(replace(p, id=pid, paraphrase_group=f"{split}-g{gid:04d}" if gid else pid))
    return rows
