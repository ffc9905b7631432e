from pathlib import Path

import pytest

from preflab.config import SFTConfig, load_config
from preflab.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def config_class(path: Path):
    """The config class of a shipped YAML, from its name: a registry stage (sft_tiny.yaml -> sft) or the pipeline."""
    from preflab.config import PipelineConfig
    from preflab.registry import STAGES

    stage = path.stem.split("_")[0]
    return PipelineConfig if stage == "pipeline" else getattr(STAGES.get(stage), "config", None)


def test_pipeline_yaml_equals_the_built_in_defaults():
    from preflab.config import PipelineConfig

    cfg = load_config(PipelineConfig, Path(__file__).parents[1] / "configs/pipeline.yaml")
    assert cfg.model_dump(exclude={"threads"}) == PipelineConfig().model_dump(exclude={"threads"})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_validates(path):
    cls = config_class(path)
    assert cls is not None, f"no config class for {path.name}"
    load_config(cls, path)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(SFTConfig, None, ["optim.learning_rate=1e-5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.batchsize: unknown key"):
        load_config(SFTConfig, bad)


def test_bad_value_and_type_are_named():
    with pytest.raises(ConfigError, match=r"optim\.lr: .*greater than 0"):
        load_config(SFTConfig, None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*integer"):
        load_config(SFTConfig, None, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_config(SFTConfig, None, ["model.dtype=fp8"])


def test_overrides_beat_yaml_and_parse_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\ntrain:\n  bf16: false\n")
    cfg = load_config(SFTConfig, f, ["optim.lr=3e-4", "train.bf16=true", "data.val=null"])
    assert cfg.optim.lr == 3e-4 and cfg.train.bf16 is True and cfg.data.val is None
    assert cfg.optim.warmup_steps == SFTConfig().optim.warmup_steps  # partial section keeps stage defaults


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(SFTConfig, None, ["optim.lr"])


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_select_best_without_held_out_data_is_refused(stage):
    """It would otherwise export the last step while the user asked for the best one."""
    from preflab.config import RMConfig

    cls, base = {"sft": (SFTConfig, []), "rm": (RMConfig, ["data.train=r.jsonl"])}[stage]
    with pytest.raises(ConfigError, match=r"train.select_best needs held-out data"):
        load_config(cls, None, [*base, "train.select_best=true", "data.val_fraction=0"])
    assert load_config(cls, None, [*base, "train.select_best=true", "data.val_fraction=0.1"]).train.select_best
    assert load_config(cls, None, [*base, "train.select_best=true", "data.val_fraction=0", "data.val=v.jsonl"])


def test_dpo_yaml_trains_at_the_recipes_step():
    """`preflab dpo --config configs/dpo.yaml` and the pipeline's DPO take the same step (1e-6 barely moved the demo)."""
    from preflab.config import DPOConfig, RecipeInputs
    from preflab.config.dpo import dpo_recipe

    run = RecipeInputs(policy="p", reference=None, reward_model="r", reward_ensemble=[], store="s", prompts="q",
                       demos="d", model={}, out="o", seed=0, sample_tokens=128, max_length=320)
    cfg = load_config(DPOConfig, Path(__file__).parents[1] / "configs/dpo.yaml")
    assert cfg.optim.lr == dpo_recipe(run)["optim"]["lr"] == 2e-5
    assert cfg.dpo.ptx_coef == dpo_recipe(run)["dpo"]["ptx_coef"] == 1.0
    assert dpo_recipe(run)["data"]["ptx"] == "d"  # the run's demonstrations, for dpo.ptx_coef
    assert cfg.data.ptx == "runs/demo/data/demos.jsonl"  # where `make demo` writes them
