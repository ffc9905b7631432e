"""``preflab compare RUN_DIR``: several RL methods and settings, several seeds, one table.

From one run (its SFT model, its reward model, its evaluation of the SFT model), every
cell (method x grid point x seed) trains the RL stage from the SFT model and evaluates the result
against the **run's own SFT samples on the same held-out prompts** (the SFT generation cache is
reused, so every cell is judged against the very same reference responses). Each finished cell
writes ``cells/NAME/cell.json``; a killed comparison resumes at the first unfinished cell (and the
RL stage itself resumes from its checkpoint). The cell the pipeline itself trained and evaluated
(its method at its seed, nothing overridden) is taken from the run, not retrained. A run whose
eval step has not run yet (SFT and RM done, the RL step still training) can be compared already:
the comparison evaluates the SFT model itself into ``OUT/reference``.

``OUT/compare.json`` is a list of rows, one per cell plus the SFT reference::

    {"method", "label", "seed", "settings": {key: value}, "gold_winrate", "gold_ci": [lo, hi], "n",
     "rm_winrate", "kl", "mean_words", "constraint_rate", "refuses_harmful", "over_refusal",
     "gold_score", "rm_score", "seconds", "train_seconds", "eval_seconds"}

``OUT/summary.json`` has one row per method and setting over its seeds (``seed_summary``): mean,
lowest and highest gold win-rate, the lowest interval bound and how many seeds' intervals lie
above 50%.

Methods are the RL presets of ``config.RL_METHODS`` on top of the run's own RL settings; any
``key=value`` override applies to every cell, and ``--grid KEY=V1,V2`` makes one cell per value
(the KL sweep: ``--grid kl.coef=0,0.02,0.1``). Methods of the preference trainers (dpo, ipo, rs,
best_of_n) join the table through ``EXTERNAL`` once their stages are registered.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from preflab import models
from preflab.config import (
    OFFLINE_METHODS,
    RL_METHODS,
    PipelineConfig,
    apply_overrides,
    parse_override,
    renamed_sections,
    validate,
)
from preflab.data.jsonl import atomic_write_text
from preflab.errors import PreflabError
from preflab.evals.metrics import seed_summary
from preflab.evals.results import EvalResults, reference_results

# Beside the online RL methods (config.RL_METHODS): the preference trainers and best-of-N, built
# from the same run (its SFT model, its store's rankings, its RM). Their presets are overridable
# from the command line like the RL ones (`dpo.beta=0.2`, `optim.lr=1e-5`, `sampling.n=8`).
PREFERENCE_METHODS = (*OFFLINE_METHODS, "best_of_n")
METHODS = (*RL_METHODS, *PREFERENCE_METHODS)
BEST_OF_N = 4
ROW_KEYS = ("method", "label", "seed", "settings", "gold_winrate", "gold_ci", "n", "rm_winrate", "kl", "mean_words",
            "constraint_rate", "refuses_harmful", "over_refusal", "gold_score", "rm_score", "seconds",
            "train_seconds", "eval_seconds")


def result_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's settings without the keys that cannot change its result (threads, progress, ...:
    run.RESUME_ALLOWED_CHANGES), as the table shows them."""
    from preflab.run import RESUME_ALLOWED_CHANGES

    return {k: v for k, v in settings.items() if k.rsplit(".", 1)[-1] not in RESUME_ALLOWED_CHANGES}


def parse_grid(items: list[str]) -> list[dict[str, Any]]:
    """``["kl.coef=0,0.05", "optim.lr=1e-5,2e-5"]`` -> the product as override dicts (key -> value)."""
    points: list[dict[str, Any]] = [{}]
    for item in items:
        key, _, values = item.partition("=")
        if not key or not values:
            raise PreflabError(f"--grid {item!r} must look like key.sub=V1,V2")
        parsed = [parse_override(f"{key}={v}")[1] for v in values.split(",")]
        points = [{**p, key: v} for p in points for v in parsed]
    return points


def trained(run_dir: Path) -> bool:
    """Whether the stage run in ``run_dir`` finished (its manifest says so) and exported its model."""
    from preflab.run import read_manifest

    path = run_dir / "manifest.json"
    return path.is_file() and read_manifest(run_dir).get("status") == "finished" and \
        (run_dir / "model" / "config.json").is_file()


