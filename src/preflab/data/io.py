"""Importers and exporters for preference data.

Every importer returns an ``Imported``: a list of ``Ranking`` objects (prompt text,
candidate texts, tiered order, labeler; not yet stored, so ids are None) and the rows it
skipped on purpose, each as ``file:line: reason``. A malformed row raises DataError naming
``file:line`` (JSONL) or ``file:task N`` (Label Studio's JSON array), before anything is
stored. ``load_into_store`` then scrubs PII, drops exact duplicates and writes everything
in one transaction.

Formats read:

- ``hh-rlhf``: ``{"chosen": transcript, "rejected": transcript}`` with transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is the shared prefix up to and
  including the last ``"\\n\\nAssistant:"``, kept verbatim (so ``prompt + " " + response``
  rebuilds the transcript); the parsed turns go to the prompt's ``meta["messages"]``.
- ``ultrafeedback``: ``{"instruction"|"prompt": str, "completions": [{"response", "model",
  "overall_score", "fine-grained_score", "annotations": {aspect: {"Rating": ...}}}]}``; the
  score (``overall_score`` by default, else ``fine-grained_score``, or an aspect name)
  gives a ranking with ties on equal scores. Completions without a numeric score are
  dropped; a row with fewer than two is skipped.
- ``trl``: TRL's standard preference rows ``{"prompt", "chosen", "rejected"}`` (strings); a row's
  ``labeler`` (as ``preflab data export --format pairs`` writes it) names its labeler.
- ``trl-conversational``: the same with lists of ``{"role", "content"}`` messages;
  ``prompt`` may be omitted (implicit prompt: the messages ``chosen`` and ``rejected`` share)
  or repeated at the head of ``chosen``/``rejected`` (as in ultrafeedback_binarized).
- ``label-studio``: Label Studio's JSON export (a list of tasks with ``data`` and
  ``annotations[].result[]``) of a ``Pairwise`` project (``value.selected`` = left/right,
  left/right texts named by the result's ``to_name``) or a ``List`` + ``Ranker`` project
  (``value.ranker`` = ``{name: [item ids, best first]}``, or one list per ``Bucket``, each
  bucket a tier). One ranking per non-cancelled annotation; labeler ``ls:<completed_by>``.

Formats written: rankings JSONL (``Ranking.to_dict``), pairs JSONL (TRL standard
``{"prompt", "chosen", "rejected"}`` and the ``labeler``), grouped K-way JSONL
(``preflab.feedback.pairs``) and
a Hugging Face ``datasets`` directory (``save_to_disk``) when ``datasets`` is installed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preflab.data import hygiene
from preflab.data.jsonl import iter_jsonl, read_jsonl, read_text_utf8, write_jsonl
from preflab.data.schema import Pair, Prompt, Ranking, check_pair_cycles, order_from_scores, validate_order
from preflab.errors import DataError, PreflabError

FORMATS = ("hh-rlhf", "ultrafeedback", "trl", "trl-conversational", "label-studio")


@dataclass
class Imported:
    """What an importer read: rankings ready for ``load_into_store``, and rows skipped on purpose."""

    rankings: list[Ranking]
    skipped: list[str] = field(default_factory=list)


def _each_row(path: str | os.PathLike, parse: Callable[[Any, int], Ranking | None | str]) -> Imported:
    """Run ``parse(obj, line)`` over a JSONL file: a Ranking is kept, a str is a skip reason.
    ValueError/KeyError/TypeError become DataError ``path:line: reason``; pairs of one prompt and
    labeler that form a cycle (A > B, B > C, C > A) become one DataError naming their lines."""
    out = Imported([])
    for lineno, obj in iter_jsonl(path):
        try:
            if not isinstance(obj, dict):
                raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
            got = parse(obj, lineno)
        except KeyError as e:
            raise DataError(f"{path}:{lineno}: missing key {e}") from None
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if isinstance(got, str):
            out.skipped.append(f"{path}:{lineno}: {got}")
        elif got is not None:
            got.meta.setdefault("file", Path(path).name)
            got.meta.setdefault("line", lineno)
            out.rankings.append(got)
    check_pair_cycles(path, [(r.prompt, r.labeler, r.candidates[r.order[0][0]], r.candidates[r.order[1][0]],
                              r.meta["line"]) for r in out.rankings if len(r.candidates) == 2 and len(r.order) == 2])
    return out


def _str(obj: dict, key: str) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise ValueError(f"{key!r} must be a string, got {type(v).__name__}")
    return v


# -- HH-RLHF --------------------------------------------------------------------------------

_H, _A = "\n\nHuman:", "\n\nAssistant:"


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``.
    A trailing empty ``Assistant:`` turn (the prompt's cue) is dropped."""
    parts = re.split(r"\n\n(Human|Assistant):", text)
    if parts[0].strip():
        raise ValueError("transcript must start with '\\n\\nHuman:'")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    if not msgs:
        raise ValueError("transcript has no 'Human:' turn")
    return msgs


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of one HH-RLHF row (see module doc)."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(_A)
    if cut < 0:
        raise ValueError("chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
    prompt = chosen[: cut + len(_A)]
    responses = []
    for name, t in (("chosen", chosen), ("rejected", rejected)):
        resp = t[len(prompt):]
        if _H in resp or _A in resp:
            raise ValueError(f"{name} continues past the final assistant turn (transcripts differ before it)")
        responses.append(resp[1:] if resp.startswith(" ") else resp)
    return prompt, responses[0], responses[1]


def read_hh_rlhf(path: str | os.PathLike, labeler: str = "hh-rlhf") -> Imported:
    def parse(obj: dict, line: int) -> Ranking:
        prompt, c, r = split_hh(_str(obj, "chosen"), _str(obj, "rejected"))
        msgs = parse_hh_transcript(prompt)
        return Ranking(prompt=prompt, candidates=[c, r], order=[[0], [1]], labeler=labeler,
                       meta={"source": "hh-rlhf", "prompt_meta": {"messages": msgs}})

    return _each_row(path, parse)


# -- UltraFeedback --------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def _uf_score(comp: dict, score: str) -> float | None:
    if score in ("overall_score", "fine-grained_score"):
        return _number(comp.get(score))
    ann = (comp.get("annotations") or {}).get(score)
    if isinstance(ann, list):
        ann = ann[0] if ann else None
    return _number(ann.get("Rating")) if isinstance(ann, dict) else None


def read_ultrafeedback(path: str | os.PathLike, score: str | None = None, labeler: str = "ultrafeedback") -> Imported:
    def parse(obj: dict, line: int) -> Ranking | str:
        prompt_key = "instruction" if "instruction" in obj else "prompt"
        prompt = _str(obj, prompt_key)
        comps = obj["completions"]
        if not isinstance(comps, list):
            raise ValueError("'completions' must be a list")
        key = score
        if key is None:
            key = "overall_score" if any("overall_score" in c for c in comps if isinstance(c, dict)) \
                else "fine-grained_score"
        texts, scores, models = [], [], []
        for i, comp in enumerate(comps):
            if not isinstance(comp, dict):
                raise ValueError(f"completion {i} is not an object")
            if not isinstance(comp.get("response"), str):
                raise ValueError(f"completion {i} has no 'response' string")
            s = _uf_score(comp, key)
            if s is None:
                continue
            texts.append(comp["response"])
            scores.append(s)
            models.append(comp.get("model"))
        if len(texts) < 2:
            return f"fewer than 2 completions with a numeric {key!r}"
        return Ranking(prompt=prompt, candidates=texts, order=order_from_scores(scores), labeler=labeler,
                       models=models, meta={"source": "ultrafeedback", "score": key, "scores": scores,
                                            "category": obj.get("source")})

    return _each_row(path, parse)


# -- TRL ------------------------------------------------------------------------------------


def _row_labeler(obj: dict, default: str) -> str:
    """A pairs row's own ``labeler`` (``preflab data export --format pairs`` writes it), else ``default``."""
    v = obj.get("labeler")
    return v if isinstance(v, str) and v.strip() else default


def read_trl(path: str | os.PathLike, labeler: str = "trl") -> Imported:
    def parse(obj: dict, line: int) -> Ranking:
        for key in ("chosen", "rejected", "prompt"):
            if key in obj and isinstance(obj[key], list):
                raise ValueError(f"{key!r} is a list of messages: use the trl-conversational format")
        prompt, chosen, rejected = _str(obj, "prompt"), _str(obj, "chosen"), _str(obj, "rejected")
        return Ranking(prompt=prompt, candidates=[chosen, rejected], order=[[0], [1]],
                       labeler=_row_labeler(obj, labeler), meta={"source": "trl"})

    return _each_row(path, parse)


def _messages(v: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise ValueError(f"{key!r} must be a non-empty list of messages")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{key}[{i}] must be an object with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def render_messages(msgs: Sequence[dict[str, str]]) -> str:
    """Prompt text of a message list: a lone user message is its content; otherwise ``Role: content`` turns."""
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs)


def read_trl_conversational(path: str | os.PathLike, labeler: str = "trl") -> Imported:
    def parse(obj: dict, line: int) -> Ranking:
        chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
        if "prompt" in obj:
            p = obj["prompt"]
            prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
            n = len(prompt)
            # ultrafeedback_binarized repeats the prompt at the head of chosen/rejected
            if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
                chosen, rejected = chosen[n:], rejected[n:]
        else:
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            if n == 0:
                raise ValueError("no 'prompt' and chosen/rejected share no leading messages (implicit prompt)")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        texts = ["\n\n".join(m["content"] for m in side) for side in (chosen, rejected)]
        return Ranking(prompt=render_messages(prompt), candidates=texts, order=[[0], [1]],
                       labeler=_row_labeler(obj, labeler),
                       meta={"source": "trl-conversational", "prompt_meta": {"messages": prompt}})

    return _each_row(path, parse)


# -- Label Studio ---------------------------------------------------------------------------

_PAIR_KEYS = (("answer1", "answer2"), ("text1", "text2"), ("response1", "response2"), ("left", "right"),
              ("response_a", "response_b"))
_PROMPT_KEYS = ("prompt", "instruction", "question", "input")


def _ls_labeler(ann: dict) -> str:
    who = ann.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return f"ls:{who}" if who is not None else "ls:unknown"


def _ls_item_text(item: dict) -> str:
    for key in ("body", "text", "html", "title"):
        if isinstance(item.get(key), str):
            return item[key]
    raise ValueError(f"list item {item.get('id')!r} has no body/text/html/title")


def _ls_pairwise(data: dict, res: dict) -> tuple[list[str], list[list[int]]]:
    sel = (res.get("value") or {}).get("selected")
    if sel not in ("left", "right"):
        raise ValueError(f"pairwise result has value.selected={sel!r}, expected 'left' or 'right'")
    names = [n.strip() for n in str(res.get("to_name", "")).split(",")]
    keys = tuple(names) if len(names) == 2 and all(n in data for n in names) else None
    if keys is None:
        keys = next((k for k in _PAIR_KEYS if k[0] in data and k[1] in data), None)
    if keys is None:
        raise ValueError(f"cannot find the two texts: to_name={res.get('to_name')!r} and none of {_PAIR_KEYS} in data")
    texts = [data[keys[0]], data[keys[1]]]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"data[{keys[0]!r}] and data[{keys[1]!r}] must be strings")
    return texts, ([[0], [1]] if sel == "left" else [[1], [0]])


