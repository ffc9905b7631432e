"""``preflab repro pack RUN_DIR`` and ``preflab repro verify ARCHIVE``: a run's reproducibility package.

``pack`` writes one ``.tar.gz`` holding ``repro.json`` and ``files/`` (copies of the run's
resolved configs and evaluation outputs). ``repro.json``::

    {"version": 1, "run_dir": ABS PATH, "created_at",
     "configs": [REL PATH, ...],                      # copied into files/
     "data": {REL PATH: sha256},                      # every data file of the run (jsonl, json, sqlite, yaml)
     "models": {REL PATH: model hash},                # every model directory (config.json), common.model_hash
     "suite": {"seed", "n"} | null,                   # from pipeline_config.json
     "eval": {"results": "files/eval/results.json", "bf16", "prompt_ids": [...], "prompts_file": REL | null},
     "pip_freeze": ["pkg==version", ...], "git": {"commit", "dirty"} | null,
     "hardware": {"platform", "machine", "cpus", "python", "torch", "cuda"}}

``verify`` re-hashes the data files (``eval/results.json`` and ``eval/samples.jsonl`` among them)
and models named in it (under the run directory, or ``--run-dir``), re-runs the evaluation with
the recorded models, prompts, seed and sampling settings, and compares every headline number with
its tolerance (``TOLERANCES``): a table of recorded vs reproduced, exit 0 when all reproduce and
every hash matches, else 1 (also when a changed file keeps the re-evaluation from running: the
table, then why).
"""

from __future__ import annotations

import io
import json
import platform
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from preflab.errors import PreflabError
from preflab.release.common import file_sha256, model_hash

VERSION = 1
DATA_SUFFIXES = (".jsonl", ".json", ".sqlite", ".yaml", ".yml", ".csv", ".parquet")
CONFIG_NAMES = ("manifest.json", "pipeline.json", "pipeline_config.json", "config.yaml", "agreement.json")
SKIP_DIRS = ("checkpoints", "generations", "__pycache__")

# metric path -> (absolute tolerance, relative tolerance): reproduced when |a - b| <= abs + rel * |a|
TOLERANCES: dict[str, tuple[float, float]] = {
    "win_rate.rate": (0.02, 0.0), "rm_win_rate.rate": (0.02, 0.0), "gold.total": (0.02, 0.0),
    "kl": (0.05, 0.05), "rm_score": (0.05, 0.0), "length_words.mean": (0.0, 0.05),
    "refusal.harmful": (0.02, 0.0), "refusal.over_refusal": (0.02, 0.0), "toxicity_proxy": (0.02, 0.0),
    "metadata.follows_constraints": (0.02, 0.0),
}


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _walk(run: Path):
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if any(part in SKIP_DIRS for part in rel.parts):
            continue
        yield p, rel


def _model_dirs(run: Path) -> list[Path]:
    return [p.parent for p, _ in _walk(run) if p.name == "config.json"
            and (any(p.parent.glob("*.safetensors")) or any(p.parent.glob("*.bin")))]


def _pip_freeze() -> list[str]:
    from importlib import metadata

    return sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]})


