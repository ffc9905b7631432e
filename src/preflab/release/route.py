"""``preflab route``: a canary router in front of two or more OpenAI-compatible back ends.

Routing: every request names a user (the body's ``user`` or the ``x-user-id`` header); a hash of
it picks a bucket in [0, 1), and the candidates own the first buckets in config order (a
candidate with share 0.02 gets the users whose bucket is below 0.02), the incumbent the rest.
So a user always lands on the same back end while the shares stay put (sticky), and raising a
share only adds users. A request without a user gets a random bucket.

Logging: every request is one row of ``route_exchanges`` in the store's SQLite file (prompt,
response, back end, model version, latency, user, status), written before the client gets its
answer (for a stream: before ``[DONE]``), so an acknowledged exchange is on disk. The response
``id`` is the exchange id; ``POST /v1/feedback`` ({id, thumbs: up|down, flags, note}) writes a
``route_feedback`` row beside it. A thumbs-down or flagged exchange becomes a task of the labeling
app's queue (project ``feedback``, K=2: the logged response and a fresh one from the incumbent),
made by a worker thread in one transaction with the mark on the feedback row, so a task is made
exactly once.

Failures: a back end that refuses connections, times out or answers 5xx is a failure; the
request is retried on the incumbent when nothing has reached the client yet (a chat completion
has no side effects), else answered 502 (the back end failed) or 503 (none is reachable). A
failed back end is skipped for ``cooldown_s``, and until a request or a health check (``GET
/health`` of every back end each ``health_interval_s``) finds it answering again. A back end's
4xx is the client's bad request: passed on as it is, and no failure of the back end. Every failure
is a ``backend_error`` row of ``route_events`` under the back end that failed (also when the
incumbent then served the request), so the canary metrics are rebuilt from the log on restart.

Canary metrics (per candidate, over its last ``window`` requests): error rate, latency p95,
refusal rate, consecutive errors, and the negative-feedback rate with its Wilson interval.
Breaching a threshold sets the candidate's share to 0 (rollback), recorded in
``route_events``. Shares live in a state file written atomically (temporary file + rename);
``/admin/rollback``, ``/admin/promote`` and ``/admin/shares`` change them and need the admin token.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from preflab.errors import PreflabError
from preflab.release.common import (
    atomic_write,
)

FEEDBACK_PROJECT = "feedback"

# ---------------------------------------------------------------------------------------------
# Config and state
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Backend(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    model: str = Field(description="The model name the back end serves.")
    role: Literal["incumbent", "candidate"] = "candidate"
    share: float = Field(0.0, ge=0, le=1, description="Candidates: the starting share of users (0.01-0.05).")
    token_env: str | None = None


class Thresholds(_Strict):
    window: int = Field(200, ge=1)
    min_requests: int = Field(30, ge=1, description="Candidate requests in the window before rates are judged.")
    error_rate: float = Field(0.05, ge=0, le=1)
    consecutive_errors: int = Field(5, ge=1)
    latency_p95_ms: float = Field(10_000, gt=0)
    refusal_rate: float = Field(0.5, ge=0, le=1)
    negative_feedback_rate: float = Field(0.3, ge=0, le=1, description="Rollback when the Wilson interval's "
                                          "lower end of the negative-feedback rate is above this.")
    min_feedback: int = Field(10, ge=1)


class RouteConfig(_Strict):
    store: str
    state: str | None = Field(None, description="Shares file (default: STORE.route-state.json).")
    model: str = Field("preflab", description="The model name clients send.")
    backends: list[Backend] = Field(min_length=2)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    timeout_s: float = Field(120, gt=0)
    cooldown_s: float = Field(2.0, ge=0)
    health_interval_s: float = Field(5.0, gt=0, description="Seconds between health checks of the back ends.")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Larger request bodies get 413 before they are read.")
    salt: str = ""
    feedback_project: str = FEEDBACK_PROJECT

    @model_validator(mode="after")
    def _check(self):
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("back end names must be unique")
        if sum(b.role == "incumbent" for b in self.backends) != 1:
            raise ValueError("exactly one back end needs role: incumbent")
        if sum(b.share for b in self.backends if b.role == "candidate") > 1:
            raise ValueError("the candidates' shares add up to more than 1")
        from preflab.feedback.store import is_url

        if is_url(self.store):
            raise ValueError("store: the router keeps its log in a SQLite store file; a postgresql:// store "
                             "is not supported here")
        return self

    @property
    def state_path(self) -> Path:
        return Path(self.state) if self.state else Path(self.store + ".route-state.json")


def load_config(path: str) -> RouteConfig:
    from preflab.config import format_validation_error, load_yaml

    try:
        return RouteConfig.model_validate(load_yaml(path) or {})
    except ValidationError as e:
        raise PreflabError(format_validation_error(e, path)) from None


class State:
    """Who is the incumbent and the candidates' shares; replaced whole (never edited in place) and
    saved atomically, so a reader sees one consistent version."""

    def __init__(self, incumbent: str, shares: dict[str, float], version: int = 0):
        self.incumbent, self.shares, self.version = incumbent, dict(shares), version

    def to_dict(self) -> dict[str, Any]:
        return {"incumbent": self.incumbent, "shares": self.shares, "version": self.version}

    @staticmethod
    def initial(cfg: RouteConfig) -> State:
        inc = next(b.name for b in cfg.backends if b.role == "incumbent")
        return State(inc, {b.name: b.share for b in cfg.backends if b.name != inc})

    def check(self, names: set[str]) -> None:
        if self.incumbent not in names or not set(self.shares) <= names or self.incumbent in self.shares:
            raise PreflabError(f"state names unknown back ends: {self.to_dict()}")
        if any(not 0 <= s <= 1 for s in self.shares.values()) or sum(self.shares.values()) > 1 + 1e-9:
            raise PreflabError(f"shares must be in [0, 1] and add up to at most 1: {self.shares}")


def load_state(cfg: RouteConfig) -> State:
    path = cfg.state_path
    if not path.is_file():
        return State.initial(cfg)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        st = State(d["incumbent"], d["shares"], int(d.get("version", 0)))
        st.check({b.name for b in cfg.backends})
    except (ValueError, KeyError, TypeError, AttributeError, PreflabError) as e:
        raise PreflabError(f"{path}: not a valid route state file ({type(e).__name__}: {e}); every state the "
                           f"router saved is in route_events of {cfg.store}: restore the file from there, or "
                           "delete it to start from the config's shares") from None
    return st


def bucket(user: str | None, salt: str) -> float:
    if user is None:
        return random.random()
    h = hashlib.sha256(f"{salt}\0{user}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def pick(state: State, order: list[str], b: float) -> str:
    """The back end owning bucket ``b``: candidates in config order, then the incumbent."""
    edge = 0.0
    for name in order:
        if name == state.incumbent:
            continue
        edge += state.shares.get(name, 0.0)
        if b < edge:
            return name
    return state.incumbent


# ---------------------------------------------------------------------------------------------
# The log (route_* tables in the store's SQLite file)
# ---------------------------------------------------------------------------------------------

TABLES = (
    """CREATE TABLE IF NOT EXISTS route_exchanges (
        id TEXT PRIMARY KEY, created_at REAL NOT NULL, user TEXT, backend TEXT NOT NULL, model_version TEXT,
        prompt TEXT NOT NULL, response TEXT, status TEXT NOT NULL, http_status INTEGER, latency_ms REAL,
        retried_from TEXT, error TEXT, stream INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS route_exchanges_backend ON route_exchanges(backend, created_at)",
    """CREATE TABLE IF NOT EXISTS route_feedback (
        id TEXT PRIMARY KEY, exchange_id TEXT NOT NULL REFERENCES route_exchanges(id), created_at REAL NOT NULL,
        user TEXT, thumbs TEXT, flags TEXT NOT NULL DEFAULT '[]', note TEXT, negative INTEGER NOT NULL,
        task_id INTEGER)""",
    "CREATE INDEX IF NOT EXISTS route_feedback_todo ON route_feedback(negative, task_id)",
    """CREATE TABLE IF NOT EXISTS route_events (
        id INTEGER PRIMARY KEY, created_at REAL NOT NULL, kind TEXT NOT NULL, backend TEXT, detail TEXT)""",
    "CREATE INDEX IF NOT EXISTS route_events_backend ON route_events(backend, kind, created_at)",
)

