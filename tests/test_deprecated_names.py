"""The online RL stage's names of 0.2 still work, each with one deprecation message.

`preflab ppo` runs `preflab rl`; `PPOConfig` and friends are `RLConfig` and friends; a pipeline
config's `ppo:` section is read as `rl_stage:`; `registry.run_stage("ppo", ...)` runs stage `rl`.
Each test compares the old name with the new one, so it fails if an alias is dropped or drifts.
"""

import json
import warnings
from pathlib import Path

import pytest
import yaml

from helpers import RL_TINY, model_weights, run_cli
from preflab import config as config_pkg
from preflab import registry
from preflab.config import PipelineConfig, RLConfig, load_config, validate
from preflab.config import rl as config_rl
from preflab.pipeline import PRESETS, Pipeline


def deprecations(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]


@pytest.fixture
def record():
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        yield got


@pytest.fixture
def fresh_aliases(monkeypatch):
    """Forget the old config names already looked up in this process (the warning comes once per name)."""
    for module in (config_pkg, config_rl):
        for old in config_rl.RENAMED:
            monkeypatch.delitem(vars(module), old, raising=False)


@pytest.mark.parametrize("old,new", sorted(config_rl.RENAMED.items()))
def test_old_config_class_names_are_the_new_classes_with_one_warning(old, new, fresh_aliases, record):
    namespace = {}
    exec(f"from preflab.config import {old}, {new}", namespace)
    assert namespace[old] is namespace[new]
    assert len(deprecations(record)) == 1 and f"{old} is now {new}" in deprecations(record)[0]
    exec(f"from preflab.config import {old} as again", namespace)  # the name is bound now: no second warning
    assert namespace["again"] is namespace[new] and len(deprecations(record)) == 1


def test_ppoconfig_from_every_old_place(fresh_aliases, record):
    import preflab
    from preflab.config.rl import PPOConfig

    assert PPOConfig is RLConfig and preflab.PPOConfig is RLConfig and preflab.RLConfig is RLConfig
    assert len(deprecations(record)) == 1  # the first look-up warns, the others find the bound name
    assert "PPOConfig" not in preflab.__all__ and "RLConfig" in preflab.__all__
    with pytest.raises(AttributeError):
        config_pkg.NoSuchConfig  # noqa: B018


def test_the_old_config_class_loads_the_same_config(fresh_aliases):
    from preflab.config import PPOConfig

    old = load_config(PPOConfig, RL_TINY, ["run.out=x", "ppo.epochs=1"])
    assert old == load_config(RLConfig, RL_TINY, ["run.out=x", "ppo.epochs=1"]) and type(old) is RLConfig


# -- the CLI command --------------------------------------------------------------------------------


