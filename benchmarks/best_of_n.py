"""What a run's reward model buys without RL: best-of-N sampling from the SFT model, judged by gold.

For each of the first ``--limit`` prompts of the eval split, ``--n`` fresh samples from
``RUN/sft/model`` (seeds 1..N; the evaluation's own SFT sample used seed 0) at the evaluation's
settings. Reported against that evaluation sample (``RUN/eval/generations/sft.jsonl``; ties
count half, Wilson 95%): one random sample (the noise floor), the sample each reward model
scores highest (best-of-N, KL to SFT at most log N - (N-1)/N nats), best-of-2, and the sample
the gold judge itself scores highest (the ceiling of any reranker). Read next to PPO-ptx's
win-rate in ``RUN/eval/results.json``: PPO at a larger KL doing worse than best-of-N with the
same reward model is an optimiser that spends KL on the RM's errors.

    .venv/bin/python benchmarks/best_of_n.py --run runs/demo                      # the run's RM
    .venv/bin/python benchmarks/best_of_n.py --run runs/demo --rm runs/rm-4ep/model   # others too

Generations are cached in ``RUN/eval/best_of_n/`` and reused by a rerun. Its peer is the run's
own RL (PPO and PPO-ptx rows from ``RUN/eval/results.json``, where the run has them; "not in this
run" otherwise), not an outside tool. The JSON goes to ``RUN/eval/best_of_n.json`` unless
``--out`` says otherwise. ``--smoke`` needs no run: it makes one in a temporary folder
from tiny random models (SFT and RM), 40 suite prompts and a fixed reference answer.

    .venv/bin/python benchmarks/best_of_n.py --smoke     # seconds; JSON in benchmarks/results/smoke/
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402


def smoke_run(where: Path) -> Path:
    """A run directory with what this script reads: tiny SFT and RM models, 40 suite prompts, the
    evaluation's settings and its SFT answers (one fixed text), no results.json."""
    from preflab import models
    from preflab.data.suite import write_suite

    write_suite(where / "data/prompts.jsonl", seed=0, n=40)
    models.save_model(models.load_policy("tiny:"), models.load_tokenizer("tiny:"), where / "sft/model")
    models.save_model(models.load_scorer("tiny:1"), models.load_tokenizer("tiny:"), where / "rm/model",
                      reward_model=True)
    (where / "pipeline_config.json").write_text(json.dumps(
        {"eval": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8, "bf16": False}}))
    from preflab.data.suite.schema import load_prompts

    (where / "eval/generations").mkdir(parents=True)
    (where / "eval/generations/sft.jsonl").write_text("".join(
        json.dumps({"id": p.id, "response": "I am not sure."}) + "\n"
        for p in load_prompts(where / "data/prompts.jsonl") if p.split == "eval"))
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a pipeline run directory")
    ap.add_argument("--rm", action="append", default=None, help="reward model directory (repeatable; "
                                                                  "default: RUN/rm/model)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--limit", type=int, default=300)
    common.add_options(ap)
    a = ap.parse_args()
    if a.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            a.run, a.n, a.limit = Path(tmp), 2, 4
            report(a)
    else:
        report(a)