def _git() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _hardware() -> dict[str, Any]:
    import os

    import torch

    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def pack(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the archive (default RUN_DIR/repro.tar.gz); return its path."""
    run = Path(run_dir).resolve()
    results_path = run / "eval" / "results.json"
    if not results_path.is_file():
        raise PreflabError(f"{run}: no eval/results.json (run the evaluation first: `preflab eval --out {run}/eval`)")
    target = Path(out) if out else run / "repro.tar.gz"
    models = _model_dirs(run)
    in_model = lambda rel: any(m in (run / rel).parents for m in models)  # noqa: E731
    data = {str(rel): file_sha256(p) for p, rel in _walk(run)
            if p.is_file() and p.suffix in DATA_SUFFIXES and not in_model(rel) and p.resolve() != target.resolve()}
    configs = [str(rel) for p, rel in _walk(run) if p.is_file() and p.name in CONFIG_NAMES and not in_model(rel)]
    pcfg = json.loads((run / "pipeline_config.json").read_text()) if (run / "pipeline_config.json").is_file() else {}
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines() if line.strip()]
    results = json.loads(results_path.read_text())
    ref = results["reference"]
    manifest = {
        "version": VERSION, "run_dir": str(run), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "configs": configs, "data": data,
        "models": {str(m.relative_to(run)): model_hash(str(m)) for m in models},
        "suite": ({"seed": pcfg["suite"].get("seed", 0), "n": pcfg["suite"].get("n")} if "suite" in pcfg else None),
        "eval": {"results": "files/eval/results.json",
                 "bf16": (pcfg.get("eval") or {}).get("bf16"),
                 "prompt_ids": [r["id"] for r in samples if r["model"] == ref],
                 "prompts_file": "data/prompts.jsonl" if (run / "data" / "prompts.jsonl").is_file() else None},
        "pip_freeze": _pip_freeze(), "git": _git(), "hardware": _hardware(),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        blob = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo("repro.json")
        info.size, info.mtime = len(blob), int(time.time())
        tar.addfile(info, io.BytesIO(blob))
        for rel in sorted({*configs, "eval/results.json", "eval/samples.jsonl"}):
            tar.add(run / rel, arcname=f"files/{rel}")
    tmp.replace(target)
    return target


def _read(archive: str | Path) -> tuple[dict, dict]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            manifest = json.load(tar.extractfile("repro.json"))
            results = json.load(tar.extractfile("files/eval/results.json"))
    except (tarfile.TarError, KeyError, OSError, json.JSONDecodeError) as e:
        raise PreflabError(f"{archive}: not a preflab repro archive ({e})") from None
    if manifest.get("version") != VERSION:
        raise PreflabError(f"{archive}: repro version {manifest.get('version')}, this preflab reads {VERSION}")
    return manifest, results


def _prompts(manifest: dict, run: Path) -> list:
    from preflab.data.suite import generate_suite, load_prompts

    ids = manifest["eval"]["prompt_ids"]
    pf = manifest["eval"]["prompts_file"]
    if pf and (run / pf).is_file():
        rows = load_prompts(run / pf)
    elif manifest["suite"]:
        rows = generate_suite(seed=manifest["suite"]["seed"], n=manifest["suite"]["n"] or 3200)
    else:
        raise PreflabError(f"{run}: the prompts file {pf} is missing and the archive has no suite seed")
    by_id = {p.id: p for p in rows}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise PreflabError(f"{len(missing)} evaluated prompt ids are not in the prompts (e.g. {missing[0]})")
    return [by_id[i] for i in ids]


def _hash_row(rel: str, kind: str, recorded: str, now: str | None) -> dict[str, Any]:
    return {"path": rel, "kind": kind, "ok": now == recorded, "recorded": recorded[:16], "now": now and now[:16]}


def _hashes(manifest: dict, run: Path) -> list[dict[str, Any]]:
    """Every packed data file (the evaluation's own outputs too) and model, re-hashed under ``run``."""
    rows = [_hash_row(rel, "data", h, file_sha256(run / rel) if (run / rel).is_file() else None)
            for rel, h in manifest["data"].items()]
    rows += [_hash_row(rel, "model", h, model_hash(str(run / rel)) if (run / rel).is_dir() else None)
             for rel, h in manifest["models"].items()]
    return rows


def _numbers(recorded: dict, again: dict) -> list[dict[str, Any]]:
    """Each headline number of each model, recorded vs reproduced, within its tolerance or not."""
    numbers = []
    for name in recorded["models"]:
        for path, (atol, rtol) in TOLERANCES.items():
            a, b = _get(recorded["models"][name], path), _get(again["models"][name], path)
            if a is None and b is None:
                continue
            ok = a is not None and b is not None and abs(a - b) <= atol + rtol * abs(a)
            numbers.append({"model": name, "metric": path, "recorded": a, "reproduced": b,
                            "tolerance": atol + rtol * abs(a or 0.0), "ok": ok})
    return numbers


def verify(archive: str | Path, *, run_dir: str | Path | None = None, out_dir: str | Path | None = None,
           bf16: bool | None = None) -> dict[str, Any]:
    """Re-hash and re-evaluate; ``passed`` only when every hash matches and every number reproduces.
    A re-evaluation that cannot run (e.g. a prompts file that no longer parses) is reported in
    ``error`` beside the hash table, not raised."""
    from preflab.config import EvalSection
    from preflab.evals.evaluate import evaluate

    manifest, results = _read(archive)
    old_run = manifest["run_dir"]
    run = Path(run_dir).resolve() if run_dir else Path(old_run)
    hashes = _hashes(manifest, run)

    def remap(spec: str | None) -> str | None:
        return spec.replace(old_run, str(run), 1) if spec and spec.startswith(old_run) else spec

    s = results["settings"]
    models = {n: remap(m["spec"]) for n, m in results["models"].items()}
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="preflab-repro-"))
    use_bf16 = bf16 if bf16 is not None else (manifest["eval"]["bf16"] if manifest["eval"]["bf16"] is not None
                                              else EvalSection().bf16)
    numbers, error = [], None
    try:
        again = evaluate(models, _prompts(manifest, run), reference=results["reference"],
                         reward_model=remap(results.get("reward_model")), out_dir=out,
                         max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], seed=s["seed"],
                         bf16=use_bf16, progress=False)
        numbers = _numbers(results, again)
    except PreflabError as e:
        error = str(e)
    return {"passed": error is None and all(h["ok"] for h in hashes) and all(n["ok"] for n in numbers),
            "hashes": hashes, "numbers": numbers, "error": error, "out": str(out), "git": manifest.get("git")}


