"""IFEval-format instruction following, scored with the ``if-verifiable`` package's checkers.

A prompt file in IFEval's format has rows ``{"key", "prompt", "instruction_id_list", "kwargs"}``
(preflab ships the 541 public IFEval prompts as ``builtin:ifeval``, for evaluation only: see
``ifeval_data/README.md``). ``read_ifeval`` checks every
row before anything runs; ``score_ifeval`` runs the checkers on one response per prompt and
returns the four standard numbers: prompt-level and instruction-level accuracy, strict (the
response as it is) and loose (also with its first/last line or markdown ``*`` removed).

Sentence counting (``length_constraints:number_sentences``) and word tokenizing
(``change_case:capital_word_frequency``) use nltk's punkt model, which is a separate download
(``nltk.download("punkt_tab")``) that a machine without network cannot do. When nltk's data is
not installed, ``nupunkt`` (a Punkt sentence splitter shipped on PyPI with its model, no
download) stands in, and the result says which splitter counted (``sentence_splitter``): counts
can differ from punkt's on rare abbreviations. Install with ``pip install 'preflab[ifeval]'``.
"""

from __future__ import annotations

import os
import re
import shutil
import types
from dataclasses import dataclass
from typing import Any

from preflab.data.jsonl import iter_jsonl
from preflab.errors import DataError, PreflabError

EXTRA_HINT = "pip install 'preflab[ifeval]'"
BUNDLED = "builtin:ifeval"


def ifeval_path(spec: str | os.PathLike) -> str:
    """A prompt file's path: ``builtin:ifeval`` is the public IFEval file shipped with preflab."""
    if str(spec) == BUNDLED:
        from importlib.resources import files

        return str(files("preflab.evals") / "ifeval_data" / "input_data.jsonl")
    return str(spec)


@dataclass(frozen=True)
class IFEvalRow:
    key: str
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


def _registry() -> dict[str, Any]:
    try:
        from if_verifiable.ifeval import INSTRUCTION_DICT
    except ImportError as e:
        raise PreflabError(f"IFEval scoring needs the if-verifiable package ({e}): {EXTRA_HINT}") from None
    return INSTRUCTION_DICT


