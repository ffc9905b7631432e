"""`preflab data label | agreement | demos`: the simulated labeling team at work.

``label`` samples K responses per prompt, stores them and has them ranked through the
store's queue (``enqueue`` / ``next_task`` / ``complete``), the same flow a human labeler
uses in the annotation app; ``agreement`` measures how well labelers agree (InstructGPT:
72.6 +/- 1.5% of pairs, docs/reference.md §1.5); ``demos`` writes SFT demonstrations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from preflab.config import LabelingSection
from preflab.errors import DataError, PreflabError
from preflab.feedback.store_option import HELP, StoreParam

LABELING = LabelingSection()  # the pipeline's labeling section: `data label` samples as `preflab pipeline` does


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)


def _select(prompts_path: Path, split: str | None, limit: int | None) -> list:
    """Prompts of a file, filtered by split (``any``/None: all), first ``limit``."""
    from preflab.data.suite.schema import load_prompts

    rows = load_prompts(prompts_path)
    if split and split != "any":
        rows = [p for p in rows if p.split == split]
        if not rows:
            raise DataError(f"{prompts_path}: no prompts of split {split!r} (use --split any for all)")
    if not rows:
        raise DataError(f"{prompts_path}: no prompts")
    return rows[:limit] if limit else rows


def _overlap_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    """A deterministic ``fraction`` of prompt ids (at least one when fraction > 0) for the agreement slice."""
    from preflab.feedback.labelers import stable_seed

    if fraction <= 0 or not ids:
        return set()
    n = min(len(ids), max(1, round(fraction * len(ids))))
    return set(sorted(ids, key=lambda i: stable_seed("overlap", seed, i))[:n])


# ---------------------------------------------------------------------------------------------
# label
# ---------------------------------------------------------------------------------------------


@click.command()
@click.option("--model", "model_spec", required=True, help="Model that writes the candidates (dir, hub id, bundled:, tiny:).")
@click.option("--prompts", "prompts_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt file (the suite's prompts.jsonl or your own).")
@click.option("--store", "store_path", required=True, type=StoreParam(),
              help=f"Preference store ({HELP}; a file is created if missing).")
@click.option("--split", default="rm", show_default=True, help="Only prompts of this split ('any': all).")
@click.option("--k", "k", default=LABELING.k, show_default=True, type=click.IntRange(2, 9),
              help="Candidates per prompt (InstructGPT: 4..9).")
@click.option("--limit", default=None, type=click.IntRange(1), help="Only the first N prompts.")
@click.option("--max-new-tokens", default=LABELING.max_new_tokens, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=LABELING.temperature, show_default=True,
              type=click.FloatRange(0, min_open=True))
@click.option("--overlap", default=LABELING.overlap, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of prompts ranked by three labelers (the agreement slice).")
@click.option("--labelers", "labelers_kind", type=click.Choice(["panel", "ai"]), default="panel", show_default=True,
              help="panel: the simulated labelers (gold judge + noise); ai: an LM compares pairs (RLAIF).")
@click.option("--ai-model", default=None, help="Judge model for --labelers ai (default: --model).")
@click.option("--batch-size", default=LABELING.batch_size, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds sampling and the labelers' noise.")
@click.option("--threads", default=None, type=click.IntRange(1))
def label(model_spec: str, prompts_path: Path, store_path: Path | str, split: str, k: int, limit: int | None,
          max_new_tokens: int, temperature: float, overlap: float, labelers_kind: str, ai_model: str | None,
          batch_size: int, seed: int, threads: int | None) -> None:
    """Sample K responses per prompt from a model, store them, and rank them through the labeling queue.

    Each prompt is ranked by one labeler (round robin); an --overlap fraction is ranked by
    three, so `preflab data agreement --store` can measure agreement. The gold judge never
    enters the store: only rankings do. The defaults are the pipeline's (its `labeling` section).

    \b
    Example:
      preflab data label --model runs/demo/sft/model --prompts runs/demo/data/prompts.jsonl --store prefs.sqlite
    """
    from preflab import models

    models.set_threads(threads)
    collect_rankings(model_spec=model_spec, prompts=_select(prompts_path, split, limit), store_path=store_path,
                     split=split, k=k, max_new_tokens=max_new_tokens, temperature=temperature, overlap=overlap,
                     labelers_kind=labelers_kind, ai_model=ai_model, batch_size=batch_size, seed=seed)


def sample_candidates(model: Any, tokenizer: Any, prompts: list, *, k: int, max_new_tokens: int, temperature: float,
                      batch_size: int, bf16: bool, cache: Path | None, seed: int, cache_key: str) -> list[str]:
    """K samples of each prompt (its own token budget where it has one), prompt after prompt: the
    candidates ``collect_rankings`` ranks; ``cache``: ``generate_texts``' resumable batch cache."""
    from preflab.data.chat import token_budgets
    from preflab.rollout import generate_texts

    rows = [p for p in prompts for _ in range(k)]
    return generate_texts(model, tokenizer, [p.prompt for p in rows], max_new_tokens=token_budgets(rows, max_new_tokens),
                          temperature=temperature, batch_size=batch_size, bf16=bf16, progress=True, cache=cache,
                          seed=seed, cache_key=cache_key)