def _ls_ranker(data: dict, res: dict) -> tuple[list[str], list[list[int]]]:
    items = next((v for v in data.values()
                  if isinstance(v, list) and v and all(isinstance(i, dict) and "id" in i for i in v)), None)
    if items is None:
        raise ValueError("ranker task has no list of items with 'id' in data")
    pos = {str(item["id"]): i for i, item in enumerate(items)}
    ranker = (res.get("value") or {}).get("ranker")
    if not isinstance(ranker, dict) or not ranker:
        raise ValueError("ranker result has no value.ranker object")
    lists = {k: v for k, v in ranker.items() if k != "_"}  # "_" is Label Studio's internal unplaced column
    if len(lists) == 1:  # plain List + Ranker: one list of ids, best first, no ties
        tiers = [[x] for x in next(iter(lists.values()))]
    else:  # buckets, in the order the config defines them, each bucket one tier
        tiers = [list(v) for v in lists.values() if v]
    order = []
    for tier in tiers:
        if not isinstance(tier, list):
            raise ValueError("value.ranker lists must be lists of item ids")
        try:
            order.append([pos[str(x)] for x in tier])
        except KeyError as e:
            raise ValueError(f"ranker names item {e} which is not in the task's list") from None
    return [_ls_item_text(i) for i in items], order


