"""The main job: the InstructGPT recipe end to end, each step resumable.

    suite -> demos -> sft -> label -> agreement -> rm -> RL methods (`rl`) -> eval -> report

The training steps are stages of the registry (``registry.STAGES``: sft, rm, and the online RL
stage ``rl`` once per method of the config's ``rl`` list, e.g. ppo and ppo_ptx, or rloo, each from
the ``rl_stage`` section and the method's preset); the others are the data engine's
steps and the evaluation. The configs of every training step are built and validated before
anything runs.

``RUN/pipeline.json`` records each finished step and its wall time; rerunning the command after
a kill skips finished steps and resumes the interrupted one (training stages continue from
their last checkpoint, evaluation reuses cached generations, labeling restarts from an empty
store because it writes to a temporary store that is renamed only when complete).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from preflab.config import (
    OFFLINE_METHODS,
    RL_METHODS,
    PipelineConfig,
    RecipeInputs,
    deep_merge,
    dump_config,
    renamed_sections,
    validate,
)
from preflab.data.jsonl import atomic_write_text, write_jsonl
from preflab.errors import ConfigError
from preflab.registry import STAGES, run_stage, stage_of
from preflab.rounds import Rounds, round_steps

DATA_STEPS = ("suite", "demos")
LABEL_STEPS = ("label", "agreement")


def changed(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``new`` that ``old`` lacks or holds otherwise, nested dicts key by key."""
    out: dict[str, Any] = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            if sub := changed(value, old[key]):
                out[key] = sub
        elif key not in old or old[key] != value:
            out[key] = value
    return out


def steps_of(cfg: PipelineConfig) -> tuple[str, ...]:
    """The step names of a pipeline, in order (training steps are named after their run directory;
    rounds 2..n come after the first evaluation, whose SFT samples they reuse)."""
    members = tuple(f"rm-{i}" for i in range(2, cfg.rm_ensemble + 1))
    return (*DATA_STEPS, "sft", *LABEL_STEPS, "rm", *members, *cfg.rl, *cfg.preference, "eval", *round_steps(cfg),
            "report")


STEPS = steps_of(PipelineConfig())  # the default graph

# `--preset tiny`: the same graph on random tiny models, in a couple of minutes (tests, CI), with
# PPO-ptx beside RLOO so that both kinds of RL step (critic and pretraining mix; group baseline) run.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "base_model": "tiny:",
        "rl": ["ppo_ptx", "rloo"],
        "threads": 1,  # tiny matrices: one thread beats two (no OpenMP hand-offs)
        "suite": {"n": 400},
        "demos": {"mode": "reference", "limit": 32},
        "labeling": {"k": 4, "limit": 24, "max_new_tokens": 8, "overlap": 0.25, "bf16": False},
        "sft": {"train": {"max_steps": 6, "batch_size": 8, "bf16": False}, "optim": {"lr": 1e-3},
                "data": {"max_length": 192}},
        "rm": {"train": {"batch_prompts": 4, "bf16": False}, "optim": {"lr": 1e-3}, "data": {"max_length": 192}},
        "rl_stage": {"train": {"steps": 2, "bf16": False},
                     "rollout": {"batch_size": 8, "max_new_tokens": 8, "bf16": False},
                     "ppo": {"minibatch_size": 4}, "optim": {"lr": 1e-4, "warmup_steps": 0}},
        "ppo_ptx": {"ptx": {"coef": 1.0, "batch_size": 2}},
        "eval": {"limit": 16, "max_new_tokens": 8, "bf16": False, "ifeval": None},
    },
    # `--preset long`: the same recipe at a scale where RL has a chance, sized for about 2 hours on
    # 2 CPU cores from the demo's measured stage rates (docs/long-preset.md has the arithmetic): a
    # 4,000-prompt suite (splits 1,000 / 1,200 / 1,000 / 800), 800 demonstrations, 1,000 RM prompts
    # x K = 4 (6,000+ comparisons), an RM of up to 2 epochs that exports the weights with the lowest
    # held-out loss, checked every 64 steps (the demo's RM peaked at 3 epochs on 390 rankings and
    # overfit at 4; with 2.5x the data 2 epochs see more examples than those 3), RLOO with 8 prompts
    # x 4 samples per update for 100 updates (3,200 episodes) at KL coefficient 0.2 (measured on this
    # preset's run, 960 episodes: 0.02 drifts 8-12 nats from SFT and loses its gain, 0.2 stays at
    # 3.6; docs/long-preset.md), 500 eval prompts. Its budgets stay at 64 tokens and its rewards the
    # RM's alone, as measured there (the demo moved to 128 tokens and the protect rewards after).
    "long": {
        "suite": {"n": 4000},
        "demos": {"limit": 800},
        "labeling": {"limit": 1000, "max_new_tokens": 64},
        # Checkpoints every ~10 minutes of each training step, so a killed run loses little.
        "sft": {"train": {"epochs": 2.0}, "run": {"save_every": 40}},
        "rm": {"train": {"epochs": 2.0, "eval_every": 64, "select_best": True}, "run": {"save_every": 32}},
        "rl": ["rloo"],
        "rl_stage": {"train": {"steps": 100, "save_every": 10}, "rollout": {"max_new_tokens": 64},
                     "rewards": {"preset": "none"}},
        "rl_overrides": {"rloo": {"rollout": {"batch_size": 8, "samples_per_prompt": 4}, "kl": {"coef": 0.2}}},
        "eval": {"limit": 500, "max_new_tokens": 64},
    },
}


