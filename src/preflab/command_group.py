"""What every preflab command group shares: lazily imported commands and the one-line errors.

``preflab`` (``cli.py``), ``preflab data`` (``data/cli.py``) and ``python -m preflab.annotate``
(``annotate/__main__.py``) build on this module rather than on ``cli.py``, so no package below
the CLI imports it. A ``LazyGroup`` lists its commands from a table of ``"module:attribute"``
strings and imports a command's module only when that command runs, which keeps ``--help``
free of torch; ``run`` is the entry point that turns user errors into one line and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from preflab.errors import PreflabError

# `-h` as well as `--help`, for every group and the commands under it.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class LazyGroup(click.Group):
    """A click group whose commands live in other modules, imported only when run.

    ``commands``: name -> ("module:attribute", one-line help); the help is listed without
    importing anything."""

    def __init__(self, *args, commands: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = commands

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

    def command_helps(self) -> dict[str, str]:
        """name -> one-line help of every listed command."""
        return {n: h for n, (_, h) in self.lazy.items()}

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from the table, so listing commands imports nothing heavy.
        with formatter.section("Commands"):
            formatter.write_dl(sorted(self.command_helps().items()))


def run(group: click.Command, argv: list[str] | None = None, prog_name: str = "preflab") -> None:
    """Run ``group`` as a program: user errors (``PreflabError``) print as one line and exit 2,
    click's usage errors as click prints them, Ctrl-C at a prompt as "Aborted." and exit 130."""
    try:
        rv = group.main(args=argv, prog_name=prog_name, standalone_mode=False, **CONTEXT_SETTINGS)
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