def read_label_studio(path: str | os.PathLike) -> Imported:
    path = Path(path)
    text = read_text_utf8(path)
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(tasks, list):
        raise DataError(f"{path}: a Label Studio export is a JSON array of tasks")
    out = Imported([])
    for ti, task in enumerate(tasks):
        where = f"{path}:task {ti}" + (f" (id {task.get('id')})" if isinstance(task, dict) and "id" in task else "")
        try:
            if not isinstance(task, dict):
                raise TypeError("task is not an object")
            data = task["data"]
            if not isinstance(data, dict):
                raise TypeError("'data' is not an object")
            pkey = next((k for k in _PROMPT_KEYS if k in data), None)
            if pkey is None:
                raise ValueError(f"data has none of the prompt keys {_PROMPT_KEYS}")
            prompt = _str(data, pkey)
            anns = [a for a in task.get("annotations") or [] if not (isinstance(a, dict) and a.get("was_cancelled"))]
            if not anns:
                out.skipped.append(f"{where}: no annotations")
                continue
            for ai, ann in enumerate(anns):
                if not isinstance(ann, dict) or not isinstance(ann.get("result"), list):
                    raise ValueError(f"annotation {ai} has no 'result' list")
                res = next((r for r in ann["result"] if isinstance(r, dict) and r.get("type") in ("pairwise", "ranker")),
                           None)
                if res is None:
                    out.skipped.append(f"{where}: annotation {ai} has no pairwise or ranker result")
                    continue
                texts, order = (_ls_pairwise if res["type"] == "pairwise" else _ls_ranker)(data, res)
                order = validate_order(order, len(texts))
                lead = _number(ann.get("lead_time"))
                out.rankings.append(Ranking(
                    prompt=prompt, candidates=texts, order=order, labeler=_ls_labeler(ann), time_s=lead,
                    meta={"source": "label-studio", "file": path.name, "task": ti, "task_id": task.get("id"),
                          "annotation_id": ann.get("id")}))
        except KeyError as e:
            raise DataError(f"{where}: missing key {e}") from None
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: {e}") from None
    return out


