"""The face of preflab: ``preflab <command>``.

Commands are loaded lazily (``LazyGroup``), so ``preflab --help`` and ``import preflab``
never import torch. Each command parses its options, loads a config and calls one
function of a stage; errors the user can fix (``PreflabError``) print as one line.
"""

from __future__ import annotations

import importlib
import sys

import click

from preflab import __version__
from preflab.errors import PreflabError

# name -> (module:attribute, one-line help). The module is imported only when the command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("preflab.stages.sft:cli", "Supervised fine-tuning on demonstrations (loss on response tokens)."),
    "rm": ("preflab.stages.reward:cli", "Train a reward model on K-way rankings."),
    "rm-eval": ("preflab.evals.rm_eval:cli", "Evaluate a reward model: accuracy, ECE, reliability."),
    "ppo": ("preflab.stages.ppo:cli", "PPO-ptx against a reward model with a KL penalty to the SFT model."),
    "data": ("preflab.data.cli:data", "Task suite, labeling, agreement, import/export, stats."),
    "judge": ("preflab.feedback.cli:judge", "Score responses to suite prompts with the gold judge."),
    "generate": ("preflab.rollout:generate_cli", "Sample responses from a model for a prompt file."),
    "eval": ("preflab.evals.cli:eval_cli", "Evaluate models on held-out prompts against the SFT model."),
    "report": ("preflab.evals.report:cli", "Write RUN_DIR/report.html."),
    "pipeline": ("preflab.pipeline:cli", "The main job: demonstrations -> SFT -> RM -> PPO -> eval -> report."),
    "model": ("preflab.models:cli", "Prepare and inspect models (e.g. convert the bundled SmolLM2)."),
    "annotate": ("preflab.annotate.cli:annotate", "Labeling web app: people rank K responses into the store."),
}


class LazyGroup(click.Group):
    """A click group whose commands live in other modules, imported only when run."""

    def __init__(self, *args, commands: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = COMMANDS if commands is None else commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return None
        target, _ = self.lazy[name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("preflab"):
                raise click.ClickException(f"command {name!r} is not available in this build ({e})") from None
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from the table, so listing commands imports nothing heavy.
        with formatter.section("Commands"):
            formatter.write_dl([(name, self.lazy[name][1]) for name in sorted(self.lazy)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="preflab")
def app() -> None:
    """preflab: SFT, a K-way reward model and PPO-ptx, with a data engine and evaluation you can trust."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one clear line and exit code 2."""
    try:
        rv = app.main(args=argv, prog_name="preflab", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except PreflabError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()


def stage_command(name: str, config_cls, run: str, help_text: str) -> click.Command:
    """A stage command: ``preflab NAME --config FILE [key.sub=value ...] [--resume]``.

    ``run`` is "module:function" taking (config, resume=bool); it is imported when called.
    """

    @click.command(name, help=help_text, context_settings={"ignore_unknown_options": False})
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="YAML config (defaults apply to what it leaves out).")
    @click.option("--resume", is_flag=True, help="Continue the run in run.out from its last checkpoint.")
    @click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
    @click.argument("overrides", nargs=-1)
    def command(config_path, resume, print_config, overrides):
        from preflab.config import dump_config, load_config

        cfg = load_config(config_cls, config_path, list(overrides))
        if print_config:
            import yaml

            click.echo(yaml.safe_dump(dump_config(cfg), sort_keys=False))
            return
        module_name, attr = run.split(":")
        stage = getattr(importlib.import_module(module_name), attr)
        from preflab import distributed

        try:
            stage(cfg, resume=resume)
            ranks = distributed.in_group()
        finally:
            distributed.shutdown()  # under torchrun: close the group rather than leave it to exit
        if ranks:
            distributed.exit_now(0)  # see exit_now: skips gloo's occasionally aborting teardown

    return command
