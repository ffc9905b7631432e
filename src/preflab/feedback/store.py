"""The preference store: prompts, candidate responses, rankings, demonstrations and
labeling queues in one SQLite file, or in a PostgreSQL database that several machines share.

Ids: every row gets an **integer** id assigned by SQLite (``INTEGER PRIMARY KEY``; on
PostgreSQL a 64-bit identity column), and every API takes and returns those ints. A prompt
may also carry ``uid``, an optional unique string key from its source (e.g. the suite's
prompt id); ``add_prompts`` with an existing uid returns the existing id instead of adding a copy.

Rankings store ``candidate_ids`` (a JSON list of candidate ids) and ``order`` (JSON tiers
of positions into that list, ties inside a tier; see preflab.data.schema). Validation
happens before anything is written, and every write runs in one ``BEGIN IMMEDIATE``
transaction, so a bad ranking raises DataError with the reason and leaves the store as
it was. The file is in WAL mode with a busy timeout, so several processes (labelers, the
web app, the pipeline) can write at once; each process opens its own PreferenceStore
(a connection must not cross ``fork``).

Schema changes are migrations: ``MIGRATIONS[i]`` takes the file from version i to i+1;
opening a store applies the pending ones in order and records each in ``schema_version``.

``PreferenceStore("postgresql://user@host:port/db")`` (or ``postgres://``; needs psycopg, the
``postgres`` extra) keeps the same tables in a PostgreSQL database. The SQL is written once:
``store_pg`` translates it, and ``Dialect`` holds what differs in transactions and locks. A write
transaction takes a store-wide advisory lock, so writers take turns as they do on SQLite, except
on the labeling queue's hot path (``transaction(exclusive=False)``: taking, completing and
releasing tasks), which locks only the rows it changes: ``next_task`` claims a task with
``SELECT ... FOR UPDATE SKIP LOCKED``, so labelers on several servers never get the same task.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from preflab.data.schema import Demonstration, KWay, Prompt, Ranking, validate_order
from preflab.errors import DataError

QUEUE_STATUSES = ("pending", "assigned", "done")
URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(spec: object) -> bool:
    """True for a PostgreSQL store (``postgresql://...`` or ``postgres://...``); else a SQLite file path."""
    return isinstance(spec, str) and spec.startswith(URL_SCHEMES)


@dataclass(frozen=True)
class Dialect:
    """What differs between the back ends in transactions and locks (the SQL itself is shared)."""

    name: str
    begin: str  # starts a write transaction
    write_lock: str | None  # then, in an exclusive transaction: the store-wide lock (writers take turns)
    labeler_lock: str | None  # next_task: one labeler's requests take turns (argument: the labeler)
    for_update: str  # after a SELECT of a row the transaction will change
    skip_locked: str  # after next_task's SELECT: claim a row no other transaction holds
    table_exists: str  # rows when the table (argument) exists


SQLITE = Dialect(
    "sqlite", "BEGIN IMMEDIATE", None, None, "", "",  # BEGIN IMMEDIATE: one writer at a time, nothing more to lock
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
)
_LOCK_KEY = 0x70726566  # "pref": the advisory lock keys of a store database
POSTGRES = Dialect(
    "postgresql", "BEGIN",
    f"SELECT pg_advisory_xact_lock({_LOCK_KEY})",
    f"SELECT pg_advisory_xact_lock({_LOCK_KEY}, hashtext(?))",
    " FOR UPDATE", " FOR UPDATE SKIP LOCKED",
    "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?",
)

_SCHEMA_V1 = """
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    uid TEXT UNIQUE,
    text TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    category TEXT,
    slice TEXT,
    split TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE INDEX prompts_text_hash ON prompts(text_hash);
CREATE INDEX prompts_split ON prompts(split);
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    model TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE INDEX candidates_prompt ON candidates(prompt_id);
CREATE TABLE rankings (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    candidate_ids TEXT NOT NULL,
    "order" TEXT NOT NULL,
    labeler TEXT NOT NULL,
    time_s REAL,
    flags TEXT NOT NULL DEFAULT '[]',
    meta TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE INDEX rankings_prompt ON rankings(prompt_id);
CREATE INDEX rankings_labeler ON rankings(labeler);
CREATE TABLE demonstrations (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    response TEXT NOT NULL,
    labeler TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE INDEX demonstrations_prompt ON demonstrations(prompt_id);
CREATE TABLE queue (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    candidate_ids TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'assigned', 'done')),
    labeler TEXT,
    assigned_at TEXT,
    done_at TEXT,
    ranking_id INTEGER REFERENCES rankings(id),
    created_at TEXT NOT NULL
);
CREATE INDEX queue_status ON queue(queue, status);
"""


def _sql_statements(script: str) -> list[str]:
    # executescript() would COMMIT the enclosing transaction, so statements run one by one.
    return [s.strip() for s in script.split(";") if s.strip()]


def _migration_1(conn: sqlite3.Connection) -> None:
    for stmt in _sql_statements(_SCHEMA_V1):
        conn.execute(stmt)


# MIGRATIONS[i] = (description, function) takes the schema from version i to i+1.
# Append only; never edit a released migration.
MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("initial schema: prompts, candidates, rankings, demonstrations, queue", _migration_1),
]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