# A back end's attempts as its canary counts them: the exchanges it served, and its failures (a back
# end's 4xx, logged as a 'rejected' exchange, is neither).
ATTEMPTS = """SELECT created_at, 1 AS ok, latency_ms, response FROM route_exchanges WHERE backend = :b AND status = 'ok'
    UNION ALL SELECT created_at, 0, json_extract(detail, '$.latency_ms'), NULL FROM route_events
    WHERE backend = :b AND kind = 'backend_error'"""


def response_content(data: dict) -> str:
    """The assistant's text of a chat completion's JSON ("" when there is none)."""
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


class Log:
    """One SQLite connection shared by the router's threads under a lock. WAL with synchronous=NORMAL:
    a committed row survives the death of the process (kill -9); only an OS crash or power loss
    can take the last commits (synchronous=FULL would fsync every request)."""

    def __init__(self, path: str):
        from preflab.feedback.store import PreferenceStore

        PreferenceStore(path).close()  # creates the store's own tables (and WAL mode) if the file is new
        self.conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.lock = threading.Lock()
        with self.lock:
            self.conn.execute("PRAGMA busy_timeout = 60000")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            for sql in TABLES:
                self.conn.execute(sql)

    def write(self, sql: str, args: tuple) -> None:
        with self.lock:
            self.conn.execute(sql, args)

    def rows(self, sql: str, args: tuple | dict = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    def exchange(self, row: dict[str, Any]) -> None:
        cols = ",".join(row)
        self.write(f"INSERT INTO route_exchanges({cols}) VALUES ({','.join('?' * len(row))})", tuple(row.values()))

    def event(self, kind: str, backend: str | None, detail: dict[str, Any]) -> None:
        self.write("INSERT INTO route_events(created_at, kind, backend, detail) VALUES (?, ?, ?, ?)",
                   (time.time(), kind, backend, json.dumps(detail)))


# ---------------------------------------------------------------------------------------------
# Canary metrics
# ---------------------------------------------------------------------------------------------


class Canary:
    """Online metrics of one back end: the last ``window`` requests and feedback."""

    def __init__(self, window: int):
        self.requests: collections.deque = collections.deque(maxlen=window)  # (ok, latency_ms, refusal)
        self.feedback: collections.deque = collections.deque(maxlen=window)  # negative: bool
        self.consecutive_errors = 0
        self.total = self.errors = 0

    def add(self, ok: bool, latency_ms: float, refusal: bool) -> None:
        self.requests.append((ok, latency_ms, refusal))
        self.total += 1
        self.errors += not ok
        self.consecutive_errors = 0 if ok else self.consecutive_errors + 1

    def summary(self) -> dict[str, Any]:
        from preflab.rl.stats import wilson_interval

        n = len(self.requests)
        lat = sorted(x[1] for x in self.requests if x[0])
        oks = [x for x in self.requests if x[0]]
        nf, neg = len(self.feedback), sum(self.feedback)
        lo, hi = wilson_interval(neg, nf) if nf else (0.0, 1.0)
        return {
            "window_requests": n, "requests_total": self.total, "errors_total": self.errors,
            "error_rate": (sum(not x[0] for x in self.requests) / n) if n else None,
            "consecutive_errors": self.consecutive_errors,
            "latency_p95_ms": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
            "refusal_rate": (sum(x[2] for x in oks) / len(oks)) if oks else None,
            "feedback": nf, "negative_feedback_rate": (neg / nf) if nf else None,
            "negative_feedback_interval": [float(lo), float(hi)],
        }

    def breach(self, t: Thresholds) -> str | None:
        """The first threshold this back end breaches, in words, or None."""
        s = self.summary()
        if s["consecutive_errors"] >= t.consecutive_errors:
            return f"{s['consecutive_errors']} consecutive errors (threshold {t.consecutive_errors})"
        if s["window_requests"] >= t.min_requests:
            if s["error_rate"] > t.error_rate:
                return f"error rate {s['error_rate']:.3f} > {t.error_rate}"
            if s["latency_p95_ms"] is not None and s["latency_p95_ms"] > t.latency_p95_ms:
                return f"latency p95 {s['latency_p95_ms']:.0f} ms > {t.latency_p95_ms:.0f} ms"
            if s["refusal_rate"] is not None and s["refusal_rate"] > t.refusal_rate:
                return f"refusal rate {s['refusal_rate']:.3f} > {t.refusal_rate}"
        if s["feedback"] >= t.min_feedback and s["negative_feedback_interval"][0] > t.negative_feedback_rate:
            lo = s["negative_feedback_interval"][0]
            return (f"negative feedback {s['negative_feedback_rate']:.3f} (95% interval from {lo:.3f}) > "
                    f"{t.negative_feedback_rate}")
        return None


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------


class BackendDown(Exception):
    def __init__(self, message: str, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


class Router:
    def __init__(self, cfg: RouteConfig):
        self.cfg = cfg
        self.backends = {b.name: b for b in cfg.backends}
        self.order = [b.name for b in cfg.backends]
        self.log = Log(cfg.store)
        self.state = load_state(cfg)
        self.state_lock = threading.Lock()
        self.canary = {n: Canary(cfg.thresholds.window) for n in self.order}
        self.down_until: dict[str, float] = {}
        self.health: dict[str, dict[str, Any]] = {n: {"checked_at": None, "error": None} for n in self.order}
        self._reload_canaries()
        self.save_state(self.state, "start", None, {})

    def _reload_canaries(self) -> None:
        """After a restart the canaries start from the log: each back end's last ``window`` attempts and
        feedback, and its totals."""
        from preflab.feedback.rubric import is_refusal

        window = self.cfg.thresholds.window
        for name, c in self.canary.items():
            rows = self.log.rows(f"{ATTEMPTS} ORDER BY created_at DESC LIMIT :n", {"b": name, "n": window})
            for r in reversed(rows):
                c.add(bool(r["ok"]), r["latency_ms"] or 0.0, bool(r["ok"]) and is_refusal(r["response"] or ""))
            c.total, c.errors = self.log.rows(f"SELECT COUNT(*), COALESCE(SUM(1 - ok), 0) FROM ({ATTEMPTS})",
                                              {"b": name})[0]
            rows = self.log.rows("SELECT f.negative FROM route_feedback f JOIN route_exchanges e ON e.id = "
                                 "f.exchange_id WHERE e.backend = ? ORDER BY f.created_at DESC LIMIT ?", (name, window))
            c.feedback.extend(bool(r["negative"]) for r in reversed(rows))

    # -- state ------------------------------------------------------------------------------

    def save_state(self, new: State, kind: str, backend: str | None, detail: dict[str, Any]) -> State:
        with self.state_lock:
            new.check(set(self.order))
            new.version = self.state.version + (kind != "start")
            atomic_write(self.cfg.state_path, json.dumps(new.to_dict(), indent=2))
            self.state = new
        self.log.event(kind, backend, {**detail, "state": new.to_dict()})
        return new

    def rollback(self, names: list[str] | None, reason: str, kind: str = "rollback") -> State:
        cur = self.state
        names = names or [n for n in cur.shares]
        unknown = [n for n in names if n not in cur.shares]
        if unknown:
            raise PreflabError(f"not a candidate: {', '.join(unknown)}")
        return self.save_state(State(cur.incumbent, {**cur.shares, **dict.fromkeys(names, 0.0)}), kind,
                               ",".join(names), {"reason": reason})

    def promote(self, name: str, reason: str) -> State:
        cur = self.state
        if name not in self.backends:
            raise PreflabError(f"unknown back end {name!r}")
        shares = dict.fromkeys([n for n in self.order if n != name], 0.0)
        return self.save_state(State(name, shares), "promote", name, {"reason": reason, "previous": cur.incumbent})

    def set_shares(self, shares: dict[str, float]) -> State:
        cur = self.state
        return self.save_state(State(cur.incumbent, {**cur.shares, **shares}), "shares", None, {"shares": shares})

    def watch(self, name: str) -> None:
        if name == self.state.incumbent or self.state.shares.get(name, 0.0) == 0.0:
            return
        why = self.canary[name].breach(self.cfg.thresholds)
        if why:
            self.rollback([name], f"automatic: {why}", kind="auto_rollback")

    # -- back ends --------------------------------------------------------------------------

    def available(self, name: str) -> bool:
        """Whether the last request or health check of ``name`` found it answering, and its cooldown
        after a failure is over."""
        return self.health[name]["error"] is None and time.monotonic() >= self.down_until.get(name, 0.0)

    def mark(self, name: str, error: str | None) -> None:
        """The outcome of a request to or a health check of ``name``: ``error`` None when it answered."""
        self.health[name] = {"checked_at": time.time(), "error": error}

    def mark_down(self, name: str, error: str) -> None:
        self.down_until[name] = time.monotonic() + self.cfg.cooldown_s
        self.mark(name, error)

    def headers(self, b: Backend) -> dict[str, str]:
        import os

        return {"authorization": f"Bearer {os.environ.get(b.token_env, '')}"} if b.token_env else {}


# ---------------------------------------------------------------------------------------------
# Negative feedback -> labeling tasks
# ---------------------------------------------------------------------------------------------


# The feedback rows of one exchange that its labeling task is for: the negative ones not yet linked
# (a thumbs-up of the same exchange, before or after, is never linked to the task).
UNLINKED_NEGATIVE = "WHERE exchange_id = ? AND negative = 1 AND task_id IS NULL"


class FeedbackWorker:
    """Turns thumbs-down and flagged exchanges into tasks of the labeling app's ``feedback`` project:
    K=2 candidates, the logged response and a fresh one from the incumbent. Owns its own
    PreferenceStore (a connection per thread); a task and the mark on its negative feedback rows
    are one transaction."""

    def __init__(self, cfg: RouteConfig, router: Router):
        self.cfg, self.router = cfg, router
        self.event = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="route-feedback", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.event.set()
        self.thread.join(5)

    def wake(self) -> None:
        self.event.set()

    def run(self) -> None:
        from preflab.feedback.store import PreferenceStore

        store = PreferenceStore(self.cfg.store)
        try:
            while not self.stopping:
                try:
                    self.drain(store)
                except Exception as e:  # noqa: BLE001 - keep the worker alive; the rows stay pending
                    self.router.log.event("feedback_worker_error", None, {"error": f"{type(e).__name__}: {e}"})
                self.event.wait(1.0)
                self.event.clear()
        finally:
            store.close()

    def drain(self, store) -> int:
        rows = store.query("SELECT DISTINCT exchange_id FROM route_feedback WHERE negative = 1 AND task_id IS NULL "
                           "LIMIT 50")
        made = 0
        for r in rows:
            if self.enqueue(store, r["exchange_id"]):
                made += 1
        return made

    def alternative(self, messages: list[dict]) -> tuple[str, str] | None:
        import httpx

        inc = self.router.backends[self.router.state.incumbent]
        try:
            resp = httpx.post(inc.url.rstrip("/") + "/v1/chat/completions", timeout=self.cfg.timeout_s,
                              json={"model": inc.model, "messages": messages}, headers=self.router.headers(inc))
            resp.raise_for_status()
            return response_content(resp.json()) or "(empty response)", inc.name
        except (httpx.HTTPError, ValueError):
            return None

    def enqueue(self, store, exchange_id: str) -> bool:
        from preflab.data.schema import Prompt

        ex = store.query("SELECT * FROM route_exchanges WHERE id = ?", (exchange_id,))[0]
        messages = json.loads(ex["prompt"])
        alt = self.alternative(messages)
        if alt is None:
            return False  # no back end to sample from now; the next pass tries again
        text = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        project = ensure_feedback_project(store, self.cfg.feedback_project)
        with store.transaction() as c:
            if c.execute("SELECT 1 FROM route_feedback WHERE exchange_id = ? AND task_id IS NOT NULL",
                         (exchange_id,)).fetchone():
                c.execute("UPDATE route_feedback SET task_id = (SELECT MAX(task_id) FROM route_feedback WHERE "
                          f"exchange_id = ?) {UNLINKED_NEGATIVE}", (exchange_id, exchange_id))
                return False
            pid = store.add_prompts([Prompt(text=text, uid=f"route:{exchange_id}",
                                            meta={"route_exchange": exchange_id, "messages": messages})],
                                    split=project["split"])[0]
            cids = store.add_candidates(pid, [ex["response"] or "(empty response)", alt[0]],
                                        model=None)
            c.execute("UPDATE candidates SET model = ? WHERE id = ?", (ex["backend"], cids[0]))
            c.execute("UPDATE candidates SET model = ? WHERE id = ?", (alt[1], cids[1]))
            task = store.enqueue(project["queue"], pid, cids)[0]
            c.execute(f"UPDATE route_feedback SET task_id = ? {UNLINKED_NEGATIVE}", (task, exchange_id))
        return True


def ensure_feedback_project(store, name: str) -> dict[str, Any]:
    """The labeling app's project for feedback tasks (K=2), created on first use."""
    from preflab.annotate.db import ensure_tables, now
    from preflab.annotate.validate import FLAGS

    ensure_tables(store)
    with store.transaction() as c:
        row = c.execute("SELECT queue, split, k FROM annotate_projects WHERE name = ?", (name,)).fetchone()
        if row is None:
            c.execute("INSERT INTO annotate_projects(name, queue, k, split, guidelines, settings, created_at) "
                      "VALUES (?, ?, 2, 'rm', ?, ?, ?)",
                      (name, f"annotate:{name}", "Exchanges users flagged or rated down in production: rank the "
                       "logged response against a fresh one from the incumbent.",
                       json.dumps({"source": "preflab route", "flags": list(FLAGS)}), now()))
            row = c.execute("SELECT queue, split, k FROM annotate_projects WHERE name = ?", (name,)).fetchone()
    return dict(row)
