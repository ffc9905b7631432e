"""The docs name code and tests (`evals.metrics:gold_win_rate`, `tests/test_reward.py::test_x`):
every such name must exist, so a rename that forgets the docs fails here."""
import functools
import importlib
import importlib.util
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {page: page.read_text(encoding="utf-8") for page in PAGES}  # read once for every check
CODE_NAME = re.compile(r"`([a-z_][a-z_0-9.]*):([A-Za-z_][A-Za-z_0-9.]*)`")  # `module:attr.attr`
TEST_NAME = re.compile(r"(tests/[a-z_0-9]+\.py)::([A-Za-z_0-9]+)")  # reference.md's legend: tests/file.py::test_name


def code_names() -> list[tuple[str, str, str]]:
    """(page, module, attribute path) for every `module:name` whose module is a preflab module
    (other `x:y` forms, like `builtin:ifeval` or `store:PATH`, are data specs)."""
    found = set()
    for page in PAGES:
        for module, attr in CODE_NAME.findall(TEXT[page]):
            if importlib.util.find_spec(f"preflab.{module.split('.')[0]}") is not None:
                found.add((page.name, module, attr))
    return sorted(found)


def test_names_are_found():
    names = code_names()
    assert len(names) > 100 and ("reference.md", "evals.metrics", "gold_win_rate") in names


@pytest.mark.parametrize("page,module,attr", code_names(), ids=lambda v: str(v))
def test_every_code_name_in_the_docs_exists(page, module, attr):
    obj = importlib.import_module(f"preflab.{module}")
    for part in attr.split("."):
        assert hasattr(obj, part), f"{page}: `{module}:{attr}` does not exist (no {part!r})"
        obj = getattr(obj, part)


def test_every_test_named_in_the_docs_exists():
    missing = []
    for page in PAGES:
        for path, name in set(TEST_NAME.findall(TEXT[page])) - {("tests/file.py", "test_name")}:
            source = ROOT / path
            if not source.is_file() or not re.search(rf"^\s*(async )?def {name}\b|^class {name}\b",
                                                     source.read_text(encoding="utf-8"), re.M):
                missing.append(f"{page.name}: {path}::{name}")
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(sorted(missing))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading).strip().lower()  # markup is not part of the anchor; `_` stays (\\w)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+\s+(.*)$", page.read_text(encoding="utf-8"), re.M)}


def test_slug_matches_githubs_rule():
    assert slug("Three reward heads on one trunk (run D9, EPYC, 2026-12-07)") == \
        "three-reward-heads-on-one-trunk-run-d9-epyc-2026-12-07"
    assert slug("8.5 `rm.train.heads`: M heads") == "85-rmtrainheads-m-heads"


def test_every_link_between_pages_lands():
    """Relative links ([text](docs/x.md#anchor)) name a file of the repository and, with an
    anchor, one of its headings."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", TEXT[page]):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no file)")
            elif anchor and dest.suffix == ".md":
                if anchor not in anchors(dest):
                    broken.append(f"{page.name}: {target} (no heading)")
    assert not broken, "links that land nowhere:\n" + "\n".join(broken)


# Config keys the docs name (`rm.train.heads`, `optim.lr=6e-6`, `kl: {coef: ...}` is not matched):
# each must be a key of the pipeline config (its stage sections read as the stage's config) or of a
# stage's config. A dotted name whose head is a preflab module (`models.load_policy`) is code instead.
CONFIG_KEY = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(?:=.*|: .*)?$")
NOT_KEYS = {"model.generate"}  # transformers' method
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "md", "html", "txt", "sqlite", "csv", "safetensors", "gguf", "whl"}


def _section(annotation):
    """The config section class inside a field's annotation (Optional, unions), or None."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((s for s in map(_section, typing.get_args(annotation)) if s is not None), None)


def _resolves(cls, parts: list[str], stage_sections: dict) -> bool:
    if not parts:
        return True
    field = cls.model_fields.get(parts[0])
    if field is None:
        return False
    if parts[0] in stage_sections:  # the pipeline's sft:, rm:, rl_stage: ... hold that stage's keys
        return _resolves(stage_sections[parts[0]], parts[1:], {})
    section = _section(field.annotation)
    if section is not None:
        return _resolves(section, parts[1:], {})
    free = field.annotation is typing.Any or dict in (typing.get_origin(field.annotation), *typing.get_args(field.annotation))
    return free or len(parts) == 1


def schemas() -> list[tuple[type, dict]]:
    """(config class, its sections that hold a stage's config) for the pipeline and each stage."""
    from preflab.config import PipelineConfig
    from preflab.registry import STAGES

    stages = {name: s.config for name, s in STAGES.items()}
    stage_sections = {"sft": stages["sft"], "rm": stages["rm"], "rl_stage": stages["rl"], "ppo_ptx": stages["rl"]}
    return [(PipelineConfig, stage_sections), *((c, {}) for c in stages.values())]


def config_keys() -> list[tuple[str, str]]:
    heads = set().union(*(cls.model_fields for cls, _ in schemas()))
    found = set()
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", TEXT[page]):
            m = CONFIG_KEY.match(span.strip())
            parts = m.group(1).split(".") if m else []
            if parts and parts[0] in heads and parts[-1] not in FILE_SUFFIXES and m.group(1) not in NOT_KEYS:
                found.add((page.name, m.group(1)))
    return sorted(found)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"preflab.{name}") is not None
    except ModuleNotFoundError:
        return False


def test_every_config_key_in_the_docs_exists():
    keys, known = config_keys(), schemas()
    assert len(keys) > 150 and ("README.md", "rewards.length_debias") in keys
    unknown = []
    for page, key in keys:
        if any(_resolves(cls, key.split("."), sections) for cls, sections in known):
            continue
        module, _, name = key.rpartition(".")
        if _is_module(key) or (_is_module(module) and hasattr(importlib.import_module(f"preflab.{module}"), name)):
            continue  # code: `data.io`, `models.load_policy`
        unknown.append(f"{page}: `{key}`")
    assert not unknown, "config keys (or code names) in the docs that do not exist:\n" + "\n".join(unknown)
