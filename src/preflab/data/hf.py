"""Hugging Face ``datasets`` inputs: a saved dataset directory or parquet files, read as rows.

Every preflab reader takes one of these wherever it takes a JSONL file (``iter_jsonl`` sends
them here), with the usual TRL column layouts as they come:

- prompts: ``prompt`` (a string, or a list of chat messages), or ``messages``;
- demonstrations: ``messages``, ``prompt``/``completion`` (strings or message lists), or
  ``prompt``/``response``; PPO-ptx rows may be ``text``;
- preferences: ``prompt``/``chosen``/``rejected`` (strings: the RM's ``data.format: pairs``
  and ``preflab data import --format trl``; message lists: ``--format trl-conversational``, or
  ``standard_preference`` for a reader that wants strings).

A source is a ``.parquet`` file, a directory of ``.parquet`` files (read in name order), or a
directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (a DatasetDict
gives its ``train`` split, or its only one; point at ``DIR/SPLIT`` for another). A null cell is a
missing key (a table gives every row every column). Errors name
the source and the row (1-based), like a JSONL file's line. Needs the ``hf`` extra
(``pip install 'preflab[hf]'``: ``datasets``, which brings ``pyarrow``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from preflab.errors import DataError

HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
EXTRA_HINT = "pip install 'preflab[hf]'"


def is_hf_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a parquet file, a directory of parquet files or a saved dataset."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".parquet"
    if p.is_dir():
        return any((p / m).is_file() for m in HF_MARKERS) or any(p.glob("*.parquet"))
    return False


def _jsonable(v: Any) -> Any:
    """Arrow values as plain JSON values (numpy scalars and arrays from some columns)."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def hf_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a parquet file, a directory of them or a saved dataset, as dicts."""
    p = Path(path)
    if p.is_file() or not any((p / m).is_file() for m in HF_MARKERS):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{p}: reading parquet needs pyarrow: {EXTRA_HINT}") from None
        files = [p] if p.is_file() else sorted(p.glob("*.parquet"))
        rows: list[dict[str, Any]] = []
        for f in files:
            try:
                rows += pq.read_table(f).to_pylist()
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
                raise DataError(f"{f}: cannot read as parquet ({e})") from None
        return [_row(r) for r in rows]
    try:
        import datasets
    except ImportError:
        raise DataError(f"{p}: reading a saved Hugging Face dataset needs `datasets`: {EXTRA_HINT}") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # FileNotFoundError, ValueError, ... for a damaged directory
        raise DataError(f"{p}: cannot load the saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if "train" in ds or len(names) == 1:
            ds = ds["train" if "train" in ds else names[0]]
        else:
            raise DataError(f"{p}: a DatasetDict with splits {', '.join(names)} and no 'train': pass {p}/SPLIT")
    return [_row(r) for r in ds]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    """A row as a JSONL row would be: a column the row has no value in (null: Arrow gives every row
    every column) is left out, as a missing key."""
    return {k: _jsonable(v) for k, v in r.items() if v is not None}


def _messages(v: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v):
        raise ValueError(f"{key!r} must be a string or a non-empty list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def standard_preference(obj: dict[str, Any]) -> dict[str, Any]:
    """A TRL preference row with string ``chosen``/``rejected``: conversational rows (message
    lists, with an explicit ``prompt`` or one implicit in their shared leading messages) become
    ``{"prompt": messages, "chosen": str, "rejected": str}``; standard rows pass unchanged."""
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return obj
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if "prompt" in obj:
        p = obj["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]  # the prompt repeated at the head (ultrafeedback_binarized)
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise ValueError("no 'prompt', and chosen/rejected share no leading messages (implicit prompt)")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    text = ["\n\n".join(m["content"] for m in side) for side in (chosen, rejected)]
    return {**obj, "prompt": prompt, "chosen": text[0], "rejected": text[1]}