def collect_rankings(*, model_spec: str, prompts: list, store_path: Path | str, split: str = "rm", k: int = LABELING.k,
                     max_new_tokens: int = LABELING.max_new_tokens, temperature: float = LABELING.temperature,
                     overlap: float = LABELING.overlap, labelers_kind: str = "panel", ai_model: str | None = None,
                     batch_size: int = LABELING.batch_size, seed: int = 0,
                     bf16: bool = LABELING.bf16, samples_cache: Path | None = None,
                     candidates: list[str] | None = None) -> dict[str, Any]:
    """The labeling flow of `preflab data label` as a function (the pipeline calls it); returns store counts.

    ``samples_cache``: the candidates are appended there batch by batch (``generate_texts``), so a
    killed call samples only what is missing when it is called again with the same arguments.
    ``candidates``: the K candidates of each prompt, prompt after prompt, already sampled from
    ``model_spec`` (``sample_candidates``); nothing is sampled then."""
    import torch

    from preflab import models
    from preflab.data.schema import Prompt
    from preflab.data.suite.schema import SuitePrompt
    from preflab.feedback.labelers import default_panel
    from preflab.feedback.store import PreferenceStore
    from preflab.run import Progress

    torch.manual_seed(seed)

    # 1. sample K candidates per prompt
    tokenizer = models.load_tokenizer(model_spec)
    model = models.load_policy(model_spec)
    flat = candidates if candidates is not None else sample_candidates(
        model, tokenizer, prompts, k=k, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
        bf16=bf16, cache=samples_cache, seed=seed, cache_key=model_spec)
    if len(flat) != k * len(prompts):
        raise ValueError(f"{len(flat)} candidates for {len(prompts)} prompts x k = {k}")

    # 2. the labelers
    if labelers_kind == "ai":
        from preflab.feedback.ai_labeler import AILabeler

        if ai_model and ai_model != model_spec:
            judge_model, judge_tok = models.load_policy(ai_model), models.load_tokenizer(ai_model)
        else:
            judge_model, judge_tok = model, tokenizer
        team: list[Any] = [AILabeler(judge_model, judge_tok, name=f"ai:{ai_model or model_spec}")]
        copies_overlap = 1  # one deterministic judge: a second copy would only agree with itself
    else:
        team = list(default_panel())
        copies_overlap = min(3, len(team))
    queue = f"rank-{split or 'any'}"
    overlap_ids = _overlap_ids([p.id for p in prompts], overlap, seed) if copies_overlap > 1 else set()

    # 3. store prompts and candidates, and enqueue one task per prompt (three for the overlap slice)
    by_store_id: dict[int, SuitePrompt] = {}
    n_tasks = 0
    with PreferenceStore(store_path) as store:
        # A named split is the stored one (the pipeline's rounds store held-out prompts under their own).
        pids = store.add_prompts([Prompt(text=p.prompt, category=p.category, slice=p.slice,
                                         split=p.split if split in (None, "any") else split,
                                         meta={"suite": p.to_dict()}, uid=p.id) for p in prompts])
        for i, (p, pid) in enumerate(zip(prompts, pids)):
            by_store_id[pid] = p
            cids = store.add_candidates(pid, flat[i * k:(i + 1) * k], model=model_spec,
                                        meta=[{"temperature": temperature, "seed": seed}] * k)
            copies = copies_overlap if p.id in overlap_ids else 1
            store.enqueue(queue, pid, cids, copies=copies)
            n_tasks += copies

        # 4. labelers take tasks in turn until the queue is empty
        done, idle, turn = 0, 0, 0
        per_labeler: dict[str, int] = {}
        with Progress(n_tasks, "rank", enabled=True) as bar:
            while idle < len(team):
                lab = team[turn % len(team)]
                turn += 1
                task = store.next_task(lab.name, queue)
                if task is None:
                    idle += 1
                    continue
                idle = 0
                p = by_store_id.get(task.prompt_id) or _stored_suite_prompt(store, task.prompt_id)
                res = lab.rank(p, task.candidates, seed=seed)
                store.complete(task.id, res.order, lab.name, time_s=res.time_s,
                               meta={"simulated": labelers_kind, "seed": seed})
                done += 1
                per_labeler[lab.name] = per_labeler.get(lab.name, 0) + 1
                bar.update(advance=1)
        counts = store.counts()
        left = store.queue_counts(queue)

    if left["pending"] or left["assigned"]:
        click.echo(f"warning: {left['pending']} tasks in queue {queue!r} are left: every labeler already "
                   "ranked their prompt", err=True)
    click.echo(f"{len(prompts)} prompts x {k} candidates from {model_spec}; {done} rankings "
               f"({len(overlap_ids)} prompts ranked by {copies_overlap} labelers) by "
               + ", ".join(f"{n}={c}" for n, c in sorted(per_labeler.items())))
    click.echo(f"store {store_path}: " + ", ".join(f"{key} {v}" for key, v in counts.items()))
    return counts