def report(a: argparse.Namespace) -> None:
    record = common.start(a)
    if a.smoke:
        smoke_run(a.run)

    import numpy as np
    from rich.table import Table

    from preflab import models
    from preflab.data.suite.schema import load_prompts
    from preflab.evals.best_of_n import pick_best
    from preflab.evals.evaluate import _generate
    from preflab.evals.metrics import gold_win_rate
    from preflab.evals.results import WinRate
    from preflab.evals.results import load as load_results
    from preflab.feedback.rubric import judge_batch
    from preflab.run import table_console

    common.set_threads(a.threads)
    cfg = json.loads((a.run / "pipeline_config.json").read_text())["eval"]
    prompts = [p for p in load_prompts(a.run / "data/prompts.jsonl") if p.split == "eval"][:a.limit]
    by_id = {p.id: p for p in prompts}
    ref = {}
    for line in open(a.run / "eval/generations/sft.jsonl", encoding="utf-8"):
        row = json.loads(line)
        ref[row["id"]] = row["response"]
    spec = str(a.run / "sft/model")
    bf16 = cfg.get("bf16", True)
    tokenizer, model = models.load_tokenizer(spec), models.load_policy(spec, dtype="bf16" if bf16 else "fp32")
    model.eval()
    samples = []  # samples[s][i]: seed s + 1, prompt i
    for seed in range(1, a.n + 1):
        settings = {"spec": spec, "max_new_tokens": cfg["max_new_tokens"], "temperature": cfg["temperature"],
                    "seed": seed}
        cache = _generate(model, tokenizer, prompts, a.run / "eval/best_of_n" / f"sft-seed{seed}.jsonl", settings,
                          max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"],
                          batch_size=cfg["batch_size"], seed=seed, bf16=bf16, progress=True, label=f"seed {seed}")
        samples.append([cache[p.id]["response"] for p in prompts])
    del model

    def gold(texts: list[str]) -> np.ndarray:
        return np.array([j.total for j in judge_batch(by_id, [{"id": p.id, "response": t}
                                                             for p, t in zip(prompts, texts)])])

    ref_gold = gold([ref[p.id] for p in prompts])
    g = np.stack([gold(s) for s in samples])  # (N, prompts)
    cols = np.arange(len(prompts))
    def win(scores: np.ndarray) -> WinRate:
        return WinRate(**gold_win_rate(scores, ref_gold))

    rows: list[tuple[str, WinRate]] = [
        ("one random sample (seed 1)", win(g[0])),
        (f"gold's best of {a.n} (ceiling)", win(g.max(0))),
    ]
    for rm in a.rm or [str(a.run / "rm/model")]:
        # preflab.evals.best_of_n.pick_best: the RM's reward of (prompt, response, EOS) for every candidate
        rm_model = models.load_reward_model(rm, dtype="bf16" if bf16 else "fp32").eval()
        _, _, scores = pick_best(rm_model, models.load_tokenizer(rm), [p.prompt for p in prompts],
                                 [[samples[s][i] for s in range(a.n)] for i in range(len(prompts))],
                                 batch_size=cfg["batch_size"], bf16=bf16)
        del rm_model
        r = np.array(scores, dtype=float).T  # (N, prompts)
        rows.append((f"{rm}: best of {a.n}", win(g[r.argmax(0), cols])))
        if a.n > 2:
            rows.append((f"{rm}: best of 2", win(g[r[:2].argmax(0), cols])))
    results = (load_results(a.run / "eval/results.json").models if (a.run / "eval/results.json").is_file() else {})
    rows += [(f"{m} (RUN/eval/results.json)", results[m].win_rate) for m in ("ppo", "ppo_ptx") if m in results]
    t = Table(title=f"Gold win-rate vs the evaluation's SFT sample, {len(prompts)} eval prompts, "
                    f"T = {cfg['temperature']}, <= {cfg['max_new_tokens']} tokens")
    for c in ("policy", "win-rate [95% CI]", "wins / ties / losses"):
        t.add_column(c, justify="left" if c == "policy" else "right")
    for name, w in rows:
        t.add_row(name, f"{100 * w.rate:.1f}% [{100 * w.lo:.1f}, {100 * w.hi:.1f}]",
                  f"{w.wins} / {w.ties} / {w.losses}")
    missing = [m for m in ("ppo", "ppo_ptx") if m not in results]
    for m in missing:
        t.add_row(f"{m} (RUN/eval/results.json)", "not in this run", "")
    table_console().print(t)
    out = [{"config": name, "status": "ran", "win_rate": w.rate, "lo": w.lo, "hi": w.hi, "wins": w.wins,
            "ties": w.ties, "losses": w.losses} for name, w in rows]
    out += [common.not_run(f"{m} (RUN/eval/results.json)", "not in this run", status="not in this run")
            for m in missing]
    path = a.out or (common.out_path(a, "best_of_n") if a.smoke else a.run / "eval/best_of_n.json")
    common.write(path, "best_of_n", record, results=out,
                 workload={"run": "a tiny run made for --smoke" if a.smoke else str(a.run), "n": a.n,
                           "prompts": len(prompts), "rms": a.rm or ["RUN/rm/model"]})


if __name__ == "__main__":
    main()
