"""Reward-model evaluation: held-out pairwise accuracy (overall, per category and slice), ECE
with the reliability table, temperature scaling, the most confidently wrong pairs, and the
labelers' own agreement on the same prompts (the ceiling RM accuracy reads against). Of an
ensemble (several reward models): the same of the members' mean, and each response's uncertainty
(``ensemble_report``).

Used by ``stages/reward.py`` after training and by ``preflab rm-eval``.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import click
import numpy as np
import torch

from preflab.data.jsonl import atomic_write_text
from preflab.errors import DataError
from preflab.rl.calibration import expected_calibration_error, fit_temperature, reliability_by_margin
from preflab.rl.ranking import batched_kway_ranking_loss
from preflab.rl.stats import ensemble_spread, most_uncertain, wilson_interval

if TYPE_CHECKING:
    from preflab.data.rankings import Group


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _accuracy(correct: np.ndarray) -> dict[str, Any]:
    n = int(correct.size)
    lo, hi = wilson_interval(float(correct.sum()), n) if n else (math.nan, math.nan)
    return {"n_pairs": n, "accuracy": float(correct.mean()) if n else math.nan, "ci": [lo, hi]}


def _pair_signs(ranks: list[int]) -> np.ndarray:
    try:
        from preflab.feedback.agreement import pair_labels
    except ImportError:  # pragma: no cover - the data engine may be absent from a build
        def pair_labels(r):
            r = np.asarray(r, dtype=float)
            i, j = np.triu_indices(r.shape[-1], 1)
            return np.sign(r[..., j] - r[..., i])
    return pair_labels(np.asarray(ranks, dtype=float))


def _same_candidates(g: Group) -> str:
    """One key for the rankings of one prompt's same candidates (by any labeler, in any order)."""
    return json.dumps([g.prompt, sorted(g.responses)])


def labeler_agreement(groups: list[Group]) -> dict[str, Any] | None:
    """Pairwise agreement between labelers who ranked the same prompt and responses (ties excluded),
    the ceiling against which RM accuracy reads (InstructGPT: 72.6%, docs/reference.md §1.5, §3.5)."""
    by_key: dict[str, list[tuple[int, Group]]] = defaultdict(list)
    for i, g in enumerate(groups):
        if g.labeler is not None and len(set(g.responses)) == len(g.responses):
            by_key[_same_candidates(g)].append((i, g))
    agree = comparable = 0
    shared: list[int] = []
    for items in by_key.values():
        if len({g.labeler for _, g in items}) < 2:
            continue
        texts = sorted(items[0][1].responses)
        labels = []
        for _, g in items:
            rank_of = dict(zip(g.responses, g.ranks))
            labels.append((g.labeler, _pair_signs([rank_of[t] for t in texts])))
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                if labels[a][0] == labels[b][0]:
                    continue
                ok = (labels[a][1] != 0) & (labels[b][1] != 0)
                agree += int((labels[a][1][ok] == labels[b][1][ok]).sum())
                comparable += int(ok.sum())
        shared += [i for i, _ in items]
    if not comparable:
        return None
    return {"n_prompts": len({json.dumps(groups[i].prompt) for i in shared}), "n_pairs": comparable,
            "agreement": agree / comparable, "groups": shared}


def gold_agreement(groups: list[Group], gold: list[list[float]],
                   scores: dict[str, list[list[float]]] | None = None) -> dict[str, Any]:
    """The held-out rankings read against the gold judge's scores of the same responses (``gold[i][j]``:
    response j of group i), which simulated labelers perceive through noise and biases.

    ``decided``: the share of the labelers' strict pairs whose two responses the gold judge scores
    differently; on the rest the labelers' order is noise and bias, which no reward model can learn.
    ``labelers``: how often the labelers' order agrees with the judge's on the pairs it decides.
    ``models[name]``: how often each model's scores order the judge-decided pairs as the judge does,
    each distinct pair of responses once however many labelers ranked it (a tie is wrong)."""
    labeler_ok: list[bool] = []
    strict = 0
    seen: set[str] = set()
    pairs: list[tuple[int, int, int]] = []  # (group, i, j) with gold[i] > gold[j], each once
    for gi, g in enumerate(groups):
        for w, v in g.pairs():
            strict += 1
            if gold[gi][w] != gold[gi][v]:
                labeler_ok.append(gold[gi][w] > gold[gi][v])
        key = _same_candidates(g)
        if key in seen:
            continue
        seen.add(key)
        pairs += [(gi, i, j) for i in range(len(g.responses)) for j in range(len(g.responses))
                  if gold[gi][i] > gold[gi][j] and g.responses[i] != g.responses[j]]
    out: dict[str, Any] = {"decided": len(labeler_ok) / strict if strict else math.nan, "n_strict_pairs": strict,
                           "labelers": _accuracy(np.array(labeler_ok, dtype=bool))}
    out["models"] = {name: _accuracy(np.array([s[gi][i] > s[gi][j] for gi, i, j in pairs], dtype=bool))
                     for name, s in (scores or {}).items()}
    return out


