"""Every benchmark's smallest setting (``--smoke``: tiny random models, a step or two) runs from a
fresh checkout in a subprocess and writes its JSON: the machine, the date, the threads, whether
other processes were busy, and the expected rows, its peer's included (TRL's rows may say "not
installed" where trl is missing; a number from elsewhere never appears). Timings are not checked.
The three whose smoke setting starts several processes with torch (FSDP's ranks, the router's
servers, the allocator's modes) are marked slow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PEER_STATUS = {"ran", "not installed"}

# script: (extra args, rows that must run, peer rows that run where installed, slow)
CASES = {
    "sft_step": (["--threads", "1"], {"fp32", "bf16"}, {"trl-fp32", "trl-bf16"}, False),
    "rm_step": (["--threads", "1"], {"fp32", "bf16", "bf16-unshared", "bf16-half-frozen"}, {"trl-fp32", "trl-bf16"}, False),
    "dpo_step": (["--threads", "1"], {"preflab"}, {"trl"}, False),
    "ppo_step": (["--threads", "1"], {"preflab-e1", "preflab-vhead-e1"}, {"trl-e1"}, False),
    "attention": (["--threads", "1"], {"16 keys", "32 keys"}, set(), False),
    "rl_prompt_sharing": (["--threads", "1"], {"forward+backward", "forward (no grad)"}, set(), False),
    "best_of_n": (["--threads", "1"], {"one random sample (seed 1)", "gold's best of 2 (ceiling)"}, set(), False),
    "annotate_load": ([], {"1 server(s), 2 labelers"}, set(), False),
    "busy_machine": ([], {"alone", "competitor, auto", "competitor, all cores"}, set(), False),
    "fsdp_memory": ([], {"ddp", "fsdp"}, set(), True),
    "route_load": ([], {"60 requests, 4 clients"}, set(), True),
    "allocator": ([], {"tuned", "untuned"}, set(), True),
}
# Not benchmarks of their own or not this file's: the shared helpers, two scripts that format a
# finished run's results (tests/test_compare.py and tests/test_pipeline.py run them), and the two
# benchmarks other test files run (tests/test_generation_llamacpp.py, tests/test_gpu_check.py).
NOT_HERE = {"common", "machine", "compare_table", "labeler_ceiling", "generate", "gpu_check"}


def test_every_benchmark_has_a_smoke_case():
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert scripts - NOT_HERE == set(CASES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if CASES[n][3] else [])
                                  for n in CASES])
def test_smoke_setting_runs_and_writes_its_json(name, tmp_path):
    args, runs, peers, _ = CASES[name]
    out = tmp_path / f"{name}.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "machine:" in proc.stdout  # the machine is printed before any number
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == name and doc["smoke"] is True
    assert {"cpu", "cores", "host", "load_1m"} <= doc["machine"].keys()
    assert doc["date"][:4].isdigit() and "threads" in doc
    assert isinstance(doc["others_busy"], bool) and doc["busy_cores_of_others_start"] >= 0
    assert "references" not in doc  # no number from elsewhere beside the measured ones
    rows = {r["config"]: r for r in doc["results"]}
    assert runs <= rows.keys() and peers <= rows.keys(), sorted(rows)
    for config in runs:
        assert rows[config]["status"] == "ran", rows[config]
    for config in peers:
        assert rows[config]["status"] in PEER_STATUS, rows[config]
        if rows[config]["status"] != "ran":
            assert rows[config]["reason"] and "s_per_step" not in rows[config]
    if name == "busy_machine":
        assert [r["threads_asked"] for r in doc["results"]] == ["auto", "auto", str(doc["cores"])]
        assert all(r["slowdown_vs_alone"] > 0 for r in doc["results"])
        assert rows["alone"]["slowdown_vs_alone"] == 1.0
