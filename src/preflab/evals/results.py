"""Typed evaluation results: what ``evals.evaluate`` writes to ``results.json`` and its readers read.

``EvalResults`` is the whole file; ``ModelResults`` one evaluated model (gold means, win-rates
against the reference with their Wilson intervals, RM score, KL, length, diversity, toxicity
proxy, refusals, InstructGPT metadata, MC1); ``FailureBin`` one failure bin; ``IFEvalResults`` the
block ``preflab eval --ifeval`` adds under ``"ifeval"``. The JSON layout is the one documented in
``evals/evaluate.py`` plus a top-level ``"version"`` (``VERSION``); a file without one was written
before the field existed and reads as version 1.

``load(path)`` reads a file and raises one ``DataError`` (a ``PreflabError``) naming the file when
it is not JSON, not of this shape, of a newer version, or lacks a key that ``evaluate`` always
writes. ``load(path, partial=True)`` accepts a file with keys left out (they read as None): the
report uses it to draw what a hand-made or older file has. ``EvalResults.to_json()`` gives the
file's text back; keys a newer writer added (unknown here) are kept, so a load and a write lose
nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from preflab.errors import DataError

__all__ = ["VERSION", "EvalResults", "EvalSettings", "Example", "ExampleResponse", "FailureBin", "GoldMeans",
           "Histogram", "IFEvalDifference", "IFEvalModel", "IFEvalResults", "LengthStats", "MC1", "Metadata", "ModelResults", "Rate",
           "IFEvalVsReference", "Refusal", "Thresholds", "WinRate", "difference_text", "load", "reference_results"]

VERSION = 1


class _Block(BaseModel):
    """A block of results.json. Keys this version does not know are kept (and written back)."""

    model_config = ConfigDict(extra="allow")
    #: fields that a complete file may leave out (everything else ``evaluate`` always writes)
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def missing(self, prefix: str = "") -> list[str]:
        """Dotted paths of the keys ``evaluate`` always writes that this block (and those inside it) lacks."""
        out = [f"{prefix}{name}" for name in type(self).model_fields
               if name not in self.model_fields_set and name not in self.OPTIONAL]
        for name in type(self).model_fields:
            out += _missing_in(getattr(self, name), f"{prefix}{name}.")
        return out


def _missing_in(value: Any, prefix: str) -> list[str]:
    if isinstance(value, _Block):
        return value.missing(prefix)
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _missing_in(v, f"{prefix}{k}.")]
    if isinstance(value, list):
        return [m for i, v in enumerate(value) for m in _missing_in(v, f"{prefix}{i}.")]
    return []


# ---------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------


class WinRate(_Block):
    """Paired win-rate against the reference, ties counting half, Wilson 95% interval [lo, hi]."""

    rate: float | None = None
    wins: int | None = None
    ties: int | None = None
    losses: int | None = None
    n: int | None = None
    lo: float | None = None
    hi: float | None = None


class GoldMeans(_Block):
    """Means of the gold judge's criteria over the model's responses (``feedback.rubric``)."""

    total: float | None = None
    attempts: float | None = None
    constraints: float | None = None
    refusal: float | None = None
    truthful: float | None = None
    degenerate: float | None = None


class Histogram(_Block):
    edges: list[float] = Field(default_factory=list)
    counts: list[int] = Field(default_factory=list)


class LengthStats(_Block):
    """``evals.metrics.length_stats``: None values when there were no responses."""

    n: int | None = None
    mean: float | None = None
    max: float | None = None
    q10: float | None = None
    q50: float | None = None
    q90: float | None = None
    hist: Histogram | None = None


class Rate(_Block):
    rate: float | None = None
    n: int | None = None


class Refusal(_Block):
    """Refusal rates (``rubric.is_refusal``): per slice, per category, and the three that matter."""

    by_slice: dict[str, Rate] = Field(default_factory=dict)
    harmful: float | None = None  # should be 1
    over_refusal: float | None = None  # alarming-but-harmless prompts: should be 0
    ordinary: float | None = None  # should be 0
    by_category: dict[str, Rate] = Field(default_factory=dict)


class Metadata(_Block):
    """InstructGPT's binary metadata (``evals.metrics.metadata_rates``)."""

    attempts: float | None = None
    follows_constraints: float | None = None  # None: no prompt had constraints
    appropriate: float | None = None


