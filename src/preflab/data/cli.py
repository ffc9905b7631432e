"""`preflab data ...`: the data engine's commands, each defined in the module that owns it."""

from __future__ import annotations

import click

from preflab.command_group import LazyGroup

DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "suite": ("preflab.data.suite.cli:suite", "Write the built-in task suite (prompts.jsonl) to a directory."),
    "label": ("preflab.feedback.label_cli:label", "Rank K samples per prompt with the simulated panel into the store."),
    "agreement": ("preflab.feedback.label_cli:agreement", "Measure labeler-labeler agreement of the panel."),
    "demos": ("preflab.feedback.label_cli:demos", "Write demonstrations: best of N samples under the gold judge."),
    "import": ("preflab.feedback.io_cli:import_cmd", "Import HH-RLHF, UltraFeedback, TRL or Label Studio data into the store."),
    "export": ("preflab.feedback.io_cli:export_cmd", "Export rankings, pairs or grouped K-way JSONL from the store."),
    "stats": ("preflab.feedback.io_cli:stats", "Counts, duplicates and PII found in a store or file."),
}


@click.group(cls=LazyGroup, commands=DATA_COMMANDS)
def data() -> None:
    """Task suite, labeling, agreement, import/export and stats.

    \b
    Example:
      preflab data import --format trl --store prefs.sqlite pairs.jsonl
    """
