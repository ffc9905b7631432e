"""`preflab pipeline`: the main job and its rounds."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from preflab.config.base import Section, deep_merge
from preflab.config.dpo import OfflineMethod
from preflab.config.rl import RLMethod
from preflab.errors import ConfigError


class SuiteSection(Section):
    prompts: str | None = Field(None, description="Your own prompt JSONL in the suite format (None: built-in suite).")
    seed: int = 0
    n: int = Field(3200, ge=100, description="Prompts in the built-in suite.")
    long_form: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of the built-in suite's generation, open-QA and chat requests that "
        "ask for at least 80-120 words and carry their own token budget (192-256), which labeling, rollouts and "
        "evaluation use instead of their default (0: none).")


class DemosSection(Section):
    mode: Literal["mixed", "best_of_n", "reference"] = Field(
        "reference", description="reference: constraint-satisfying templated answers (and templated refusals); "
                                 "best_of_n: the gold judge's best of n base-model samples; mixed: best of n, "
                                 "reference when no sample is good enough.")
    limit: int = Field(400, ge=8, description="SFT-split prompts that get a demonstration.")
    n: int = Field(4, ge=1, description="Samples per prompt for best_of_n/mixed.")
    extra: str | None = Field(None, description="Your own demonstrations JSONL, added to the generated ones.")


class LabelingSection(Section):
    k: int = Field(4, ge=2, le=9, description="Samples per RM prompt (InstructGPT: 4 to 9).")
    limit: int = Field(300, ge=8, description="RM-split prompts to rank (300 x C(4,2) = 1,800 comparisons, "
                                              "2,340 with the overlap slice's extra rankings).")
    max_new_tokens: int = Field(128, ge=1, description="Token budget of a candidate (a prompt row's own "
                                                       "`max_new_tokens` wins).")
    temperature: float = Field(0.8, gt=0)
    overlap: float = Field(0.15, ge=0, le=1, description="Fraction ranked by three labelers (agreement slice).")
    batch_size: int = Field(32, ge=1, description="Sequences per generate() call (K samples of a prompt together).")
    bf16: bool = Field(True, description="bf16 autocast while sampling.")


class EvalSection(Section):
    limit: int = Field(300, ge=4, description="Held-out eval-split prompts.")
    max_new_tokens: int = Field(128, ge=1, description="Token budget of an answer (a prompt row's own "
                                                       "`max_new_tokens` wins).")
    temperature: float = Field(0.7, gt=0)
    batch_size: int = Field(32, ge=1, description="Sequences per generate() and scoring call.")
    bf16: bool = Field(True, description="bf16 weights and autocast for sampling and scoring (about 2x faster "
                                         "on CPU; log-softmax stays fp32).")
    models: list[str] | None = Field(
        None, description="Models to evaluate: base, sft and trained methods (None: sft and every method of `rl` "
                          "and `preference`; list base to compare with the pretrained model too). SFT is the "
                          "reference.")
    ifeval: str | None = Field(
        None, description="An IFEval-format prompt file (`builtin:ifeval`: the 541 public IFEval prompts shipped "
                          "with preflab): every evaluated model also answers these, greedy, and the report shows "
                          "strict/loose accuracy and answer length beside the suite's numbers (needs the ifeval "
                          "extra; None: off).")
    ifeval_limit: int | None = Field(None, ge=1, description="Only the file's first N prompts (None: all).")
    ifeval_max_new_tokens: int = Field(512, ge=1, description="Token budget of an IFEval answer.")


class RoundsSection(Section):
    """Rounds 2..n of the main job (InstructGPT's iteration): rank fresh samples of the current policy,
    refit the RM on every ranking so far, train the policy a little further from where it is."""

    method: str | None = Field(None, description="Trainer of rounds 2..n: a method of `rl` or `preference` (None: "
                                                 "the first of `rl`, else of `preference`).")
    prompts: int = Field(150, ge=8, description="Fresh RM-split prompts ranked per round (never ranked before), "
                                                "K samples each from the current policy.")
    heldout: int = Field(40, ge=0, description="Further fresh prompts per round ranked by three labelers and kept "
                                               "out of the RM: its on-policy accuracy and the labelers' agreement "
                                               "on the same samples (0: off).")
    kl_anchor: Literal["sft", "previous"] = Field(
        "sft", description="KL reference of a round's trainer: the SFT model (the leash never moves, so the "
                           "total drift stays bounded) or the previous round's policy (a trust region per round).")
    rm_init: Literal["sft", "previous"] = Field(
        "sft", description="A round's RM starts from the SFT model (every ranking weighs the same) or from the "
                           "previous round's RM (warm start).")
    select: Literal["random", "uncertainty"] = Field(
        "random", description="Which fresh RM-split prompts a round ranks. random: the next `round.prompts` of the "
                              "suite. uncertainty: of the next `round.pool` x `round.prompts`, the ones whose K samples "
                              "of the current policy the reward-model ensemble disagrees on most (the members' std of "
                              "the normalised reward, averaged over the K samples); needs rm_ensemble >= 2 (every "
                              "member is refit each round) or rm.train.heads >= 2.")
    pool: int = Field(3, ge=1, description="With select: uncertainty, the prompts scored per round, in multiples of "
                                           "`round.prompts` (the pool's unpicked prompts are never ranked, and no "
                                           "later round draws them).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the round trainer's config in rounds 2..n, applied after "
                                          "`rl_overrides` (e.g. train.steps).")


# Sections of 0.2 that have a new name: `ppo` held the RL stage's settings, but `rl` was already the
# list of RL methods, so the settings became `rl_stage` (like `sft` and `rm`, named after their stage).
RENAMED_SECTIONS: dict[str, str] = {"ppo": "rl_stage"}


def renamed_sections(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` with the old section names of ``RENAMED_SECTIONS`` moved to the new ones (an old
    section merged over a new one that is also there, as the defaults are), and the old names found."""
    old = [k for k in RENAMED_SECTIONS if k in data]
    if not old:
        return data, []
    data = dict(data)
    for k in old:
        new, value = RENAMED_SECTIONS[k], data.pop(k)
        both = isinstance(value, dict) and isinstance(data.get(new), dict)
        data[new] = deep_merge(data[new], value) if both else value
    return data, old


class PipelineConfig(Section):
    """`preflab pipeline`: base -> demonstrations -> SFT -> rankings -> RM -> RL methods -> eval -> report.

    The ``sft``, ``rm`` and ``rl_stage`` sections are overrides of those stages' own configs (same
    keys as `preflab sft`, `preflab rm`, `preflab rl`), ``ppo_ptx`` and ``rl_overrides`` of single
    RL methods; the pipeline fills in models, data and run directories. They are validated
    against the stage configs before anything starts. ``rl`` is the list of RL methods, which
    is why the RL stage's settings are ``rl_stage`` (``ppo`` before 0.3.0, still read, with a
    DeprecationWarning).
    """

    base_model: str = Field("bundled:smollm2-135m-instruct", description="The pretrained policy to post-train.")
    threads: int | None = Field(None, ge=1, description="torch threads for every stage (None: auto, one per core "
                                                        "that other processes leave free, checked at each step's "
                                                        "start, with a warning when the machine is busy).")
    seed: int = 0
    keep_checkpoints: bool = Field(False, description="Keep each training stage's checkpoints after it has finished "
                                                      "and exported its model (the demo's hold ~9 GiB of optimizer "
                                                      "state; only an unfinished stage needs them, to resume).")
    suite: SuiteSection = Field(default_factory=SuiteSection)
    demos: DemosSection = Field(default_factory=DemosSection)
    labeling: LabelingSection = Field(default_factory=LabelingSection)
    rl: list[RLMethod] = Field(
        ["rloo"], description="Online RL methods trained after the RM, each its own step and run directory "
        "(RUN/<method>). The demo trains RLOO (k = 4 samples per prompt, no critic), the method that beat SFT on "
        "the gold judge on every seed measured (docs/results.md); add ppo_ptx for InstructGPT's PPO-ptx.")
    preference: list[OfflineMethod] = Field(
        [], description="Offline preference trainers run after the RL methods, each its own step and run directory: "
                        "dpo, ipo (on the store's rankings), rs (rejection-sampling fine-tuning with the RM).")
    rl_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-method overrides of the RL stage config, applied after `rl_stage`, "
                                          "the method's preset and (for ppo_ptx) `ppo_ptx`.")
    # Stage overrides. The defaults size the main job for about 30 minutes on 2 CPU cores.
    sft: dict[str, Any] = Field(
        default_factory=lambda: {"optim": {"lr": 3e-5}, "data": {"max_length": 320},
                                 "train": {"epochs": 1.25, "batch_size": 8, "length_groups": 8}},
        description="Overrides of the SFT config.")
    rm: dict[str, Any] = Field(
        default_factory=lambda: {"train": {"batch_prompts": 2, "grad_accum": 4}, "optim": {"lr": 5e-5},
                                 "data": {"max_length": 320}},
        description="Overrides of the RM config (lr 5e-5, not InstructGPT's 9e-6: 30 steps, not thousands).")
    rl_stage: dict[str, Any] = Field(
        default_factory=lambda: {"train": {"steps": 15}, "rollout": {"batch_size": 16, "max_new_tokens": 128},
                                 "ppo": {"epochs": 1, "minibatch_size": 8}, "kl": {"coef": 0.02},
                                 "optim": {"lr": 2e-5, "warmup_steps": 4}, "rewards": {"preset": "protect"}},
        description="Overrides of the RL stage config (`preflab rl`) every method of `rl` starts from "
                    "(InstructGPT: beta 0.02, one PPO epoch; 128-token rollouts, so answers are not taught to "
                    "stop early, and the protect rewards beside the RM). Called `ppo` before 0.3.0.")
    ppo_ptx: dict[str, Any] = Field(
        default_factory=lambda: {"ptx": {"coef": 1.0, "batch_size": 2}},
        description="Overrides of the RL stage config for PPO-ptx (applied after `rl_stage`). gamma is 1 here, not "
                    "InstructGPT's 27.8: the mix is the demonstrations (the per-token NLL, ~1 nat) against "
                    "a per-token PPO loss of ~0.01-0.1, so 27.8 would drown the PPO signal.")
    eval: EvalSection = Field(
        default_factory=lambda: EvalSection(ifeval="builtin:ifeval", ifeval_limit=150, ifeval_max_new_tokens=384),
        description="Evaluation settings; the pipeline also scores every model on IFEval's first 150 prompts.")
    rm_ensemble: int = Field(1, ge=1, description="Reward models trained on the rankings (RUN/rm, RUN/rm-2, ...; "
                                                  "seeds seed, seed + 1, ...): with more than one, the online RL "
                                                  "methods optimise `rewards.ensemble` over them (conservative where "
                                                  "they disagree). Rounds 2..n refit one RM (each member with "
                                                  "`round.select: uncertainty`). `rm.train.heads` is the same kind "
                                                  "of ensemble as heads on one RM's trunk, for one RM's cost.")
    rounds: int = Field(1, ge=1, description="Rounds of the recipe: 1 is the graph above; each further round "
                                             "ranks fresh samples of the current policy, refits the RM and "
                                             "trains on (`round`).")
    round: RoundsSection = Field(default_factory=RoundsSection)

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data, old = renamed_sections(data)
        for k in old:
            warnings.warn(f"the pipeline section `{k}` is now `{RENAMED_SECTIONS[k]}`; the old name will be removed",
                          DeprecationWarning, stacklevel=2)
        return data



def round_method(cfg: PipelineConfig) -> str:
    """The trainer of rounds 2..n: ``round.method``, else the first of ``rl``, else of ``preference``.
    Here, beside the config, so that the rounds (``rounds.py``) and the report read one rule."""
    trained = (*cfg.rl, *cfg.preference)
    method = cfg.round.method or (trained[0] if trained else None)
    if method is None or method not in trained:
        raise ConfigError(f"round.method: {method!r} is not among the trained methods ({', '.join(trained) or 'none'})")
    return method


def round_dir(run: Path, r: int) -> Path:
    """Where round ``r`` of pipeline run ``run`` keeps its models (METHOD/model, rm/model, ...): the
    run directory itself for round 1, RUN/round-r after. The rounds and the release layer read it."""
    return run if r == 1 else run / f"round-{r}"


__all__ = ["round_dir", "SuiteSection", "DemosSection", "LabelingSection", "EvalSection", "RoundsSection", "PipelineConfig",
           "RENAMED_SECTIONS", "renamed_sections", "round_method"]