def _stored_suite_prompt(store: Any, prompt_id: int) -> Any:
    """The suite row saved with a stored prompt, or a bare prompt from its text."""
    from preflab.data.suite.schema import SuitePrompt

    p = store.prompt(prompt_id)
    row = (p.meta or {}).get("suite")
    if isinstance(row, dict):
        try:
            return SuitePrompt.from_dict(row)
        except (KeyError, ValueError, TypeError):
            pass
    return SuitePrompt(id=p.uid or str(prompt_id), prompt=p.text)


# ---------------------------------------------------------------------------------------------
# agreement
# ---------------------------------------------------------------------------------------------


def store_groups(store: Any, split: str | None = None) -> list:
    """Rankings of the store grouped by (prompt, set of candidates): one ``RatedGroup`` each.

    Positions are aligned across labelers by sorted candidate id. A labeler who ranked the same
    candidates twice counts once (the latest ranking). Gold totals are filled in when the
    prompt carries its suite row (``meta["suite"]``, as ``data label`` stores it).
    """
    from preflab.data.schema import ranks_from_order
    from preflab.data.suite.schema import SuitePrompt
    from preflab.feedback.labelers import RatedGroup
    from preflab.feedback.rubric import judge

    groups: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}
    for r in store.rankings(split=split):
        if "not_rankable" in r.flags or not r.order:
            continue
        ids = sorted(r.candidate_ids)
        pos = {cid: i for i, cid in enumerate(r.candidate_ids)}
        ranks = ranks_from_order(r.order, r.k)
        g = groups.setdefault((r.prompt_id, tuple(ids)), {"ranks": {}, "texts": None})
        g["ranks"][r.labeler] = [ranks[pos[cid]] for cid in ids]
        g["texts"] = [r.candidates[pos[cid]] for cid in ids]
    out = []
    suite_cache: dict[int, SuitePrompt | None] = {}
    for (pid, ids), g in groups.items():
        if pid not in suite_cache:
            row = (store.prompt(pid).meta or {}).get("suite")
            try:
                suite_cache[pid] = SuitePrompt.from_dict(row) if isinstance(row, dict) else None
            except (KeyError, ValueError, TypeError):
                suite_cache[pid] = None
        sp = suite_cache[pid]
        gold = [judge(sp, t).total for t in g["texts"]] if sp is not None else None
        out.append(RatedGroup(ranks=g["ranks"], gold=gold, key=(pid, list(ids))))
    return out


