"""`preflab eval`: evaluate models against the reference and print the summary table."""

from __future__ import annotations

from pathlib import Path

import click

from preflab.config import EvalSection
from preflab.errors import PreflabError
from preflab.evals.results import EvalResults, IFEvalResults, difference_text

DEFAULTS = EvalSection()  # the pipeline's eval section: the command samples as `preflab pipeline` does


def _parse_models(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, spec = v.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise PreflabError(f"--models {v!r}: expected NAME=PATH (e.g. sft=runs/x/sft/model)")
        if name in out:
            raise PreflabError(f"--models: {name!r} given twice")
        out[name.strip()] = spec.strip()
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def summary_rows(results: EvalResults) -> list[list[str]]:
    """One row of strings per model, in the column order of ``SUMMARY_COLUMNS``."""
    rows = []
    for name, m in results.models.items():
        w, rmw = m.win_rate, m.rm_win_rate
        rows.append([
            name,
            f"{_pct(w.rate)} [{_pct(w.lo)}, {_pct(w.hi)}]" if w else "-",
            _pct(rmw.rate) if rmw else "-",
            _num(m.kl),
            _num(m.length_words.mean if m.length_words else None, ".1f"),
            _pct(m.refusal.harmful if m.refusal else None),
            _pct(m.refusal.over_refusal if m.refusal else None),
            _pct(m.toxicity_proxy),
            _pct(m.mc1.mc1 if m.mc1 else None),
        ])
    return rows


SUMMARY_COLUMNS = ("model", "gold win [95% CI]", "RM win", "KL", "words", "refuse harmful", "over-refuse",
                   "toxic (proxy)", "MC1")


def print_summary(results: EvalResults) -> None:
    from rich.table import Table

    from preflab.run import table_console

    console = table_console(140)
    t = Table(title=f"{results.n_prompts} prompts, win-rates against {results.reference!r} (gold judge and RM; "
                    "KL in nats per response)")
    for c in SUMMARY_COLUMNS:
        t.add_column(c, justify="left" if c == "model" else "right", no_wrap=c == "model")
    for row in summary_rows(results):
        t.add_row(*row)
    console.print(t)


def print_ifeval(entry: IFEvalResults) -> None:
    from rich.table import Table

    from preflab.run import table_console

    n = entry.settings.n_prompts if entry.settings else None
    t = Table(title=f"IFEval: {n} prompts (strict: the response as it is; loose: also "
                    "without its first/last line or markdown *)")
    for c in ("model", "prompt strict", "instruction strict", "prompt loose", "instruction loose", "words",
              "prompt strict vs ref [95%]", "instruction strict vs ref [95%]", "splitter"):
        t.add_column(c, justify="left" if c in ("model", "splitter") else "right")
    for name, m in entry.models.items():
        vs = m.vs_reference
        t.add_row(name, _pct(m.prompt_level_strict), _pct(m.instruction_level_strict),
                  _pct(m.prompt_level_loose), _pct(m.instruction_level_loose),
                  "-" if m.mean_words is None else f"{m.mean_words:.0f}",
                  difference_text(vs.prompt_level_strict if vs else None),
                  difference_text(vs.instruction_level_strict if vs else None), m.sentence_splitter or "-")
    table_console(160).print(t)



@click.command("eval")
@click.option("--models", "model_args", multiple=True, required=True,
              help="NAME=PATH (model directory, hub id, bundled: or tiny:); repeat for each model.")
@click.option("--prompts", "prompts_path", required=True,
              help="Prompt file (the suite's prompts.jsonl or your own; with --ifeval, `builtin:ifeval` is the "
                   "541 public IFEval prompts shipped with preflab).")
@click.option("--split", default="eval", show_default=True,
              help="Keep prompts of this split (files without splits are used whole); 'all' keeps every row.")
@click.option("--reference", default="sft", show_default=True, help="Name of the model the others are compared with.")
@click.option("--rm", "reward_model", default=None, help="Reward model directory: RM scores and RM win-rate.")
@click.option("--out", "out_dir", default="runs/eval", show_default=True, type=click.Path(file_okay=False),
              help="Writes results.json, samples.jsonl and generations/ here (cached generations are reused).")
@click.option("--limit", default=None, type=click.IntRange(1), help="Only the first N prompts.")
@click.option("--max-new-tokens", default=DEFAULTS.max_new_tokens, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True, type=click.FloatRange(0),
              help="0: greedy.")
@click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--bf16/--no-bf16", default=DEFAULTS.bf16, show_default=True,
              help="bfloat16 weights and autocast for every forward pass.")
