"""A bounded load test over loopback HTTP: simulated labelers rank through the real server.

``run_load`` builds a project in a fresh store, starts `preflab annotate serve` as a child
process, and lets ``labelers`` threads (one account and one HTTP client each) take tasks
and submit rankings until the queue is empty. When ``kill_at`` of the target is
acknowledged it kills the server with SIGKILL and starts it again; clients retry what
failed (a retried submit is idempotent). At the end every acknowledged ranking must be in
the store exactly once. `benchmarks/annotate_load.py` runs it at full size; the test suite
runs a small one.

With ``store`` a postgresql:// URL (an empty database) and ``servers`` > 1, that many servers
share the database: each labeler sends its requests to them in turn (a task taken from one is
submitted to the next) and moves to the next server when one does not answer; the first server
is the one killed.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from preflab.annotate.accounts import create_account
from preflab.annotate.project import Item, create_project, load_project
from preflab.annotate.stats import project_rankings
from preflab.feedback.store import PreferenceStore, is_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m preflab.annotate serve` as a child process on a loopback port."""

    def __init__(self, store_path: Path | str, port: int, log_path: Path):
        self.store_path, self.port, self.log_path = store_path, port, log_path
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, token: str, timeout_s: float = 60.0) -> float:
        """Start and wait until it answers an authenticated request; return the seconds it took."""
        import httpx

        t0 = time.monotonic()
        log = open(self.log_path, "ab")  # the child process writes to it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "preflab.annotate", "serve", "--store", str(self.store_path),
             "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/api/me", headers={"Authorization": f"Bearer {token}"}, timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not answer within {timeout_s}s; see {self.log_path}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def build(store_path: Path | str, *, labelers: int, rankings: int, k: int = 4, overlap: float = 0.1,
          overlap_labelers: int = 3, seed: int = 0) -> tuple[list[str], str, int]:
    """A project with at least ``rankings`` tasks, ``labelers`` accounts and one admin.
    Returns (labeler tokens, admin token, number of tasks)."""
    n_prompts = int(np.ceil(rankings / (1 + overlap * (overlap_labelers - 1))))
    while n_prompts + round(overlap * n_prompts) * (overlap_labelers - 1) < rankings:
        n_prompts += 1  # create_project rounds the overlap share
    items = [Item(f"Load-test prompt {i}: say something about item {i}.",
                  [f"Response {j} to prompt {i}." for j in range(k)], uid=f"load-{i}", slice=f"s{i % 3}")
             for i in range(n_prompts)]
    with PreferenceStore(store_path) as store:
        p = create_project(store, "load", items, overlap=overlap, overlap_labelers=overlap_labelers, seed=seed)
        tokens = [create_account(store, f"sim{i:02d}") for i in range(labelers)]
        admin = create_account(store, "admin", "admin")
        n_tasks = store.queue_counts(p.queue)["pending"]
    return tokens, admin, n_tasks