def store_agreement(store_path: Path | str, split: str | None = None) -> dict[str, Any]:
    """Agreement metrics of the rankings in a store (JSON-ready; NaN as None)."""
    from preflab.feedback.labelers import agreement_summary
    from preflab.feedback.store import PreferenceStore

    with PreferenceStore(store_path) as store:
        groups = store_groups(store, split)
    if not groups:
        raise DataError(f"{store_path}: no candidates ranked by two or more labelers"
                        f"{f' in split {split!r}' if split else ''}")
    return _jsonable(agreement_summary(groups))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def print_summary(title: str, s: dict[str, Any]) -> None:
    from rich.table import Table

    con = _console()
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("groups ranked by >= 2 labelers", s["groups"]), ("rankings", s["rankings"]), ("labelers", s["labelers"]),
        ("pairwise agreement (ties excluded)", s["pairwise"]), ("  pairs compared", s["pairs"]),
        ("pairwise agreement (tie = label)", s["pairwise_ties"]),
        ("leave-one-out majority agreement", s["loo_majority"]),
        (f"Fleiss' kappa ({s.get('fleiss_raters', 0)} raters)", s["fleiss_kappa"]),
        ("Krippendorff's alpha (ordinal)", s["krippendorff_alpha"]), ("Kendall's W (mean)", s["kendalls_w"]),
        ("agreement with gold", s["gold"]), ("tie rate", s["tie_rate"]),
    ]
    for name, v in rows:
        t.add_row(name, _fmt(v))
    con.print(t)
    if s.get("gold_by_labeler") or s.get("pairwise_by_labeler_pair"):
        t2 = Table(title="per labeler", title_justify="left")
        t2.add_column("labeler (pair)")
        t2.add_column("agreement", justify="right")
        for k, v in s.get("gold_by_labeler", {}).items():
            t2.add_row(f"{k} vs gold", _fmt(v))
        for k, v in s.get("pairwise_by_labeler_pair", {}).items():
            t2.add_row(k.replace("|", " vs "), _fmt(v))
        con.print(t2)
    con.print("InstructGPT: labelers agree on 72.6 +/- 1.5% of pairs (held-out labelers 77.3 +/- 1.3%).",
              highlight=False)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


@click.command()
@click.option("--store", "store_path", default=None, type=StoreParam(exists=True),
              help=f"Measure the rankings in this store ({HELP}; candidates ranked by >= 2 labelers).")
@click.option("--split", default=None, help="With --store: only prompts of this split. With --panel: default rm.")
@click.option("--panel", "panel_mode", is_flag=True,
              help="Measure the default simulated panel on a fixed synthetic candidate set (no model).")