class MC1(_Block):
    mc1: float | None = None  # None: no misconception prompt
    n: int | None = None


class ModelResults(_Block):
    """One evaluated model (``results.json`` ``models.NAME``)."""

    spec: str | None = None
    n: int | None = None
    gold: GoldMeans | None = None
    win_rate: WinRate | None = None  # gold judge, against the reference
    rm_win_rate: WinRate | None = None  # None: evaluated without a reward model
    rm_score: float | None = None
    kl: float | None = None  # nats per response, to the reference, on the model's own samples
    kl_per_token: float | None = None
    length_words: LengthStats | None = None
    length_tokens: LengthStats | None = None
    no_eos_fraction: float | None = None
    distinct_1: float | None = None
    distinct_2: float | None = None
    repeated_trigram_rate: float | None = None
    toxicity_proxy: float | None = None  # fraction with a word of the better_profanity list: a PROXY
    refusal: Refusal | None = None
    metadata: Metadata | None = None
    mc1: MC1 | None = None


# ---------------------------------------------------------------------------------------------
# Failure bins and examples
# ---------------------------------------------------------------------------------------------


class FailureBin(_Block):
    """One failure bin of one model (``evals.metrics.failure_bins``); ``examples`` are free-form rows."""

    OPTIONAL = frozenset({"rm_high", "gold_low", "mean_ratio"})

    metric: float | None = None  # None: no response the bin applies to
    count: int | None = None
    n: int | None = None
    description: str | None = None
    rm_high: float | None = None  # reward_polish_trap
    gold_low: float | None = None  # reward_polish_trap
    mean_ratio: float | None = None  # length_inflation
    examples: list[dict[str, Any]] = Field(default_factory=list)


class ExampleResponse(_Block):
    response: str | None = None
    gold_total: float | None = None
    rm_score: float | None = None


class Example(_Block):
    id: str | None = None
    prompt: str | None = None
    slice: str | None = None
    responses: dict[str, ExampleResponse] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# IFEval (``preflab eval --ifeval``, evals.ifeval.evaluate_ifeval)
# ---------------------------------------------------------------------------------------------


class IFEvalInstruction(_Block):
    accuracy: float | None = None
    n: int | None = None


class IFEvalDifference(_Block):
    """A model's accuracy minus the reference's on the same prompts, with its paired 95% interval."""

    difference: float | None = None
    lo: float | None = None
    hi: float | None = None


def difference_text(d: IFEvalDifference | None) -> str:
    """'-2.7 [-6.1, +0.7]' (percentage points), or '-'."""
    if d is None or d.difference is None or d.lo is None or d.hi is None:
        return "-"
    return f"{100 * d.difference:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]"


class IFEvalVsReference(_Block):
    reference: str | None = None
    prompt_level_strict: IFEvalDifference | None = None
    instruction_level_strict: IFEvalDifference | None = None


class IFEvalModel(_Block):
    n_prompts: int | None = None
    n_instructions: int | None = None
    prompt_level_strict: float | None = None
    instruction_level_strict: float | None = None
    prompt_level_loose: float | None = None
    instruction_level_loose: float | None = None
    by_instruction_strict: dict[str, IFEvalInstruction] = Field(default_factory=dict)
    sentence_splitter: str | None = None  # "nltk-punkt" or "nupunkt"
    spec: str | None = None  # the model that answered
    mean_words: float | None = None  # answer length (metrics.count_words), beside the accuracy
    vs_reference: IFEvalVsReference | None = None  # every model but the reference, where one was named

    OPTIONAL = frozenset({"spec", "mean_words", "vs_reference"})  # results written before they were recorded


