"""Load test of ``preflab route`` in front of two ``preflab serve`` processes with tiny models.

Loopback only. Starts ``preflab serve --model tiny:7`` (the incumbent, ``prod``) and
``preflab serve --model tiny:3`` (the candidate, ``cand``, share 5%), then ``preflab route start``,
and sends ``--requests`` chat completions from ``--clients`` concurrent clients (``--users``
distinct user ids, each request by a random one), with feedback on 30% of the answers (a third
of them thumbs-down; each feedback carries an idempotency key and is retried until acknowledged).
At 40% of the requests the candidate is killed with SIGKILL; at 70% the router is killed with
SIGKILL and started again (clients retry while it is down). Afterwards it checks, from the
store:

- the candidate's share of users (before its death) against the binomial interval of the share;
- stickiness: each user answered by one back end while the candidate lived;
- every acknowledged request and feedback is in the log exactly once (ids are primary keys);
- the candidate's death: client-visible errors, the automatic rollback and its reason;
- latency (p50/p95 as the clients saw it) and throughput.

    .venv/bin/python benchmarks/route_load.py            # JSON in benchmarks/results/route_load.json
    .venv/bin/python benchmarks/route_load.py --requests 300 --clients 16   # a quick run
    .venv/bin/python benchmarks/route_load.py --smoke    # 60 requests from 4 clients (seconds)

No outside peer: the checks are the router's own guarantees.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

SMOKE = {"requests": 60, "clients": 4, "users": 20, "share": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int, timeout: float = 180.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "preflab.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[:2]} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{args[:2]} did not start in {timeout} s")


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return c - h, c + h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--share", type=float, default=0.05)
    ap.add_argument("--max-tokens", type=int, default=2)
    common.add_options(ap, with_threads=False)
    a = ap.parse_args()
    if a.smoke:
        vars(a).update(SMOKE)
    record = common.start(a)

    work = Path(tempfile.mkdtemp(prefix="route_load_"))
    ports = {"prod": free_port(), "cand": free_port(), "router": free_port()}
    procs: dict[str, subprocess.Popen] = {}
    t_start = time.perf_counter()
    for name, spec in (("prod", "tiny:7"), ("cand", "tiny:3")):
        procs[name] = start(["serve", "--model", spec, "--name", name, "--port", str(ports[name]),
                             "--max-new-tokens", str(a.max_tokens)], ports[name])
    import yaml

    cfg = {"store": str(work / "store.sqlite"), "model": "preflab", "cooldown_s": 2.0,
           "backends": [{"name": "prod", "url": f"http://127.0.0.1:{ports['prod']}", "model": "prod",
                         "role": "incumbent"},
                        {"name": "cand", "url": f"http://127.0.0.1:{ports['cand']}", "model": "cand",
                         "share": a.share}],
           "thresholds": {"consecutive_errors": 3, "min_requests": 30}}
    (work / "route.yaml").write_text(yaml.safe_dump(cfg))
    router_args = ["route", "start", "--config", str(work / "route.yaml"), "--port", str(ports["router"])]
    procs["router"] = start(router_args, ports["router"])
    startup_s = time.perf_counter() - t_start

    url = f"http://127.0.0.1:{ports['router']}"
    lock = threading.Lock()
    done = [0]
    acked: list[dict] = []
    fb_acked: list[str] = []
    client_errors: dict[str, int] = {}
    events: dict[str, float] = {}
    kill_cand_at, kill_router_at = int(0.4 * a.requests), int(0.7 * a.requests)
    rng = random.Random(0)
    users = [f"user{rng.randrange(a.users)}" for _ in range(a.requests)]
    local = threading.local()

    def chaos(n: int) -> None:
        if n == kill_cand_at:
            os.kill(procs["cand"].pid, signal.SIGKILL)
            events["candidate_killed_at_request"] = n
        if n == kill_router_at:
            os.kill(procs["router"].pid, signal.SIGKILL)
            procs["router"].wait()
            events["router_killed_at_request"] = n
            t0 = time.perf_counter()
            procs["router"] = start(router_args, ports["router"])
            events["router_restart_s"] = round(time.perf_counter() - t0, 2)

    def call(fn):
        """Retry while the router is down (connection errors); anything else is returned."""
        for _ in range(600):
            try:
                return fn()
            except httpx.TransportError as e:
                with lock:
                    key = f"transport:{type(e).__name__}"
                    client_errors[key] = client_errors.get(key, 0) + 1
                time.sleep(0.1)
        raise RuntimeError("the router did not come back")

    def one(i: int) -> None:
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=120)
        c, user = local.c, users[i]
        body = {"model": "preflab", "user": user, "max_tokens": a.max_tokens,
                "messages": [{"role": "user", "content": f"Request {i}: say something."}]}
        t0 = time.perf_counter()
        r = call(lambda: c.post("/v1/chat/completions", json=body))
        latency = (time.perf_counter() - t0) * 1000
        with lock:
            done[0] += 1
            n = done[0]
        if r.status_code != 200:
            with lock:
                key = f"http:{r.status_code}"
                client_errors[key] = client_errors.get(key, 0) + 1
        else:
            with lock:
                acked.append({"id": r.json()["id"], "user": user, "backend": r.headers["x-preflab-backend"],
                              "n": n, "latency_ms": latency})
            if i % 10 < 3:
                fid = f"fb-{i}"
                f = call(lambda: c.post("/v1/feedback", json={"id": r.json()["id"], "feedback_id": fid,
                                                              "thumbs": "down" if i % 10 == 0 else "up"}))
                if f.status_code == 200:
                    with lock:
                        fb_acked.append(fid)
        if n in (kill_cand_at, kill_router_at):
            chaos(n)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        list(pool.map(one, range(a.requests)))
    wall = time.perf_counter() - t0

    admin_state = httpx.get(f"{url}/health", timeout=10).json()
    db = sqlite3.connect(cfg["store"])
    pending_sql = "SELECT COUNT(*) FROM route_feedback WHERE negative = 1 AND task_id IS NULL"
    deadline = time.monotonic() + 60  # let the feedback worker make the labeling tasks
    while db.execute(pending_sql).fetchone()[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    logged = {r[0]: r[1] for r in db.execute("SELECT id, backend FROM route_exchanges")}
    fbs = [r[0] for r in db.execute("SELECT id FROM route_feedback")]
    acked_ids = [x["id"] for x in acked]
    before = [x for x in acked if x["n"] < kill_cand_at - a.clients]
    per_user: dict[str, set[str]] = {}
    for x in before:
        per_user.setdefault(x["user"], set()).add(x["backend"])
    cand_users = sum(b == {"cand"} for b in per_user.values())
    lo, hi = wilson(cand_users, len(per_user))
    rollbacks = [json.loads(r[0]) for r in db.execute("SELECT detail FROM route_events WHERE kind = 'auto_rollback'")]
    lat = sorted(x["latency_ms"] for x in acked)
    tasks = db.execute("SELECT COUNT(*) FROM queue WHERE queue = 'annotate:feedback'").fetchone()[0]
    negatives = db.execute("SELECT COUNT(DISTINCT exchange_id) FROM route_feedback WHERE negative = 1").fetchone()[0]
    result = {
        "requests": a.requests, "clients": a.clients, "users": a.users, "share": a.share,
        "max_tokens": a.max_tokens, "startup_s": round(startup_s, 1), "wall_s": round(wall, 1),
        "requests_per_s": round(a.requests / wall, 1),
        "latency_ms": {"p50": round(lat[len(lat) // 2], 1), "p95": round(lat[int(0.95 * len(lat))], 1),
                       "max": round(lat[-1], 1)},
        "acknowledged": len(acked), "client_errors": client_errors, **events,
        "share_check": {"users_seen_before_kill": len(per_user), "candidate_users": cand_users,
                        "candidate_user_share": round(cand_users / max(len(per_user), 1), 4),
                        "wilson_95": [round(lo, 4), round(hi, 4)], "share_within_interval": lo <= a.share <= hi},
        "sticky_violations_before_kill": sum(len(b) > 1 for b in per_user.values()),
        "logged_rows": len(logged), "acknowledged_not_logged": len(set(acked_ids) - set(logged)),
        "logged_not_acknowledged": len(set(logged) - set(acked_ids)),  # answered as the router died; resent
        "backend_error_events": dict(db.execute("SELECT backend, COUNT(*) FROM route_events "
                                                "WHERE kind = 'backend_error' GROUP BY backend").fetchall()),
        "acknowledged_twice": len(acked_ids) - len(set(acked_ids)),
        "logged_backend_mismatch": sum(logged.get(x["id"]) != x["backend"] for x in acked),
        "feedback_acknowledged": len(fb_acked), "feedback_rows": len(fbs),
        "feedback_acknowledged_not_logged": len(set(fb_acked) - set(fbs)),
        "feedback_rows_duplicated": len(fbs) - len(set(fbs)),
        "auto_rollbacks": rollbacks and [r["reason"] for r in rollbacks],
        "final_shares": admin_state["shares"],
        "served_by_candidate_after_kill": sum(x["backend"] == "cand" for x in acked if x["n"] > kill_cand_at + a.clients),
        "labeling_tasks": tasks, "negative_exchanges": negatives,
        "negative_feedback_without_task": db.execute(pending_sql).fetchone()[0],
    }
    for p in procs.values():
        p.kill()
        p.wait()
    print(json.dumps(result, indent=2))
    common.write(common.out_path(a, "route_load"), "route_load", record,
                 results=[{"config": f"{a.requests} requests, {a.clients} clients", "status": "ran", **result}])


if __name__ == "__main__":
    main()