def cell_label(method: str, point: dict[str, Any]) -> str:
    return method + "".join(f"[{k}={v}]" for k, v in point.items())


def _row_from_results(results: EvalResults | Mapping[str, Any], name: str,
                      source: str = "evaluation results") -> dict[str, Any]:
    """The table columns of model ``name`` (``results``: typed, or the dict ``evaluate`` returns)."""
    if not isinstance(results, EvalResults):
        results = EvalResults.from_dict(results, source)
    m = results.model(name, source)
    win, rm_win = m.win_rate, m.rm_win_rate
    return {
        "gold_winrate": win.rate, "gold_ci": [win.lo, win.hi], "n": win.n,
        "rm_winrate": rm_win.rate if rm_win else None, "kl": m.kl, "mean_words": m.length_words.mean,
        "constraint_rate": m.metadata.follows_constraints, "refuses_harmful": m.refusal.harmful,
        "over_refusal": m.refusal.over_refusal, "gold_score": m.gold.total, "rm_score": m.rm_score,
    }


class Comparison:
    """The cells of one comparison, built from a run directory's pipeline config."""

    def __init__(self, run_dir: str | Path, out: str | Path, *, methods: list[str], seeds: list[int],
                 overrides: list[str], grid: list[str]):
        from preflab.pipeline import Pipeline

        self.run = Path(run_dir)
        self.out = Path(out)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise PreflabError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
        cfg_path = self.run / "pipeline_config.json"
        if not cfg_path.is_file():
            raise PreflabError(f"{self.run}: not a pipeline run (no pipeline_config.json)")
        saved, _ = renamed_sections(json.loads(cfg_path.read_text()))  # a run begun before 0.3.0 said `ppo`
        self.pipeline = Pipeline(validate(PipelineConfig, saved, str(cfg_path)), self.run)
        for need in (self.run / "sft" / "model", self.run / "rm" / "model"):
            if not need.exists():
                raise PreflabError(f"{self.run}: {need.relative_to(self.run)} is missing; run the pipeline's "
                                   "sft and rm steps first")
        if "best_of_n" in methods and not (self.final_rm / "config.json").is_file():
            raise PreflabError(f"{self.run}: best_of_n reranks with the run's final reward model "
                               f"{self.final_rm.relative_to(self.run)}, which is not there yet (finish the run's rounds)")
        # The reference: the run's own evaluation of its SFT model; before the run's eval step has
        # run (the long preset's comes after its hour-long RL step), one that another comparison
        # made under the run, else the comparison evaluates the SFT model itself, with the run's
        # eval settings, into OUT/reference (ensure_reference) and keeps judging against that one
        # when the run's evaluation appears later: every cell of a directory is judged against the
        # same SFT responses.
        own = self.out / "reference" / "results.json"
        self.results_path = own if own.is_file() else reference_results(self.run)
        if not self.results_path.is_file():
            self.results_path = own
        self.reference = json.loads(self.results_path.read_text()) if self.results_path.is_file() else None
        self.methods, self.seeds, self.overrides = methods, seeds, overrides
        self.points = parse_grid(grid)
        # Validate every cell's config before anything runs.
        self.cells = [(m, p, s, self.stage_config(m, p, s)) for m in methods for p in self.points for s in seeds]

    def ensure_reference(self) -> None:
        """Evaluate the SFT model into OUT/reference when neither the run nor an earlier
        invocation has (resumable: the generation cache keeps finished batches)."""
        if self.reference is None:
            click.secho(f"[compare] {self.run} has no evaluation yet: evaluating its SFT model into "
                        f"{self.results_path.parent}", fg="cyan", err=True)
            self.pipeline.evaluate(["sft"], self.results_path.parent)
            self.reference = json.loads(self.results_path.read_text())
            models.release_memory()

    def stage_of(self, method: str) -> str | None:
        """The registry stage that trains ``method`` (None: best-of-N trains nothing)."""
        from preflab.registry import stage_of

        return None if method == "best_of_n" else stage_of(method)

    def base_config(self, method: str) -> dict[str, Any]:
        """What the method trains from this run, before the command's overrides: the pipeline's
        own config of it (nothing for best-of-N, which trains nothing)."""
        return {} if self.stage_of(method) is None else self.pipeline.method_dict(method)

    def stage_config(self, method: str, point: dict[str, Any], seed: int) -> Any:
        from preflab.registry import STAGES

        label = cell_label(method, point)
        stage = self.stage_of(method)
        if stage is None:
            return None
        data = self.base_config(method)
        data["run"] = {**data.get("run", {}), "out": str(self.out / "cells" / f"{label}-s{seed}" / "train"),
                       "seed": seed}
        apply_overrides(data, [*self.overrides, *(f"{k}={v}" for k, v in point.items())])
        return validate(STAGES[stage].config, data, f"compare {label}")

    @property
    def final_rm(self) -> Path:
        """The run's reward model after its last round (RUN/rm/model without rounds): the one
        best-of-N picks with, so that trained policies meet the best reranker the run has."""
        return self.pipeline.rounds.rm(self.pipeline.cfg.rounds)

    def best_of_n_cache(self, path: Path, seed: int) -> float:
        """Write the eval generation cache of best-of-N (n SFT samples per eval prompt, the best by
        ``final_rm``) so evaluate() judges it like a model; returns its KL bound log n - (n-1)/n."""
        from preflab import models
        from preflab.data.jsonl import write_jsonl
        from preflab.evals.best_of_n import best_of_n

        ref, s = self.reference, self.reference["settings"]
        spec = ref["models"][ref["reference"]]["spec"]
        prompts = self.pipeline._split("eval", self.pipeline.cfg.eval.limit)
        tokenizer = models.load_tokenizer(spec)
        out = best_of_n(models.load_policy(spec, dtype="bf16"), models.load_reward_model(
            str(self.final_rm), dtype="bf16"), tokenizer, [p.prompt for p in prompts], n=BEST_OF_N,
            max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], seed=seed)
        rows = []
        for p, text, ended in zip(prompts, out.texts, out.ended):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if ended else [])
            rows.append({"id": p.id, "response": text, "ended": bool(ended), "tokens": len(ids), "token_ids": ids,
                         "spec": spec, "max_new_tokens": s["max_new_tokens"], "temperature": s["temperature"]})
        write_jsonl(path, rows)
        return float(out.kl_bound)

    def run_cell(self, method: str, point: dict[str, Any], seed: int, cfg: Any) -> dict[str, Any]:
        from preflab.evals.evaluate import evaluate
        from preflab.registry import run_stage

        label = cell_label(method, point)
        cell = self.out / "cells" / f"{label}-s{seed}"
        done = cell / "cell.json"
        if done.is_file():
            row = json.loads(done.read_text())
            if cfg is not None or row.get("reranker") == str(self.final_rm):  # best-of-N: by this RM
                return row
        row = self.run_row(method, point, seed)
        if row is not None:
            atomic_write_text(done, json.dumps(row, indent=2) + "\n")
            return row
        t0 = time.perf_counter()
        ref = self.reference
        sft_spec = ref["models"][ref["reference"]]["spec"]
        gen_dir = cell / "eval" / "generations"
        gen_dir.mkdir(parents=True, exist_ok=True)
        kl_bound = None
        if cfg is None:  # best-of-N: the SFT model's samples, reranked; nothing is trained
            model, kl_bound = sft_spec, self.best_of_n_cache(gen_dir / f"{method}.jsonl", seed)
        elif trained(Path(cfg.run.out)):  # killed in its evaluation: the training is not redone
            model = Path(cfg.run.out) / "model"
        else:
            model = run_stage(self.stage_of(method), cfg, resume=(Path(cfg.run.out) / "manifest.json").exists())
            if not self.pipeline.cfg.keep_checkpoints:  # a finished cell is never resumed (1.6 GiB each)
                shutil.rmtree(Path(cfg.run.out) / "checkpoints", ignore_errors=True)
            models.release_memory()  # the evaluation starts without the training's peak
        t1 = time.perf_counter()
        # The run's SFT generations are the reference: copy the cache, so the SFT is not resampled.
        shutil.copyfile(self.results_path.parent / "generations" / f"{ref['reference']}.jsonl",
                        gen_dir / f"{ref['reference']}.jsonl")
        e = self.pipeline.cfg.eval
        s = ref["settings"]
        results = evaluate({ref["reference"]: sft_spec, method: str(model)},
                           self.pipeline._split("eval", e.limit), reference=ref["reference"],
                           reward_model=ref["reward_model"], out_dir=cell / "eval",
                           max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], batch_size=e.batch_size,
                           bf16=e.bf16, seed=s["seed"])
        t2 = time.perf_counter()
        if kl_bound is not None:  # evaluate() scores its samples under the SFT model itself: KL 0
            results = json.loads(json.dumps(results, default=str))
            results["models"][method]["kl"] = kl_bound  # the analytic bound instead (docs/reference.md §8)
        settings = result_settings({**dict((".".join(k), v) for k, v in map(parse_override, self.overrides)), **point})
        row = {"method": method, "label": label, "seed": seed, "settings": settings,
               **({"reranker": str(self.final_rm)} if cfg is None else {}), **_row_from_results(results, method),
               "seconds": round(t2 - t0, 1), "train_seconds": round(t1 - t0, 1), "eval_seconds": round(t2 - t1, 1)}
        atomic_write_text(done, json.dumps(row, indent=2) + "\n")
        return row

    def run_row(self, method: str, point: dict[str, Any], seed: int) -> dict[str, Any] | None:
        """The run's own model as this cell, when the pipeline trained exactly it (this method at
        the run's seed, no grid point, no override: the same stage config) and its evaluation
        judged it: the pipeline's result is the cell's, nothing is retrained (the long preset's RL
        step is an hour or more). ``source: "run"`` marks the row."""
        cfg, model = self.pipeline.cfg, self.run / method / "model"
        evaluated = self.reference.get("models", {}).get(method, {})
        if (point or self.overrides or seed != cfg.seed or method not in (*cfg.rl, *cfg.preference)
                or evaluated.get("spec") != str(model) or not model.is_dir()):
            return None
        steps = {s["step"]: s["seconds"] for s in self.pipeline.state().get("steps", [])}
        return {"method": method, "label": cell_label(method, point), "seed": seed, "settings": {},
                **_row_from_results(self.reference, method, str(self.results_path)),
                "seconds": steps.get(method), "train_seconds": steps.get(method), "eval_seconds": None,
                "source": "run"}

    def reference_row(self) -> dict[str, Any]:
        results = EvalResults.from_dict(self.reference, str(self.results_path))
        name = results.reference
        row = _row_from_results(results, name, str(self.results_path))
        row.update({"gold_winrate": None, "gold_ci": None, "rm_winrate": None})
        return {"method": name, "label": name, "seed": None, "settings": {}, **row,
                "seconds": None, "train_seconds": None, "eval_seconds": None}

    def run_all(self, on_row: Callable[[dict[str, Any]], None] = lambda r: None) -> list[dict[str, Any]]:
        self.ensure_reference()
        rows = [self.reference_row()]
        for i, (method, point, seed, cfg) in enumerate(self.cells):
            click.secho(f"[compare] cell {i + 1}/{len(self.cells)}: {cell_label(method, point)} seed {seed}",
                        fg="cyan", err=True)
            rows.append(self.run_cell(method, point, seed, cfg))
            models.release_memory()  # the next cell starts without this one's peak
            on_row(rows[-1])
            self.write(rows)  # the table grows as cells finish
        return rows

    def finished(self) -> list[dict[str, Any]]:
        """Every finished cell in the output directory (also those of earlier invocations), in the
        order methods, settings and seeds were first run."""
        rows = [json.loads(p.read_text()) for p in (self.out / "cells").glob("*/cell.json")]
        order = {cell_label(m, pt): i for i, (m, pt, _, _) in enumerate(self.cells)}
        return sorted(rows, key=lambda r: (order.get(r["label"], len(order)), r["label"], r["seed"]))

    def write(self, rows: list[dict[str, Any]]) -> None:
        """compare.json and compare.html: the reference and every finished cell of the directory."""
        done = {(r["label"], r["seed"]) for r in rows}
        rows = rows + [r for r in self.finished() if (r["label"], r["seed"]) not in done]
        atomic_write_text(self.out / "compare.json", json.dumps(rows, indent=2) + "\n")
        atomic_write_text(self.out / "summary.json", json.dumps(seed_summary(rows), indent=2) + "\n")
        from preflab.evals.report import write_compare_html

        write_compare_html(rows, self.out / "compare.html")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} must be comma-separated integers") from None


