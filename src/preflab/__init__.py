"""preflab: the InstructGPT post-training recipe, end to end.

The Python API is what the CLI calls::

    import preflab

    cfg = preflab.load_config(preflab.SFTConfig, "configs/sft_tiny.yaml", ["run.out=runs/sft"])
    model_dir = preflab.train("sft", cfg)            # any stage of the registry: sft, rm, rl, dpo, rs
    run_dir = preflab.run_pipeline("runs/tiny", preset="tiny")    # the whole recipe, resumable

Importing the package is cheap on purpose: torch and transformers load only when a stage runs
(the names below are resolved on first use).
"""

from __future__ import annotations

from typing import Any

try:  # one place for the version: pyproject.toml, as installed
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("preflab")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

_CONFIGS = ("SFTConfig", "RMConfig", "RLConfig", "PipelineConfig", "load_config")
__all__ = ["STAGES", "__version__", "run_pipeline", "train", *_CONFIGS]


def train(stage: str, cfg: Any, resume: bool = False):
    """Run one registered stage (``preflab.STAGES``) with its config; returns the exported model directory."""
    from preflab.registry import run_stage

    return run_stage(stage, cfg, resume=resume)


def run_pipeline(out: str = "runs/demo", *, preset: str | None = None, config: str | None = None,
             overrides: list[str] | None = None):
    """Run (or resume) the main job into ``out``, like ``preflab pipeline``; returns the run directory."""
    from pathlib import Path

    from preflab.config import PipelineConfig, apply_overrides, load_yaml, validate
    from preflab.pipeline import PRESETS, Pipeline, deep_merge

    data = deep_merge(PipelineConfig().model_dump(mode="json"), PRESETS[preset] if preset else {})
    if config:
        data = deep_merge(data, load_yaml(config))
    apply_overrides(data, list(overrides or []))
    Pipeline(validate(PipelineConfig, data, config or "pipeline"), out).run()
    return Path(out)


def __getattr__(name: str) -> Any:
    if name in _CONFIGS or name == "PPOConfig":  # PPOConfig: RLConfig's old name, with a DeprecationWarning
        from preflab import config

        return getattr(config, name)
    if name == "STAGES":
        from preflab.registry import STAGES

        return STAGES
    raise AttributeError(f"module 'preflab' has no attribute {name!r}")
