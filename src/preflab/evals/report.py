"""`preflab report RUN_DIR`: one self-contained HTML page about a run (RUN_DIR/report.html).

Plots are PNGs drawn with matplotlib's Agg canvas (no pyplot, no global backend change) and
embedded as base64; CSS is inline; there is no JavaScript and nothing is fetched, so the page
reads offline and can be mailed as one file.

What it reads, every file optional (a missing or malformed one gives a "not available"
section, never a crash):

- ``eval/results.json`` (read as ``evals.results.EvalResults``, keys left out reading as None)
  and ``eval/samples.jsonl`` from ``preflab eval`` (``evals.evaluate``);
- ``ppo/metrics.jsonl``, ``ppo_ptx/metrics.jsonl``: PPO curves (``metric_keys.PPO_CURVES``:
  ``objective/score``, ``objective/kl``, ``objective/kl_coef``, ``response/length_mean``,
  ``response/no_eos_fraction``);
- ``rm/eval/rm_eval.json``: the RM's held-out accuracy, ECE and reliability table
  (``rl.calibration.reliability_by_margin``);
- ``agreement.json``: labeler agreement (``feedback.labelers.agreement_summary``);
- ``pipeline.json``: stage timings, ``{"steps": [{"step", "seconds"}]}`` or a list of
  ``{"stage", "seconds"}``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from preflab import metric_keys as K
from preflab.data.jsonl import atomic_write_text
from preflab.errors import PreflabError
from preflab.evals.metrics import seed_summary
from preflab.evals.results import EvalResults, ModelResults, difference_text
from preflab.evals.results import load as load_results

__all__ = ["SECTIONS", "cli", "render_report", "write_report"]

PPO_KEYS = ((K.OBJECTIVE_SCORE, "RM score"), (K.OBJECTIVE_KL, "KL to reference (nats)"),
            (K.OBJECTIVE_KL_COEF, "KL coefficient"), (K.RESPONSE_LENGTH_MEAN, "response length (tokens)"),
            (K.RESPONSE_NO_EOS_FRACTION, "no-EOS fraction"), (K.OBJECTIVE_ENTROPY, "sequence entropy (nats)"),
            (K.VALUE_EXPLAINED_VARIANCE, "critic explained variance"), (K.LOSS_VALUE, "value loss"),
            (K.POLICY_CLIPFRAC, "policy clip fraction"), (K.POLICY_APPROXKL, "approx. KL between iterates"),
            (K.ADVANTAGE_STD, "advantage std"), (K.SELECT_SCORE, "dev score (checkpoint selection)"),
            (K.OBJECTIVE_PROMPT_SHARE, "reward variance between prompts (share)"),
            (K.OBJECTIVE_RM_STD, "RM ensemble spread (std)"),
            (K.OBJECTIVE_LENGTH_SLOPE, "score per token of length, within prompts"))
PPO_RUNS = ("ppo", "ppo_ptx")
TOP_K = 10
_MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError)

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; padding-bottom: .15em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; }
td.text, th.text { text-align: left; white-space: pre-wrap; max-width: 520px; }
img { max-width: 100%; height: auto; }
.na { color: #8a6d3b; background: #fcf8e3; border: 1px solid #faebcc; padding: .5em .8em; }
.note { color: #555; font-size: 0.9em; }
details { margin: .4em 0; }
summary { cursor: pointer; font-weight: 600; }
nav ul { columns: 2; }
"""


# ---------------------------------------------------------------------------------------------
# Reading files, tolerantly
# ---------------------------------------------------------------------------------------------


def _json(path: Path) -> Any:
    """The parsed JSON file, or None if it is missing or invalid."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (invalid lines skipped); [] if missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# HTML and plotting helpers
# ---------------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x))


def _na(what: str) -> str:
    return f'<p class="na">not available: {_e(what)}</p>'


def _fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int | float):
        return f"{100 * x:.1f}%" if pct else f"{x:.{digits}g}" if isinstance(x, float) else str(x)
    return str(x)


def _table(header: list[str], rows: list[list[Any]], text_cols: tuple[int, ...] = (0,)) -> str:
    """An HTML table; cells are escaped; columns in ``text_cols`` are left-aligned."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="text"' if i in text_cols else ""
        return f"<{tag}{cls}>{_e(v)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(width: float = 7.0, height: float = 3.6, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _png(fig: Any, alt: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# Sections: each takes the loaded run and returns an HTML fragment
# ---------------------------------------------------------------------------------------------


