"""The registry is the one trainer table: the pipeline accepts exactly the methods it lists, and every
one of them trains through the pipeline and through `preflab compare` on tiny models."""

import dataclasses
import json
from typing import get_args

from helpers import run_cli
from preflab.config import PipelineConfig, deep_merge
from preflab.pipeline import PRESETS, Pipeline
from preflab.registry import METHODS, STAGES, stage_of

TRAINED = [m for m in METHODS if m not in ("sft", "rm")]
ONLINE = [m for m in TRAINED if stage_of(m) == "rl"]
OFFLINE = [m for m in TRAINED if stage_of(m) != "rl"]


def listed(field: str) -> set[str]:
    (literal,) = get_args(PipelineConfig.model_fields[field].annotation)  # list[Literal[...]]
    return set(get_args(literal))


def test_the_pipeline_accepts_exactly_the_registered_methods():
    assert listed("rl") == set(ONLINE)
    assert listed("preference") == set(OFFLINE)


def test_every_registered_method_trains_in_the_pipeline_and_in_compare(tmp_path):
    run = tmp_path / "run"
    assert run_cli(["pipeline", "--preset", "tiny", "--out", str(run), f"rl=[{','.join(ONLINE)}]",
                    f"preference=[{','.join(OFFLINE)}]", "eval.models=[sft]", "eval.limit=8"]) == 0
    steps = [s["step"] for s in json.loads((run / "pipeline.json").read_text())["steps"]]
    for m in TRAINED:
        assert (run / m / "model").is_dir(), m
        assert m in steps, m
    for methods, extra in ((ONLINE, []), (OFFLINE, ["train.max_steps=1"])):
        out = tmp_path / f"compare-{methods[0]}"
        assert run_cli(["compare", str(run), "--methods", ",".join(methods), "--seeds", "0", "--out", str(out),
                        *extra]) == 0
        rows = json.loads((out / "compare.json").read_text())
        assert [r["method"] for r in rows[1:]] == methods
        assert all(r["gold_winrate"] is not None and r["n"] == 8 for r in rows[1:])


def test_a_methods_config_is_its_registry_recipe_on_the_runs_pieces(tmp_path, monkeypatch):
    """Adding a trainer takes no branch in the pipeline: a method's config on a run is what its stage's
    registry entry builds from the run's pieces (RecipeInputs), with the method's preset and
    `rl_overrides` on top; a later round's keywords reach the recipe."""
    seen = []

    def recipe(run):
        seen.append(run)
        return {"from_recipe": run.policy, "train": {"epochs": 9, "batch_size": 3}}

    monkeypatch.setitem(STAGES, "rs", dataclasses.replace(STAGES["rs"], recipe=recipe))
    data = deep_merge(deep_merge(PipelineConfig().model_dump(mode="json"), PRESETS["tiny"]),
                      {"rl": ["rloo"], "rm_ensemble": 2, "rl_overrides": {"rloo": {"kl": {"coef": 0.5}}}})
    pipe = Pipeline(PipelineConfig.model_validate(data), tmp_path)  # rs is not trained: its patched entry unchecked
    overrides = {**pipe.cfg.rl_overrides, "rs": {"train": {"epochs": 2}}}
    pipe.cfg = pipe.cfg.model_copy(update={"rl_overrides": overrides})

    round1 = pipe.method_dict("rs")
    assert round1 == {"from_recipe": str(tmp_path / "sft/model"), "train": {"epochs": 2, "batch_size": 3}}
    run = seen[-1]
    assert (run.policy, run.reference, run.reward_model) == (str(tmp_path / "sft/model"), None,
                                                             str(tmp_path / "rm/model"))
    assert run.reward_ensemble == [str(tmp_path / "rm-2/model")] and run.store == str(tmp_path / "store.sqlite")
    assert (run.out, run.seed) == (str(tmp_path / "rs"), pipe.cfg.seed)
    assert run.sample_tokens == pipe.cfg.labeling.max_new_tokens == 8
    assert run.max_length == pipe.stage_configs["rm"].data.max_length == 192

    moved = pipe.method_dict("rs", policy="P", reward_model="R", store=tmp_path / "s2", reference="REF",
                             out=tmp_path / "round-2/rs", seed=1000)
    assert moved == {"from_recipe": "P", "train": {"epochs": 2, "batch_size": 3}}  # the move where the recipe puts it
    run = next(r for r in seen if r.policy == "P")
    assert (run.policy, run.reference, run.reward_model, run.reward_ensemble) == ("P", "REF", "R", [])
    assert (run.store, run.out, run.seed) == (str(tmp_path / "s2"), str(tmp_path / "round-2/rs"), 1000)
    # The online stage's recipe: rl_stage, then the method's preset, then rl_overrides.
    rloo = pipe.method_dict("rloo", reference="REF")
    assert rloo["models"]["reference"] == "REF" and rloo["algo"]["estimator"] == "rloo"
    assert rloo["kl"]["coef"] == 0.5 and rloo["train"]["steps"] == 2  # override over preset; tiny's rl_stage
