"""Every command's --help shows an example, and --print-config shows the defaults without --config."""

import click
import pytest
import yaml
from click.testing import CliRunner

from preflab.cli import app

# Commands whose help lives in files another change owns (issue 15 leaves them to it).
ELSEWHERE = {"pipeline", "annotate"}


def _commands(group: click.Group, ctx: click.Context, prefix=()):
    for name in group.list_commands(ctx):
        if name in ELSEWHERE and not prefix:
            continue
        cmd = group.get_command(ctx, name)
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, click.Context(cmd, parent=ctx), (*prefix, name))


def test_every_command_help_has_an_example():
    ctx = click.Context(app)
    names = []
    for path, _ in _commands(app, ctx):
        r = CliRunner().invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        assert "Example" in r.output, f"preflab {' '.join(path)} --help has no example"
        assert f"preflab {' '.join(path)}" in r.output.split("Example", 1)[1], path
        names.append(" ".join(path))
    assert {"sft", "rm", "rl", "eval", "generate", "report", "rm-eval", "data import", "model prepare"} <= set(names)


@pytest.mark.parametrize("stage, required", [("sft", []), ("rm", ["data.train"]),
                                             ("rl", ["models.reward_model", "data.prompts"])])
def test_print_config_without_a_config_shows_the_defaults(stage, required):
    r = CliRunner().invoke(app, [stage, "--print-config"])
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(r.output)
    for key in required:
        section, name = key.split(".")[0], key.split(".", 1)[1]
        node = cfg[section]
        for part in name.split("."):
            node = node[part]
        assert node == "<required>", key
    assert cfg["run"]["trackers"] == [] and cfg["run"]["progress"] is True
    r = CliRunner().invoke(app, [stage, "--print-config", "run.seed=7"])
    assert yaml.safe_load(r.output)["run"]["seed"] == 7
    r = CliRunner().invoke(app, [stage, "--print-config", "run.seedd=7"])
    assert r.exit_code != 0 and "run.seedd: unknown key" in str(r.exception) + r.output