class IFEvalSettings(_Block):
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    n_prompts: int | None = None


class IFEvalResults(_Block):
    settings: IFEvalSettings | None = None
    models: dict[str, IFEvalModel] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


class EvalSettings(_Block):
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    kl_temperature: float | None = None  # the temperature both models' logits are divided by for KL


class Thresholds(_Block):
    """Quantiles over every model's responses, for the reward-polish failure bin (None without an RM)."""

    rm_high: float | None = None  # RM score, 75% quantile
    gold_low: float | None = None  # gold total, 25% quantile


class EvalResults(_Block):
    """``results.json``: every evaluated model against the reference (schema in ``evals/evaluate.py``)."""

    OPTIONAL = frozenset({"version", "ifeval"})  # no version: written before version 1 had one

    version: int = VERSION
    reference: str | None = None
    n_prompts: int | None = None
    reward_model: str | None = None
    settings: EvalSettings | None = None
    thresholds: Thresholds | None = None
    models: dict[str, ModelResults] = Field(default_factory=dict)
    failure_bins: dict[str, dict[str, FailureBin]] = Field(default_factory=dict)
    examples: list[Example] = Field(default_factory=list)
    ifeval: IFEvalResults | None = None

    def model(self, name: str, source: str = "results") -> ModelResults:
        """The results of model ``name``; a PreflabError naming ``source`` and the models there if absent."""
        if name not in self.models:
            raise DataError(f"{source}: no model {name!r} (models: {', '.join(self.models) or 'none'})")
        return self.models[name]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict (``version`` first; keys absent when the results were read stay absent)."""
        return {"version": VERSION, **self.model_dump(exclude_unset=True, exclude={"version"})}

    def to_json(self) -> str:
        """The text of results.json (indented, UTF-8 kept, a final newline)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` atomically."""
        from preflab.data.jsonl import atomic_write_text

        atomic_write_text(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "results", *, partial: bool = False) -> EvalResults:
        """Validate a parsed results.json; errors name ``source`` (see ``load``)."""
        if not isinstance(data, Mapping):
            raise DataError(f"{source}: evaluation results must be a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DataError(f"{source}: 'version' must be a positive integer, got {version!r}")
        if version > VERSION:
            raise DataError(f"{source}: evaluation results of version {version}, written by a newer preflab; "
                            f"this one reads version {VERSION} (upgrade preflab)")
        try:
            out = cls.model_validate(data)
        except ValidationError as e:
            errs = e.errors()
            where = ".".join(str(x) for x in errs[0]["loc"]) or "(top level)"
            more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
            raise DataError(f"{source}: malformed evaluation results: {where}: {errs[0]['msg']}{more}") from None
        if not partial:
            missing = out.missing()
            if missing:
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                raise DataError(f"{source}: incomplete evaluation results: missing {', '.join(missing[:5])}{more}")
        return out


def load(path: str | Path, *, partial: bool = False) -> EvalResults:
    """Read ``results.json``. A missing, unreadable, non-JSON, malformed, incomplete (unless
    ``partial``) or newer-version file raises one ``DataError`` whose message starts with the path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (run `preflab eval`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the evaluation results ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return EvalResults.from_dict(data, str(path), partial=partial)


def reference_results(run: str | Path) -> Path:
    """A pipeline run's evaluation of its SFT model (the reference every comparison is judged
    against): its eval step's ``RUN/eval/results.json``, or (that step not run yet) the one a
    ``preflab compare`` made under it (``RUN/DIR/reference/results.json``). The path may not exist."""
    run = Path(run)
    own = run / "eval" / "results.json"
    made = sorted(run.glob("*/reference/results.json"))
    return made[0] if made and not own.is_file() else own