def test_preflab_ppo_prints_the_same_config_as_preflab_rl_with_one_note(capsys, record):
    assert run_cli(["rl", "--config", RL_TINY, "--print-config", "kl.coef=0.1"]) == 0
    new = capsys.readouterr()
    assert not deprecations(record) and "note" not in new.err
    assert run_cli(["ppo", "--config", RL_TINY, "--print-config", "kl.coef=0.1"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out and yaml.safe_load(old.out)["kl"]["coef"] == 0.1
    assert old.err.splitlines() == ["note: `preflab ppo` is now `preflab rl`; the old name will be removed"]
    assert len(deprecations(record)) == 1


def test_preflab_ppo_trains_what_preflab_rl_trains(tmp_path, capsys, record):
    runs = {}
    for name in ("rl", "ppo"):
        out = tmp_path / name
        assert run_cli([name, "--config", RL_TINY, "train.steps=1", f"run.out={out}"]) == 0
        runs[name] = out
    assert len(deprecations(record)) == 1 and capsys.readouterr().err.count("note: `preflab ppo`") == 1
    manifests = {n: json.loads((p / "manifest.json").read_text()) for n, p in runs.items()}
    assert manifests["ppo"]["stage"] == manifests["rl"]["stage"] == "rl"
    strip = lambda c: {**c, "run": {k: v for k, v in c["run"].items() if k != "out"}}  # noqa: E731
    assert strip(manifests["ppo"]["config"]) == strip(manifests["rl"]["config"])
    a, b = model_weights(runs["rl"] / "model"), model_weights(runs["ppo"] / "model")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_old_stage_name_is_not_listed(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  rl " in out and "  ppo " not in out


def test_run_stage_with_the_old_name_runs_the_rl_stage(monkeypatch, record):
    import preflab
    import preflab.stages.rl

    seen = []
    monkeypatch.setattr(preflab.stages.rl, "train", lambda cfg, resume=False: seen.append((cfg, resume)) or Path("m"))
    cfg = load_config(RLConfig, RL_TINY, ["run.out=x"])
    assert registry.run_stage("ppo", cfg, resume=True) == Path("m") and seen == [(cfg, True)]
    assert preflab.train("ppo", cfg) == Path("m") and len(seen) == 2
    assert len(deprecations(record)) == 2  # one per call
    assert registry.stage_of("rloo") == "rl" and "ppo" not in registry.STAGES


# -- the pipeline's section -------------------------------------------------------------------------


def test_a_pipeline_config_with_the_old_section_is_the_same_config(record):
    section = {"train": {"steps": 7}, "kl": {"coef": 0.3}}
    old = validate(PipelineConfig, {"ppo": section})
    assert len(deprecations(record)) == 1 and "`ppo` is now `rl_stage`" in deprecations(record)[0]
    assert old == validate(PipelineConfig, {"rl_stage": section}) and old.rl_stage == section
    # merged over the defaults, as the command line does: the old section's keys win, the rest stay
    defaults = PipelineConfig().model_dump(mode="json")
    merged = validate(PipelineConfig, {**defaults, "ppo": section})
    assert merged.rl_stage == {**defaults["rl_stage"], "train": {"steps": 7}, "kl": {"coef": 0.3}}


def test_preflab_pipeline_reads_the_old_section_with_one_note(tmp_path, capsys, record):
    new, old = tmp_path / "new.yaml", tmp_path / "old.yaml"
    new.write_text(yaml.safe_dump({"rl_stage": {"train": {"steps": 4}}}))
    old.write_text(yaml.safe_dump({"ppo": {"train": {"steps": 4}}}))
    assert run_cli(["pipeline", "--config", str(new), "--print-config"]) == 0
    printed = capsys.readouterr()
    assert not deprecations(record) and "note" not in printed.err
    assert run_cli(["pipeline", "--config", str(old), "--print-config", "ppo.kl.coef=0.02"]) == 0
    again = capsys.readouterr()
    assert again.out == printed.out and yaml.safe_load(again.out)["rl_stage"]["train"]["steps"] == 4
    assert again.err.splitlines() == ["note: the pipeline section `ppo` is now `rl_stage`; the old name will be removed"]
    assert len(deprecations(record)) == 1


def test_a_run_begun_under_the_old_section_name_resumes_without_a_config_change(tmp_path):
    data = json.loads(json.dumps(PipelineConfig.model_validate(PRESETS["tiny"]).model_dump(mode="json")))
    saved = {("ppo" if k == "rl_stage" else k): v for k, v in data.items()}  # what 0.2 wrote
    (tmp_path / "pipeline_config.json").write_text(json.dumps(saved))
    (tmp_path / "pipeline.json").write_text(json.dumps({"steps": [{"step": "suite", "seconds": 1.0}]}))
    Pipeline(validate(PipelineConfig, data), tmp_path).run(only=lambda step: False)
    assert "config_changes" not in json.loads((tmp_path / "pipeline.json").read_text())
    assert "rl_stage" in json.loads((tmp_path / "pipeline_config.json").read_text())
