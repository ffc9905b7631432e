"""The face of preflab: ``preflab <command>``.

Commands are loaded lazily (``command_group.LazyGroup``), so ``preflab --help`` and ``import
preflab`` never import torch. Each command parses its options, loads a config and calls one
function of a stage; errors the user can fix (``PreflabError``) print as one line.
"""

from __future__ import annotations

import importlib

import click

from preflab import __version__
from preflab.command_group import CONTEXT_SETTINGS, LazyGroup, run

# name -> (module:attribute, one-line help). The module is imported only when the command runs.
# The training stages come from the stage registry (``preflab.registry.STAGES``).
COMMANDS: dict[str, tuple[str, str]] = {
    "rm-eval": ("preflab.evals.rm_eval:cli", "Evaluate a reward model: accuracy, ECE, reliability."),
    "data": ("preflab.data.cli:data", "Task suite, labeling, agreement, import/export, stats."),
    "judge": ("preflab.feedback.cli:judge", "Score responses to suite prompts with the gold judge."),
    "generate": ("preflab.rollout:generate_cli", "Sample responses from a model for a prompt file."),
    "eval": ("preflab.evals.cli:eval_cli", "Evaluate models on held-out prompts against the SFT model."),
    "report": ("preflab.evals.report:cli", "Write RUN_DIR/report.html."),
    "pipeline": ("preflab.pipeline:cli", "The main job: demonstrations -> SFT -> RM -> online RL -> eval -> report."),
    "compare": ("preflab.compare:cli", "Re-run a run's RL stage with several methods and seeds; one table."),
    "audit": ("preflab.evals.audit:cli", "Reward-hacking audit: exploit probes, RM-gold correlation by KL."),
    "model": ("preflab.models:cli", "Prepare and inspect models (e.g. convert the bundled SmolLM2)."),
    "annotate": ("preflab.annotate.cli:annotate", "Labeling web app: people rank K responses into the store."),
    "serve": ("preflab.release.serve:cli", "Serve one model behind an OpenAI-compatible API (chat, streaming)."),
    "gate": ("preflab.release.gate:cli", "Release gate: candidate vs incumbent on a frozen prompt replay; exit 0/1."),
    "route": ("preflab.release.route_cli:cli", "Canary router over OpenAI-compatible back ends: feedback, rollback."),
    "repro": ("preflab.release.repro:cli", "Reproducibility package of a run: pack, and verify by re-evaluating."),
}


class PreflabGroup(LazyGroup):
    """``preflab``: the lazy command table plus one command per registry stage (``stage_command``).

    A renamed stage's old name (``registry.RENAMED``: ``preflab ppo``) still runs the new one, with
    one line on stderr and a DeprecationWarning; it is not listed."""

    def __init__(self, *args, **kwargs):
        from preflab.registry import STAGES

        super().__init__(*args, commands=COMMANDS, **kwargs)
        self.stages = STAGES

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self.lazy, *self.stages])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from preflab.registry import RENAMED, stage_name

        if name in RENAMED:
            click.secho(f"note: `preflab {name}` is now `preflab {RENAMED[name]}`; the old name will be removed",
                        fg="yellow", err=True)
            name = stage_name(name)
        if name in self.stages:
            return stage_command(self.stages[name])
        return super().get_command(ctx, name)

    def command_helps(self) -> dict[str, str]:
        return {**super().command_helps(), **{n: s.help for n, s in self.stages.items()}}


@click.group(cls=PreflabGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="preflab")
def app() -> None:
    """preflab: SFT, a K-way reward model and online RL (PPO-ptx, RLOO, ...), with a data engine and evaluation
    you can trust."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one clear line and exit code 2."""
    run(app, argv)


