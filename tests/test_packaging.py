"""Packaging: the license matches pyproject, shipped configs stand alone, and a wheel installed into a
fresh virtual environment runs `preflab pipeline --preset tiny` outside the repository."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
PACKAGED = ROOT / "src/preflab/configs"


def test_license_file_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # the SPDX string form (PEP 639), not a table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def _values(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _values(v)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v)
    else:
        yield node


def test_shipped_configs_live_in_the_package_and_point_nowhere_into_the_repo():
    assert (ROOT / "configs").resolve() == PACKAGED.resolve()  # the README's configs/ paths still work
    names = sorted(p.name for p in PACKAGED.glob("*.yaml"))
    assert {"sft.yaml", "rm.yaml", "pipeline.yaml", "sft_tiny.yaml", "rm_tiny.yaml", "rl_tiny.yaml"} <= set(names)
    for path in PACKAGED.glob("*.yaml"):
        for v in _values(yaml.safe_load(path.read_text())):
            assert not (isinstance(v, str) and ("tests/" in v or "fixtures" in v)), (path.name, v)


def test_builtin_data_of_the_tiny_configs():
    from preflab.data.chat import read_prompts
    from preflab.data.jsonl import read_jsonl
    from preflab.errors import DataError

    assert len(read_prompts("builtin:prompts")) == 16
    assert [r["chosen"] for r in read_jsonl("builtin:prefs")][:2] == [" blue.", "The bat."]
    with pytest.raises(DataError, match=r"builtin:nope: no such built-in data \(known: builtin:examples, "
                                        r"builtin:prefs, builtin:prompts\)"):
        read_jsonl("builtin:nope")


def _copy_source(dst: Path) -> Path:
    """The files a wheel is built from, without build leftovers of the working tree."""
    src = dst / "src-tree"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    return src


def test_wheel_in_a_fresh_venv_runs_the_tiny_pipeline_outside_the_repo(tmp_path):
    """About 40 s on one core: build (no isolation: setuptools is in the test venv), install with
    --no-deps into a venv that borrows this venv's dependencies, run the tiny pipeline from /tmp."""
    src = _copy_source(tmp_path)
    # The build backend itself (what pip runs), so its warnings reach us.
    build = subprocess.run([sys.executable, "-c", f"import setuptools.build_meta as b; b.build_wheel({str(tmp_path / 'dist')!r})"],
                           cwd=src, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "DeprecationWarning" not in build.stdout + build.stderr, build.stderr  # e.g. a TOML-table license
    (wheel,) = (tmp_path / "dist").glob("preflab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for need in ("preflab/configs/sft_tiny.yaml", "preflab/configs/pipeline.yaml", "preflab/data/examples/prompts.jsonl",
                 "preflab/data/examples/demos.jsonl"):
        assert need in names, need
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # This venv's packages (torch, transformers, ...) without its editable preflab: a .pth line adds
    # the directory to sys.path but does not run the .pth files inside it (the editable finder).
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-3000:]

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PREFLAB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    where = subprocess.run([str(venv / "bin/python"), "-c", "import preflab; print(preflab.__file__)"], cwd=away,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    run = subprocess.run([str(venv / "bin/preflab"), "pipeline", "--preset", "tiny", "--out", "run"], cwd=away, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (away / "run/report.html").is_file() and (away / "run/ppo_ptx/model/config.json").is_file()
    # The packaged tiny configs run as they come from the installed package.
    cfg = site / "preflab/configs/rm_tiny.yaml"
    rm = subprocess.run([str(venv / "bin/preflab"), "rm", "--config", str(cfg), "run.out=rm"], cwd=away, env=env,
                        capture_output=True, text=True, timeout=300)
    assert rm.returncode == 0, rm.stderr[-3000:]
    assert (away / "rm/model/config.json").is_file()
