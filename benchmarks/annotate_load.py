"""Load test of the labeling app (`preflab annotate serve`) over loopback HTTP.

``--labelers`` simulated labelers (threads, one account and one HTTP client each) take tasks
and submit K = 4 rankings (about 1 in 5 with a tie, 1-7 scores, a time) until the queue is
empty: at least ``--rankings`` tasks. When ``--kill-at`` of them are acknowledged the server
is killed with SIGKILL and started again on the same store; clients retry what failed (a
retried submit is idempotent). Then every acknowledged ranking must be in the store exactly
once. Reports p50/p95/max latency of submits and of task fetches (successful requests;
retries counted apart), throughput, the restart time, and the checks.

    .venv/bin/python benchmarks/annotate_load.py                       # 20 labelers, 1,000 rankings
    .venv/bin/python benchmarks/annotate_load.py --out load.json       # JSON elsewhere than results/
    .venv/bin/python benchmarks/annotate_load.py --smoke               # 2 labelers, 12 rankings (seconds)
    .venv/bin/python benchmarks/annotate_load.py --no-kill             # latency without the kill
    .venv/bin/python benchmarks/annotate_load.py --store postgresql://USER@HOST:PORT/DB --servers 2

With --store postgresql://... (an empty database: the project is created there) --servers
servers share the database; each labeler sends its requests to them in turn and moves to the
next when one does not answer, and the first server is the one killed.

Everything stays on 127.0.0.1; the store (a SQLite file unless --store) and the server logs go
to --workdir (a new temporary folder by default, removed afterwards unless --keep). Exit code 1
if a check fails. No outside peer: the figures are the server's own, with the exactly-once checks.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

from preflab.annotate.loadtest import run_load  # noqa: E402

SMOKE = {"labelers": 2, "rankings": 12}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelers", type=int, default=20)
    ap.add_argument("--rankings", type=int, default=1000)
    ap.add_argument("--kill-at", type=float, default=0.4, help="SIGKILL the server when this share is acknowledged.")
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds before the clients give up.")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="Keep the workdir (store and server log).")
    ap.add_argument("--store", default=None, help="postgresql://USER@HOST:PORT/DB of an empty database "
                    "(default: a SQLite file in --workdir).")
    ap.add_argument("--servers", type=int, default=1, help="Servers on the store (more than 1 needs --store).")
    common.add_options(ap, with_threads=False)
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    record = common.start(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="annotate-load-"))
    try:
        res = run_load(workdir, labelers=args.labelers, rankings=args.rankings,
                       kill_at=None if args.no_kill else args.kill_at, timeout_s=args.timeout, store=args.store,
                       servers=args.servers)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sub, task = res["latency_ms"]["submit"], res["latency_ms"]["next_task"]
    print(f"{res['acknowledged']} rankings acknowledged by {res['labelers']} concurrent labelers in {res['wall_s']} s "
          f"({res['rankings_per_s']}/s); {res['servers']} server(s) on a {res['store']} store, acknowledged per "
          f"server: {res['acknowledged_by_server']}")
    print(f"submit latency p50 {sub['p50']} ms, p95 {sub['p95']} ms, max {sub['max']} ms; "
          f"next task p50 {task['p50']} ms, p95 {task['p95']} ms")
    if res["kill9"]:
        k = res["kill9"]
        print(f"kill -9 after {k['at_acknowledged']} acknowledged, restarted in {k['restart_s']} s: "
              f"{k['acknowledged_before_kill_lost']} of them lost; {res['retried_requests']} requests retried, "
              f"{res['duplicate_acks']} resubmits answered as duplicates")
    print(f"store: {res['stored']} rankings, {res['lost_acknowledged']} acknowledged lost, {res['stored_twice']} "
          f"stored twice -> exactly once: {res['exactly_once']}")
    common.write(common.out_path(args, "annotate_load"), "annotate_load", record,
                 results=[{"config": f"{res['servers']} server(s), {res['labelers']} labelers", "status": "ran", **res}])
    return 0 if res["exactly_once"] and not res["client_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