class Tally:
    """What the clients saw, shared between threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acks: dict[int, int] = {}  # task id -> ranking id
        self.acks_by_server: Counter[int] = Counter()  # server index -> submits it acknowledged
        self.duplicates = 0
        self.retries = 0
        self.submit_ms: list[float] = []
        self.task_ms: list[float] = []
        self.errors: list[str] = []


def _call(clients: list[Any], turn: list[int], method: str, path: str, tally: Tally, deadline: float,
          **kw: Any) -> tuple[Any, float, str]:
    """One request to ``clients[turn[0]]``, then the turn passes to the next server. A connection error
    (the server may be down) is retried on the next server. (json, ms, server index) of the answer."""
    import httpx

    while True:
        server = turn[0] % len(clients)
        turn[0] += 1
        t0 = time.perf_counter()
        try:
            r = clients[server].request(method, path, **kw)
        except httpx.TransportError:
            with tally.lock:
                tally.retries += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r.json(), ms, server


def _labeler(urls: list[str], token: str, seed: int, tally: Tally, deadline: float) -> None:
    import httpx

    rng = random.Random(seed)
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) for url in urls]
    turn = [seed % len(urls)]  # labelers start on different servers
    try:
        while time.monotonic() < deadline:
            got, ms, _ = _call(clients, turn, "GET", "/api/task", tally, deadline)
            task = got["task"]
            if task is None:
                return
            perm = list(range(task["k"]))
            rng.shuffle(perm)
            order = [[perm[0], perm[1]], *[[x] for x in perm[2:]]] if rng.random() < 0.2 else [[x] for x in perm]
            body = {"order": order, "scores": [rng.randint(1, 7) for _ in perm], "time_s": rng.uniform(5, 60)}
            res, sms, server = _call(clients, turn, "POST", f"/api/tasks/{task['task_id']}/submit", tally, deadline,
                                     json=body)
            with tally.lock:
                tally.task_ms.append(ms)
                tally.submit_ms.append(sms)
                tally.acks[task["task_id"]] = res["ranking_id"]
                tally.acks_by_server[server] += 1
                tally.duplicates += bool(res["duplicate"])
    except Exception as e:  # reported in the result
        with tally.lock:
            tally.errors.append(f"{type(e).__name__}: {e}")
    finally:
        for client in clients:
            client.close()


def _pct(xs: list[float]) -> dict[str, float | int]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs)
    return {"n": len(xs), "p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "max": round(float(a.max()), 2)}


def verify(store_path: Path | str, tally: Tally) -> dict[str, Any]:
    """Every acknowledged ranking stored exactly once, with the id the client was given."""
    with PreferenceStore(store_path) as store:
        project = load_project(store, "load")
        rows = project_rankings(store, project)
        done = store.queue_counts(project.queue)["done"]
    per_task = Counter(int(r.meta["task_id"]) for r in rows)
    by_task = {int(r.meta["task_id"]): r.id for r in rows}
    lost = [t for t, rid in tally.acks.items() if by_task.get(t) != rid]
    twice = [t for t, n in per_task.items() if n > 1]
    return {"stored": len(rows), "queue_done": done, "lost_acknowledged": len(lost), "stored_twice": len(twice),
            "stored_unacknowledged": len(set(by_task) - set(tally.acks)),
            "exactly_once": not lost and not twice and len(rows) == len(tally.acks) == done}


def run_load(workdir: str | Path, *, labelers: int = 20, rankings: int = 1000, k: int = 4, kill_at: float | None = 0.4,
             seed: int = 0, timeout_s: float = 600.0, store: str | None = None, servers: int = 1) -> dict[str, Any]:
    """Run the load test in ``workdir`` (a new store there, or ``store``: a postgresql:// URL of an
    empty database) with ``servers`` servers on it; return the figures and checks."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if servers > 1 and not is_url(store):
        raise ValueError("several servers share a PostgreSQL store: give store=postgresql://...")
    store_path: Path | str = store if is_url(store) else workdir / "load.sqlite"
    if isinstance(store_path, Path) and store_path.exists():
        raise FileExistsError(f"{store_path} exists: give an empty --workdir")
    tokens, admin, n_tasks = build(store_path, labelers=labelers, rankings=rankings, k=k, seed=seed)
    pool = [Server(store_path, free_port(), workdir / ("server.log" if servers == 1 else f"server-{i}.log"))
            for i in range(servers)]
    server = pool[0]  # the one killed
    tally = Tally()
    kill: dict[str, Any] = {}
    try:
        startup_s = max(s.start(admin) for s in pool)
        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        urls = [s.url for s in pool]
        threads = [threading.Thread(target=_labeler, args=(urls, tok, seed * 1000 + i, tally, deadline))
                   for i, tok in enumerate(tokens)]
        for t in threads:
            t.start()
        if kill_at is not None:
            while len(tally.acks) < kill_at * n_tasks and any(t.is_alive() for t in threads):
                time.sleep(0.005)
            with tally.lock:
                before = dict(tally.acks)
            server.kill9()
            kill = {"at_acknowledged": len(before), "restart_s": round(server.start(admin), 2)}
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        for s in pool:
            s.stop()
    check = verify(store_path, tally)
    if kill:
        with PreferenceStore(store_path) as s:
            ids = {r.id for r in project_rankings(s, load_project(s, "load"))}
        kill["acknowledged_before_kill_lost"] = sum(1 for rid in before.values() if rid not in ids)
    return {"store": "postgresql" if is_url(store_path) else "sqlite", "servers": servers,
            "acknowledged_by_server": [tally.acks_by_server[i] for i in range(servers)],
            "labelers": labelers, "k": k, "tasks": n_tasks, "acknowledged": len(tally.acks), "wall_s": round(wall, 2),
            "rankings_per_s": round(len(tally.acks) / wall, 1), "server_startup_s": round(startup_s, 2),
            "latency_ms": {"submit": _pct(tally.submit_ms), "next_task": _pct(tally.task_ms)},
            "retried_requests": tally.retries, "duplicate_acks": tally.duplicates, "kill9": kill or None,
            "client_errors": tally.errors[:10], **check}