_WS = re.compile(r"\s+")


def text_hash(text: str) -> str:
    """Hash of a prompt's text with whitespace collapsed: how the store finds a prompt by text."""
    return hashlib.sha1(_WS.sub(" ", text).strip().encode("utf-8")).hexdigest()


@dataclass
class Task:
    """One labeling task from a queue: rank ``candidates`` (texts, aligned with ``candidate_ids``)."""

    id: int
    queue: str
    prompt_id: int
    prompt: str
    candidate_ids: list[int]
    candidates: list[str]
    status: str
    labeler: str | None = None
    ranking_id: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class PreferenceStore:
    """The preference store. ``PreferenceStore(path)`` creates the SQLite file (and parent dir) if needed;
    ``PreferenceStore("postgresql://user@host:port/db")`` opens that database (which must exist) and
    creates the tables there. ``path`` is the file's Path, or the URL without its password.

    Use as a context manager or call ``close()``. Not shareable across processes: open one per process.
    """

    def __init__(self, path: str | os.PathLike, *, timeout_s: float = 60.0):
        self._depth = 0
        if is_url(path):
            self._open_postgres(str(path), timeout_s)
            return
        self.dialect = SQLITE
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; ``_tx`` issues BEGIN IMMEDIATE itself.
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a directory, not a SQLite preference store")
        self._conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        c = self._conn
        try:
            c.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            mode = self._set_wal(timeout_s)
            if mode != "wal":
                raise DataError(f"{self.path}: cannot switch the store to WAL mode (journal_mode={mode})")
            c.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; safe with WAL
            c.execute("PRAGMA foreign_keys = ON")
            self.migrate()
        except sqlite3.DatabaseError as e:  # e.g. a JSONL file passed as --store
            c.close()
            if isinstance(e, sqlite3.OperationalError):
                raise DataError(f"{self.path}: cannot open the store ({e})") from None
            raise DataError(f"{self.path}: not a SQLite preference store ({e}); a store is the .sqlite file "
                            "that `preflab data` commands create") from None
        except BaseException:
            c.close()
            raise

    # -- plumbing -------------------------------------------------------------------------

    def _open_postgres(self, url: str, timeout_s: float) -> None:
        try:
            from preflab.feedback import store_pg
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("psycopg"):
                raise
            raise DataError("a postgresql:// store needs psycopg: pip install 'preflab[postgres]'") from None
        self.dialect, self.path = POSTGRES, store_pg.redact(url)
        self._conn = store_pg.Connection(url, timeout_s)
        try:
            self.migrate()
        except BaseException:
            self._conn.close()
            raise

    def _set_wal(self, timeout_s: float) -> str:
        # Switching a fresh file to WAL needs an exclusive lock and SQLite does not call the
        # busy handler for it, so processes opening a new store at once retry here.
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                return str(self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise DataError(f"{self.path}: cannot open the store ({e})") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: takes the write lock up front, so two
        writers queue on busy_timeout instead of failing to upgrade). Nested uses join the
        outer transaction; any exception rolls the whole thing back.

        On PostgreSQL an ``exclusive`` transaction takes the store-wide lock the same way; with
        ``exclusive=False`` it does not, and the caller locks the rows it reads to change
        (``dialect.for_update``). SQLite has one writer at a time either way."""
        if self._depth:
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1
            return
        self._conn.execute(self.dialect.begin)
        self._depth = 1
        try:
            if exclusive and self.dialect.write_lock:
                self._conn.execute(self.dialect.write_lock)
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")
        finally:
            self._depth = 0

    _tx = transaction

    def schema_version(self) -> int:
        row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self) -> int:
        """Apply pending migrations in order (each in its own transaction); return the version."""
        with self._tx() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
        while True:
            with self._tx() as c:  # re-read inside the lock: another process may have migrated
                current = self.schema_version()
                if current > len(MIGRATIONS):
                    raise DataError(
                        f"{self.path}: store schema version {current} is newer than this preflab "
                        f"supports ({len(MIGRATIONS)}); upgrade preflab"
                    )
                if current == len(MIGRATIONS):
                    return current
                description, fn = MIGRATIONS[current]
                fn(c)
                c.execute(
                    "INSERT INTO schema_version(version, description, applied_at) VALUES (?, ?, ?)",
                    (current + 1, description, _now()),
                )

    # -- prompts and candidates -------------------------------------------------------------

    def add_prompts(self, prompts: Iterable[Prompt | dict | str], *, split: str | None = None) -> list[int]:
        """Add prompts (Prompt, dict with Prompt's fields, or plain text); return their ids in order.

        A prompt whose ``uid`` is already stored is not added again: its existing id is returned.
        ``split`` applies to prompts that have none.
        """
        items = [_as_prompt(p) for p in prompts]
        for i, p in enumerate(items):
            if not isinstance(p.text, str) or not p.text.strip():
                raise DataError(f"prompt {i}: text is empty")
        ids = []
        with self._tx() as c:
            for p in items:
                if p.uid is not None:
                    row = c.execute("SELECT id FROM prompts WHERE uid = ?", (p.uid,)).fetchone()
                    if row:
                        ids.append(int(row[0]))
                        continue
                cur = c.execute(
                    "INSERT INTO prompts(uid, text, text_hash, category, slice, split, meta, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (p.uid, p.text, text_hash(p.text), p.category, p.slice, p.split or split,
                     json.dumps(p.meta or {}), _now()),
                )
                ids.append(int(cur.lastrowid))
        return ids

    def find_prompt(self, text: str) -> int | None:
        """Id of the earliest stored prompt with this text (whitespace-insensitive), or None."""
        for row in self._conn.execute(
            "SELECT id, text FROM prompts WHERE text_hash = ? ORDER BY id", (text_hash(text),)
        ):
            if _WS.sub(" ", row["text"]).strip() == _WS.sub(" ", text).strip():
                return int(row["id"])
        return None

    def prompt(self, prompt_id: int) -> Prompt:
        row = self._conn.execute("SELECT * FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        if row is None:
            raise DataError(f"unknown prompt id {prompt_id}")
        return _row_prompt(row)

    def prompts(self, split: str | None = None, category: str | None = None) -> list[Prompt]:
        q, args = _where("SELECT * FROM prompts", split=split, category=category)
        return [_row_prompt(r) for r in self._conn.execute(q + " ORDER BY id", args)]

    def add_candidates(self, prompt_id: int, texts: Sequence[str], model: str | None = None,
                       *, meta: Sequence[dict] | None = None) -> list[int]:
        """Add candidate responses to a prompt; return their ids in order."""
        if isinstance(texts, str):
            raise DataError("add_candidates takes a list of texts, not one string")
        if not all(isinstance(t, str) for t in texts):
            raise DataError("candidate texts must be strings")
        if meta is not None and len(meta) != len(texts):
            raise DataError(f"{len(meta)} meta dicts for {len(texts)} candidates")
        with self._tx() as c:
            prompt_id = self._require_prompt(c, prompt_id)
            now = _now()
            return [
                int(c.execute(
                    "INSERT INTO candidates(prompt_id, text, model, meta, created_at) VALUES (?, ?, ?, ?, ?)",
                    (prompt_id, t, model, json.dumps(meta[i] if meta else {}), now),
                ).lastrowid)
                for i, t in enumerate(texts)
            ]

    def candidates(self, prompt_id: int) -> list[tuple[int, str, str | None]]:
        """``(id, text, model)`` of each candidate of a prompt, in id order."""
        return [
            (int(r["id"]), r["text"], r["model"])
            for r in self._conn.execute(
                "SELECT id, text, model FROM candidates WHERE prompt_id = ? ORDER BY id", (prompt_id,))
        ]

    def find_candidate(self, prompt_id: int, text: str) -> int | None:
        row = self._conn.execute(
            "SELECT id FROM candidates WHERE prompt_id = ? AND text = ? ORDER BY id LIMIT 1", (prompt_id, text)
        ).fetchone()
        return None if row is None else int(row[0])

    # -- rankings ---------------------------------------------------------------------------

    def add_ranking(
        self,
        prompt_id: int,
        candidate_ids: Sequence[int],
        order: Sequence[Sequence[int]],
        labeler: str,
        *,
        time_s: float | None = None,
        flags: Sequence[str] = (),
        meta: dict | None = None,
    ) -> int:
        """Store one labeler's ranking; return its id.

        ``order`` is tiers of positions into ``candidate_ids`` (best first; ties share a tier).
        An order may be empty only when ``flags`` contains ``"not_rankable"``. Raises DataError
        naming the problem (unknown prompt or candidate, candidate of another prompt, duplicate
        candidate, wrong K, position ranked twice or out of range, bad labeler/time/flags); on
        error nothing is written.
        """
        with self._tx() as c:
            prompt_id = self._require_prompt(c, prompt_id)
            ids, norm, flag_list = self._check_ranking(c, prompt_id, candidate_ids, order, labeler, time_s, flags)
            cur = c.execute(
                'INSERT INTO rankings(prompt_id, candidate_ids, "order", labeler, time_s, flags, meta, created_at) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (prompt_id, json.dumps(ids), json.dumps(norm), labeler, time_s, json.dumps(flag_list),
                 json.dumps(meta or {}), _now()),
            )
            return int(cur.lastrowid)

    def _require_prompt(self, c: sqlite3.Connection, prompt_id: Any) -> int:
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, numbers.Integral):
            raise DataError(f"prompt id must be an int, got {prompt_id!r}")
        prompt_id = int(prompt_id)  # numpy ints too; sqlite3 binds only Python ints
        if c.execute("SELECT 1 FROM prompts WHERE id = ?", (prompt_id,)).fetchone() is None:
            raise DataError(f"unknown prompt id {prompt_id}")
        return prompt_id

    def _check_candidates(self, c: sqlite3.Connection, prompt_id: int, candidate_ids: Sequence[int]) -> list[int]:
        prompt_id = self._require_prompt(c, prompt_id)
        ids = [int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x for x in candidate_ids]
        if len(ids) < 2:
            raise DataError(f"a ranking needs at least 2 candidates, got {len(ids)}")
        for cid in ids:
            if isinstance(cid, bool) or not isinstance(cid, int):
                raise DataError(f"candidate id must be an int, got {cid!r}")
        dup = sorted({x for x in ids if ids.count(x) > 1})
        if dup:
            raise DataError(f"duplicate candidate id(s) {dup} in one ranking")
        marks = ",".join("?" * len(ids))
        owner = dict(c.execute(f"SELECT id, prompt_id FROM candidates WHERE id IN ({marks})", ids).fetchall())
        for cid in ids:
            if cid not in owner:
                raise DataError(f"unknown candidate id {cid}")
            if owner[cid] != prompt_id:
                raise DataError(f"candidate {cid} belongs to prompt {owner[cid]}, not prompt {prompt_id}")
        return ids

    def _check_ranking(self, c, prompt_id, candidate_ids, order, labeler, time_s, flags):
        ids = self._check_candidates(c, prompt_id, candidate_ids)
        if not isinstance(labeler, str) or not labeler.strip():
            raise DataError(f"labeler must be a non-empty string, got {labeler!r}")
        if time_s is not None and (
            isinstance(time_s, bool) or not isinstance(time_s, int | float) or not math.isfinite(time_s) or time_s < 0
        ):
            raise DataError(f"time_s must be a finite number >= 0, got {time_s!r}")
        if isinstance(flags, str) or not all(isinstance(f, str) and f for f in flags):
            raise DataError(f"flags must be a list of non-empty strings, got {flags!r}")
        flag_list = list(dict.fromkeys(flags))
        try:
            norm = validate_order(list(order) if not isinstance(order, list) else order, len(ids),
                                  allow_empty="not_rankable" in flag_list)
        except ValueError as e:
            raise DataError(f"bad ranking of prompt {prompt_id}: {e}") from None
        return ids, norm, flag_list

    def rankings(self, split: str | None = None, labeler: str | None = None,
                 prompt_id: int | None = None) -> list[Ranking]:
        """Rankings (with prompt and candidate texts filled in), in id order, optionally filtered."""
        q, args = _where(
            'SELECT r.*, p.text AS prompt_text, p.split AS split FROM rankings r JOIN prompts p ON p.id = r.prompt_id',
            split=split, labeler=labeler, prompt_id=prompt_id, alias={"split": "p.split", "labeler": "r.labeler",
                                                                      "prompt_id": "r.prompt_id"},
        )
        rows = self._conn.execute(q + " ORDER BY r.id", args).fetchall()
        texts = self._candidate_texts({cid for r in rows for cid in json.loads(r["candidate_ids"])})
        out = []
        for r in rows:
            ids = json.loads(r["candidate_ids"])
            out.append(Ranking(
                prompt=r["prompt_text"],
                candidates=[texts[i][0] for i in ids],
                order=json.loads(r["order"]),
                labeler=r["labeler"],
                prompt_id=int(r["prompt_id"]),
                candidate_ids=ids,
                time_s=r["time_s"],
                flags=json.loads(r["flags"]),
                models=[texts[i][1] for i in ids],
                meta=json.loads(r["meta"]),
                id=int(r["id"]),
                split=r["split"],
                created_at=r["created_at"],
            ))
        return out

    def _candidate_texts(self, ids: set[int]) -> dict[int, tuple[str, str | None]]:
        out: dict[int, tuple[str, str | None]] = {}
        ids_l = sorted(ids)
        for i in range(0, len(ids_l), 900):  # stay under SQLite's bound-parameter limit
            chunk = ids_l[i : i + 900]
            marks = ",".join("?" * len(chunk))
            for row in self._conn.execute(f"SELECT id, text, model FROM candidates WHERE id IN ({marks})", chunk):
                out[int(row["id"])] = (row["text"], row["model"])
        return out

    def grouped_kway(self, split: str | None = None, labeler: str | None = None,
                     *, exclude_flags: Sequence[str] = ("not_rankable",)) -> list[dict]:
        """The RM's training set: one grouped K-way object per (prompt, labeler ranking).

        ``{"prompt": str, "responses": [str]*K, "order": [[int]...], "meta": {"prompt_id",
        "ranking_id", "labeler", "split", "flags", "candidate_ids"[, "messages"]}}``; ``messages``
        (the prompt as chat messages) is there when the prompt was imported from a conversation
        (HH-RLHF, TRL conversational): render those rather than the raw text. Rankings carrying any of
        ``exclude_flags``, and all-tied rankings (no pairs), are left out.
        """
        out = []
        msgs: dict[int, Any] = {}
        for pid, pmeta in self._conn.execute("SELECT id, meta FROM prompts WHERE meta LIKE '%\"messages\"%'"):
            m = json.loads(pmeta).get("messages")
            if m:
                msgs[int(pid)] = m
        for r in self.rankings(split=split, labeler=labeler):
            if set(r.flags) & set(exclude_flags) or len(r.order) < 2:
                continue
            meta = {"prompt_id": r.prompt_id, "ranking_id": r.id, "labeler": r.labeler, "split": r.split,
                    "flags": r.flags, "candidate_ids": r.candidate_ids}
            if r.prompt_id in msgs:  # imported conversations: the prompt as chat messages
                meta["messages"] = msgs[r.prompt_id]
            out.append(KWay(r.prompt, r.candidates, r.order, meta).to_dict())
        return out

    def has_ranking(self, prompt_id: int, candidate_ids: Sequence[int], order: Sequence[Sequence[int]],
                    labeler: str) -> bool:
        """True if this labeler already stored the same ranking of this prompt: the same candidate
        ids in the same tiers (positions may be listed in another order)."""
        ids = list(candidate_ids)
        want = (sorted(ids), [sorted(ids[x] for x in tier) for tier in order])
        for cids_json, order_json in self._conn.execute(
            'SELECT candidate_ids, "order" FROM rankings WHERE prompt_id = ? AND labeler = ?', (prompt_id, labeler)
        ):
            got_ids = json.loads(cids_json)
            if (sorted(got_ids), [sorted(got_ids[x] for x in tier) for tier in json.loads(order_json)]) == want:
                return True
        return False

    # -- demonstrations ---------------------------------------------------------------------

    def add_demonstrations(self, demos: Iterable[Demonstration | dict], *, split: str | None = None) -> list[int]:
        """Add demonstrations; return their ids. A demo without ``prompt_id`` is attached to the stored
        prompt with the same text, or to a new prompt (given ``split``)."""
        items = [d if isinstance(d, Demonstration) else Demonstration(**d) for d in demos]
        for i, d in enumerate(items):
            if not isinstance(d.response, str) or not isinstance(d.prompt, str):
                raise DataError(f"demonstration {i}: prompt and response must be strings")
        ids = []
        with self._tx() as c:
            for d in items:
                pid = d.prompt_id
                if pid is None:
                    pid = self.find_prompt(d.prompt)
                    if pid is None:
                        pid = self.add_prompts([Prompt(text=d.prompt, split=split)])[0]
                else:
                    self._require_prompt(c, pid)
                cur = c.execute(
                    "INSERT INTO demonstrations(prompt_id, response, labeler, meta, created_at) VALUES (?, ?, ?, ?, ?)",
                    (pid, d.response, d.labeler, json.dumps(d.meta or {}), _now()),
                )
                ids.append(int(cur.lastrowid))
        return ids

    def demonstrations(self, split: str | None = None) -> list[Demonstration]:
        q, args = _where("SELECT d.*, p.text AS prompt_text FROM demonstrations d JOIN prompts p ON p.id = d.prompt_id",
                         split=split, alias={"split": "p.split"})
        return [
            Demonstration(prompt=r["prompt_text"], response=r["response"], prompt_id=int(r["prompt_id"]),
                          labeler=r["labeler"], meta=json.loads(r["meta"]), id=int(r["id"]))
            for r in self._conn.execute(q + " ORDER BY d.id", args)
        ]

    # -- labeling queues ----------------------------------------------------------------------

    def enqueue(self, queue: str, prompt_id: int, candidate_ids: Sequence[int], *, copies: int = 1) -> list[int]:
        """Add ``copies`` pending tasks (rank these candidates of this prompt) to ``queue``; return task ids.
        Use copies > 1 for the agreement slice: each copy goes to a different labeler."""
        if copies < 1:
            raise DataError(f"copies must be >= 1, got {copies}")
        with self._tx() as c:
            prompt_id = self._require_prompt(c, prompt_id)
            ids = self._check_candidates(c, prompt_id, candidate_ids)
            now = _now()
            return [
                int(c.execute(
                    "INSERT INTO queue(queue, prompt_id, candidate_ids, status, created_at) VALUES (?, ?, ?, 'pending', ?)",
                    (queue, prompt_id, json.dumps(ids), now),
                ).lastrowid)
                for _ in range(copies)
            ]

    def next_task(self, labeler: str, queue: str | None = None, *, where: str = "",
                  where_args: Sequence[Any] = ()) -> Task | None:
        """Assign the next task to ``labeler`` and return it, or None when nothing is left.

        A task the labeler already holds (assigned, not done) comes back first, so a reload
        resumes it. Otherwise the oldest pending task whose prompt this labeler has not yet
        been given in that queue (and that meets ``where``: an SQL condition on the task ``q``,
        with ``where_args``). Atomic: two labelers never get the same task.
        """
        if not isinstance(labeler, str) or not labeler.strip():
            raise DataError(f"labeler must be a non-empty string, got {labeler!r}")
        qfilter, qargs = ("AND q.queue = ?", [queue]) if queue is not None else ("", [])
        with self._tx(exclusive=False) as c:
            if self.dialect.labeler_lock:
                c.execute(self.dialect.labeler_lock, (labeler,))
            row = c.execute(
                f"SELECT q.id FROM queue q WHERE q.status = 'assigned' AND q.labeler = ? {qfilter} ORDER BY q.id LIMIT 1",
                [labeler, *qargs],
            ).fetchone()
            if row is None:
                row = c.execute(
                    f"SELECT q.id FROM queue q WHERE q.status = 'pending' {qfilter} AND NOT EXISTS ("
                    "SELECT 1 FROM queue o WHERE o.queue = q.queue AND o.prompt_id = q.prompt_id AND o.labeler = ?) "
                    f"{where} ORDER BY q.id LIMIT 1{self.dialect.skip_locked}",
                    [*qargs, labeler, *where_args],
                ).fetchone()
                if row is None:
                    return None
                c.execute("UPDATE queue SET status = 'assigned', labeler = ?, assigned_at = ? WHERE id = ?",
                          (labeler, _now(), row[0]))
            return self.task(int(row[0]))

    def task(self, task_id: int) -> Task:
        r = self._conn.execute(
            "SELECT q.*, p.text AS prompt_text FROM queue q JOIN prompts p ON p.id = q.prompt_id WHERE q.id = ?",
            (task_id,),
        ).fetchone()
        if r is None:
            raise DataError(f"unknown task id {task_id}")
        ids = json.loads(r["candidate_ids"])
        texts = self._candidate_texts(set(ids))
        return Task(id=int(r["id"]), queue=r["queue"], prompt_id=int(r["prompt_id"]), prompt=r["prompt_text"],
                    candidate_ids=ids, candidates=[texts[i][0] for i in ids], status=r["status"],
                    labeler=r["labeler"], ranking_id=r["ranking_id"])

    def complete(self, task_id: int, order: Sequence[Sequence[int]], labeler: str, *,
                 time_s: float | None = None, flags: Sequence[str] = (), meta: dict | None = None) -> int:
        """Record the labeler's ranking for an assigned task and mark it done; return the ranking id.
        The task must be assigned to ``labeler``; the order indexes the task's candidates."""
        with self._tx(exclusive=False) as c:
            r = c.execute(f"SELECT * FROM queue WHERE id = ?{self.dialect.for_update}", (task_id,)).fetchone()
            if r is None:
                raise DataError(f"unknown task id {task_id}")
            if r["status"] != "assigned" or r["labeler"] != labeler:
                raise DataError(f"task {task_id} is {r['status']} (labeler {r['labeler']!r}), not assigned to {labeler!r}")
            rid = self.add_ranking(int(r["prompt_id"]), json.loads(r["candidate_ids"]), order, labeler,
                                   time_s=time_s, flags=flags, meta={**(meta or {}), "task_id": task_id})
            c.execute("UPDATE queue SET status = 'done', done_at = ?, ranking_id = ? WHERE id = ?", (_now(), rid, task_id))
            return rid

    def release(self, task_id: int) -> None:
        """Put an assigned (not done) task back to pending, e.g. when a labeler abandons it."""
        with self._tx(exclusive=False) as c:
            c.execute("UPDATE queue SET status = 'pending', labeler = NULL, assigned_at = NULL "
                      "WHERE id = ? AND status = 'assigned'", (task_id,))

    def has_table(self, name: str) -> bool:
        return bool(self._conn.execute(self.dialect.table_exists, (name,)).fetchall())

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of one read-only statement, outside any write lock. For modules that keep their own
        tables in the store file (``preflab.annotate``); writes go through ``transaction()``."""
        if not sql.lstrip().upper().startswith("SELECT"):
            raise DataError("query() runs SELECT statements only; write inside transaction()")
        return self._conn.execute(sql, list(args)).fetchall()

    def queue_counts(self, queue: str | None = None) -> dict[str, int]:
        q, args = _where("SELECT status, COUNT(*) FROM queue", queue=queue)
        got = dict(self._conn.execute(q + " GROUP BY status", args).fetchall())
        return {s: int(got.get(s, 0)) for s in QUEUE_STATUSES}

    # -- counts -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Rows per table, and queue tasks per status: ``{"prompts", "candidates", "rankings",
        "demonstrations", "queue_pending", "queue_assigned", "queue_done"}``."""
        out = {t: int(self._conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
               for t in ("prompts", "candidates", "rankings", "demonstrations")}
        out.update({f"queue_{s}": n for s, n in self.queue_counts().items()})
        return out

    def breakdown(self) -> dict[str, dict[str, int]]:
        """Counts by group: prompts per split and per category, rankings per split and per labeler,
        flags per kind. Missing values are shown as ``"-"``."""
        def grouped(sql: str) -> dict[str, int]:
            return {("-" if k is None else str(k)): int(n) for k, n in self._conn.execute(sql).fetchall()}

        flags: dict[str, int] = {}
        for (fl,) in self._conn.execute("SELECT flags FROM rankings WHERE flags != '[]'"):
            for f in json.loads(fl):
                flags[f] = flags.get(f, 0) + 1
        return {
            "prompts_by_split": grouped("SELECT split, COUNT(*) FROM prompts GROUP BY split ORDER BY split"),
            "prompts_by_category": grouped("SELECT category, COUNT(*) FROM prompts GROUP BY category ORDER BY category"),
            "rankings_by_split": grouped(
                "SELECT p.split, COUNT(*) FROM rankings r JOIN prompts p ON p.id = r.prompt_id GROUP BY p.split ORDER BY p.split"),
            "rankings_by_labeler": grouped("SELECT labeler, COUNT(*) FROM rankings GROUP BY labeler ORDER BY labeler"),
            "flags": dict(sorted(flags.items())),
        }


def _as_prompt(p: Prompt | dict | str) -> Prompt:
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt(text=p)
    if isinstance(p, dict):
        return Prompt(**{k: v for k, v in p.items() if k in Prompt.__dataclass_fields__})
    raise DataError(f"cannot make a prompt from {type(p).__name__}")


def _row_prompt(r: sqlite3.Row) -> Prompt:
    return Prompt(text=r["text"], category=r["category"], slice=r["slice"], split=r["split"],
                  meta=json.loads(r["meta"]), id=int(r["id"]), uid=r["uid"])


def _where(sql: str, alias: dict[str, str] | None = None, **filters: Any) -> tuple[str, list]:
    alias = alias or {}
    conds, args = [], []
    for key, val in filters.items():
        if val is not None:
            conds.append(f"{alias.get(key, key)} = ?")
            args.append(val)
    return (sql + (" WHERE " + " AND ".join(conds) if conds else "")), args