def gold_totals(source: str, split: str | None, groups: list[Group]) -> list[list[float]] | None:
    """The gold judge's total of every response of ``groups``, read from ``source`` (``store:PATH``)
    ``split``, or None when that is not a store or a prompt has no suite record to judge by (one a
    person added, or an imported file)."""
    if not source.startswith("store:"):
        return None
    from preflab.feedback.rubric import judge
    from preflab.feedback.store import PreferenceStore

    with PreferenceStore(source.removeprefix("store:")) as store:
        suite = {p.text: p.meta.get("suite") for p in store.prompts(split=split)}
    if not all(suite.get(g.prompt) for g in groups):
        return None
    return [[judge(suite[g.prompt], text).total for text in g.responses] for g in groups]


def evaluate(groups: list[Group], scores: list[list[float]], *, n_bins: int = 10,
             temperature_scaling: bool = True, worst_k: int = 20, seed: int = 0) -> dict[str, Any]:
    """Held-out metrics of raw scores (gain and bias do not change who wins; raw margins are the
    trained log-odds). Returns a JSON-ready report; ``report_metrics`` flattens it to ``rm/...``."""
    rows = [(gi, w, v, s[w] - s[v]) for gi, (g, s) in enumerate(zip(groups, scores)) for w, v in g.pairs()]
    if not rows:
        raise DataError("the held-out set has no untied pair to evaluate")
    margin = np.array([m for *_, m in rows])
    correct = margin > 0  # a tie in reward is not correct (TRL's reward accuracy)
    report: dict[str, Any] = {"n_groups": len(groups), **_accuracy(correct)}
    rewards = [torch.tensor(s) for s in scores]
    per_prompt = [float(batched_kway_ranking_loss(r[None], torch.tensor(g.ranks)[None], torch.ones(1, len(r)))
                        .per_prompt_loss[0]) for r, g in zip(rewards, groups) if g.pairs()]
    report["loss"] = float(np.mean(per_prompt))
    for attr in ("category", "slice"):
        names = [getattr(groups[gi], attr) for gi, *_ in rows]
        if any(n is not None for n in names):
            arr = np.array([str(n) for n in names])
            report[f"by_{attr}"] = {n: _accuracy(correct[arr == n]) for n in sorted(set(arr))}
    # Calibration of p(chosen > rejected) = sigmoid(margin) (docs/reference.md §3): ECE on max(p, 1-p), and the
    # N+ reliability table of accuracy per 0.5-wide bin of |margin|.
    cal = expected_calibration_error(_sigmoid(margin), np.ones_like(margin), n_bins)
    report["ece"] = {"ece": cal.ece, "mce": cal.mce, "table": [b._asdict() for b in cal.table]}
    report["reliability"] = [b._asdict() for b in reliability_by_margin(margin)]
    # Temperature scaling (Gao et al. §2.2): fit T on half the prompts, report ECE on the other half.
    fit_groups = list(range(len(groups)))
    random.Random(seed).shuffle(fit_groups)
    fit_set = set(fit_groups[:len(groups) // 2])
    in_fit = np.array([gi in fit_set for gi, *_ in rows])
    if temperature_scaling and in_fit.any() and (~in_fit).any():
        t = fit_temperature(margin[in_fit], np.ones(int(in_fit.sum())))
        test = margin[~in_fit]
        report["temperature"] = {
            "T": t, "n_fit": int(in_fit.sum()), "n_test": int(test.size),
            "ece_before": expected_calibration_error(_sigmoid(test), np.ones_like(test), n_bins).ece,
            "ece_after": expected_calibration_error(_sigmoid(test / t), np.ones_like(test), n_bins).ece}
    worst = sorted(range(len(rows)), key=lambda i: margin[i])[:worst_k]
    report["worst"] = [{"prompt": groups[rows[i][0]].prompt, "chosen": groups[rows[i][0]].responses[rows[i][1]],
                        "rejected": groups[rows[i][0]].responses[rows[i][2]], "margin": float(margin[i]),
                        "p_wrong": float(_sigmoid(-margin[i])), "category": groups[rows[i][0]].category}
                       for i in worst if margin[i] <= 0]
    agreement = labeler_agreement(groups)
    if agreement is not None:
        shared = set(agreement.pop("groups"))
        on_shared = np.array([gi in shared for gi, *_ in rows])
        agreement["rm_accuracy"] = float(correct[on_shared].mean())
        report["labelers"] = agreement
    return report


def ensemble_report(groups: list[Group], member_scores: list[list[list[float]]], members: list[str], *,
                    top_k: int = 20) -> dict[str, Any]:
    """An ensemble on a held-out set, from each member's normalised scores (``member_scores[m][g][i]``:
    member m, group g, response i). Per response: the members' mean and std, the std being the
    uncertainty. Overall: accuracy of the mean and of each member, the mean uncertainty, and the
    accuracy of the mean on the most and on the least uncertain half of the pairs (a pair's uncertainty
    is the mean of its two responses'; with an odd count the middle pair is in neither half). An
    ensemble whose disagreement flags its errors is less accurate on the uncertain half."""
    flat = np.array([[x for g in m for x in g] for m in member_scores], dtype=np.float64)  # (M, responses)
    mean, std = ensemble_spread(flat)
    start = np.cumsum([0] + [len(g.responses) for g in groups])
    pairs = [(start[gi] + w, start[gi] + v) for gi, g in enumerate(groups) for w, v in g.pairs()]
    if not pairs:
        raise DataError("the held-out set has no untied pair to evaluate")
    win, lose = (np.array(c) for c in zip(*pairs))
    correct = mean[win] > mean[lose]
    order = most_uncertain((std[win] + std[lose]) / 2, len(pairs))
    half = len(pairs) // 2
    where = [(gi, i) for gi, g in enumerate(groups) for i in range(len(g.responses))]

    def sample(j: int) -> dict[str, Any]:
        gi, i = where[j]
        return {"group": gi, "response": i, "mean": float(mean[j]), "std": float(std[j]),
                "scores": flat[:, j].tolist()}

    return {"members": list(members), "n_members": len(members), **_accuracy(correct),
            "member_accuracy": [float((m[win] > m[lose]).mean()) for m in flat],
            "mean_uncertainty": float(std.mean()),
            "most_uncertain_half": _accuracy(correct[order[:half]]),
            "least_uncertain_half": _accuracy(correct[order[len(order) - half:]]),
            "most_uncertain": [{**sample(j), "prompt": groups[where[j][0]].prompt,
                                "text": groups[where[j][0]].responses[where[j][1]]}
                               for j in most_uncertain(std, top_k)],
            "samples": [sample(j) for j in range(len(where))]}


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The flat ``rm/...`` metrics of an ``evaluate`` report (for metrics.jsonl)."""
    m = {"rm/accuracy": report["accuracy"], "rm/loss": report["loss"], "rm/pairs": report["n_pairs"],
         "rm/ece": report["ece"]["ece"], "rm/mce": report["ece"]["mce"]}
    for attr in ("category", "slice"):
        for name, acc in report.get(f"by_{attr}", {}).items():
            m[f"rm/accuracy/{attr}/{name}"] = acc["accuracy"]
    if "temperature" in report:
        t = report["temperature"]
        m.update({"rm/temperature": t["T"], "rm/ece_test_before": t["ece_before"], "rm/ece_test_after": t["ece_after"]})
    if "labelers" in report:
        m.update({"rm/labeler_agreement": report["labelers"]["agreement"],
                  "rm/accuracy_multi_labeled": report["labelers"]["rm_accuracy"]})
    return m


def print_report(report: dict[str, Any], console=None) -> None:
    """Rich tables: summary, accuracy per category/slice, ECE bins, reliability by margin, worst pairs."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    lo, hi = report["ci"]
    summary = Table(title="reward model, held-out")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("pairs / prompts", f"{report['n_pairs']} / {report['n_groups']}")
    summary.add_row("accuracy (95% CI)", f"{report['accuracy']:.3f} ({lo:.3f}-{hi:.3f})")
    summary.add_row("loss (Eq. 1)", f"{report['loss']:.4f}")
    summary.add_row("ECE / MCE", f"{report['ece']['ece']:.4f} / {report['ece']['mce']:.4f}")
    if "temperature" in report:
        t = report["temperature"]
        summary.add_row("temperature (fit half)", f"{t['T']:.3f}")
        summary.add_row("ECE other half before -> after", f"{t['ece_before']:.4f} -> {t['ece_after']:.4f}")
    if "labelers" in report:
        la = report["labelers"]
        summary.add_row("labeler agreement (ceiling)", f"{la['agreement']:.3f} on {la['n_pairs']} pairs")
        summary.add_row("RM accuracy, same prompts", f"{la['rm_accuracy']:.3f}")
    console.print(summary)
    if "gold" in report:
        print_gold(report["gold"], console)
    if "ensemble" in report:
        print_ensemble(report["ensemble"], console)
    for attr in ("category", "slice"):
        if f"by_{attr}" in report:
            t = Table(title=f"accuracy by {attr}")
            for col in (attr, "pairs", "accuracy", "95% CI"):
                t.add_column(col, justify="left" if col == attr else "right")
            for name, a in report[f"by_{attr}"].items():
                t.add_row(name, str(a["n_pairs"]), f"{a['accuracy']:.3f}", f"{a['ci'][0]:.3f}-{a['ci'][1]:.3f}")
            console.print(t)
    t = Table(title="expected calibration error: confidence bins")
    for col in ("confidence", "pairs", "mean conf", "accuracy"):
        t.add_column(col, justify="right")
    for b in report["ece"]["table"]:
        t.add_row(f"{b['lo']:.2f}-{b['hi']:.2f}", str(b["count"]), f"{b['mean_confidence']:.3f}", f"{b['accuracy']:.3f}")
    console.print(t)
    t = Table(title="reliability by |reward difference| (perfect: sigmoid(mid))")
    for col in ("|r_c - r_r|", "pairs", "accuracy", "sigmoid(mid)"):
        t.add_column(col, justify="right")
    for b in report["reliability"]:
        t.add_row(f"{b['lo']:.1f}-{b['hi']:.1f}", str(b["count"]), f"{b['accuracy']:.3f}", f"{b['expected']:.3f}")
    console.print(t)
    if report["worst"]:
        t = Table(title="most confidently wrong pairs")
        for col in ("margin", "prompt", "chosen (by label)", "rejected"):
            t.add_column(col, overflow="fold", justify="right" if col == "margin" else "left")
        for w in report["worst"]:
            t.add_row(f"{w['margin']:.2f}", *(str(w[k])[:80] for k in ("prompt", "chosen", "rejected")))
        console.print(t)


def print_gold(gold: dict[str, Any], console) -> None:
    """The held-out pairs against the gold judge (``gold_agreement``)."""
    from rich.table import Table

    t = Table(title=f"against the gold judge: it scores {gold['decided']:.1%} of the labelers' "
                    f"{gold['n_strict_pairs']} pairs unequally")
    for col in ("who", "pairs", "agrees with the judge", "95% CI"):
        t.add_column(col, justify="left" if col == "who" else "right")
    for who, a in [("labelers", gold["labelers"]), *gold["models"].items()]:
        t.add_row(who, str(a["n_pairs"]), f"{a['accuracy']:.3f}", f"{a['ci'][0]:.3f}-{a['ci'][1]:.3f}")
    console.print(t)


def print_ensemble(ens: dict[str, Any], console) -> None:
    """The ensemble's summary (accuracy of the mean and of each member, uncertainty, the accuracy of the
    mean on the most and least uncertain half of the pairs) and its most uncertain responses."""
    from rich.table import Table

    t = Table(title=f"reward-model ensemble: {ens['n_members']} members, uncertainty = std of the normalised reward")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("accuracy of the mean", f"{ens['accuracy']:.3f}")
    t.add_row("accuracy of each member", " ".join(f"{a:.3f}" for a in ens["member_accuracy"]))
    t.add_row("mean uncertainty", f"{ens['mean_uncertainty']:.4f}")
    for key, label in (("most_uncertain_half", "most"), ("least_uncertain_half", "least")):
        h = ens[key]
        t.add_row(f"accuracy, {label} uncertain half", f"{h['accuracy']:.3f} of {h['n_pairs']} pairs")
    console.print(t)
    if ens["most_uncertain"]:
        t = Table(title="most uncertain responses")
        for col in ("std", "mean", "prompt", "response"):
            t.add_column(col, overflow="fold", justify="right" if col in ("std", "mean") else "left")
        for u in ens["most_uncertain"]:
            t.add_row(f"{u['std']:.3f}", f"{u['mean']:.3f}", str(u["prompt"])[:80], str(u["text"])[:80])
        console.print(t)


def member_scores(spec: str, groups: list[Group], max_length: int, batch_size: int, bf16: bool, *,
                  normalise: bool) -> list[list[list[float]]]:
    """One reward model's scores of every response of ``groups`` (raw, or with its stored gain and
    bias), as one member, or a member per head of a model with several (``rm.train.heads``; a
    one-model ensemble). Rankings of the same prompt and candidates in the same order (several
    labelers') are scored once."""
    from preflab import models
    from preflab.data.rankings import encode_groups
    from preflab.reward_heads import head_mode
    from preflab.scoring import reward_norm, score_groups

    keys = [json.dumps([g.prompt, g.responses]) for g in groups]
    first: dict[str, int] = {}  # each key's first group, in order
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    tokenizer = models.load_tokenizer(spec)
    model = models.load_reward_model(spec)
    with head_mode(model, "members" if normalise else "raw") as heads:
        unique = score_groups(model, encode_groups(tokenizer, [groups[i] for i in first.values()], max_length),
                              tokenizer.pad_token_id, batch_size=batch_size, bf16=bf16)
    by_key = dict(zip(first, unique))
    if heads > 1:  # normalised per head inside the heads (members), or raw
        return [[[x[m] for x in by_key[k]] for k in keys] for m in range(heads)]
    gain, bias = reward_norm(model) if normalise else (1.0, 0.0)
    return [[[gain * x + bias for x in by_key[k]] for k in keys]]


def rm_scores(spec: str, groups: list[Group], max_length: int, batch_size: int, bf16: bool) -> list[list[float]]:
    """A reward model's score of every response of ``groups``: raw from one head; from several heads
    their mean normalised score, the model's score everywhere else too."""
    from preflab.models import saved_heads

    if saved_heads(spec) == 1:
        return member_scores(spec, groups, max_length, batch_size, bf16, normalise=False)[0]
    members = member_scores(spec, groups, max_length, batch_size, bf16, normalise=True)
    return [list(np.mean([m[g] for m in members], axis=0)) for g in range(len(groups))]


@click.command("rm-eval")
@click.option("--model", "model_specs", required=True, multiple=True,
              help="Reward model directory (from `preflab rm`); repeat it for an ensemble (the members' mean is "
                   "evaluated, with each response's uncertainty: the std of the members' normalised rewards).")
@click.option("--data", required=True, help="Held-out grouped K-way or pairs JSONL, or store:PATH.")
@click.option("--split", default=None, help="Store split (store: sources only; default: all).")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--max-length", default=384, show_default=True, type=click.IntRange(16))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--n-bins", default=10, show_default=True, type=click.IntRange(2))
@click.option("--worst-k", default=20, show_default=True, type=click.IntRange(0),
              help="Most confidently wrong pairs listed (and, of an ensemble, most uncertain responses).")
@click.option("--temperature-scaling/--no-temperature-scaling", default=True, show_default=True)
@click.option("--bf16/--no-bf16", default=False, show_default=True)
@click.option("--threads", default=None, type=click.IntRange(1))
def cli(model_specs, data, split, out_path, max_length, batch_size, n_bins, worst_k, temperature_scaling,
        bf16, threads):
    """Held-out accuracy (overall, per category and slice), ECE, reliability, temperature scaling,
    the most confidently wrong pairs and labeler agreement of a reward model, or of an ensemble's
    mean with each response's uncertainty and the accuracy on the most and least uncertain half of
    the pairs; prints tables.

    \b
    Examples:
      preflab rm-eval --model runs/demo/rm/model --data store:runs/demo/store.sqlite --split rm
      preflab rm-eval --model runs/demo/rm/model --model runs/demo/rm-2/model --data held.jsonl --out e.json
    """
    from preflab import models
    from preflab.feedback.ranking_sources import read_groups

    models.set_threads(threads)
    groups = [g for g in read_groups(data, None, split) if g.pairs()]
    heads = {spec: models.saved_heads(spec) for spec in model_specs}
    names = [spec if heads[spec] == 1 else f"{spec}#head{m}" for spec in model_specs for m in range(heads[spec])]
    ensemble = len(names) > 1  # an ensemble (models, or heads) is read in normalised rewards, one model in raw
    members = [m for spec in model_specs for m in member_scores(spec, groups, max_length, batch_size, bf16,
                                                                normalise=ensemble)]
    scores = [list(np.mean([m[g] for m in members], axis=0)) for g in range(len(groups))] if ensemble else members[0]
    report = evaluate(groups, scores, n_bins=n_bins, temperature_scaling=temperature_scaling, worst_k=worst_k)
    if ensemble:
        report["ensemble"] = ensemble_report(groups, members, names, top_k=worst_k)
    gold = gold_totals(data, split, groups)
    if gold is not None:  # a store of suite prompts: read the pairs against the gold judge too
        report["gold"] = gold_agreement(groups, gold, {**dict(zip(names, members)),
                                                       **({"mean": scores} if ensemble else {})})
    print_report(report)
    if out_path:
        atomic_write_text(out_path, json.dumps(report, indent=2, default=str))
        click.echo(f"wrote {out_path}")