def stage_command(stage) -> click.Command:
    """A stage command: ``preflab NAME --config FILE [key.sub=value ...] [--resume [--force]]``.

    ``stage`` is a ``preflab.registry.Stage`` (name, config class, "module:function" taking
    (config, resume=bool), help, example). The function is imported when called. It runs inside
    ``preflab.run.session``: a failure or Ctrl-C is recorded in the run's manifest
    (``failed``/``interrupted`` and why), and Ctrl-C prints the command that resumes.
    """
    name, config_cls, run, help_text, example = stage.name, stage.config, stage.run, stage.help, stage.example
    epilog = (
        "\b\nExamples:\n"
        + (f"  {example}\n" if example else "")
        + f"  preflab {name} --print-config > {name}.yaml     # every key with its default\n"
        f"  preflab {name} --config {name}.yaml optim.lr=1e-5 run.out=runs/{name}\n"
        f"  preflab {name} --config {name}.yaml --resume    # continue run.out from its last checkpoint"
    )

    @click.command(name, help=help_text, epilog=epilog, context_settings={"ignore_unknown_options": False})
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="YAML config (defaults apply to what it leaves out).")
    @click.option("--resume", is_flag=True, help="Continue the run in run.out from its last checkpoint.")
    @click.option("--force", is_flag=True, help="With --resume: accept a config that differs from the run's "
                                                "(recorded in its manifest as a change at the resumed step).")
    @click.option("--print-config", is_flag=True, help="Print the resolved config and exit (without --config: "
                                                       "the defaults; required keys show as <required>).")
    @click.argument("overrides", nargs=-1)
    def command(config_path, resume, force, print_config, overrides):
        import os
        import shlex
        from pathlib import Path

        from preflab.config import load_config
        from preflab.errors import ConfigError, TrainingError

        if print_config:
            import yaml

            click.echo(yaml.safe_dump(_printable_config(config_cls, config_path, list(overrides)), sort_keys=False))
            return
        if force and not resume:
            raise ConfigError("--force only applies with --resume")
        cfg = load_config(config_cls, config_path, list(overrides))
        module_name, attr = run.split(":")
        stage = getattr(importlib.import_module(module_name), attr)
        from preflab import distributed
        from preflab.run import latest_checkpoint_in, session

        out = Path(cfg.run.out)
        again = shlex.join(["preflab", name, *(["--config", config_path] if config_path else []), *overrides,
                            "--resume"])
        try:
            with session(force=force):
                stage(cfg, resume=resume)
            ranks = distributed.in_group()
        except KeyboardInterrupt:
            if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 says it once
                ckpt = latest_checkpoint_in(out)
                click.secho(f"\ninterrupted: {out}/manifest.json says so. "
                            + (f"Its last checkpoint is {ckpt}; continue from it with:" if ckpt
                               else "It has no checkpoint yet (run.save_every sets how often); start it again with:")
                            + f"\n  {again}", fg="yellow", err=True)
            raise
        except TrainingError as e:
            if "last good checkpoint" in str(e):
                raise
            ckpt = latest_checkpoint_in(out)
            raise TrainingError(f"{e}; last good checkpoint: {ckpt or 'none'}"
                                + (f" (continue with: {again})" if ckpt else "")) from None
        finally:
            distributed.shutdown()  # under torchrun: close the group rather than leave it to exit
        if ranks:
            distributed.exit_now(0)  # see exit_now: skips gloo's occasionally aborting teardown

    def _printable_config(config_cls, config_path: str | None, overrides: list[str]) -> dict:
        """The resolved config as a dict for ``--print-config``: with required keys the user has not
        set yet (e.g. ``data.train`` of ``preflab rm``) shown as ``<required>``, so the defaults print
        without a config file. Any other error is raised as usual."""
        from pydantic import ValidationError

        from preflab.config import apply_overrides as apply
        from preflab.config import dump_config, format_validation_error, load_yaml
        from preflab.errors import ConfigError

        data = apply(load_yaml(config_path) if config_path else {}, overrides)
        for _ in range(8):  # each pass fills one more level of missing sections
            try:
                return dump_config(config_cls.model_validate(data))
            except ValidationError as err:
                errors = err.errors()
                if any(e["type"] != "missing" for e in errors):
                    raise ConfigError(format_validation_error(err, config_path or "config")) from None
                for e in errors:
                    node, loc = data, [str(p) for p in e["loc"]]
                    for part in loc[:-1]:
                        node = node.setdefault(part, {})
                    field = _field_at(config_cls, loc)
                    node[loc[-1]] = {} if field is not None and isinstance(field, type) and hasattr(
                        field, "model_fields") else "<required>"
        raise ConfigError(f"{config_path or 'config'}: cannot resolve the defaults")


    def _field_at(cls, loc: list[str]):
        for part in loc:
            info = getattr(cls, "model_fields", {}).get(part)
            if info is None:
                return None
            cls = info.annotation
        return cls

    return command


if __name__ == "__main__":
    main()