@click.group("repro")
def cli() -> None:
    """Reproducibility package of a run: pack it into one archive, verify it by re-running the evaluation.

    \b
    Examples:
      preflab repro pack runs/demo                   # -> runs/demo/repro.tar.gz
      preflab repro verify runs/demo/repro.tar.gz    # exit 0 when every number reproduces
    """


@cli.command("pack")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Archive path (default RUN_DIR/repro.tar.gz).")
def pack_cmd(run_dir, out):
    """Write RUN_DIR's configs, data and model hashes, suite seed, pip freeze, git commit, hardware and
    evaluation outputs into one archive.

    Example: preflab repro pack runs/demo --out demo-repro.tar.gz"""
    path = pack(run_dir, out)
    m, _ = _read(path)
    click.echo(f"wrote {path}: {len(m['configs'])} configs, {len(m['data'])} data files, {len(m['models'])} models")


@cli.command("verify")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Where the run's files are now (default: where they were packed).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Re-evaluation output.")
@click.option("--bf16/--no-bf16", default=None, help="Override the recorded precision.")
def verify_cmd(archive, run_dir, out_dir, bf16):
    """Re-hash the data and models, re-run the evaluation and report which numbers reproduce.

    Example: preflab repro verify runs/demo/repro.tar.gz --out runs/demo-verify"""
    report = verify(archive, run_dir=run_dir, out_dir=out_dir, bf16=bf16)
    for h in report["hashes"]:
        click.echo(f"{'ok  ' if h['ok'] else 'DIFF'}  {h['kind']:<5} {h['path']}  {h['recorded']} -> {h['now']}")
    for n in report["numbers"]:
        click.echo(f"{'ok  ' if n['ok'] else 'DIFF'}  {n['model']:<10} {n['metric']:<30} {n['recorded']!s:<22} "
                   f"{n['reproduced']!s:<22} (tolerance {n['tolerance']:.3g})")
    if report["error"]:
        click.echo(f"DIFF  the re-evaluation could not run: {report['error']}")
    click.echo(f"repro: {'REPRODUCED' if report['passed'] else 'NOT REPRODUCED'} (re-evaluation in {report['out']})")
    return 0 if report["passed"] else 1