def read_ifeval(path: str | os.PathLike, id_field: str = "key", limit: int | None = None) -> list[IFEvalRow]:
    """Rows of an IFEval-format file (JSONL, parquet or a saved dataset; ``builtin:ifeval``), the
    first ``limit`` of them if given. A bad row, a duplicate id or an instruction id the checkers
    do not know is a DataError naming ``file:line``."""
    known = _registry()
    path = ifeval_path(path)
    rows, first = [], {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        for k in (id_field, "prompt", "instruction_id_list", "kwargs"):
            if k not in obj:
                raise DataError(f"{where}: missing key {k!r}" + (" (--id-field names the id key)" if k == id_field else ""))
        key, prompt, ids, kwargs = obj[id_field], obj["prompt"], obj["instruction_id_list"], obj["kwargs"]
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise DataError(f"{where}: {id_field!r} must be a string or an integer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{where}: 'instruction_id_list' must be a non-empty list of strings")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise DataError(f"{where}: 'kwargs' must be a list of objects, one per instruction ({len(ids)})")
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DataError(f"{where}: unknown instruction id(s) {', '.join(map(repr, unknown))} "
                            f"(if-verifiable knows {len(known)}, e.g. {', '.join(sorted(known)[:3])})")
        if str(key) in first:
            raise DataError(f"{where}: duplicate id {key!r} (first at line {first[str(key)]})")
        first[str(key)] = lineno
        rows.append(IFEvalRow(str(key), prompt, tuple(ids), tuple(dict(k) for k in kwargs)))
    if not rows:
        raise DataError(f"{path}: no IFEval rows")
    return rows[:limit]


# ---------------------------------------------------------------------------------------------
# nltk's punkt, or nupunkt standing in for it
# ---------------------------------------------------------------------------------------------


def _nltk_punkt_available() -> bool:
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except (ImportError, LookupError):
        return False


class _NupunktSentences:
    def tokenize(self, text: str) -> list[str]:
        import nupunkt

        return list(nupunkt.sent_tokenize(text))


def use_sentence_splitter() -> str:
    """Make the IFEval checkers count sentences and split words with nltk's punkt when its data is
    installed, else with nupunkt; returns which ("nltk-punkt" or "nupunkt")."""
    from if_verifiable.ifeval import instructions_util as util

    if _nltk_punkt_available():
        return "nltk-punkt"
    try:
        import nupunkt  # noqa: F401
    except ImportError:
        raise PreflabError("IFEval sentence counting needs nltk's punkt data or the nupunkt package: "
                           f"{EXTRA_HINT}") from None
    import nltk
    from nltk.tokenize import NLTKWordTokenizer

    splitter = _NupunktSentences()
    words = NLTKWordTokenizer()

    def word_tokenize(text: str, language: str = "english", preserve_line: bool = False) -> list[str]:
        sentences = [text] if preserve_line else splitter.tokenize(text)
        return [tok for s in sentences for tok in words.tokenize(s)]

    util._get_sentence_tokenizer = lambda: splitter  # count_sentences() looks it up at call time
    util.nltk = types.SimpleNamespace(tokenize=nltk.tokenize, data=nltk.data, word_tokenize=word_tokenize)
    return "nupunkt"


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def score_ifeval(rows: list[IFEvalRow], responses: list[str]) -> dict[str, Any]:
    """IFEval's four accuracies over ``responses`` (one per row, in order), per-instruction-type
    strict accuracy, and each row's results (``rows``: key, strict/loose per instruction)."""
    if len(rows) != len(responses):
        raise PreflabError(f"score_ifeval: {len(rows)} prompts but {len(responses)} responses")
    registry = _registry()
    from if_verifiable.common import evaluate_instructions

    splitter = use_sentence_splitter()
    try:
        import langdetect

        langdetect.DetectorFactory.seed = 0  # language checks give the same answer every run
    except ImportError:
        pass
    per_row, by_type = [], {}
    n_prompts_strict = n_prompts_loose = n_inst = n_inst_strict = n_inst_loose = 0
    for row, response in zip(rows, responses):
        results, _ = evaluate_instructions(response, list(row.instruction_id_list), list(row.kwargs), row.prompt,
                                           registry)
        got = {r.instruction_id: r for r in results}
        strict = [bool(got[i].strict_pass) if i in got else False for i in row.instruction_id_list]
        loose = [bool(got[i].loose_pass) if i in got else False for i in row.instruction_id_list]
        n_prompts_strict += all(strict)
        n_prompts_loose += all(loose)
        n_inst += len(strict)
        n_inst_strict += sum(strict)
        n_inst_loose += sum(loose)
        for i, ok in zip(row.instruction_id_list, strict):
            t = by_type.setdefault(i, [0, 0])
            t[0] += ok
            t[1] += 1
        per_row.append({"key": row.key, "instructions": list(row.instruction_id_list), "strict": strict, "loose": loose})
    n = len(rows)
    return {
        "n_prompts": n,
        "n_instructions": n_inst,
        "prompt_level_strict": n_prompts_strict / n,
        "instruction_level_strict": n_inst_strict / n_inst,
        "prompt_level_loose": n_prompts_loose / n,
        "instruction_level_loose": n_inst_loose / n_inst,
        "by_instruction_strict": {k: {"accuracy": a / c, "n": c} for k, (a, c) in sorted(by_type.items())},
        "sentence_splitter": splitter,
        "rows": per_row,
    }


def against_reference(answers: dict[str, list[dict[str, Any]]], reference: str) -> dict[str, dict[str, Any]]:
    """Each model's strict accuracy minus the reference's on the same prompts (matched by key), with
    a paired 95% interval (``rl.stats.paired_difference``): prompt level over prompts, instruction
    level over prompts weighted by their instructions. ``answers``: name -> the rows of its
    ``ifeval/NAME.jsonl`` (key, instructions, strict)."""
    from preflab.rl.stats import paired_difference

    ref = {r["key"]: r for r in answers[reference]}
    out = {}
    for name, rows in answers.items():
        pairs = [(r, ref[r["key"]]) for r in rows if r["key"] in ref]
        if name == reference or not pairs:
            continue
        levels = {"prompt_level_strict": ([float(all(a["strict"])) - float(all(b["strict"])) for a, b in pairs],
                                          [1.0] * len(pairs)),
                  "instruction_level_strict": ([float(sum(a["strict"]) - sum(b["strict"])) for a, b in pairs],
                                               [float(len(b["strict"])) for _, b in pairs])}
        out[name] = {"reference": reference}
        for level, (diffs, weights) in levels.items():
            d, (lo, hi) = paired_difference(diffs, weights)
            out[name][level] = {"difference": d, "lo": lo, "hi": hi}
    return out


def evaluate_ifeval(models: dict[str, str], rows: list[IFEvalRow], out_dir: str | os.PathLike, *,
                    max_new_tokens: int = 512, temperature: float = 0.0, batch_size: int = 16, seed: int = 0,
                    progress: bool = True, bf16: bool = True,
                    reuse: str | os.PathLike | None = None, reference: str | None = None) -> dict[str, Any]:
    """Sample one response per prompt from each model (name -> model spec), score them, write
    ``OUT/ifeval/NAME.jsonl`` (key, prompt, response, strict, loose) and put the scores under
    ``"ifeval"`` in ``OUT/results.json`` (kept beside what ``preflab eval`` wrote there before).
    Returns that ``"ifeval"`` entry: settings and, per model, ``score_ifeval`` without its rows,
    the model spec and the mean answer length in words. A model already scored there with the same
    spec and settings is not sampled again (a rerun after a kill resumes), nor one scored so in
    the evaluation directory ``reuse`` (a round's evaluation takes the run's SFT scores). With a
    ``reference`` among the models, every other model gets ``vs_reference``: its strict accuracies
    minus the reference's with paired 95% intervals (``against_reference``)."""
    import json
    from pathlib import Path

    import torch

    from preflab import models as loader
    from preflab.constraints import count_words
    from preflab.data.jsonl import atomic_write_text, write_jsonl
    from preflab.rollout import generate_texts

    _registry()
    out = Path(out_dir)
    results_path = out / "results.json"
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "n_prompts": len(rows)}
    def scored(where: Path) -> dict[str, Any]:  # name -> entry of the models scored there with these settings
        path = where / "results.json"
        entry = (json.loads(path.read_text(encoding="utf-8")).get("ifeval") or {}) if path.is_file() else {}
        return entry.get("models", {}) if entry.get("settings") == settings else {}

    done = scored(out)
    if reuse is not None:
        for name, m in scored(Path(reuse)).items():
            saved = Path(reuse) / "ifeval" / f"{safe_name(name)}.jsonl"
            if name in models and m.get("spec") == models[name] and name not in done and saved.is_file():
                (out / "ifeval").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(saved, out / "ifeval" / saved.name)
                done[name] = m
    entry: dict[str, Any] = {"settings": settings, "models": {}}
    for name, spec in models.items():
        if (done.get(name) or {}).get("spec") == spec:
            entry["models"][name] = done[name]
            continue
        tokenizer, model = loader.load_tokenizer(spec), loader.load_policy(spec)
        model.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            texts = generate_texts(model, tokenizer, [r.prompt for r in rows], max_new_tokens=max_new_tokens,
                                   temperature=temperature, batch_size=batch_size, progress=progress, bf16=bf16)
        del model
        scores = score_ifeval(rows, texts)
        write_jsonl(out / "ifeval" / f"{safe_name(name)}.jsonl",
                    [{"key": r.key, "prompt": r.prompt, "response": t, **{k: s[k] for k in ("instructions", "strict", "loose")}}
                     for r, t, s in zip(rows, texts, scores["rows"])])
        entry["models"][name] = {**{k: v for k, v in scores.items() if k != "rows"}, "spec": spec,
                                 "mean_words": sum(count_words(t) for t in texts) / max(len(texts), 1)}
        results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
        results["ifeval"] = {"settings": settings, "models": {**done, **entry["models"]}}
        atomic_write_text(results_path, json.dumps(results, indent=2))  # after each model: a kill keeps it
    if reference in entry["models"]:
        from preflab.data.jsonl import read_jsonl

        files = {name: out / "ifeval" / f"{safe_name(name)}.jsonl" for name in entry["models"]}
        answers = {name: read_jsonl(path) for name, path in files.items() if path.is_file()}
        if reference in answers:
            for name, diff in against_reference(answers, reference).items():
                entry["models"][name] = {**entry["models"][name], "vs_reference": diff}
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
    results["ifeval"] = entry
    atomic_write_text(results_path, json.dumps(results, indent=2))
    return entry


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