def read_preferences(path: str | os.PathLike, fmt: str, *, labeler: str | None = None,
                     score: str | None = None) -> Imported:
    """Read ``path`` in one of FORMATS. ``labeler`` overrides the source's labeler name (not for
    Label Studio, whose annotators are the labelers); ``score`` picks UltraFeedback's score."""
    if fmt == "hh-rlhf":
        got = read_hh_rlhf(path)
    elif fmt == "ultrafeedback":
        got = read_ultrafeedback(path, score=score)
    elif fmt == "trl":
        got = read_trl(path)
    elif fmt == "trl-conversational":
        got = read_trl_conversational(path)
    elif fmt == "label-studio":
        return read_label_studio(path)
    else:
        raise PreflabError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if labeler:
        for r in got.rankings:
            r.labeler = labeler
    return got


# -- into the store -------------------------------------------------------------------------


@dataclass
class ImportReport:
    rows: int = 0  # rankings read
    imported: int = 0
    exact_duplicates: int = 0  # dropped: the same ranking (prompt, candidates, order, labeler) was stored
    new_prompts: int = 0
    reused_prompts: int = 0  # rankings attached to a prompt already stored (same text)
    near_duplicates: list[tuple[int, int, float]] = field(default_factory=list)  # prompt ids, Jaccard
    pii: dict[str, int] = field(default_factory=lambda: {k: 0 for k in hygiene.PII_KINDS})
    skipped: list[str] = field(default_factory=list)


def _scrub(text: str, counts: dict[str, int]) -> str:
    s = hygiene.scrub_pii(text)
    for k, n in s.counts.items():
        counts[k] += n
    return s.text


