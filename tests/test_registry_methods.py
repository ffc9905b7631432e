"""The registry is the one trainer table: the pipeline accepts exactly the methods it lists, and every
one of them trains through the pipeline and through `preflab compare` on tiny models."""

import json
from typing import get_args

from helpers import run_cli
from preflab.config import PipelineConfig
from preflab.registry import METHODS, stage_of

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
