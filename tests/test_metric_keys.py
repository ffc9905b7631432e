"""Every key a stage writes to metrics.jsonl is named in ``preflab.metric_keys``: each registered
stage runs on its tiny config (and variants that switch on its optional metrics), and the keys
of its metrics.jsonl are compared with the module."""

import json

import pytest

from preflab import metric_keys as K
from preflab.config import load_config
from preflab.registry import STAGES, run_stage

# stage -> variants (dotted overrides of configs/<stage>_tiny.yaml); each variant is one tiny run.
VARIANTS: dict[str, dict[str, list[str]]] = {
    "sft": {"tiny": [], "validation": ["train.eval_every=2", "train.select_best=true"]},
    "rm": {"tiny": [], "eval-every": ["train.eval_every=1", "eval.temperature_scaling=true",
                                      "train.select_best=true"]},
    "rl": {"tiny": [], "ptx": ["ptx.coef=1.0", "data.ptx=builtin:examples", "ptx.batch_size=2"],
           "rloo": ["algo.estimator=rloo", "rollout.samples_per_prompt=2", "rollout.batch_size=4", "train.steps=2"],
           "grpo-kl-loss": ["algo.estimator=grpo", "algo.kl_in=loss", "rollout.samples_per_prompt=2",
                            "rollout.batch_size=4", "train.steps=2"]},
    "dpo": {"tiny": [], "held-out": ["data.val_fraction=0.34", "eval.kl_prompts=2", "eval.max_new_tokens=4",
                                     "train.eval_every=1"]},
    "rs": {"tiny": []},
}


# keys a variant must log: it switched on what it was meant to (else the check above proves little)
EXPECT: dict[tuple[str, str], set[str]] = {
    ("sft", "tiny"): {K.TRAIN_LOSS, K.TRAIN_TOKENS, K.PERF_TOKENS_PER_S},
    ("sft", "validation"): {K.VAL_LOSS},
    ("rm", "tiny"): {K.TRAIN_ACCURACY, K.TRAIN_PAIRS, K.RM_ACCURACY, K.RM_ECE, K.RM_NORM_GAIN},
    ("rm", "eval-every"): {K.BEST_STEP, K.BEST_VAL_LOSS},
    ("rl", "tiny"): {K.OBJECTIVE_KL, K.POLICY_APPROXKL, K.VALUE_EXPLAINED_VARIANCE, K.PERF_GEN_S},
    ("rl", "ptx"): {K.LOSS_PTX},
    ("rl", "grpo-kl-loss"): {K.LOSS_KL},
    ("dpo", "tiny"): {K.TRAIN_REWARDS_ACCURACY, "train/logps/chosen"},
    ("dpo", "held-out"): {K.VAL_KL, "val/rewards/margin", "val/loss"},
    ("rs", "tiny"): {K.rs_round(1, "picks"), K.rs_round(1, "reward_mean")},
}


def test_every_registered_stage_is_exercised():
    assert set(VARIANTS) == set(STAGES)


def logged_keys(run_dir) -> set[str]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows, f"{run_dir}/metrics.jsonl is empty"
    return {k for row in rows for k in row}


@pytest.mark.parametrize("stage,variant", [(s, v) for s, vs in VARIANTS.items() for v in vs])
def test_every_logged_key_is_named(stage, variant, tmp_path):
    out = tmp_path / stage
    cfg = load_config(STAGES[stage].config, f"configs/{stage}_tiny.yaml", [f"run.out={out}",
                                                                           *VARIANTS[stage][variant]])
    run_stage(stage, cfg)
    keys = logged_keys(out)
    unnamed = sorted(k for k in keys if not K.is_known(k))
    assert not unnamed, f"{stage} ({variant}) logs keys that preflab/metric_keys.py does not name: {unnamed}"
    assert K.STEP in keys
    assert EXPECT.get((stage, variant), set()) <= keys, sorted(EXPECT[stage, variant] - keys)


def test_the_names_are_what_the_readers_expect():
    assert K.OBJECTIVE_KL == "objective/kl" and K.POLICY_APPROXKL == "policy/approxkl"
    assert K.TRAIN_LOSS == "train/loss" and K.RM_ACCURACY == "rm/accuracy"
    assert K.PERF_TOKENS_PER_S == "perf/tokens_per_s"
    assert {K.TRAIN_LOSS, K.OBJECTIVE_KL, "val/rewards/margin", "train/logps/chosen", K.STEP} <= K.KEYS
    assert all("/" in k for k in K.KEYS - {K.STEP})
    from preflab.evals.report import PPO_KEYS

    assert tuple(k for k, _ in PPO_KEYS) == K.PPO_CURVES


@pytest.mark.parametrize("key,known", [
    ("rm/accuracy/category/open_qa", True), ("rm/accuracy/slice/harmful", True), ("round1/reward_mean", True),
    ("round12/kept", True), (K.rs_round(3, "picks"), True), (K.rm_accuracy_by("slice", "x y"), True),
    ("rm/accuracy/colour/red", False), ("round0/kept", False), ("round1/nonsense", False), ("train/lose", False),
    ("objective/kl ", False), ("test/loss", False),
])
def test_patterns(key, known):
    assert K.is_known(key) is known


def test_pattern_builders_refuse_unknown_parts():
    with pytest.raises(ValueError):
        K.rm_accuracy_by("colour", "red")
    with pytest.raises(ValueError):
        K.rs_round(1, "nonsense")