def load_into_store(store, rankings: Sequence[Ranking], *, split: str | None = None, scrub: bool = True,
                    near_dup_threshold: float | None = 0.8) -> ImportReport:
    """Write imported rankings into a PreferenceStore in one transaction, with hygiene.

    PII in prompts, responses and prompt messages is replaced by tags (``scrub``). A prompt
    already stored with the same text is reused, as are its candidates with the same text; a
    ranking already stored (same prompt, same candidates per tier, same labeler) is an exact
    duplicate and is dropped. Near-duplicate prompts among those touched are reported (ids),
    not dropped. ``split`` is given to new prompts.
    """
    rep = ImportReport(rows=len(rankings))
    touched: dict[int, str] = {}
    with store.transaction():
        for r in rankings:
            prompt = _scrub(r.prompt, rep.pii) if scrub else r.prompt
            cands = [_scrub(c, rep.pii) if scrub else c for c in r.candidates]
            pmeta = dict(r.meta.get("prompt_meta") or {})
            if scrub and "messages" in pmeta:
                pmeta["messages"] = [{**m, "content": _scrub(m["content"], rep.pii)} for m in pmeta["messages"]]
            pid = store.find_prompt(prompt)
            if pid is None:
                pmeta.setdefault("source", r.meta.get("source"))
                pid = store.add_prompts([Prompt(text=prompt, category=r.meta.get("category"), split=split,
                                                meta=pmeta)])[0]
                rep.new_prompts += 1
            else:
                rep.reused_prompts += 1
            touched[pid] = prompt
            models = r.models or [None] * len(cands)
            cids = []
            for text, model in zip(cands, models):
                cid = store.find_candidate(pid, text)
                cids.append(cid if cid is not None else store.add_candidates(pid, [text], model)[0])
            if len(set(cids)) < len(cids):
                rep.skipped.append(f"{r.meta.get('file', '?')}:{r.meta.get('line', r.meta.get('task', '?'))}: "
                                   "two candidates have the same text")
                continue
            if store.has_ranking(pid, cids, r.order, r.labeler):
                rep.exact_duplicates += 1
                continue
            meta = {k: v for k, v in r.meta.items() if k not in ("prompt_meta", "category")}
            store.add_ranking(pid, cids, r.order, r.labeler, time_s=r.time_s, flags=r.flags, meta=meta)
            rep.imported += 1
    if near_dup_threshold is not None and len(touched) > 1:
        ids, texts = list(touched), list(touched.values())
        rep.near_duplicates = [(ids[i], ids[j], s) for i, j, s in hygiene.near_duplicates(texts, near_dup_threshold)]
    return rep


# -- exporters ------------------------------------------------------------------------------


def write_rankings(path: str | os.PathLike, rankings: Iterable[Ranking]) -> int:
    """Rankings JSONL, one ``Ranking.to_dict()`` per line; read back with ``read_rankings``."""
    return write_jsonl(path, (r.to_dict() for r in rankings))


def read_rankings(path: str | os.PathLike) -> list[Ranking]:
    return read_jsonl(path, Ranking.from_dict)


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> int:
    """Pairwise JSONL in TRL's standard preference format ``{"prompt", "chosen", "rejected"}``, with
    the pair's ``labeler`` when it has one: reading the file back, two people's opposite pairs of
    a prompt are a disagreement, not one labeler's cycle (``schema.check_pair_cycles``)."""
    return write_jsonl(path, ({**p.to_trl(), **({"labeler": p.meta["labeler"]} if p.meta.get("labeler") else {})}
                              for p in pairs))


def export_hf(path: str | os.PathLike, rows: Sequence[dict]) -> int:
    """Save rows as a Hugging Face dataset directory (``datasets.load_from_disk`` reads it).

    Raises PreflabError with the fix when ``datasets`` is not installed.
    """
    try:
        import datasets  # optional dependency
    except ImportError:
        raise PreflabError(
            "exporting a Hugging Face dataset needs the `datasets` package (pip install 'preflab[hf]'); "
            "nothing was written. The JSONL formats (pairs, kway, rankings) need nothing extra."
        ) from None
    ds = datasets.Dataset.from_list(list(rows))
    ds.save_to_disk(str(path))
    return len(ds)
