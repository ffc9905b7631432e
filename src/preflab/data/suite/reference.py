"""Reference answers: a compliant response to a suite prompt that satisfies its constraints.

``reference_answer`` builds content from the topic's facts (or the item's answer, or the
task's canonical ``answer``), then shapes it to the constraints: it tries the first k
content items for k from all down to 1, applies the format (JSON, bullets, paragraphs),
keyword insertions, word removals, wrappers (start, end, title, P.S., quotes) and case,
and returns the first text that the checkers accept. The suite generator only keeps
constraint sets for which this succeeds, so every suite prompt has a witness that its
constraints can be met together. Harmful prompts get ``templated_refusal`` instead.
"""

from __future__ import annotations

import json
from typing import Any

from preflab.constraints import check_all, count_phrase
from preflab.data.suite.schema import SuitePrompt, as_prompt
from preflab.data.suite.templates import ALARMING, MISCONCEPTIONS
from preflab.data.suite.topics import TOPICS

TOPIC_BY_ID = {t.id: t for t in TOPICS}
ALARMING_BY_ID = {f"alarm_{a.id}": a for a in ALARMING}
MISCONCEPTION_BY_ID = {f"misc_{m.id}": m for m in MISCONCEPTIONS}

# First sentence of a reference answer, per template of the topic-only categories.
OPENERS: dict[str, str] = {
    "g_poem": "Here is a short poem about {topic}.", "g_story": "Once upon a time, a curious girl set out to learn about {topic}.",
    "g_product": "Meet the perfect beginner's guide to {topic}.", "g_speech": "Good morning, everyone. Today I want to talk about {topic}.",
    "g_tweet": "Fun fact time about {topic}!", "g_letter": "Dear Sam, I have been learning about {topic}.",
    "g_ad": "Join our new class on {topic}!", "g_diary": "Dear diary, today I learned about {topic}.",
    "q_explain": "Here is a simple explanation of {topic}.", "q_fact": "Here is a fact about {topic}.",
    "q_importance": "Here is why people care about {topic}.", "q_child": "Here is how I would explain {topic} to a child.",
    "q_know": "Here are the basics of {topic}.", "q_misunderstand": "Many people only know a little about {topic}.",
    "q_background": "Here is some background on {topic}.", "q_overview": "Here is a short overview of {topic}.",
    "c_curious": "Great topic! There is a lot to love about {topic}.", "c_bored": "Sure, let's talk about {topic}!",
    "c_friend": "I can see why your friend likes {topic}.", "c_test": "You will do fine! Here is what to remember about {topic}.",
    "c_opinion": "I think {topic} is a fascinating subject.", "c_start": "Happy to help you get started with {topic}.",
    "c_dinner": "Here are some things you could discuss about {topic}.", "c_kid": "You could tell them this about {topic}.",
    "o_riddle": "Here is a riddle, and the answer is {topic}.", "o_quiz": "Here is a quiz about {topic}, with the answer in the facts.",
    "o_motto": "Motto: learn, share and enjoy {topic}!", "o_dialogue": "Ana: What do you know about {topic}?",
    "o_memory": "Try linking each fact about {topic} to a picture.", "o_steps": "Here is how to get started with {topic}.",
    "o_analogy": "Think of {topic} like a busy kitchen where everything has a job.",
    "o_joke": "Why did the teacher love {topic}? Because it always had class!",
}

# Brainstorming ideas, per template; {k0}..{k3} are the topic's keywords.
IDEAS: dict[str, tuple[str, ...]] = {
    "b_project": ("Build a model that shows {k0}.", "Make a poster about {k1}.", "Run a small survey about {topic}.",
                  "Film a short video on {k2}.", "Write a fact sheet about {k3}."),
    "b_names": ("The {K0} Club.", "Friends of {Topic}.", "The {K1} Crew.", "{K2} Fans United.", "The {K3} Circle."),
    "b_questions": ("What first drew you to {topic}?", "What do people get wrong about {k0}?", "How has {k1} changed over time?",
                    "What should a beginner read about {k2}?", "What excites you most about {k3}?"),
    "b_blog": ("A beginner's guide to {topic}.", "Five facts about {k0}.", "How {k1} affects daily life.",
               "Myths about {k2}.", "A photo essay on {k3}."),
    "b_learn": ("Read a library book about {topic}.", "Watch a documentary on {k0}.", "Join a local club about {k1}.",
                "Take a free online course on {k2}.", "Ask an expert about {k3}."),
    "b_activities": ("Visit a museum about {topic}.", "Draw a comic about {k0}.", "Play a quiz game about {k1}.",
                     "Cook a snack inspired by {k2}.", "Make a scrapbook about {k3}."),
    "b_kids": ("Tell a story about {k0}.", "Play a guessing game about {k1}.", "Build a craft about {k2}.",
               "Go on a field trip about {topic}.", "Sing a song about {k3}."),
    "b_gifts": ("A book about {topic}.", "A poster of {k0}.", "A mug with a {k1} design.",
                "A class about {k2}.", "A puzzle about {k3}."),
}

