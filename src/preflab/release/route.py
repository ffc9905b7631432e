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

import asyncio
import collections
import contextlib
import hashlib
import json
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from preflab.errors import PreflabError
from preflab.http_body import BodyError
from preflab.release.common import (
    TextContent,
    atomic_write,
    bearer_ok,
    body_error_response,
    chat_request,
    check_bind,
    error_response,
    json_object,
    validation_message,
)

try:
    from fastapi import Request
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"{e}; install the server extra: pip install 'preflab[annotate]'") from None

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


def build_app(cfg: RouteConfig, *, admin_token: str | None = None, token: str | None = None):
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from preflab.feedback.rubric import is_refusal

    router = Router(cfg)
    client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)),
                               limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
    worker = FeedbackWorker(cfg, router)

    async def probe(b: Backend) -> None:
        try:
            r = await client.get(b.url.rstrip("/") + "/health", headers=router.headers(b),
                                 timeout=min(cfg.timeout_s, 5.0))
            error = f"health check: HTTP {r.status_code}" if r.status_code >= 500 else None
        except httpx.HTTPError as e:
            error = f"health check: {type(e).__name__}: {e}"
        router.mark(b.name, error)

    async def check_health() -> None:
        """Every ``health_interval_s``: is each back end answering (any answer below 500 counts)?"""
        while True:
            await asyncio.gather(*(probe(b) for b in cfg.backends))
            await asyncio.sleep(cfg.health_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        checks = asyncio.create_task(check_health())
        try:
            yield
        finally:
            checks.cancel()
            worker.stop()
            await client.aclose()

    app = FastAPI(title="preflab route", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.router = router
    app.add_exception_handler(BodyError, body_error_response)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        if path.startswith("/admin"):
            if admin_token is None:
                return error_response(403, "admin endpoints are off: start the router with --admin-token",
                                      type_="permission_error", code="admin_disabled")
            if not bearer_ok(request.headers.get("authorization"), admin_token):
                return error_response(401, "missing or wrong admin token", type_="authentication_error",
                                      code="invalid_api_key")
        elif path.startswith("/v1/") and not bearer_ok(request.headers.get("authorization"), token):
            return error_response(401, "missing or wrong bearer token", type_="authentication_error",
                                  code="invalid_api_key")
        return await call_next(request)

    async def read_json(request: Request) -> dict[str, Any]:
        return await json_object(request, cfg.max_body_bytes)

    async def count_failure(name: str, latency: float, error: str, xid: str) -> None:
        """A failed attempt on ``name``: counted by its canary and logged under it."""
        router.canary[name].add(False, latency, False)
        await run_in_threadpool(router.log.event, "backend_error", name,
                                {"exchange": xid, "error": error, "latency_ms": latency})
        router.watch(name)

    @app.get("/health")
    async def health():
        st = router.state
        return {"status": "ok", "incumbent": st.incumbent, "shares": st.shares,
                "backends": {n: {"available": router.available(n), "last_checked": router.health[n]["checked_at"],
                                 "error": router.health[n]["error"]} for n in router.order}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "preflab"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        req, refused = chat_request(body, ChatBody, cfg.model, "the router")
        if refused:
            return refused
        body["messages"] = [m.model_dump() for m in req.messages]  # list-of-parts content as text
        user = body.get("user") if isinstance(body.get("user"), str) else request.headers.get("x-user-id")
        state = router.state
        first = pick(state, router.order, bucket(user, cfg.salt))
        tries = [first] + ([state.incumbent] if first != state.incumbent else [])
        xid = f"chatcmpl-{uuid.uuid4().hex}"
        if not router.available(first) and len(tries) > 1:  # down: counts as a failure of it
            tries = tries[1:]
            await count_failure(first, 0.0, f"{first}: unavailable ({router.health[first]['error']})", xid)
        base = {"id": xid, "user": user, "prompt": json.dumps(body["messages"], ensure_ascii=False),
                "stream": int(bool(body.get("stream")))}
        errors: list[str] = []
        unreachable = True
        for name in tries:
            b = router.backends[name]
            t0 = time.perf_counter()
            fwd = {**body, "model": b.model}
            try:
                if body.get("stream"):
                    resp = await open_stream(client, b, fwd, router.headers(b))
                else:
                    resp = await client.post(b.url.rstrip("/") + "/v1/chat/completions", json=fwd,
                                             headers=router.headers(b))
                    if resp.status_code >= 500:
                        raise BackendDown(f"{name}: HTTP {resp.status_code}", unreachable=False)
            except (httpx.HTTPError, BackendDown) as e:
                latency = (time.perf_counter() - t0) * 1000
                unreachable = unreachable and (isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
                                               or getattr(e, "unreachable", False))
                errors.append(f"{name}: {type(e).__name__}: {e}")
                router.mark_down(name, errors[-1])
                await count_failure(name, latency, errors[-1], xid)
                continue
            router.mark(name, None)
            retried_from = first if name != first else None
            if body.get("stream") and resp.status_code != 200:  # a 4xx before any event: pass it on as JSON
                raw = await resp.aread()
                await resp.aclose()
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = None
                return await rejected(base, name, resp.status_code, data, raw.decode(errors="replace"),
                                      (time.perf_counter() - t0) * 1000)
            if body.get("stream"):
                return StreamingResponse(relay(resp, b, base, t0, retried_from), media_type="text/event-stream",
                                         headers={"x-preflab-exchange-id": xid, "x-preflab-backend": name})
            latency = (time.perf_counter() - t0) * 1000
            try:
                data = resp.json()
            except ValueError:
                data = None
            if resp.status_code != 200 or not isinstance(data, dict):  # the back end's own 4xx: pass it on
                return await rejected(base, name, resp.status_code, data, resp.text, latency)
            text = _content(data)
            version = resp.headers.get("x-preflab-model-version") or data.get("system_fingerprint") or b.model
            await run_in_threadpool(router.log.exchange, {
                **base, "created_at": time.time(), "backend": name, "model_version": version, "response": text,
                "status": "ok", "http_status": 200, "latency_ms": latency, "retried_from": retried_from})
            router.canary[name].add(True, latency, is_refusal(text))
            router.watch(name)
            data.update(id=xid, model=cfg.model)
            return JSONResponse(data, headers={"x-preflab-exchange-id": xid, "x-preflab-backend": name})
        status = 503 if unreachable else 502
        await run_in_threadpool(router.log.exchange, {
            **base, "created_at": time.time(), "backend": tries[-1], "status": "error", "http_status": status,
            "error": "; ".join(errors), "retried_from": tries[0] if len(tries) > 1 else None})
        return error_response(status, "no back end could serve the request: " + "; ".join(errors),
                              type_="server_error", code="backend_unavailable" if unreachable else "backend_error")

    async def rejected(base: dict, name: str, status: int, data: Any, text: str, latency: float):
        """A back end's 4xx (e.g. a prompt too long for it): logged as ``rejected`` and passed on."""
        body = data if isinstance(data, dict) else {"error": {"message": text[:500], "type": "invalid_request_error",
                                                             "param": None, "code": None}}
        await run_in_threadpool(router.log.exchange, {
            **base, "created_at": time.time(), "backend": name, "status": "rejected", "http_status": status,
            "latency_ms": latency, "error": json.dumps(body)[:1000]})
        return JSONResponse(body, status_code=status, headers={"x-preflab-exchange-id": base["id"]})

    async def open_stream(client, b: Backend, body: dict, headers: dict):
        req = client.build_request("POST", b.url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers)
        resp = await client.send(req, stream=True)
        if resp.status_code >= 500:
            await resp.aclose()
            raise BackendDown(f"{b.name}: HTTP {resp.status_code}", unreachable=False)
        return resp

    async def relay(resp, b: Backend, base: dict, t0: float, retried_from: str | None):
        """Pass the back end's events on, rewriting id/model; log before the final ``[DONE]``."""
        parts: list[str] = []
        status, error = "ok", None
        version = resp.headers.get("x-preflab-model-version") or b.model
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    continue
                for ch in chunk.get("choices") or []:
                    parts.append((ch.get("delta") or {}).get("content") or "")
                chunk.update(id=base["id"], model=cfg.model)
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except httpx.HTTPError as e:  # the back end died mid-stream: too late to retry
            status, error = "error", f"{b.name} broke off the stream: {type(e).__name__}"
            router.mark_down(b.name, error)
            yield "data: " + json.dumps({"error": {"message": error, "type": "server_error",
                                                   "code": "backend_error"}}) + "\n\n"
        finally:
            await resp.aclose()
        latency = (time.perf_counter() - t0) * 1000
        text = "".join(parts)
        await run_in_threadpool(router.log.exchange, {
            **base, "created_at": time.time(), "backend": b.name, "model_version": version, "response": text,
            "status": status, "http_status": resp.status_code, "latency_ms": latency, "retried_from": retried_from,
            "error": error})
        if status != "ok":
            await count_failure(b.name, latency, error, base["id"])
            return
        router.canary[b.name].add(True, latency, is_refusal(text))
        router.watch(b.name)
        yield "data: [DONE]\n\n"

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        body = await read_json(request)
        try:
            fb = Feedback.model_validate(body)
        except ValidationError as e:
            msg, param = validation_message(e)
            return error_response(400, msg, param=param, code="invalid_value")
        rows = await run_in_threadpool(router.log.rows, "SELECT backend FROM route_exchanges WHERE id = ? "
                                       "AND status = 'ok'", (fb.id,))
        if not rows:
            return error_response(404, f"no logged exchange {fb.id!r}", param="id", code="exchange_not_found")
        fid = fb.feedback_id or uuid.uuid4().hex
        negative = fb.thumbs == "down" or bool(fb.flags)
        try:
            await run_in_threadpool(router.log.write, "INSERT INTO route_feedback(id, exchange_id, created_at, user, "
                                    "thumbs, flags, note, negative) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    (fid, fb.id, time.time(), fb.user, fb.thumbs, json.dumps(fb.flags), fb.note,
                                     int(negative)))
        except sqlite3.IntegrityError:  # the same feedback_id again (a client retry): already recorded
            return {"id": fid, "exchange_id": fb.id, "status": "duplicate"}
        name = rows[0]["backend"]
        router.canary[name].feedback.append(negative)
        router.watch(name)
        worker.wake()
        return {"id": fid, "exchange_id": fb.id, "status": "recorded", "negative": negative}

    @app.get("/admin/state")
    async def admin_state():
        return {**router.state.to_dict(), "metrics": {n: c.summary() for n, c in router.canary.items()},
                "thresholds": cfg.thresholds.model_dump()}

    @app.post("/admin/rollback")
    async def admin_rollback(request: Request):
        body = await read_json(request)
        names = body.get("backends")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            return error_response(400, "backends: a list of names", param="backends", code="invalid_value")
        try:
            return router.rollback(names, str(body.get("reason", "by hand"))).to_dict()
        except PreflabError as e:
            return error_response(400, str(e), code="invalid_value")

    @app.post("/admin/promote")
    async def admin_promote(request: Request):
        body = await read_json(request)
        if not isinstance(body.get("backend"), str):
            return error_response(400, "backend: the name of the back end to promote", param="backend",
                                  code="invalid_value")
        try:
            return router.promote(body["backend"], str(body.get("reason", "by hand"))).to_dict()
        except PreflabError as e:
            return error_response(400, str(e), code="invalid_value")

    @app.post("/admin/shares")
    async def admin_shares(request: Request):
        body = await read_json(request)
        shares = body.get("shares")
        if not isinstance(shares, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                   for v in shares.values()):
            return error_response(400, "shares: {name: share in [0, 1]}", param="shares", code="invalid_value")
        try:
            return router.set_shares({k: float(v) for k, v in shares.items()}).to_dict()
        except PreflabError as e:
            return error_response(400, str(e), code="invalid_value")

    return app


class ChatMessage(BaseModel):
    """A message as the router forwards it: any role the back end takes, the content as text."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: TextContent  # a string or OpenAI's list of text parts


class ChatBody(BaseModel):
    """What the router reads of a chat completion request; every other field goes on as sent."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="The exchange id (the completion's id).")
    thumbs: Literal["up", "down"] | None = None
    flags: list[str] = Field(default_factory=list, max_length=16)
    note: str | None = Field(None, max_length=4000)
    user: str | None = None
    feedback_id: str | None = Field(None, max_length=200, description="An idempotency key: a retry with the "
                                    "same one is recorded once.")


def _content(data: dict) -> str:
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


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
            return _content(resp.json()) or "(empty response)", inc.name
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


# ---------------------------------------------------------------------------------------------
# preflab route
# ---------------------------------------------------------------------------------------------


@click.group("route")
def cli() -> None:
    """Canary router in front of OpenAI-compatible back ends (start), and its admin commands.

    \b
    Examples:
      preflab route start --config route.yaml --port 8000 --admin-token "$ADMIN"
      preflab route rollback --url http://127.0.0.1:8000      # every candidate to share 0
      preflab route promote cand --url http://127.0.0.1:8000  # cand becomes the incumbent
      preflab route shares cand=0.05 --url http://127.0.0.1:8000
      preflab route status --url http://127.0.0.1:8000
    The admin commands read the token from --admin-token or PREFLAB_ROUTE_ADMIN_TOKEN.
    """


@cli.command("start")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--allow-public", is_flag=True, help="Allow a --host that is not a loopback address.")
@click.option("--admin-token", envvar="PREFLAB_ROUTE_ADMIN_TOKEN", default=None,
              help="Token of the /admin endpoints (env PREFLAB_ROUTE_ADMIN_TOKEN); without it they are off.")
@click.option("--token", envvar="PREFLAB_ROUTE_TOKEN", default=None, help="Bearer token clients must send.")
def start(config_path, host, port, allow_public, admin_token, token):
    """Run the router.

    Example: preflab route start --config route.yaml --port 8000 --admin-token "$ADMIN"
    """
    import uvicorn

    check_bind(host, allow_public)
    cfg = load_config(config_path)
    app = build_app(cfg, admin_token=admin_token, token=token)  # reads the state file: a bad one stops here
    click.echo(f"routing {cfg.model!r} on http://{host}:{port} to {', '.join(b.name for b in cfg.backends)}",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _admin(url: str, token: str | None, method: str, path: str, body: dict | None = None) -> dict:
    import httpx

    if not token:
        raise PreflabError("the admin commands need --admin-token (or PREFLAB_ROUTE_ADMIN_TOKEN)")
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, timeout=30,
                          headers={"authorization": f"Bearer {token}"})
    except httpx.HTTPError as e:
        raise PreflabError(f"{url}: cannot reach the router ({e})") from None
    if r.status_code != 200:
        raise PreflabError(f"{url}{path}: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


_url = click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The router.")
_token = click.option("--admin-token", envvar="PREFLAB_ROUTE_ADMIN_TOKEN", default=None)


@cli.command("rollback")
@click.argument("backends", nargs=-1)
@click.option("--reason", default="by hand")
@_url
@_token
def rollback_cmd(backends, reason, url, admin_token):
    """Set the candidates' share (all, or BACKENDS) to 0.

    Example: preflab route rollback --admin-token "$ADMIN"
    """
    click.echo(json.dumps(_admin(url, admin_token, "POST", "/admin/rollback",
                                 {"backends": list(backends) or None, "reason": reason})))


@cli.command("promote")
@click.argument("backend")
@click.option("--reason", default="by hand")
@_url
@_token
def promote_cmd(backend, reason, url, admin_token):
    """Make BACKEND the incumbent (every other share 0).

    Example: preflab route promote cand --admin-token "$ADMIN"
    """
    click.echo(json.dumps(_admin(url, admin_token, "POST", "/admin/promote", {"backend": backend, "reason": reason})))


@cli.command("shares")
@click.argument("pairs", nargs=-1, required=True)
@_url
@_token
def shares_cmd(pairs, url, admin_token):
    """Set shares: NAME=SHARE ... (e.g. cand=0.05).

    Example: preflab route shares cand=0.05 --admin-token "$ADMIN"
    """
    shares = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        try:
            shares[name] = float(value) if sep else float("nan")
        except ValueError:
            shares[name] = float("nan")
        if shares[name] != shares[name]:
            raise PreflabError(f"{p!r}: expected NAME=SHARE, e.g. cand=0.05")
    click.echo(json.dumps(_admin(url, admin_token, "POST", "/admin/shares", {"shares": shares})))


@cli.command("status")
@_url
@_token
def status_cmd(url, admin_token):
    """Shares, incumbent and the canary metrics of every back end.

    Example: preflab route status --admin-token "$ADMIN"
    """
    click.echo(json.dumps(_admin(url, admin_token, "GET", "/admin/state"), indent=2))
