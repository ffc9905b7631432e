"""`preflab annotate create | user | token | serve | stats`: the labeling app's commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from preflab.errors import PreflabError
from preflab.feedback.store import is_url
from preflab.feedback.store_option import HELP, StoreParam

STORE = click.option("--store", "store_path", required=True, type=StoreParam(),
                     help=f"Preference store ({HELP}): what `preflab rm` reads as data.train=store:PATH.")
PROJECT = click.option("--project", default=None, help="Project name (default: the store's only project).")


def existing_store(path: Path | str) -> Path | str:
    """``path`` if the store exists; only `annotate create` makes one (a mistyped --store is an error).
    A URL names a database: opening it says whether it exists."""
    if not is_url(path) and not path.is_file():
        raise PreflabError(f"{path}: store does not exist (only `preflab annotate create` makes one; check --store)")
    return path


@click.group()
def annotate() -> None:
    """People rank K responses in the browser, into the preference store."""


@annotate.command()
@STORE
@click.option("--name", required=True, help="Project name (letters, digits, '-', '_', '.').")
@click.option("--responses", "responses_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Existing responses: JSONL of {"prompt", "responses": [K strings], "id"?, "slice"?, "category"?}.')
@click.option("--prompts", "prompts_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt file (the suite's prompts.jsonl or your own); candidates are sampled from --model.")
@click.option("--model", "model_spec", default=None, help="With --prompts: the model that writes the K candidates.")
@click.option("--split", default="rm", show_default=True,
              help="With --prompts: only prompts of this split ('any': all). Also the store split of new prompts.")
@click.option("--limit", default=None, type=click.IntRange(1), help="With --prompts: only the first N prompts.")
@click.option("--k", "k", default=4, show_default=True, type=click.IntRange(2, 9), help="With --prompts: candidates per prompt.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--gold", "gold_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Gold items: JSONL of {"prompt", "responses", "order"?: tiers, "flags"?: {position: [flag]}}.')
@click.option("--overlap", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Share of prompts ranked by --overlap-labelers labelers (the agreement slice).")
@click.option("--overlap-labelers", default=3, show_default=True, type=click.IntRange(2, 20))
@click.option("--gold-copies", default=3, show_default=True, type=click.IntRange(1, 100),
              help="How many labelers rank each gold item.")
@click.option("--guidelines", "guidelines_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Markdown file shown in the labeling page's guidelines panel.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds sampling, the overlap draw and task order.")
def create(store_path: Path | str, name: str, responses_path: Path | None, prompts_path: Path | None, model_spec: str | None,
           split: str, limit: int | None, k: int, max_new_tokens: int, temperature: float, gold_path: Path | None,
           overlap: float, overlap_labelers: int, gold_copies: int, guidelines_path: Path | None, seed: int) -> None:
    """Create a project: prompts with K candidates each, as tasks of the store's labeling queue."""
    from preflab.annotate.project import create_project, read_guidelines, read_items, sample_items
    from preflab.feedback.store import PreferenceStore

    if (responses_path is None) == (prompts_path is None):
        raise PreflabError("give exactly one of --responses FILE or --prompts FILE --model SPEC")
    if responses_path is not None:
        items = read_items(responses_path)
    else:
        if not model_spec:
            raise PreflabError("--prompts needs --model (the sampler of the K candidates)")
        from preflab.feedback.label_cli import _select

        items = sample_items(_select(prompts_path, split, limit), model_spec, k=k, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed)
    gold = read_items(gold_path, gold=True) if gold_path else []
    with PreferenceStore(store_path) as store:
        p = create_project(store, name, items, gold=gold, overlap=overlap, overlap_labelers=overlap_labelers,
                           gold_copies=gold_copies, guidelines=read_guidelines(guidelines_path),
                           split=None if split == "any" else split, seed=seed)
        n = store.queue_counts(p.queue)["pending"]
        where = store.path  # a URL without its password
    click.echo(f"project {p.name!r} in {where}: {len(items)} prompts + {len(gold)} gold items, K={p.k}, "
               f"{n} tasks (overlap {overlap:g} x {overlap_labelers} labelers, gold x {gold_copies})")
    click.echo(f"next: preflab annotate user --store {where} NAME   (--admin for an admin)")


@annotate.command()
@STORE
@click.argument("name")
@click.option("--admin", is_flag=True, help="An admin: sees the admin page (progress, agreement, adjudication).")
def user(store_path: Path | str, name: str, admin: bool) -> None:
    """Create an account and print its token (shown once; the store keeps only its hash)."""
    from preflab.annotate.accounts import create_account
    from preflab.feedback.store import PreferenceStore

    with PreferenceStore(existing_store(store_path)) as store:
        token = create_account(store, name, "admin" if admin else "labeler")
    click.echo(f"{'admin' if admin else 'labeler'} {name}: token {token}")
    click.echo("give it to them privately; it is not shown again (`preflab annotate token NAME` replaces it)")


@annotate.command()
@STORE
@click.argument("name")
def token(store_path: Path | str, name: str) -> None:
    """Replace an account's token (the old one stops working) and print the new one."""
    from preflab.annotate.accounts import new_token
    from preflab.feedback.store import PreferenceStore

    with PreferenceStore(existing_store(store_path)) as store:
        click.echo(f"{name}: token {new_token(store, name)}")


@annotate.command()
@STORE
@PROJECT
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535))
@click.option("--allow-public", is_flag=True, help="Allow a non-loopback --host (put TLS in front of it).")
def serve(store_path: Path | str, project: str | None, host: str, port: int, allow_public: bool) -> None:
    """Serve the labeling page (/) and the admin page (/admin)."""
    from preflab.annotate.server import serve as run

    run(existing_store(store_path), project, host=host, port=port, allow_public=allow_public)


@annotate.command()
@STORE
@PROJECT
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the numbers to this JSON file.")
def stats(store_path: Path | str, project: str | None, json_out: Path | None) -> None:
    """Print progress, per-labeler gold accuracy and agreement (what the admin page shows)."""
    from preflab.annotate.project import load_project
    from preflab.annotate.stats import project_stats
    from preflab.feedback.store import PreferenceStore

    with PreferenceStore(existing_store(store_path)) as store:
        s = project_stats(store, load_project(store, project))
    pr = s["progress"]
    click.echo(f"project {s['project']}: {pr['done']}/{pr['tasks']} tasks done, {pr['assigned']} assigned, "
               f"{pr['skipped']} skipped, {pr['adjudicated']} adjudicated")
    a = s["agreement"]["all"]
    click.echo(f"agreement: pairwise {_f(a['pairwise'])} over {a['pairs'] or 0} pairs, "
               f"Krippendorff's alpha {_f(a['krippendorff_alpha'])}, {a['groups'] or 0} groups ranked by >= 2")
    for row in s["labelers"]:
        click.echo(f"  {row['labeler']}: {row['rankings']} rankings, {row['skipped']} skipped, gold accuracy "
                   f"{_f(row['gold_accuracy'])}, flag recall {_f(row['gold_flag_recall'])}, agreement with others "
                   f"{_f(row['agreement_with_others'])}")
    click.echo(f"disagreement queue: {len(s['disagreements'])}")
    click.echo(f"notes: {pr['notes']} (the newest on the admin page and in --json)")
    if json_out is not None:
        from preflab.data.jsonl import atomic_write_text

        atomic_write_text(json_out, json.dumps(s, indent=2) + "\n")
        click.echo(f"wrote {json_out}")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