@click.option("--threads", default=None, type=click.IntRange(1))
@click.option("--id-field", default=None,
              help="The prompt rows' id key when it is not `id` (IFEval files: `key`, the default with --ifeval).")
@click.option("--ifeval", is_flag=True,
              help="PROMPTS is an IFEval-format file ({key, prompt, instruction_id_list, kwargs}): sample each model "
                   "and score strict/loose prompt- and instruction-level accuracy with if-verifiable's checkers "
                   "(pip install 'preflab[ifeval]'); written under \"ifeval\" in OUT/results.json.")
@click.option("--reuse", default=None, type=click.Path(file_okay=False, exists=True),
              help="With --ifeval: an earlier evaluation directory (e.g. runs/demo/eval); a model scored there under "
                   "the same name, spec and settings is copied, not sampled again (the run's SFT scores).")
def eval_cli(model_args, prompts_path, split, reference, reward_model, out_dir, limit, max_new_tokens, temperature,
             batch_size, seed, bf16, threads, id_field, ifeval, reuse):
    """Evaluate models on held-out prompts against the reference model: gold-judged win-rate with a 95%
    interval, RM win-rate, KL to the reference, length, refusals, toxicity proxy, MC1 truthfulness proxy,
    failure bins. Writes OUT/results.json and OUT/samples.jsonl and prints a summary table. The sampling
    defaults are the pipeline's (its `eval` section), so both sample the same responses.

    \b
    Examples:
      preflab eval --models sft=runs/demo/sft/model --models ppo=runs/demo/ppo/model \\
                   --prompts runs/demo/data/prompts.jsonl --rm runs/demo/rm/model --out runs/demo/eval2
      preflab eval --ifeval --models sft=runs/demo/sft/model --prompts builtin:ifeval \\
                   --max-new-tokens 1024 --temperature 0 --out runs/ifeval
      preflab eval --ifeval --models sft=runs/demo/sft/model --models dpo=runs/demo/dpo/model \\
                   --prompts builtin:ifeval --limit 150 --max-new-tokens 384 --temperature 0 \\
                   --reuse runs/demo/eval --out runs/ifeval-dpo
    """
    from preflab import models as loader
    from preflab.data.suite.schema import load_prompts

    named = _parse_models(model_args)
    if reuse is not None and not ifeval:
        raise click.UsageError("--reuse applies to --ifeval only")
    if ifeval:
        from preflab.evals.ifeval import evaluate_ifeval, read_ifeval

        rows = read_ifeval(prompts_path, id_field=id_field or "key", limit=limit)
        loader.set_threads(threads)
        entry = evaluate_ifeval(named, rows, out_dir, max_new_tokens=max_new_tokens, temperature=temperature,
                                batch_size=batch_size, seed=seed, reference=reference, reuse=reuse)
        print_ifeval(IFEvalResults.model_validate(entry))
        click.echo(f"wrote {Path(out_dir) / 'results.json'} (\"ifeval\") and {Path(out_dir) / 'ifeval'}/")
        return
    from preflab.evals.evaluate import evaluate

    prompts = load_prompts(prompts_path, id_field=id_field or "id")
    if split != "all" and any(p.split is not None for p in prompts):
        prompts = [p for p in prompts if p.split == split]
    prompts = prompts[:limit]
    if not prompts:
        raise PreflabError(f"{prompts_path}: no prompts of split {split!r}")
    loader.set_threads(threads)
    results = evaluate(named, prompts, reference=reference, reward_model=reward_model, out_dir=out_dir,
                       max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed,
                       progress=True, bf16=bf16)
    print_summary(EvalResults.from_dict(results, str(Path(out_dir) / "results.json")))
    click.echo(f"wrote {Path(out_dir) / 'results.json'} and {Path(out_dir) / 'samples.jsonl'}")