class Pipeline:
    """Builds each stage's config from the pipeline config and runs the steps in order."""

    def __init__(self, cfg: PipelineConfig, out: str | Path):
        self.cfg = cfg
        self.out = Path(out)
        self.data = self.out / "data"
        self.prompts = self.data / "prompts.jsonl"
        self.demos_path = self.data / "demos.jsonl"
        self.store = self.out / "store.sqlite"
        self.state_path = self.out / "pipeline.json"
        self.steps = steps_of(cfg)
        trained = (*cfg.rl, *cfg.preference)
        unknown = sorted(set(cfg.rl_overrides) - set(trained))
        if unknown:
            raise ConfigError(f"rl_overrides: {', '.join(unknown)} not among the trained methods ({', '.join(trained)})")
        self.eval_models = cfg.eval.models if cfg.eval.models is not None else ["sft", *trained]
        bad = [m for m in self.eval_models if m not in ("base", "sft", *trained)]
        if bad or "sft" not in self.eval_models:
            raise ConfigError(f"eval.models: {', '.join(bad) or 'sft is missing'} (choose from base, sft and the "
                              f"methods of rl: {', '.join(cfg.rl)}; sft is the reference)")
        # Validate every stage config before anything starts (a bad key fails now, not in hour two).
        self.members = [f"rm-{i}" for i in range(2, cfg.rm_ensemble + 1)]  # RM ensemble members beside rm
        self.stage_names = {name: self.stage_of(name) for name in ("sft", "rm", *trained)}
        self.stage_configs = {name: self._stage_config(name) for name in ("sft", "rm", *trained)}
        for i, member in enumerate(self.members, start=1):
            data = deep_merge(self.stage_dict("rm"), {"run": {"out": str(self.out / member), "seed": cfg.seed + i}})
            self.stage_names[member] = "rm"
            self.stage_configs[member] = validate(STAGES["rm"].config, data, f"pipeline.{member}")
        if cfg.eval.ifeval:  # a missing file or extra fails now, not at the evaluation step
            from preflab.evals.ifeval import read_ifeval

            read_ifeval(cfg.eval.ifeval, limit=cfg.eval.ifeval_limit)
        self.rounds = Rounds(self)
        if cfg.rounds > 1:
            for step, (stage, data) in self.rounds.stage_dicts().items():
                self.stage_names[step] = stage
                self.stage_configs[step] = validate(STAGES[stage].config, data, f"pipeline.{step}")

    stage_of = staticmethod(stage_of)  # the registry's method -> stage table

    # -- stage configs -----------------------------------------------------------------------

    def _model(self) -> dict[str, Any]:
        return {"threads": self.cfg.threads}

    def _stage_config(self, name: str):
        if name in ("sft", "rm"):
            return validate(STAGES[name].config, self.stage_dict(name), f"pipeline.{name}")
        return validate(STAGES[self.stage_of(name)].config, self.method_dict(name), f"pipeline.{name}")

    def stage_dict(self, name: str) -> dict[str, Any]:
        """The SFT or RM stage config of this run as a dict (the pipeline's section merged in)."""
        c, run = self.cfg, {"seed": self.cfg.seed, "progress": True}
        if name == "sft":
            base = {"model": {"path": c.base_model, **self._model()},
                    "data": {"train": str(self.demos_path), "val_fraction": 0.1},
                    # No RM exists yet when SFT runs: the exported checkpoint is chosen by validation loss.
                    "train": {"epochs": 2, "batch_size": 8, "eval_every": 15, "select_best": True},
                    "run": {"out": str(self.out / "sft"), **run}}
            return deep_merge(base, c.sft)
        base = {"model": {"path": str(self.out / "sft/model"), **self._model()},
                "data": {"train": f"store:{self.store}", "split": "rm", "val_split": None, "val_fraction": 0.2,
                         "demos": str(self.demos_path)},
                "run": {"out": str(self.out / "rm"), **run}}
        return deep_merge(base, c.rm)

    def method_dict(self, method: str, *, policy: str | None = None, reward_model: str | None = None,
                    store: Path | None = None, reference: str | None = None, out: Path | None = None,
                    seed: int | None = None) -> dict[str, Any]:
        """The config dict of trained method ``method`` on this run: its stage's recipe
        (``registry.Stage.recipe``) on the run's pieces, then the pipeline's `rl_stage` section
        (RL methods), the method's preset (``config.RL_METHODS``, ``config.OFFLINE_METHODS``),
        `ppo_ptx` for ppo_ptx, and `rl_overrides[method]`. The keywords move it (a later round:
        another starting policy, RM, store, KL reference, run directory and seed); they have the
        last word, over any section, and a moved RM stands alone (without round 1's ensemble).
        `preflab compare` starts from the same dict."""
        c, stage = self.cfg, self.stage_of(method)
        recipe = STAGES[stage].recipe
        run = RecipeInputs(
            policy=str(self.out / "sft/model"), reference=None, reward_model=str(self.out / "rm/model"),
            reward_ensemble=[str(self.out / m / "model") for m in self.members], store=str(self.store),
            prompts=str(self.prompts), demos=str(self.demos_path), model=self._model(), out=str(self.out / method),
            seed=c.seed, sample_tokens=c.labeling.max_new_tokens, max_length=self._stage_config("rm").data.max_length)
        sections = ([c.rl_stage, RL_METHODS[method], c.ppo_ptx if method == "ppo_ptx" else {}] if stage == "rl"
                    else [OFFLINE_METHODS[method][1]])
        data = recipe(run)
        for section in (*sections, c.rl_overrides.get(method, {})):
            data = deep_merge(data, section)
        moves = {k: str(v) for k, v in (("policy", policy), ("reward_model", reward_model), ("store", store),
                                         ("reference", reference), ("out", out)) if v is not None}
        if seed is not None:
            moves["seed"] = seed
        if not moves:
            return data
        moved = run._replace(**moves, **({"reward_ensemble": []} if reward_model is not None else {}))
        data = deep_merge(data, changed(recipe(moved), recipe(run)))  # where the recipe puts each move
        if reward_model is not None and "models" in data:
            data["models"].pop("reward_ensemble", None)
        return data

    # -- state -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"steps": []}

    def _record(self, step: str, seconds: float) -> None:
        st = self.state()
        st["steps"] = [s for s in st["steps"] if s["step"] != step] + [{"step": step, "seconds": round(seconds, 1)}]
        atomic_write_text(self.state_path, json.dumps(st, indent=2))

    def done(self) -> set[str]:
        return {s["step"] for s in self.state()["steps"]}

    # -- steps -------------------------------------------------------------------------------

    def step_suite(self) -> None:
        from preflab.data.suite import load_prompts, write_suite

        if self.cfg.suite.prompts:
            write_jsonl(self.prompts, [p.to_dict() for p in load_prompts(self.cfg.suite.prompts)])
        else:
            write_suite(self.prompts, seed=self.cfg.suite.seed, n=self.cfg.suite.n, long_form=self.cfg.suite.long_form)

    def _split(self, split: str, limit: int | None = None):
        from preflab.data.suite import load_prompts

        rows = [p for p in load_prompts(self.prompts) if p.split == split]
        return rows[:limit] if limit else rows

    def step_demos(self) -> None:
        from preflab import models
        from preflab.feedback.demos import write_demonstrations

        d = self.cfg.demos
        model = tok = None
        if d.mode != "reference":
            model, tok = models.load_policy(self.cfg.base_model), models.load_tokenizer(self.cfg.base_model)
        rows = write_demonstrations(self._split("sft", d.limit), model, tok, n=d.n, mode=d.mode, progress=True)
        if d.extra:
            from preflab.data.chat import read_demos

            rows += [{"messages": m, "source": "user"} for m in read_demos(d.extra)]
        write_jsonl(self.demos_path, rows)

    def train(self, step: str) -> None:
        """A training step: its stage from the registry, resumed when its run directory exists."""
        cfg = self.stage_configs[step]
        run_stage(self.stage_names[step], cfg, resume=(Path(cfg.run.out) / "manifest.json").exists())

    def step_label(self) -> None:
        from preflab.feedback.label_cli import collect_rankings

        lab = self.cfg.labeling
        tmp = self.store.with_suffix(".sqlite.partial")
        for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            p.unlink(missing_ok=True)
        collect_rankings(model_spec=str(self.out / "sft/model"), prompts=self._split("rm", lab.limit),
                         store_path=tmp, split="rm", k=lab.k, max_new_tokens=lab.max_new_tokens,
                         temperature=lab.temperature, overlap=lab.overlap, batch_size=lab.batch_size, bf16=lab.bf16,
                         seed=self.cfg.seed, samples_cache=self.data / "label_samples.jsonl")  # a kill keeps them
        tmp.rename(self.store)

    def step_agreement(self) -> None:
        from preflab.feedback.label_cli import store_agreement

        summary = store_agreement(self.store, split="rm")
        atomic_write_text(self.out / "agreement.json", json.dumps(summary, indent=2, default=str))

    def step_eval(self) -> None:
        self.evaluate(self.eval_models, self.out / "eval")

    def evaluate(self, names: list[str], out_dir: Path) -> dict[str, Any]:
        """Evaluate the run's models ``names`` (base, sft and trained methods) against its SFT
        model on its held-out prompts, with its eval settings, into ``out_dir``."""
        paths = {"base": self.cfg.base_model,
                 **{m: str(self.out / m / "model") for m in ("sft", *self.cfg.rl, *self.cfg.preference)}}
        return self.evaluate_paths({m: paths[m] for m in names}, out_dir)

    def evaluate_paths(self, models: dict[str, str], out_dir: Path, reward_model: str | None = None,
                       ifeval_reuse: Path | None = None) -> dict[str, Any]:
        """``evals.evaluate`` of name -> model spec (``sft`` among them, the reference) with the run's
        eval prompts and settings; RM scores from ``reward_model`` (default: the run's RM); IFEval
        scores of the same model and settings in ``ifeval_reuse`` (an evaluation directory) reused."""
        from preflab.evals.evaluate import evaluate

        e = self.cfg.eval
        results = evaluate(models, self._split("eval", e.limit), reference="sft",
                           reward_model=reward_model or str(self.out / "rm/model"), out_dir=out_dir,
                           max_new_tokens=e.max_new_tokens, temperature=e.temperature, batch_size=e.batch_size,
                           bf16=e.bf16, seed=self.cfg.seed)
        if e.ifeval:  # beyond the suite: the same models on an IFEval-format file, greedy
            from preflab.evals.ifeval import evaluate_ifeval, read_ifeval

            evaluate_ifeval(models, read_ifeval(e.ifeval, limit=e.ifeval_limit), out_dir,
                            max_new_tokens=e.ifeval_max_new_tokens, temperature=0.0, batch_size=e.batch_size,
                            seed=self.cfg.seed, bf16=e.bf16, reuse=ifeval_reuse, reference="sft")
        return results

    def step_report(self) -> None:
        from preflab.evals.report import write_report

        write_report(self.out)

    def _prune_checkpoints(self, step: str) -> None:
        """A finished training step is never resumed: drop its checkpoints (and SFT's best-weights
        copy); its exported ``model/`` stays. A kill before this leaves them, which is harmless."""
        if self.cfg.keep_checkpoints or step not in self.stage_configs:
            return
        for name in ("checkpoints", "best"):  # a round's step is named after its directory too
            shutil.rmtree(self.out / step / name, ignore_errors=True)

    # -- driver ------------------------------------------------------------------------------

    def run(self, only: Callable[[str], bool] = lambda s: True, force: bool = False) -> None:
        """Run the steps not yet finished, holding the run directory's lock (a second pipeline on
        the same --out is refused, naming the first one's pid). A rerun with a config that differs
        from the run's ``pipeline_config.json`` (beyond logging and threads) is refused, naming the
        keys, unless ``force``; the change is then recorded in ``pipeline.json``."""
        from preflab.run import run_dir_lock

        with run_dir_lock(self.out):
            self._run(only, force)

    def _run(self, only: Callable[[str], bool], force: bool) -> None:
        from preflab import models
        from preflab.run import check_config_change

        cfg_path = self.out / "pipeline_config.json"
        new = dump_config(self.cfg)
        if cfg_path.is_file() and self.done():
            saved, _ = renamed_sections(json.loads(cfg_path.read_text()))  # a run begun before 0.3.0 said `ppo`
            changes, _ = check_config_change(saved, new, force=force, where=cfg_path, schema=type(self.cfg))
            if changes:
                st = self.state()
                st.setdefault("config_changes", []).append(
                    {"after": [s["step"] for s in st["steps"]], "changes": changes})
                atomic_write_text(self.state_path, json.dumps(st, indent=2, default=str))
        atomic_write_text(cfg_path, json.dumps(new, indent=2))
        models.set_threads(self.cfg.threads)
        finished = self.done()
        for step in self.steps:
            if step in finished or not only(step):
                if step in finished:
                    click.secho(f"[pipeline] {step}: done already", fg="bright_black", err=True)
                continue
            click.secho(f"[pipeline] {step} ...", fg="cyan", bold=True, err=True)
            models.set_threads(self.cfg.threads)  # auto (None): the cores free now, step by step
            t0 = time.perf_counter()
            if step.startswith(("round-", "final/")):
                self.rounds.run_step(step)
            elif step in self.stage_configs:
                self.train(step)
            else:
                getattr(self, f"step_{step}")()
            models.release_memory()  # the next step starts without this one's peak
            took = time.perf_counter() - t0
            self._record(step, took)
            self._prune_checkpoints(step)
            click.secho(f"[pipeline] {step}: {took:.0f}s", fg="green", err=True)
        total = sum(s["seconds"] for s in self.state()["steps"])
        click.secho(f"[pipeline] finished in {total / 60:.1f} min of stage time; report: {self.out / 'report.html'}",
                    fg="green", bold=True, err=True)