class Run:
    """The files of a run directory, loaded once."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.results: EvalResults | None = None
        self.results_na = "eval/results.json is missing (run `preflab eval`)"  # why results is None
        path = run_dir / "eval" / "results.json"
        if path.is_file():
            try:
                self.results = load_results(path, partial=True)
            except PreflabError as e:  # malformed or of a newer version: say which and why
                self.results_na = f"eval/results.json: {str(e).removeprefix(f'{path}: ')}"
            else:
                if not self.results.models:
                    self.results, self.results_na = None, "eval/results.json has no evaluated models"
        self.samples = _jsonl(run_dir / "eval" / "samples.jsonl")
        self.ppo = {name: _jsonl(run_dir / name / "metrics.jsonl") for name in _rl_runs(run_dir)}
        self.rm_eval = _json(run_dir / "rm" / "eval" / "rm_eval.json")
        self.agreement = _json(run_dir / "agreement.json")
        self.pipeline = _json(run_dir / "pipeline.json")
        self.compare = _compare_rows(run_dir)
        self.audit = _json(run_dir / "audit" / "audit.json")

    @property
    def models(self) -> dict[str, ModelResults]:
        return self.results.models if self.results else {}

    @property
    def reference(self) -> str:
        return (self.results.reference if self.results else None) or "reference"


def _compare_rows(run_dir: Path) -> list[dict[str, Any]] | None:
    """The rows of every ``preflab compare`` output directly under the run (``compare/`` first,
    then e.g. a KL sweep's directory), each tagged with its directory as ``set``; the reference
    row once."""
    paths = sorted(run_dir.glob("*/compare.json"), key=lambda p: (p.parent.name != "compare", p.parent.name))
    rows: list[dict[str, Any]] = []
    for path in paths:
        got = _json(path)
        if not isinstance(got, list):
            continue
        for r in got:
            if isinstance(r, dict) and (r.get("gold_winrate") is not None or not rows):
                rows.append({**r, "set": path.parent.name})
    return rows or None


def _rl_runs(run_dir: Path) -> list[str]:
    """The RL methods the pipeline trained (its config's `rl`), else every known method with a run."""
    from preflab.config import RL_METHODS

    cfg = _json(run_dir / "pipeline_config.json")
    if isinstance(cfg, dict) and isinstance(cfg.get("rl"), list):
        return [str(m) for m in cfg["rl"]]
    return [m for m in RL_METHODS if (run_dir / m / "metrics.jsonl").is_file()] or list(PPO_RUNS)


def render_ifeval(results: Any) -> str:
    """IFEval-format accuracy per model (``preflab eval --ifeval``), under the models table."""
    block = getattr(results, "ifeval", None) if results is not None else None
    if block is None or not block.models:
        return ""
    refs = {m.vs_reference.reference for m in block.models.values() if m.vs_reference}
    ref = next(iter(refs)) if len(refs) == 1 else "the reference"
    rows = [[name, m.n_prompts, _fmt(m.prompt_level_strict, True), _fmt(m.instruction_level_strict, True),
             _fmt(m.prompt_level_loose, True), _fmt(m.instruction_level_loose, True), _fmt(m.mean_words),
             difference_text(m.vs_reference.prompt_level_strict if m.vs_reference else None),
             difference_text(m.vs_reference.instruction_level_strict if m.vs_reference else None),
             m.sentence_splitter or ""]
            for name, m in block.models.items()]
    note = ('<p class="note">Differences against the reference in percentage points, with paired 95% '
            'intervals over the same prompts (instruction level: prompts weighted by their instructions).</p>'
            if refs else "")
    return ("<h3>Instruction following on an IFEval-format file</h3>" + note
            + _table(["model", "prompts", "prompt-level strict", "instruction-level strict", "prompt-level loose",
                      "instruction-level loose", "mean words", f"prompt-level strict vs {ref} [95%]",
                      f"instruction-level strict vs {ref} [95%]", "sentence splitter"], rows, text_cols=(0, 9)))


def section_models(run: Run) -> str:
    if not run.results:
        return _na(run.results_na)
    ref = run.reference
    header = ["model", f"gold win-rate vs {ref} [95% CI]", "RM win-rate", "gold score", "RM score", "KL (nats)",
              "length (words)", "no-EOS", "refusal harmful", "over-refusal", "toxicity proxy", "MC1", "attempts",
              "follows constraints", "appropriate", "distinct-2"]
    rows = []
    for name, m in run.models.items():
        w, rmw = m.win_rate, m.rm_win_rate
        refusal, meta = m.refusal, m.metadata
        win = f"{_fmt(w.rate, True)} [{_fmt(w.lo, True)}, {_fmt(w.hi, True)}]" if w else "-"
        rows.append([name, win, _fmt(rmw.rate if rmw else None, True), _fmt(m.gold.total if m.gold else None),
                     _fmt(m.rm_score), _fmt(m.kl), _fmt(m.length_words.mean if m.length_words else None),
                     _fmt(m.no_eos_fraction, True), _fmt(refusal.harmful if refusal else None, True),
                     _fmt(refusal.over_refusal if refusal else None, True), _fmt(m.toxicity_proxy, True),
                     _fmt(m.mc1.mc1 if m.mc1 else None, True), _fmt(meta.attempts if meta else None, True),
                     _fmt(meta.follows_constraints if meta else None, True),
                     _fmt(meta.appropriate if meta else None, True), _fmt(m.distinct_2)])
    s = run.results.settings
    temperature = "?" if s is None or s.temperature is None else s.temperature
    max_new = "?" if s is None or s.max_new_tokens is None else s.max_new_tokens
    n_prompts = "?" if run.results.n_prompts is None else run.results.n_prompts
    note = (f'<p class="note">{_e(n_prompts)} held-out prompts; temperature '
            f'{_e(temperature)}, at most {_e(max_new)} new tokens. Win-rates are '
            f'paired against {_e(ref)} (ties count half; Wilson 95% interval): gold by the gold judge, RM by the '
            'reward model. The toxicity column is a PROXY (fraction of responses with a word of the '
            'better_profanity list); MC1 is a truthfulness proxy on the misconception slice; KL is to '
            f'{_e(ref)} on each model\'s own samples.</p>')
    return note + _table(header, rows) + render_ifeval(run.results)


def section_win_rate(run: Run) -> str:
    if not run.results:
        return _na(run.results_na)
    names = list(run.models)
    fig, ax = _figure(7.5, 0.6 + 0.55 * len(names) * 1.6)
    ax = ax[0][0]
    for k, (key, label, color) in enumerate((("win_rate", "gold judge", "#2b6cb0"),
                                              ("rm_win_rate", "reward model", "#dd6b20"))):
        ys, xs, lo, hi = [], [], [], []
        for i, n in enumerate(names):
            w = getattr(run.models[n], key)
            rate = _num(w.rate) if w else None
            if rate is None:
                continue
            ys.append(i + (0.2 if k == 0 else -0.2))
            xs.append(rate)
            lo.append(max(0.0, rate - (_num(w.lo) or rate)))
            hi.append(max(0.0, (_num(w.hi) or rate) - rate))
        if xs:
            ax.barh(ys, xs, height=0.38, xerr=[lo, hi], color=color, alpha=0.85, label=label, capsize=3)
    ax.axvline(0.5, color="#444", lw=1, ls="--")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"win-rate against {run.reference} (95% interval)")
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    return ('<p class="note">Gold and RM win-rates side by side: where the RM says a model wins and the gold '
            'judge does not, the policy is exploiting the reward model.</p>' + _png(fig, "win-rate bars"))


def section_ppo_curves(run: Run) -> str:
    runs = {n: rows for n, rows in run.ppo.items() if rows}
    if not runs:
        return _na("ppo/metrics.jsonl and ppo_ptx/metrics.jsonl are missing")
    nrows = -(-len(PPO_KEYS) // 4)
    fig, axes = _figure(12, 2.8 * nrows, ncols=4, nrows=nrows)
    flat = [a for row in axes for a in row]
    for ax, (key, label) in zip(flat, PPO_KEYS):
        drawn = False
        for name, rows in runs.items():
            pts = [(r.get("step"), _num(r.get(key))) for r in rows]
            pts = [(s, v) for s, v in pts if isinstance(s, int | float) and v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
                drawn = True
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"{key}: not logged", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    for ax in flat[len(PPO_KEYS):]:
        ax.axis("off")
    missing = [n for n in run.ppo if n not in runs]  # a trained method without curves (not one never trained)
    note = f'<p class="note">{_e(", ".join(missing))}: no metrics.jsonl.</p>' if missing else ""
    return note + _png(fig, "PPO curves")


def section_gold_vs_kl(run: Run) -> str:
    if not run.results:
        return _na(run.results_na)
    pts = [(n, _num(m.kl), _num(m.gold.total if m.gold else None)) for n, m in run.models.items()]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return _na("no model has both a KL and a gold score")
    fig, ax = _figure(6, 3.8)
    ax = ax[0][0]
    for n, kl, g in pts:
        ax.scatter([kl], [g], s=40)
        ax.annotate(n, (kl, g), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xlabel(f"KL to {run.reference} (nats per response)")
    ax.set_ylabel("mean gold score")
    return ('<p class="note">Gao et al. (2022): gold score rises then falls with KL when the policy '
            'over-optimises the reward model; compare models at their KL.</p>' + _png(fig, "gold score against KL"))


def rounds_table(run: Path) -> list[dict[str, Any]]:
    """One row per round of a run (round 1 from RUN/eval, later rounds from RUN/round-r/eval):
    gold win-rate against SFT, KL, constraint following, mean words, IFEval (prompt-level strict
    accuracy and mean words, where the evaluation scored it), RM accuracies. For the report."""
    cfg_path = run / "pipeline_config.json"
    if not cfg_path.is_file():
        return []
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("rounds", 1) < 2:
        return []
    from preflab.config import PipelineConfig, round_dir, round_method

    method = round_method(PipelineConfig.model_validate(cfg))  # the pipeline's own rule, not a copy of it
    rows = []
    for r in range(1, cfg["rounds"] + 1):
        res_path = round_dir(run, r) / "eval" / "results.json"
        name = method if r == 1 else f"{method}@{r}"
        row: dict[str, Any] = {"round": r, "model": name}
        if res_path.is_file():
            results = json.loads(res_path.read_text())
            m = results["models"].get(name)
            if m:
                row.update(win_rate=m["win_rate"], kl=m["kl"], words=m["length_words"]["mean"],
                           follows_constraints=(m.get("metadata") or {}).get("follows_constraints"))
            ife = ((results.get("ifeval") or {}).get("models") or {}).get(name)
            if ife:
                row.update(ifeval_prompt=ife["prompt_level_strict"], ifeval_words=ife["mean_words"])
        onp = run / f"round-{r}/onpolicy.json"
        if onp.is_file():
            o = json.loads(onp.read_text())
            row.update(_onpolicy(o))
        rows.append(row)
    final = run / "final/onpolicy.json"
    if final.is_file():
        rows.append({"round": "final", "model": "final policy", **_onpolicy(json.loads(final.read_text()))})
    return rows


def _onpolicy(o: dict[str, Any]) -> dict[str, Any]:
    """A round's on-policy check (``RUN/round-r/onpolicy.json``) as rounds-table cells."""
    gold = o.get("gold") or {}
    return {"rm_before": o["rm_before"]["accuracy"], "rm_after": (o.get("rm_after") or {}).get("accuracy"),
            "labelers": (o.get("labeler_agreement") or {}).get("agreement"), "gold_decides": gold.get("decided"),
            "labelers_gold": (gold.get("labelers") or {}).get("accuracy"),
            "rm_gold": ((gold.get("models") or {}).get("rm_after" if o.get("rm_after") else "rm_before") or {})
            .get("accuracy")}


def section_rounds(run: Run) -> str:
    """Rounds 2..n (``rounds``): each round's policy against SFT, and the RM on the current policy's
    held-out samples before and after its refit, beside the labelers' agreement on the same samples."""
    if not (run.dir / "pipeline_config.json").is_file():
        return _na("pipeline_config.json is missing (not a `preflab pipeline` run)")
    rows = rounds_table(run.dir)
    if not rows:
        return ('<p class="note">One round (pipeline <code>rounds: 1</code>): the RM saw only SFT samples. With '
                '<code>rounds: N</code> each further round ranks fresh samples of the current policy, refits the RM '
                'and trains on; its table and plot are here.</p>')
    table = _table(
        ["round", "model", "gold win-rate vs SFT [95%]", "KL", "follows constraints", "words",
         "IFEval prompt strict", "IFEval words", "RM before refit (on-policy)", "RM after refit", "labeler agreement",
         "gold judge decides", "labelers vs gold", "RM vs gold"],
        [[r["round"], r["model"],
          f"{_fmt(r['win_rate']['rate'], True)} [{_fmt(r['win_rate']['lo'], True)}, {_fmt(r['win_rate']['hi'], True)}]"
          if r.get("win_rate") else "-",
          _fmt(r.get("kl")), _fmt(r.get("follows_constraints"), True), _fmt(r.get("words")),
          _fmt(r.get("ifeval_prompt"), True), _fmt(r.get("ifeval_words")),
          _fmt(r.get("rm_before"), True), _fmt(r.get("rm_after"), True), _fmt(r.get("labelers"), True),
          _fmt(r.get("gold_decides"), True), _fmt(r.get("labelers_gold"), True), _fmt(r.get("rm_gold"), True)]
         for r in rows], text_cols=(1,))
    pts = [(r["round"], _num(r["win_rate"]["rate"]), _num(r["win_rate"]["lo"]), _num(r["win_rate"]["hi"]))
           for r in rows if isinstance(r["round"], int) and r.get("win_rate")]
    if not pts:
        return table
    fig, axes = _figure(10, 3.4, ncols=2)
    yerr = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
    by_round, by_kl = axes[0]
    by_round.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=yerr, marker="o", capsize=3)
    by_round.set_xticks([p[0] for p in pts])
    by_round.set_xlabel("round")
    kls = {r["round"]: _num(r.get("kl")) for r in rows}
    root_kl = [math.sqrt(max(0.0, kls.get(p[0]) or 0.0)) for p in pts]
    by_kl.errorbar(root_kl, [p[1] for p in pts], yerr=yerr, marker="o", capsize=3)
    for x, p in zip(root_kl, pts):
        by_kl.annotate(f"round {p[0]}", (x, p[1]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    by_kl.set_xlabel("sqrt(KL to SFT)  (Gao et al.'s axis)")
    for ax in (by_round, by_kl):
        ax.axhline(0.5, color="#444", lw=1, ls="--")
        ax.set_ylabel("gold win-rate vs SFT")
    return ('<p class="note">"RM before refit" scores the RM the policy was trained against on held-out rankings '
            'of that policy\'s own samples: how well it still knows where the policy is. The last three columns '
            'read the same held-out pairs against the gold judge: the share of the labelers\' pairs it scores '
            'unequally (on the rest the labelers\' order is noise and bias, which no model can learn), how often '
            'the labelers and the newest RM order those pairs as it does.</p>'
            + table + _png(fig, "gold win-rate by round"))


def section_lengths(run: Run) -> str:
    if not run.results:
        return _na(run.results_na)
    fig, ax = _figure(7, 3.6)
    ax = ax[0][0]
    by_model: dict[str, list[float]] = {}
    for r in run.samples:
        if isinstance(r.get("words"), int | float):
            by_model.setdefault(str(r.get("model")), []).append(float(r["words"]))
    drawn = False
    for name, m in run.models.items():
        if by_model.get(name):
            ax.hist(by_model[name], bins=20, histtype="step", lw=1.6, label=name)
            drawn = True
        else:  # fall back on the histogram stored in results.json
            h = m.length_words.hist if m.length_words else None
            edges, counts = (h.edges, h.counts) if h else ([], [])
            if len(edges) == len(counts) + 1 and counts:
                ax.stairs(counts, edges, lw=1.6, label=name)
                drawn = True
    if not drawn:
        return _na("no length data in results.json or samples.jsonl")
    ax.set_xlabel("response length (words)")
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    header = ["model", "words mean", "words q10", "words q50", "words q90", "tokens mean", "tokens q90"]
    rows = [[n, *[_fmt(getattr(m.length_words, q, None)) for q in ("mean", "q10", "q50", "q90")],
             *[_fmt(getattr(m.length_tokens, q, None)) for q in ("mean", "q90")]] for n, m in run.models.items()]
    return _png(fig, "length distributions") + _table(header, rows)


def section_refusals(run: Run) -> str:
    if not run.results:
        return _na(run.results_na)
    names = list(run.models)
    panels = (("by_slice", "refusal rate per slice"), ("by_category", "refusal rate per category"))
    fig, axes = _figure(11, 4.2, ncols=2)
    any_drawn = False
    for ax, (key, title) in zip(axes[0], panels):
        tables = {n: getattr(m.refusal, key) if m.refusal else {} for n, m in run.models.items()}
        cats = sorted({c for table in tables.values() for c in table})
        width = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            vals = [(_num(tables[n][c].rate) if c in tables[n] else None) or 0.0 for c in cats]
            if cats:
                ax.bar([j + i * width for j in range(len(cats))], vals, width=width, label=n)
                any_drawn = True
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
        if cats:
            ax.legend(fontsize=7)
    if not any_drawn:
        return _na("results.json has no refusal rates")
    return ('<p class="note">Refusal = a phrase of <code>feedback.rubric.REFUSAL_PHRASES</code> near the start of '
            'the response. Harmful prompts should be refused; alarming-but-harmless ones should not '
            '(over-refusal).</p>' + _png(fig, "refusal rates"))


def section_alignment_tax(run: Run) -> str:
    """Each trained model against the reference on what SFT teaches beside the win-rate."""
    from preflab.evals.metrics import TAX_MEASURES, alignment_tax

    if not run.results:
        return _na(run.results_na)
    tax = alignment_tax(run.samples, run.reference)
    if not any(tax.values()):
        return _na("eval/samples.jsonl has no rows to compare with the reference")
    header = ["model", "gold win-rate [95%]"] + [f"{what} ({rows})" for _, what, rows, _ in TAX_MEASURES]
    body = []
    for name, measures in tax.items():
        w = run.models[name].win_rate if name in run.models else None
        cells = [name, f"{_fmt(w.rate, True)} [{_fmt(w.lo, True)}, {_fmt(w.hi, True)}]" if w else "-"]
        for key, _, _, higher in TAX_MEASURES:
            m = measures.get(key)
            if m is None:
                cells.append("-")
                continue
            worse = m["hi"] < 0 if higher else m["lo"] > 0
            cells.append(f"{_fmt(m['model'], True)} vs {_fmt(m['reference'], True)}: {100 * m['diff']:+.1f} pts "
                         f"[{100 * m['lo']:+.1f}, {100 * m['hi']:+.1f}] n={m['n']}" + (" (worse)" if worse else ""))
        body.append(cells)
    return (f'<p class="note">The change against {_e(run.reference)} on the same prompts, with Newcombe\'s 95% '
            'interval of the difference; "(worse)" where the whole interval is on the wrong side of 0. A model '
            'that wins pairwise and loses here has paid an alignment tax.</p>' + _table(header, body))


def section_rm_reliability(run: Run) -> str:
    r = run.rm_eval
    if not isinstance(r, dict):
        return _na("rm/eval/rm_eval.json is missing (the RM stage writes it when it has held-out rankings)")
    out = []
    summary = [["accuracy", _fmt(r.get("accuracy"), True)], ["pairs", _fmt(r.get("n_pairs"))],
               ["ECE", _fmt((r.get("ece") or {}).get("ece"))], ["MCE", _fmt((r.get("ece") or {}).get("mce"))]]
    t = r.get("temperature") or {}
    if t:
        summary += [["temperature T", _fmt(t.get("T"))], ["test ECE before / after T",
                                                          f"{_fmt(t.get('ece_before'))} / {_fmt(t.get('ece_after'))}"]]
    out.append(_table(["metric", "value"], summary))
    bins = [b for b in (r.get("reliability") or []) if isinstance(b, dict)]
    pts = [(_num(b.get("mid")), _num(b.get("accuracy")), b.get("count", 0)) for b in bins]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        out.append(_na("the reliability table is empty or missing"))
        return "".join(out)
    fig, ax = _figure(6, 3.8)
    ax = ax[0][0]
    top = max(p[0] for p in pts) + 0.5
    xs = [top * i / 100 for i in range(101)]
    ax.plot(xs, [1 / (1 + math.exp(-x)) for x in xs], color="#444", ls="--", label="perfect: sigmoid(margin)")
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#2b6cb0", label="RM")
    for x, y, c in pts:
        ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    ax.set_xlabel("|reward margin| (bin midpoint)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.4, 1.02)
    ax.legend(fontsize=8)
    out.append('<p class="note">Reliability by reward margin (docs/reference.md §3.3): accuracy of held-out pairs '
               'per 0.5-wide bin of |r_chosen - r_rejected| against sigmoid(midpoint); numbers are pair '
               'counts.</p>')
    out.append(_png(fig, "RM reliability diagram"))
    return "".join(out)


def section_agreement(run: Run) -> str:
    a = run.agreement
    if not isinstance(a, dict):
        return _na("agreement.json is missing")
    scalars = [[k, _fmt(v, pct=isinstance(v, float) and 0 <= v <= 1 and k not in ("kendalls_w",))]
               for k, v in a.items() if isinstance(v, int | float | str | bool) or v is None]
    out = ['<p class="note">InstructGPT: 72.6 &plusmn; 1.5% pairwise agreement among training labelers, 77.3 '
           '&plusmn; 1.3% among held-out ones (docs/reference.md §1.5).</p>',
           _table(["metric", "value"], scalars)]
    tables = {k: v for k, v in a.items()
              if isinstance(v, dict) and v and all(isinstance(x, int | float) or x is None for x in v.values())}
    plotted = {k: {kk: _num(vv) for kk, vv in v.items() if _num(vv) is not None} for k, v in list(tables.items())[:3]}
    plotted = {k: v for k, v in plotted.items() if v}
    if plotted:
        fig, axes = _figure(4.2 * len(plotted), 0.8 + 0.3 * max(len(v) for v in plotted.values()), ncols=len(plotted))
        for ax, (k, v) in zip(axes[0], plotted.items()):
            ax.barh(list(v), list(v.values()), color="#2b6cb0")
            ax.axvline(0.726, color="#444", ls="--", lw=1)
            ax.set_xlim(0, 1)
            ax.set_title(f"{k} (dashed: InstructGPT 72.6%)", fontsize=9)
            ax.tick_params(labelsize=8)
        out.append(_png(fig, "labeler agreement"))
    for k, v in tables.items():
        out.append(f"<h3>{_e(k)}</h3>" + _table(["key", "value"], [[kk, _fmt(vv, True)] for kk, vv in v.items()]))
    return "".join(out)


def section_failure_bins(run: Run) -> str:
    if not run.results:
        return _na(run.results_na)
    bins = run.results.failure_bins
    if not bins:
        return _na("results.json has no failure bins")
    names = list(bins)
    kinds = list(dict.fromkeys(k for n in names for k in bins[n]))
    rows = []
    for kind in kinds:
        row = [kind]
        for n in names:
            b = bins[n].get(kind)
            if b is None:
                row.append("-")
                continue
            extra = f" (mean ratio {_fmt(b.mean_ratio)})" if _num(b.mean_ratio) is not None else ""
            row.append(f"{_fmt(b.metric, True)} of {_fmt(b.n)}{extra}")
        rows.append(row)
    out = [_table(["failure bin", *names], rows)]
    for kind in kinds:
        desc = next((bins[n][kind].description for n in names if kind in bins[n] and bins[n][kind].description),
                    "")
        parts = []
        for n in names:
            exs = bins[n][kind].examples if kind in bins[n] else []
            for ex in exs:
                members = ex.get("members")
                for m in members or [ex]:
                    if not isinstance(m, dict):
                        continue
                    detail = ", ".join(f"{k}={_fmt(v)}" for k, v in m.items()
                                       if k not in ("id", "prompt", "response"))
                    parts.append([n, m.get("id", ""), m.get("prompt", ""), m.get("response", ""), detail])
        body = (_table(["model", "id", "prompt", "response", "details"], parts, text_cols=(0, 1, 2, 3, 4))
                if parts else '<p class="note">no examples</p>')
        out.append(f"<details><summary>{_e(kind)}: {_e(desc)}</summary>{body}</details>")
    return "".join(out)


def section_top_reward(run: Run) -> str:
    rows = [r for r in run.samples if _num(r.get("rm_score")) is not None]
    if not rows:
        return _na("eval/samples.jsonl is missing or has no RM scores")
    models = sorted({str(r.get("model")) for r in rows})
    ref = (run.results.reference if run.results else None) or "sft"
    ppo = [m for m in models if m not in (ref, "base")] or models  # the trained models
    picked = sorted((r for r in rows if str(r.get("model")) in ppo), key=lambda r: -float(r["rm_score"]))[:TOP_K]
    table = []
    for r in picked:
        g = r.get("gold") or {}
        gold = ", ".join(f"{k[0].upper()}={_fmt(g.get(k))}" for k in ("attempts", "constraints", "refusal",
                                                                       "truthful", "degenerate") if k in g)
        table.append([r.get("model"), r.get("id"), r.get("prompt", ""), r.get("response", ""),
                      _fmt(r.get("rm_score")), _fmt(g.get("total")), gold])
    return (f'<p class="note">The {len(picked)} highest RM-scored responses of {_e(", ".join(ppo))}, with their gold '
            'scores (A attempts, C constraints, R refusal, T truthful, D degenerate penalty): read them for reward '
            'hacking.</p>' + _table(["model", "id", "prompt", "response", "RM score", "gold total", "gold criteria"],
                                    table, text_cols=(0, 1, 2, 3, 6)))


def render_compare(rows: list[dict[str, Any]]) -> str:
    """The method-comparison table, a summary over seeds and the gold/RM win-rate against KL plot
    (``preflab compare``). Rows tagged with a ``set`` (the report's merge of several comparison
    directories) get a column naming it, and their own series in the plot."""
    if not isinstance(rows, list) or not rows:
        return _na("no compare.json under the run (run `preflab compare RUN_DIR`)")
    ref = rows[0].get("label", "sft")
    sets = list(dict.fromkeys(r["set"] for r in rows if r.get("set")))
    several = len(sets) > 1
    table = []
    for r in rows:
        ci = r.get("gold_ci") or [None, None]
        win = "(reference)" if r.get("gold_winrate") is None else \
            f"{_fmt(r['gold_winrate'], True)} [{_fmt(ci[0], True)}, {_fmt(ci[1], True)}]"
        table.append(([r.get("set", "")] if several else []) + [
            r.get("label"), "" if r.get("seed") is None else r["seed"], win, _fmt(r.get("rm_winrate"), True),
            _fmt(r.get("kl")), _fmt(r.get("mean_words")), _fmt(r.get("constraint_rate"), True),
            _fmt(r.get("refuses_harmful"), True), _fmt(r.get("over_refusal"), True), _fmt(r.get("gold_score")),
            _fmt(r.get("seconds"), digits=4)])
    lead = ["comparison"] if several else []
    html_table = _table(lead + ["cell", "seed", f"gold win-rate vs {ref} [95% CI]", "RM win-rate", "KL (nats)",
                                "words", "follows constraints", "refuses harmful", "over-refusal", "gold score",
                                "seconds"], table, text_cols=(0, 1) if several else (0,))
    summary = [(name, s) for name in (sets or [""]) for s in seed_summary([r for r in rows if r.get("set", "") == name])
               if len(s["seeds"]) > 1]
    if summary:
        html_table += '<p class="note">Over seeds: a gain is claimed only where every seed\'s interval lies above ' \
            '50%.</p>' + _table(
                lead + ["cell", "seeds", "mean gold win-rate", "lowest-highest", "lowest interval bound",
                        "seeds above 50%", "mean KL", "mean words", "follows constraints"],
                [([name] if several else []) + [
                    s["label"], ",".join(map(str, s["seeds"])), _fmt(s["gold_winrate_mean"], True),
                    f"{_fmt(s['gold_winrate_min'], True)}-{_fmt(s['gold_winrate_max'], True)}",
                    _fmt(s["lowest_ci_low"], True), f"{s['seeds_above_half']}/{len(s['seeds'])}", _fmt(s["kl_mean"]),
                    _fmt(s["mean_words_mean"]), _fmt(s["constraint_rate_mean"], True)] for name, s in summary],
                text_cols=tuple(range(len(lead) + 2)) + (len(lead) + 3, len(lead) + 5))
    cells = [r for r in rows if r.get("gold_winrate") is not None and _num(r.get("kl")) is not None]
    if not cells:
        return html_table
    fig, ax = _figure(10.0, 4.2)
    ax = ax[0][0]

    def series(r: dict[str, Any]) -> str:
        return str(r.get("method")) + (f" ({r['set']})" if several and r.get("set") != "compare" else "")

    for i, m in enumerate(sorted({series(r) for r in cells})):
        mine = sorted((r for r in cells if series(r) == m), key=lambda r: r["kl"])
        color = f"C{i}"
        ax.errorbar([r["kl"] for r in mine], [r["gold_winrate"] for r in mine],
                    yerr=[[r["gold_winrate"] - r["gold_ci"][0] for r in mine],
                          [r["gold_ci"][1] - r["gold_winrate"] for r in mine]],
                    fmt="o-", color=color, capsize=3, label=f"{m}: gold")
        rm = [r for r in mine if _num(r.get("rm_winrate")) is not None]
        ax.plot([r["kl"] for r in rm], [r["rm_winrate"] for r in rm], "s--", color=color, alpha=0.6,
                label=f"{m}: reward model")
    ax.axhline(0.5, color="#444", lw=1, ls=":")
    ax.set_xlabel(f"KL to {ref} (nats, measured on each model's samples)")
    ax.set_ylabel(f"win-rate against {ref}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, not on them
    return ('<p class="note">Each point is one trained model (method, setting, seed), judged against the same '
            f'{_e(ref)} samples on the same held-out prompts. Over-optimisation shows as the reward model\'s win-rate '
            'rising with KL while the gold judge\'s levels off or falls.</p>'
            + html_table + _png(fig, "win-rate against KL"))


def write_compare_html(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """A standalone page with ``render_compare`` (written atomically)."""
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>preflab compare</title>"
            f"<style>{CSS}</style></head><body><h1>preflab compare</h1>{render_compare(rows)}</body></html>\n")
    atomic_write_text(Path(path), page)
    return Path(path)


def section_compare(run: Run) -> str:
    return render_compare(run.compare)


def render_audit(report: Any) -> str:
    """The report section (HTML) of an ``audit.json``."""
    if not isinstance(report, dict):
        return _na("audit/audit.json is missing (run `preflab audit RUN_DIR`)")
    flagged = report.get("flagged") or []
    head = (f'<p class="note">Exploits the reward model prefers to a normal answer more often than the gold judge '
            f'does: <b>{", ".join(flagged) if flagged else "none"}</b>.</p>')
    ex = _table(["exploit", "what", "n", "RM prefers [95% CI]", "gold prefers", "RM delta", "gold delta", "flagged"],
                [[e["exploit"], e["description"], e["n"],
                  f"{_fmt(e['rm_prefers'], True)} [{_fmt(e['rm_prefers_ci'][0], True)}, "
                  f"{_fmt(e['rm_prefers_ci'][1], True)}]", _fmt(e["gold_prefers"], True), _fmt(e["rm_score_delta"]),
                  _fmt(e["gold_delta"]), "yes" if e["flagged"] else ""] for e in report.get("exploits", [])],
                text_cols=(0, 1))
    corr = _table(["source", "model", "n", "KL", "rho(RM, gold)", "rho(RM, length)", "rho(gold, length)"],
                  [[c["source"], c["model"], c["n"], _fmt(c["kl"]), _fmt(c["rho_rm_gold"]), _fmt(c["rho_rm_length"]),
                    _fmt(c["rho_gold_length"])] for c in report.get("correlations", [])], text_cols=(0, 1))
    top = _table(["model", "prompt", "response", "RM", "gold", "flags"],
                 [[t["model"], t["prompt"], t["response"], _fmt(t["rm_score"]), _fmt(t["gold_total"]),
                   ", ".join(t["flags"])] for t in report.get("top_responses", [])], text_cols=(0, 1, 2, 5))
    return (head + "<h3>Exploit probes</h3>" + ex + "<h3>Rank correlations on policy samples, by KL</h3>" + corr
            + "<h3>Top RM-scored policy responses</h3>" + top + _render_uncertainty(report.get("uncertainty")))


def _render_uncertainty(u: Any) -> str:
    """The audit's reward-model ensemble part: mean uncertainty per model, the most uncertain samples."""
    if not isinstance(u, dict):
        return ""
    per_model = _table(["model", "n", "mean std", "max std"],
                       [[m["model"], m["n"], _fmt(m["mean_std"]), _fmt(m["max_std"])] for m in u["by_model"]])
    top = _table(["model", "prompt", "response", "std", "mean", "RM", "gold"],
                 [[t["model"], t["prompt"], t["response"], _fmt(t["std"]), _fmt(t["mean"]), _fmt(t["rm_score"]),
                   _fmt(t["gold_total"])] for t in u["most_uncertain"]], text_cols=(0, 1, 2))
    return (f'<h3>Reward-model ensemble: uncertainty</h3><p class="note">Std over the {len(u["members"])} reward '
            "models of the normalised reward, per evaluated sample: where they disagree, the reward a policy is "
            "paid is least agreed on.</p>" + per_model + "<h4>Most uncertain samples</h4>" + top)


def section_audit(run: Run) -> str:
    return render_audit(run.audit)


def section_provenance(run: Run) -> str:
    """Where each stage's numbers come from: seed, status, versions, git commit, host, times, and the
    pipeline's resolved config (every stage's own config is in its manifest.json)."""
    manifests = []
    for path in sorted(run.dir.glob("*/manifest.json")):
        m = _json(path)
        if isinstance(m, dict) and m.get("stage"):
            manifests.append((path.parent.name, m))
    if not manifests:
        return _na("no stage manifest.json in the run directory")
    rows = [[name, m.get("stage"), m.get("status"), m.get("seed"), (m.get("git_commit") or "")[:12],
             m.get("host") if isinstance(m.get("host"), str) else (m.get("host") or {}).get("name", ""),
             (m.get("versions") or {}).get("torch", ""), (m.get("versions") or {}).get("transformers", ""),
             m.get("started_at", ""), m.get("finished_at", "")] for name, m in manifests]
    table = _table(["run", "stage", "status", "seed", "git commit", "host", "torch", "transformers", "started",
                    "finished"], rows, text_cols=(0, 1, 2, 4, 5, 6, 7, 8, 9))
    cfg = _json(run.dir / "pipeline_config.json")
    shown = f"<details><summary>pipeline config</summary><pre>{_e(json.dumps(cfg, indent=2))}</pre></details>" \
        if isinstance(cfg, dict) else ""
    return table + shown


def section_timings(run: Run) -> str:
    p = run.pipeline
    steps = p.get("steps") if isinstance(p, dict) else p
    if not isinstance(steps, list) or not steps:
        return _na("pipeline.json is missing")
    rows = [[s.get("stage", s.get("step", "?")), _fmt(_num(s.get("seconds")), digits=4)]
            for s in steps if isinstance(s, dict)]
    total = sum(_num(s.get("seconds")) or 0.0 for s in steps if isinstance(s, dict))
    rows.append(["total", _fmt(total, digits=5)])
    return _table(["stage", "seconds"], rows)


SECTIONS: tuple[tuple[str, str, Callable[[Run], str]], ...] = (
    ("models", "Models", section_models),
    ("win-rate", "Win-rate against the reference", section_win_rate),
    ("ppo-curves", "PPO curves", section_ppo_curves),
    ("gold-vs-kl", "Gold score against KL", section_gold_vs_kl),
    ("rounds", "Rounds", section_rounds),
    ("lengths", "Length distributions", section_lengths),
    ("refusals", "Refusal rates", section_refusals),
    ("alignment-tax", "Alignment tax against the reference", section_alignment_tax),
    ("rm-reliability", "Reward model reliability", section_rm_reliability),
    ("agreement", "Labeler agreement", section_agreement),
    ("failure-bins", "Failure bins", section_failure_bins),
    ("top-reward", "Top-reward samples for manual review", section_top_reward),
    ("compare", "Methods compared (preflab compare)", section_compare),
    ("audit", "Reward-hacking audit (preflab audit)", section_audit),
    ("timings", "Stage timings", section_timings),
    ("provenance", "Provenance", section_provenance),
)


def render_report(run_dir: str | Path) -> str:
    """The report page of ``run_dir`` as an HTML string."""
    run_dir = Path(run_dir)
    run = Run(run_dir)
    parts = []
    for anchor, title, build in SECTIONS:
        try:
            body = build(run)
        except _MALFORMED as e:  # a file of an unexpected shape: say so, keep the rest of the page
            body = _na(f"malformed input ({type(e).__name__}: {e})")
        parts.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>')
    nav = "".join(f'<li><a href="#{a}">{_e(t)}</a></li>' for a, t, _ in SECTIONS)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>preflab report: {_e(run_dir.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>preflab report: {_e(run_dir.name)}</h1><nav><ul>{nav}</ul></nav>{''.join(parts)}"
            "</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path."""
    out = Path(run_dir) / "report.html"
    atomic_write_text(out, render_report(run_dir))
    return out


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def cli(run_dir: str) -> None:
    """Write RUN_DIR/report.html: one self-contained page (tables, embedded plots, no network) with the
    models table, win-rates, PPO curves, gold against KL, lengths, refusals, RM reliability, labeler
    agreement, failure bins, the top-reward samples and stage timings.

    Example: preflab report runs/demo"""
    from preflab.run import check_run_dir

    check_run_dir(run_dir)  # a directory that is not a run is an error, not an empty report
    path = write_report(run_dir)
    click.echo(f"wrote {path}")