# A long-form reference answer's sentence on each of the topic's keywords.
LONG_KEYWORD_NOTES = ("People enjoy learning about {w}.", "There is always more to discover about {w}.",
                      "Books and museums have much to say about {w}.", "Ask a friend what they know about {w}.")
# Closing sentences of a long-form reference answer, per topic domain (after the topic's facts).
DOMAIN_NOTES: dict[str, tuple[str, ...]] = {
    "science": ("Scientists test ideas about {topic} with careful experiments and measurements.",
                "Each new finding about {topic} raises fresh questions to explore.",
                "Learning the science of {topic} helps us understand the world around us."),
    "nature": ("Nature shows many ways in which living things depend on each other.",
               "Watching {topic} up close teaches patience and respect for wild places.",
               "Protecting habitats keeps {topic} part of our world for future generations."),
    "food": ("Food connects people across cultures, families and generations.",
             "Trying {topic} yourself is one of the best ways to learn about it.",
             "Good ingredients and simple steps make a big difference in the kitchen."),
    "technology": ("Technology changes quickly, so ideas about {topic} keep improving.",
                   "Engineers build on earlier designs to make {topic} faster and safer.",
                   "Learning how {topic} works makes it easier to use it wisely."),
    "history": ("History helps us see how people lived and why things changed.",
                "Old records, objects and stories tell us about {topic}.",
                "Lessons from {topic} still shape the way we think today."),
    "health": ("Small daily habits can add up to better health over time.",
               "A doctor or nurse can answer questions about {topic} for a particular person.",
               "Reliable information about {topic} helps people make good choices."),
    "sports": ("Sports build strength, teamwork and a sense of fair play.",
               "Practice and patience help anyone improve at {topic}.",
               "Fans and players share the excitement of {topic} around the world."),
    "arts": ("Art lets people share feelings and ideas in ways words cannot.",
             "Studying {topic} trains the eye and the imagination.",
             "Anyone can start exploring {topic} with simple tools and curiosity."),
}

PS_TEXT = "I hope this helps you enjoy {topic}."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(fmt: str, topic_name: str, keywords: tuple[str, ...]) -> str:
    kw = {f"k{i}": keywords[i % len(keywords)] if keywords else topic_name for i in range(4)}
    kw |= {k.upper(): _cap(v) for k, v in list(kw.items())}
    return fmt.format(topic=topic_name, Topic=_cap(topic_name), **kw)


def content_items(p: SuitePrompt) -> list[str] | None:
    """Sentences (or list items) of a compliant answer, most important first; None if unknown."""
    if p.slice == "harmful":
        return None
    if p.topic in ALARMING_BY_ID:
        return list(ALARMING_BY_ID[p.topic].answer)
    if p.topic in MISCONCEPTION_BY_ID:
        return list(MISCONCEPTION_BY_ID[p.topic].answer)
    topic = TOPIC_BY_ID.get(p.topic or "")
    if topic is None:
        return None
    name, facts = topic.name, list(topic.facts)
    if p.answer is not None:  # closed QA, classification, extraction: the answer, then support
        return [_cap(p.answer.rstrip(".")) + "."] + facts
    if p.category == "brainstorming" and p.template in IDEAS:
        return [_fill(f, name, topic.keywords) for f in IDEAS[p.template]]
    if p.category in ("rewrite", "summarization"):
        src = [s for s in facts if p.source and s in p.source] or facts
        if p.category == "summarization":
            return [f"The passage is about {name}."] + src
        return src
    opener = OPENERS.get(p.template or "", "Here is what I know about {topic}.")
    items = [_fill(opener, name, topic.keywords)] + facts
    if p.max_new_tokens is not None:  # a long-form task: room for the words it asks for
        items += [LONG_KEYWORD_NOTES[i % len(LONG_KEYWORD_NOTES)].format(w=w) for i, w in enumerate(topic.keywords)]
        items += [s.format(topic=name) for s in DOMAIN_NOTES[topic.domain]]
        items.append(f"That is a short tour of {name}, and there is much more to learn.")
    return items


def _topic_name(p: SuitePrompt) -> str:
    t = TOPIC_BY_ID.get(p.topic or "")
    return t.name if t else "this topic"


def _keyword_sentences(word: str) -> list[str]:
    return [f"People enjoy learning about {word}.", f"There is always more to discover about {word}.",
            f"{_cap(word)} is worth a closer look.", f"Ask a friend what they know about {word}."]