@click.command("pipeline")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Pipeline YAML.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="tiny: the same graph on random tiny models, in a few minutes; long: the recipe at the "
                   "scale where RL can work (sized for 2 hours on 2 CPU cores; measured: about 2.3, docs/long-preset.md).")
@click.option("--out", default="runs/demo", show_default=True, help="Run directory (rerun to resume).")
@click.option("--restart", is_flag=True, help="Delete the run directory first.")
@click.option("--force", is_flag=True, help="Rerun a run with a changed config (recorded in pipeline.json).")
@click.option("--print-config", is_flag=True, help="Print the resolved pipeline config and exit.")
@click.argument("overrides", nargs=-1)
def cli(config_path, preset, out, restart, force, print_config, overrides):
    """The main job: demonstrations -> SFT -> rankings -> RM -> online RL (rl: ppo_ptx, rloo by default)
    -> evaluation -> report. Rerun the same command to resume a stopped run.

    \b
    Examples:
      preflab pipeline --out runs/demo                     # the demo (configs/pipeline.yaml's settings)
      preflab pipeline --preset tiny --out runs/tiny       # tiny random models, about a minute
      preflab pipeline --out runs/rloo 'rl=[rloo]'         # RLOO instead of PPO and PPO-ptx
      preflab pipeline --print-config > pipeline.yaml      # every key with its default
    """
    from preflab.config import RENAMED_SECTIONS, apply_overrides, load_yaml
    from preflab.run import clear_run_dir, session

    # Defaults, then the preset, the YAML file and the overrides, merged key by key (a YAML that
    # sets sft.optim.lr keeps the default sft.train section).
    data = deep_merge(PipelineConfig().model_dump(mode="json"), PRESETS[preset] if preset else {})
    if config_path:
        data = deep_merge(data, load_yaml(config_path))
    apply_overrides(data, list(overrides))
    for old, new in RENAMED_SECTIONS.items():
        if old in data:
            click.secho(f"note: the pipeline section `{old}` is now `{new}`; the old name will be removed",
                        fg="yellow", err=True)
    cfg = validate(PipelineConfig, data, config_path or "pipeline")
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(dump_config(cfg), sort_keys=False))
        return
    if restart:
        clear_run_dir(out)  # under the directory's lock: a pipeline running there is refused
    try:
        with session(force=force):
            Pipeline(cfg, out).run(force=force)
    except KeyboardInterrupt:
        click.secho(f"\ninterrupted: rerun the same command to resume {out} where it stopped.", fg="yellow", err=True)
        raise

