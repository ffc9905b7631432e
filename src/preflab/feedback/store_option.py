"""The ``--store`` value of the commands that open the preference store: a SQLite file or a URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from preflab.feedback.store import is_url

HELP = "a SQLite file, or postgresql://USER@HOST:PORT/DB for a database several machines share"


class StoreParam(click.ParamType):
    """A ``postgresql://`` (or ``postgres://``) URL as given; else the SQLite file's Path (which must
    exist when ``exists``)."""

    name = "store"

    def __init__(self, exists: bool = False):
        self.exists = exists

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | Path:
        if is_url(value):
            return value
        return click.Path(exists=self.exists, dir_okay=False, path_type=Path).convert(value, param, ctx)
