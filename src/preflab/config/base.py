"""The base of every config: ``Section`` (unknown keys are errors, numbers finite), the model,
optimizer and run sections the stages share, and loading (YAML, dotted overrides, validation
with one error naming the key)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from preflab.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and a
    number must be finite (``inf``, ``nan``, ``1e999`` are errors naming the key, also inside
    tuples, lists and free-form mappings such as the pipeline's stage overrides)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        bad = _non_finite(value)
        if bad is not None:
            where, number = bad
            raise ValueError(f"must be a finite number, got {number}" if not where
                             else f"{where} must be a finite number, got {number}")
        return value


def _non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """The first non-finite float in ``value`` (nested lists, tuples and dicts) as (dotted key
    inside ``value``, the number), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items = enumerate(value) if isinstance(value, list | tuple) else value.items() if isinstance(value, dict) else ()
    for k, v in items:
        bad = _non_finite(v, f"{where}.{k}" if where else str(k))
        if bad is not None:
            return bad
    return None


# ---------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------


class LoraSection(Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="peft target_modules.")


class ModelSection(Section):
    path: str = Field(
        "bundled:smollm2-135m-instruct",
        description="A local directory, a hub id, `bundled:smollm2-135m-instruct` or `tiny:` (random, for tests).",
    )
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Weight dtype. Keep fp32 for training: bf16 autocast does the speed-up."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present, else CPU.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: auto, one per core that "
                                                        "other processes leave free, checked at each stage's start).")
    lora: LoraSection = Field(default_factory=LoraSection)


class OptimSection(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas (InstructGPT: 0.9, 0.95).")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    schedule: Literal["cosine", "constant", "linear"] = Field("cosine")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from warmup_start * lr.")
    warmup_start: float = Field(0.0, ge=0, le=1, description="Warm-up starts at this fraction of lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine/linear decay floor as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None: off).")


class RunSection(Section):
    out: str = Field("runs/sft", description="Run directory.")
    seed: int = Field(0, description="Seed for python, numpy and torch (per rank: seed + 100003 * rank).")
    log_every: int = Field(1, ge=1, description="Write metrics every N optimizer steps.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = Field(1, ge=1, description="How many recent checkpoints to keep.")
    progress: bool = Field(True, description="Show a progress bar.")
    trackers: list[Literal["tensorboard", "mlflow"]] = Field(
        [], description="Also send metrics to these trackers (metrics.jsonl is always written): tensorboard "
                        "(RUN/tensorboard; pip install 'preflab[tensorboard]'), mlflow (MLFLOW_TRACKING_URI, "
                        "else RUN/mlruns; pip install 'preflab[mlflow]').")


PARALLEL_HELP = ("How several ranks (torchrun) share the model: ddp keeps a full copy on every rank; fsdp "
                 "shards weights, gradients and optimizer state over the ranks (FSDP2, one unit per decoder "
                 "layer; bf16 then means bf16 weights in compute with fp32 gradient reduction). One process: no "
                 "effect. docs/scale-out.md")
LENGTH_GROUPS_HELP = ("Steps per length group: the examples of each run of N steps are sorted by length and cut "
                      "into steps again, taken in random order, so a step pads less (same examples each epoch; "
                      "0 or 1: plain random steps).")


def check_select_best(data: Any, train: Any) -> None:
    """``train.select_best`` picks among held-out scores: without held-out data it would silently
    export the last step."""
    if train.select_best and not data.val and data.val_fraction == 0:
        raise ValueError("train.select_best needs held-out data: set data.val or data.val_fraction > 0")


C = TypeVar("C", bound=BaseModel)


class RecipeInputs(NamedTuple):
    """What a pipeline run hands a trainer's recipe (``registry.Stage.recipe``) to build its config:
    the paths of the run's pieces and the settings a recipe may follow. A later round moves the
    policy, the reward model, the store, the KL reference, the run directory and the seed."""

    policy: str  # the policy the trainer starts from (round 1: RUN/sft/model)
    reference: str | None  # the KL reference (None: the starting policy)
    reward_model: str
    reward_ensemble: list[str]  # the RM's ensemble members beside it (none in a later round)
    store: str  # the preference store whose split ``rm`` holds the rankings
    prompts: str  # the suite's prompts (split ``ppo``: the prompts a sampling trainer draws)
    demos: str  # the demonstrations (a pretraining mix)
    model: dict[str, Any]  # options of every model section (threads)
    out: str
    seed: int
    sample_tokens: int  # the labeling budget: the response lengths the RM was trained on
    max_length: int  # the RM's sequence length


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base`` key by key (nested dicts merge; anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-5"`` -> (["optim", "lr"], 1e-5). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({e})") from None
    if isinstance(value, dict) and not raw.strip().startswith("{"):
        value = raw.strip()  # `model.path=tiny:` is a string, not the mapping {tiny: None}
    elif isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value  # YAML 1.1 misses 3e-3
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating sections as needed); returns ``data``."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a check across keys (model validator): its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
            continue
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{key}: {msg}{shown}")
    return f"{source}: " + "; ".join(lines)


def validate(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults < YAML file < dotted overrides; one ConfigError naming every bad key."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, list(overrides or []))
    return validate(cls, data, source=str(path) if path else "config")


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")

__all__ = ["RecipeInputs", "Section", "LoraSection", "ModelSection", "OptimSection", "RunSection", "PARALLEL_HELP", "LENGTH_GROUPS_HELP", "check_select_best", "deep_merge", "parse_override", "apply_overrides", "format_validation_error", "validate", "load_yaml", "load_config", "dump_config"]