@click.command("compare")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--methods", default="ppo_ptx,rloo", show_default=True,
              help=f"Comma-separated methods: {', '.join(METHODS)}.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--out", default=None, help="Output directory (default: RUN_DIR/compare). Rerun to resume.")
@click.option("--grid", multiple=True, help="KEY=V1,V2,...: one cell per value (e.g. kl.coef=0,0.02,0.1 for the KL "
                                             "sweep); several --grid options multiply.")
@click.option("--table-only", is_flag=True, help="Only rewrite compare.json/html from the finished cells; train nothing.")
@click.argument("overrides", nargs=-1)
def cli(run_dir, methods, seeds, out, grid, overrides, table_only):
    """Re-run the RL stage of RUN_DIR with several methods, settings and seeds, and evaluate each
    against the run's SFT samples (gold win-rate with a Wilson interval, RM win-rate, KL, length,
    constraint following, refusals, seconds).

    \b
    Example:
      preflab compare runs/demo --methods ppo_ptx,rloo,grpo --seeds 0,1,2 --out runs/demo/compare
      preflab compare runs/demo --methods rloo --grid kl.coef=0,0.02,0.1 --out runs/demo/kl-sweep
    """
    from preflab.run import table_console

    comp = Comparison(run_dir, out or Path(run_dir) / "compare",
                      methods=[m.strip() for m in methods.split(",") if m.strip()], seeds=_ints(seeds),
                      overrides=list(overrides), grid=list(grid))
    if table_only:
        if comp.reference is None:
            raise PreflabError(f"{run_dir}: no evaluation of its SFT model yet (run the comparison first)")
        comp.write([comp.reference_row()])
        rows = json.loads((comp.out / "compare.json").read_text())
    else:
        rows = comp.run_all()
    from rich.table import Table

    table = Table(title=f"compare: {run_dir} (gold win-rate vs {rows[0]['label']}, Wilson 95%)")
    for col in ("cell", "seed", "gold win", "95% CI", "RM win", "KL", "words", "constraints", "s"):
        table.add_column(col)
    for r in rows:
        ci = f"[{r['gold_ci'][0]:.1%}, {r['gold_ci'][1]:.1%}]" if r["gold_ci"] else ""
        table.add_row(r["label"], "" if r["seed"] is None else str(r["seed"]),
                      "" if r["gold_winrate"] is None else f"{r['gold_winrate']:.1%}", ci,
                      "" if r["rm_winrate"] is None else f"{r['rm_winrate']:.1%}", f"{r['kl']:.2f}",
                      f"{r['mean_words']:.1f}",
                      "" if r["constraint_rate"] is None else f"{r['constraint_rate']:.1%}",
                      "" if r["seconds"] is None else f"{r['seconds']:.0f}")
    table_console().print(table)
    summary = [s for s in seed_summary(rows) if len(s["seeds"]) > 1]
    if summary:
        table = Table(title="over seeds (a gain needs every seed's interval above 50%)")
        for col in ("cell", "seeds", "mean gold win", "range", "lowest CI bound", "seeds > 50%", "mean KL"):
            table.add_column(col)
        for s in summary:
            table.add_row(s["label"], ",".join(map(str, s["seeds"])), f"{s['gold_winrate_mean']:.1%}",
                          f"{s['gold_winrate_min']:.1%}-{s['gold_winrate_max']:.1%}", f"{s['lowest_ci_low']:.1%}",
                          f"{s['seeds_above_half']}/{len(s['seeds'])}", f"{s['kl_mean']:.2f}")
        table_console().print(table)
    click.echo(f"wrote {comp.out / 'compare.json'}, summary.json and {comp.out / 'compare.html'}")
