"""JSONL reading and writing shared by every reader and writer in preflab.

Readers report ``file:line: reason`` for any bad row, before any work starts.
Writers are atomic: a temporary file in the same directory, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from preflab.errors import DataError

T = TypeVar("T")

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it; Python has no getter before 3.13)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file or directory made by mkstemp/mkdtemp (0600/0700) the mode an ordinary
    ``open()``/``mkdir()`` would give it: 0666/0777 minus the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def not_utf8(path: str | os.PathLike, err: UnicodeDecodeError, lineno: int | None = None) -> DataError:
    """One clear error for a file that is not UTF-8 text (e.g. UTF-16, Latin-1, a binary file)."""
    where = f"{path}:{lineno}" if lineno else str(path)
    return DataError(f"{where}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}"
                     f"{' of the line' if lineno else ''}); save the file as UTF-8")


def read_text_utf8(path: str | os.PathLike) -> str:
    """A whole text file; DataError naming the file when it is missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


EXAMPLES_DIR = Path(__file__).parent / "examples"


def builtin_path(path: str | os.PathLike) -> Path:
    """``builtin:NAME`` -> the example file NAME.jsonl shipped with preflab (``builtin:examples``
    is demos.jsonl); any other path unchanged."""
    text = str(path)
    if not text.startswith("builtin:"):
        return Path(path)
    name = text.removeprefix("builtin:")
    found = EXAMPLES_DIR / f"{'demos' if name == 'examples' else name}.jsonl"
    if not found.is_file():
        known = sorted(["examples", *(p.stem for p in EXAMPLES_DIR.glob("*.jsonl") if p.stem != "demos")])
        raise DataError(f"{text}: no such built-in data (known: {', '.join('builtin:' + k for k in known)})")
    return found


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line; line numbers start at 1.

    Raises DataError naming ``path:line`` for invalid JSON or a line that is not UTF-8, and for a
    missing file. ``builtin:NAME`` reads an example file shipped with preflab; a parquet file, a
    directory of them or a saved Hugging Face dataset yields its rows (``preflab.data.hf``).
    """
    path = builtin_path(path)
    from preflab.data.hf import hf_rows, is_hf_source

    if is_hf_source(path):  # a saved Hugging Face dataset or parquet: rows numbered from 1
        yield from enumerate(hf_rows(path), start=1)
        return
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(path, e, lineno) from None
            if not line.strip():
                continue
            text = line.rstrip("\r\n")
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({json_error(text, e)})") from None


def json_error(text: str, e: json.JSONDecodeError) -> str:
    """Why one line of JSONL is not JSON, at its real column; a line that ends before its value
    does (cut off, e.g. by a full disk or a killed writer) is called truncated."""
    end = len(text.rstrip())
    if e.msg.startswith("Unterminated string"):
        return f"the line is truncated: it ends at column {end}, inside a string that starts at column {e.colno}"
    if e.pos >= end:
        return f"the line is truncated: it ends at column {end} before the JSON value does"
    return f"{e.msg} at column {e.colno}"


def read_jsonl(path: str | os.PathLike, parse: Callable[[Any], T] | None = None) -> list[T]:
    """Read every row of a JSONL file, optionally through ``parse(obj)``.

    ``parse`` raises ValueError/KeyError/TypeError with a reason; it is re-raised as
    DataError with the file and line, so the user sees e.g. ``demos.jsonl:7: missing key 'response'``.
    """
    return [row for _, row in read_jsonl_lines(path, parse)]


def read_jsonl_lines(path: str | os.PathLike, parse: Callable[[Any], T] | None = None) -> list[tuple[int, T]]:
    """``read_jsonl`` with each row's line number: ``[(line, row), ...]``."""
    rows: list[tuple[int, T]] = []
    for lineno, obj in iter_jsonl(path):
        if parse is None:
            rows.append((lineno, obj))
            continue
        try:
            rows.append((lineno, parse(obj)))
        except KeyError as e:
            raise DataError(f"{path}:{lineno}: missing key {e}") from None
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    return rows


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        honour_umask(tmp)  # mkstemp makes 0600; the result is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


TMP_DIR_PREFIX = ".tmp-"


def clean_stale_tmp_dirs(parent: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Remove ``.tmp-*`` directories that ``atomic_dir`` left in ``parent`` when its process was
    killed mid-write (a finished or failed write removes its own). Only directories older than
    ``min_age_s`` go, so a write in progress in another process is left alone when that matters."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for p in parent.iterdir():
        if p.name.startswith(TMP_DIR_PREFIX) and p.is_dir() and not p.is_symlink():
            try:
                if now - p.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Fill the yielded temporary sibling directory; on success it replaces ``path`` by a rename,
    so a reader sees the old directory or the complete new one. On error ``path`` is untouched.

    Stale temporary directories of ``path`` from a killed earlier write are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{TMP_DIR_PREFIX}{path.name}-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_DIR_PREFIX}{path.name}-", dir=path.parent))
    try:
        honour_umask(tmp, directory=True)  # mkdtemp makes 0700; the result is an ordinary directory
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except Exception as e:
        if disk_full(e, path.parent):
            raise DataError(f"{path}: no space left on the device while writing it; free some space and run the "
                            "same command again (a run resumes from its last checkpoint)") from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DISK_FULL_BYTES = 16 * 2**20


def disk_full(error: BaseException, where: Path) -> bool:
    """Whether ``error`` came from a full disk: ENOSPC, or (torch.save reports it as a RuntimeError
    about the file position) under ``DISK_FULL_BYTES`` left where it was writing."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(where).free < DISK_FULL_BYTES
    except OSError:
        return False


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Atomically write ``rows`` (JSON-serialisable) one per line; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
