"""One set of defaults: `preflab data label` and `preflab eval` sample with the pipeline's labeling
and eval sections (config.LabelingSection, config.EvalSection), so the same command gives the same
data whether it is typed or run by `preflab pipeline`."""

import inspect
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from preflab.config import EvalSection, LabelingSection, PipelineConfig, load_config
from preflab.evals.cli import eval_cli
from preflab.evals.evaluate import evaluate
from preflab.feedback.label_cli import collect_rankings, label

FIXTURES = Path(__file__).parent / "fixtures"
# CLI option (click parameter name) -> the config field it defaults to
LABEL_OPTIONS = ("k", "max_new_tokens", "temperature", "overlap", "batch_size")
EVAL_OPTIONS = ("max_new_tokens", "temperature", "batch_size", "bf16")


def defaults(command) -> dict:
    return {p.name: p.default for p in command.params}


def keyword_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_label_command_defaults_are_the_pipelines():
    cli, fn, section = defaults(label), keyword_defaults(collect_rankings), LabelingSection()
    for name in LABEL_OPTIONS:
        assert cli[name] == getattr(section, name), name
        assert fn[name] == getattr(section, name), name
    assert fn["bf16"] == section.bf16  # the command has no --bf16: collect_rankings' default applies


def test_eval_command_defaults_are_the_pipelines():
    cli, fn, section = defaults(eval_cli), keyword_defaults(evaluate), EvalSection()
    for name in EVAL_OPTIONS:
        assert cli[name] == getattr(section, name), name
        assert fn[name] == getattr(section, name), name


def test_the_pipeline_uses_the_same_sections():
    """`preflab pipeline` (PipelineConfig's defaults) and the shipped configs/pipeline.yaml."""
    for cfg in (PipelineConfig(), load_config(PipelineConfig, "configs/pipeline.yaml")):
        assert {n: getattr(cfg.labeling, n) for n in LABEL_OPTIONS} == \
            {n: getattr(LabelingSection(), n) for n in LABEL_OPTIONS}
        assert {n: getattr(cfg.eval, n) for n in EVAL_OPTIONS} == {n: getattr(EvalSection(), n) for n in EVAL_OPTIONS}


class Called(Exception):
    pass


def capture(monkeypatch, module, name) -> dict:
    seen: dict = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise Called

    monkeypatch.setattr(module, name, fake)
    return seen


def test_label_command_passes_the_pipelines_values(monkeypatch, tmp_path):
    from preflab.feedback import label_cli

    seen = capture(monkeypatch, label_cli, "collect_rankings")
    r = CliRunner().invoke(label, ["--model", "tiny:", "--prompts", str(FIXTURES / "prompts_tiny.jsonl"),
                                   "--store", str(tmp_path / "s.sqlite"), "--split", "any"])
    assert isinstance(r.exception, Called), r.output
    lab = LabelingSection()
    assert {n: seen[n] for n in LABEL_OPTIONS} == {n: getattr(lab, n) for n in LABEL_OPTIONS}
    assert "bf16" not in seen  # collect_rankings' own default, LabelingSection().bf16


def test_eval_command_passes_the_pipelines_values(monkeypatch, tmp_path):
    from preflab.evals import evaluate as evaluate_module

    seen = capture(monkeypatch, evaluate_module, "evaluate")
    r = CliRunner().invoke(eval_cli, ["--models", "sft=tiny:", "--prompts", str(FIXTURES / "prompts_tiny.jsonl"),
                                      "--split", "all", "--out", str(tmp_path / "eval")])
    assert isinstance(r.exception, Called), r.output
    e = EvalSection()
    assert {n: seen[n] for n in EVAL_OPTIONS} == {n: getattr(e, n) for n in EVAL_OPTIONS}


@pytest.mark.parametrize("command,option", [(label, "temperature"), (label, "overlap"), (label, "batch_size"),
                                            (eval_cli, "max_new_tokens"), (eval_cli, "batch_size")])
def test_help_shows_the_shared_defaults(command, option):
    """The values the CLI and the pipeline disagreed on (the issue: temperature 0.7 vs 0.8, overlap
    0.1 vs 0.15, eval max tokens 96 vs 64) print as the config's."""
    section = LabelingSection() if command is label else EvalSection()
    out = CliRunner().invoke(command, ["--help"], terminal_width=200).output
    line = next(x for x in out.splitlines() if x.startswith("  --" + option.replace("_", "-") + " "))  # Options:
    assert re.search(rf"\[default: {re.escape(str(getattr(section, option)))}[];]", line), line