def _render(items: list[str], cons: dict[str, dict[str, Any]], topic_name: str) -> str:
    items = list(items)
    if "no_commas" in cons:
        items = [s.replace(",", "") for s in items]
    body_text = " ".join(items).lower()
    extra: list[str] = []
    if "include_keywords" in cons:
        missing = [k for k in cons["include_keywords"]["keywords"] if not count_phrase(body_text, k)]
        if missing:
            extra.append(f"This involves {' and '.join(missing)}.")
    if "keyword_frequency" in cons:
        c = cons["keyword_frequency"]
        need = c["n"] - count_phrase(body_text, c["word"])
        extra.extend(_keyword_sentences(c["word"])[: max(0, need)])
    if extra:
        if "bullet_count" in cons or "paragraph_count" in cons:
            items[-1] = items[-1] + " " + " ".join(extra)
        else:
            items.extend(extra)
    if "json_output" in cons:
        text = json.dumps({"answer": " ".join(items)}, ensure_ascii=False)
    elif "bullet_count" in cons:
        n = cons["bullet_count"]["n"]
        if len(items) != n:
            return ""
        text = "\n".join("- " + s for s in items)
    elif "paragraph_count" in cons:
        n = cons["paragraph_count"]["n"]
        if len(items) < n:
            return ""
        size, rem = divmod(len(items), n)
        paras, i = [], 0
        for j in range(n):
            step = size + (1 if j < rem else 0)
            paras.append(" ".join(items[i : i + step]))
            i += step
        text = "\n\n".join(paras)
    else:
        text = " ".join(items)
    block = "bullet_count" in cons
    if "end_with" in cons:
        text += ("\n" if block else " ") + cons["end_with"]["phrase"]
    if "postscript" in cons:
        ps = PS_TEXT.format(topic=topic_name)
        if "no_commas" in cons:
            ps = ps.replace(",", "")
        text += f"\n\n{cons['postscript']['marker']} {ps}"
    if "start_with" in cons:
        text = cons["start_with"]["phrase"] + ("\n" if block else " ") + text
    if "title" in cons:
        text = f"<<{_cap(topic_name)}>>\n" + text
    if "quoted" in cons:
        text = f'"{text}"'
    if "lowercase" in cons:
        text = text.lower()
    elif "uppercase" in cons:
        text = text.upper()
    return text


def fit_constraints(items: list[str], constraints: tuple[dict[str, Any], ...] | list[dict[str, Any]],
                    topic_name: str = "this topic", shortest: bool = False) -> tuple[str, float]:
    """Shape ``items`` into the response that satisfies most constraints; returns (text, fraction met).

    Tries the first k items for k = len(items) .. 1 (1 .. len(items) when ``shortest``) and
    keeps the first text meeting all constraints; otherwise the one meeting the most.
    """
    cons = {c["type"]: c for c in constraints}
    if "avoid_words" in cons:
        words = cons["avoid_words"]["words"]
        items = [s for s in items if not any(count_phrase(s, w) for w in words)]
    if "bullet_count" in cons:  # exactly n list items: take n, pad with keyword lines
        n = cons["bullet_count"]["n"]
        pad = [s for s in _keyword_sentences(topic_name) if s not in items]
        items = (items + pad)[:n]
        candidates = [items]
    else:
        candidates = [items[:k] for k in range(len(items), 0, -1)]
        if shortest:
            candidates.reverse()
    best, best_score = "", -1.0
    for cand in candidates:
        text = _render(cand, cons, topic_name)
        if not text:
            continue
        ok = check_all(list(cons.values()), text)
        score = sum(ok) / len(ok) if ok else 1.0
        if score == 1.0:
            return text, 1.0
        if score > best_score:
            best, best_score = text, score
    return best, max(best_score, 0.0)


def reference_with_score(p: SuitePrompt) -> tuple[str | None, float]:
    """``reference_answer`` and the fraction of the prompt's constraints it meets (1.0 if none)."""
    if p.slice == "harmful":
        return templated_refusal(p), 1.0
    items = content_items(p)
    if not items:
        return None, 0.0
    text, score = fit_constraints(items, p.constraints, _topic_name(p), shortest=p.answer is not None)
    return text or None, score


def reference_answer(prompt: SuitePrompt | dict[str, Any]) -> str | None:
    """A compliant answer that meets the prompt's constraints (a refusal for harmful prompts).

    None when the prompt's topic is unknown (e.g. a user's own prompt). Harmful prompts get
    ``templated_refusal``, which ignores their formatting constraints.
    """
    return reference_with_score(as_prompt(prompt))[0]


def templated_refusal(prompt: SuitePrompt | dict[str, Any] | None = None) -> str:
    """A short, polite refusal that offers a safe alternative (fallback demo for harmful prompts)."""
    return ("I'm sorry, but I can't help with that. It could hurt someone or break the law. "
            "If you tell me more about the problem behind the request, I'm happy to suggest a safe and legal way to handle it.")


def number_answer(n: int) -> tuple[str, ...]:
    """Keywords for a count: the digits and, up to ten, the word."""
    return (str(n), NUMBER_WORDS[n]) if n < len(NUMBER_WORDS) else (str(n),)
