"""`preflab data import | export | stats`: preference data in and out of the store."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import click

from preflab.data import hygiene
from preflab.data.io import (
    FORMATS,
    export_hf,
    load_into_store,
    read_preferences,
    write_pairs,
    write_rankings,
)
from preflab.errors import DataError, PreflabError
from preflab.feedback.store_option import HELP, StoreParam

EXPORT_FORMATS = ("rankings", "pairs", "kway", "hf")


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)


def _table(title: str, rows: list[tuple[Any, ...]], columns: tuple[str, ...] = ("", "count")):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if i else "left")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    return t


@click.command("import")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="Format of FILE.")
@click.option("--store", "store_path", type=StoreParam(), required=True,
              help=f"Preference store ({HELP}; a file is created if missing).")
@click.option("--split", default="train", show_default=True, help="Split given to new prompts.")
@click.option("--labeler", default=None, help="Labeler name to record (default: the source's name).")
@click.option("--score", default=None,
              help="UltraFeedback score: overall_score (default), fine-grained_score, or an aspect (helpfulness, ...).")
@click.option("--no-scrub", is_flag=True, help="Keep PII (by default e-mails, phones, cards, IPs, URL secrets are replaced).")
@click.option("--near-dup-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
              help="Report prompt pairs with character 5-gram Jaccard at or above this.")
@click.argument("file", type=click.Path())
def import_cmd(fmt: str, store_path: Path | str, split: str, labeler: str | None, score: str | None, no_scrub: bool,
               near_dup_threshold: float, file: str) -> None:
    """Import HH-RLHF, UltraFeedback, TRL or Label Studio preferences from FILE into the store.

    FILE is JSONL, or (for the JSONL formats) a parquet file or a saved Hugging Face dataset
    directory with the same columns (pip install 'preflab[hf]').

    PII is scrubbed, rankings already in the store are dropped as exact duplicates, and
    near-duplicate prompts are reported. The whole file is checked before anything is written.

    \b
    Example:
      preflab data import --format hh-rlhf --store prefs.sqlite hh_rlhf_sample.jsonl
    """
    from preflab.feedback.store import PreferenceStore

    got = read_preferences(file, fmt, labeler=labeler, score=score)
    with PreferenceStore(store_path) as store:
        rep = load_into_store(store, got.rankings, split=split, scrub=not no_scrub,
                              near_dup_threshold=near_dup_threshold)
        counts = store.counts()
    skipped = got.skipped + rep.skipped
    con = _console()
    con.print(_table(f"import {Path(file).name} ({fmt}) -> {store_path}", [
        ("rankings read", rep.rows),
        ("imported", rep.imported),
        ("exact duplicates dropped", rep.exact_duplicates),
        ("rows skipped", len(skipped)),
        ("new prompts", rep.new_prompts),
        ("near-duplicate prompt pairs", len(rep.near_duplicates)),
        *((f"PII scrubbed: {k}", n) for k, n in rep.pii.items() if n),
        ("store: prompts / rankings", f"{counts['prompts']} / {counts['rankings']}"),
    ]))
    for s in skipped[:20]:
        con.print(f"[yellow]skipped[/yellow] {s}", markup=True, highlight=False)
    for a, b, j in rep.near_duplicates[:10]:
        con.print(f"near-duplicate prompts {a} ~ {b} (Jaccard {j:.2f})", highlight=False)


@click.command("export")
@click.option("--store", "store_path", type=StoreParam(exists=True), required=True,
              help=f"Preference store ({HELP}).")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="rankings: one ranking per line; pairs: TRL {prompt, chosen, rejected}; "
                   "kway: grouped K-way for the RM; hf: the pairs as a datasets directory.")
@click.option("--out", type=click.Path(), required=True, help="Output file (a directory for hf).")
@click.option("--split", default=None, help="Only prompts of this split.")
@click.option("--labeler", default=None, help="Only this labeler's rankings.")
def export_cmd(store_path: Path | str, fmt: str, out: str, split: str | None, labeler: str | None) -> None:
    """Export rankings, pairs or grouped K-way JSONL (or a HF dataset) from the store.

    \b
    Example:
      preflab data export --store runs/demo/store.sqlite --format pairs --out pairs.jsonl
    """
    from preflab.feedback.pairs import flatten_pairs, rankings_to_pairs, write_kway
    from preflab.feedback.store import PreferenceStore

    with PreferenceStore(store_path) as store:
        if fmt == "rankings":
            n = write_rankings(out, store.rankings(split=split, labeler=labeler))
        elif fmt == "kway":
            n = write_kway(out, store.grouped_kway(split=split, labeler=labeler))
        else:
            usable = [r for r in store.rankings(split=split, labeler=labeler) if "not_rankable" not in r.flags]
            pairs = flatten_pairs(rankings_to_pairs(usable))
            n = write_pairs(out, pairs) if fmt == "pairs" else export_hf(out, [p.to_trl() for p in pairs])
    click.echo(f"wrote {n} {'rows' if fmt in ('pairs', 'hf') else fmt} to {out}")


def _file_rows(path: str) -> tuple[str, list[dict]]:
    """Read a JSONL file and tell what it holds: kway, rankings, pairs or prompts."""
    from preflab.data.jsonl import read_jsonl

    rows = read_jsonl(path)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{path}: row {i + 1} is not a JSON object")
    if not rows:
        return "empty", rows
    keys = set(rows[0])
    if {"responses", "order"} <= keys:
        return "kway", rows
    if {"candidates", "order"} <= keys:
        return "rankings", rows
    if {"chosen", "rejected"} <= keys:
        return "pairs", rows
    if keys & {"prompt", "text", "instruction"}:
        return "prompts", rows
    raise DataError(f"{path}: cannot tell what the rows hold (keys {sorted(keys)})")


def _prompt_text(r: dict) -> str:
    for k in ("prompt", "text", "instruction"):
        if isinstance(r.get(k), str):
            return r[k]
    return ""


def _response_texts(kind: str, r: dict) -> list[str]:
    vals = {"kway": r.get("responses"), "rankings": r.get("candidates"),
            "pairs": [r.get("chosen"), r.get("rejected")]}.get(kind) or []
    return [v for v in vals if isinstance(v, str)]


@click.command("stats")
@click.option("--store", "store_path", type=StoreParam(exists=True), default=None,
              help=f"Preference store ({HELP}).")
@click.option("--file", "file_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A JSONL file: prompts, rankings, pairs or grouped K-way.")
@click.option("--near-dup-threshold", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True)
def stats(store_path: Path | str | None, file_path: str | None, near_dup_threshold: float) -> None:
    """Counts per split, category and labeler, duplicate prompts and PII found, for a store or a file.

    \b
    Example:
      preflab data stats --store runs/demo/store.sqlite
    """
    if (store_path is None) == (file_path is None):
        raise PreflabError("give exactly one of --store or --file")
    con = _console()
    groups: dict[str, dict[str, int]] = {}
    if store_path is not None:
        from preflab.feedback.store import PreferenceStore

        with PreferenceStore(store_path) as store:
            con.print(_table(f"store {store_path}", list(store.counts().items())))
            groups = store.breakdown()
            prompts = [p.text for p in store.prompts()]
            responses = [t for r in store.rankings() for t in r.candidates]
            responses = list(dict.fromkeys(responses)) + [d.response for d in store.demonstrations()]
    else:
        kind, rows = _file_rows(file_path)
        con.print(_table(f"file {file_path}", [("kind", kind), ("rows", len(rows))]))
        metas = [{**r, **(r.get("meta") or {})} for r in rows]
        for key, title in (("split", "by split"), ("category", "by category"), ("labeler", "by labeler")):
            c = Counter(str(m[key]) for m in metas if m.get(key) is not None)
            if c:
                groups[title] = dict(sorted(c.items()))
        prompts = [_prompt_text(r) for r in rows]
        responses = [t for r in rows for t in _response_texts(kind, r)]
    for title, c in groups.items():
        if c:
            con.print(_table(title.replace("_", " "), list(c.items())))
    distinct = list(dict.fromkeys(prompts))
    exact = hygiene.exact_duplicates(distinct)
    near = hygiene.near_duplicates(distinct, near_dup_threshold)
    pii, tags = Counter(), Counter()
    for text in distinct + responses:
        pii.update({k: n for k, n in hygiene.find_pii(text).items() if n})
        tags.update({k: text.count(tag) for k, tag in hygiene.PII_TAGS.items() if tag in text})
    con.print(_table("duplicates", [
        ("prompts (distinct texts)", len(distinct)),
        ("repeated prompt rows", len(prompts) - len(distinct)),
        ("exact-duplicate groups (normalised)", len(exact)),
        (f"near-duplicate pairs (Jaccard >= {near_dup_threshold})", len(near)),
    ]))
    con.print(_table("PII (prompts and responses)",
                     [(k, pii.get(k, 0), tags.get(k, 0)) for k in hygiene.PII_KINDS],
                     columns=("kind", "found", "already scrubbed (tags)")))