@click.option("--prompts", "prompts_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --panel: the prompt file (suite prompts with metadata).")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1), help="With --panel: prompts used.")
@click.option("--k", "k", default=4, show_default=True, type=click.IntRange(2, 9), help="With --panel: candidates per prompt.")
@click.option("--seed", default=0, show_default=True, type=int, help="With --panel: candidate set and noise seed.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the metrics to this JSON file.")
def agreement(store_path: Path | str | None, split: str | None, panel_mode: bool, prompts_path: Path | None, limit: int,
              k: int, seed: int, json_out: Path | None) -> None:
    """Labeler-labeler agreement: pairwise (with and without ties), leave-one-out majority,
    Fleiss' kappa, Krippendorff's alpha, Kendall's W, and agreement with the gold judge.

    \b
    Example:
      preflab data agreement --store runs/demo/store.sqlite --split rm
    """
    from preflab.feedback.labelers import agreement_summary, synthetic_agreement

    if panel_mode == (store_path is not None):
        raise PreflabError("give exactly one of --store DB or --panel --prompts FILE")
    if panel_mode:
        if prompts_path is None:
            raise PreflabError("--panel needs --prompts FILE")
        prompts = _select(prompts_path, split or "rm", limit)
        s = synthetic_agreement(prompts, k=k, seed=seed)
        title = f"default panel on synthetic candidates ({len(prompts)} prompts, K={k})"
    else:
        from preflab.feedback.store import PreferenceStore

        with PreferenceStore(store_path) as store:
            groups = store_groups(store, split)
        if not groups:
            raise DataError(f"{store_path}: no rankings{f' of split {split!r}' if split else ''}")
        s = agreement_summary(groups)
        title = f"agreement in {store_path}" + (f" (split {split})" if split else "")
    print_summary(title, s)
    if json_out is not None:
        from preflab.data.jsonl import atomic_write_text

        atomic_write_text(json_out, json.dumps(_jsonable(s), indent=2) + "\n")
        click.echo(f"wrote {json_out}")


# ---------------------------------------------------------------------------------------------
# demos
# ---------------------------------------------------------------------------------------------


@click.command()
@click.option("--prompts", "prompts_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt file (the suite's prompts.jsonl or your own).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help='JSONL to write: {"id", "prompt", "response", "source", "gold"} (SFT reads prompt, response).')
@click.option("--split", default="sft", show_default=True, help="Only prompts of this split ('any': all).")
@click.option("--model", "model_spec", default=None, help="Model to sample from (needed unless --mode reference).")
@click.option("--n", "n", default=4, show_default=True, type=click.IntRange(1), help="Samples per prompt (best of N).")
@click.option("--mode", type=click.Choice(["mixed", "best_of_n", "reference"]), default="mixed", show_default=True,
              help="mixed: best of N, templated answer when none reaches --threshold; best_of_n: always the best "
                   "sample; reference: the templated answer only.")
@click.option("--threshold", default=0.6, show_default=True, type=click.FloatRange(0, 1),
              help="Gold total a sample needs in mixed mode.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Only the first N prompts.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=None, type=click.IntRange(1))
def demos(prompts_path: Path, out_path: Path, split: str, model_spec: str | None, n: int, mode: str,
          threshold: float, limit: int | None, max_new_tokens: int, temperature: float, batch_size: int, seed: int,
          threads: int | None) -> None:
    """Write SFT demonstrations: the best of N samples under the gold judge, or the templated answer.

    \b
    Example:
      preflab data demos --prompts runs/demo/data/prompts.jsonl --out demos.jsonl --mode reference
    """
    from preflab.feedback.demos import source_counts, write_demonstrations

    prompts = _select(prompts_path, split, limit)
    model = tokenizer = None
    if mode != "reference":
        if not model_spec:
            raise PreflabError(f"--mode {mode} samples from a model: give --model (or use --mode reference)")
        import torch

        from preflab import models

        models.set_threads(threads)
        torch.manual_seed(seed)
        tokenizer = models.load_tokenizer(model_spec)
        model = models.load_policy(model_spec)
    rows = write_demonstrations(prompts, model, tokenizer, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                threshold=threshold, mode=mode, batch_size=batch_size, progress=mode != "reference",
                                out=out_path)
    mean = sum(r["gold"] for r in rows) / len(rows) if rows else float("nan")
    src = source_counts(rows)
    skipped = len(prompts) - len(rows)
    click.echo(f"wrote {len(rows)} demonstrations to {out_path} (mean gold {mean:.3f}; "
               + ", ".join(f"{k} {v}" for k, v in src.items())
               + (f"; {skipped} prompts without a reference skipped" if skipped else "") + ")")
