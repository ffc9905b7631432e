"""A small bounded load test: 20 simulated labelers over loopback HTTP, the server killed with
SIGKILL mid-load and restarted; every acknowledged ranking is in the store exactly once.
(The full-size run: benchmarks/annotate_load.py.)"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the annotate extra is not installed (pip install -e '.[annotate]')")


def test_concurrent_labelers_and_kill9_lose_nothing(tmp_path):
    from preflab.annotate.loadtest import run_load

    res = run_load(tmp_path / "load", labelers=20, rankings=150, kill_at=0.4, timeout_s=120)
    print(f"load: {res['acknowledged']} rankings, {res['labelers']} labelers, submit p50/p95 "
          f"{res['latency_ms']['submit']['p50']}/{res['latency_ms']['submit']['p95']} ms, kill9 {res['kill9']}")
    assert res["client_errors"] == []
    assert res["tasks"] >= 150 and res["acknowledged"] == res["tasks"] == res["stored"] == res["queue_done"]
    assert res["kill9"]["at_acknowledged"] >= 0.4 * res["tasks"]
    assert res["kill9"]["acknowledged_before_kill_lost"] == 0
    assert res["lost_acknowledged"] == 0 and res["stored_twice"] == 0 and res["stored_unacknowledged"] == 0
    assert res["exactly_once"] is True
    assert res["latency_ms"]["submit"]["n"] == res["acknowledged"]


def test_two_servers_on_one_postgres_store_and_kill9_lose_nothing(tmp_path, postgres_url):
    """Two servers on one PostgreSQL database, each labeler's requests going to both in turn; the
    first server killed with SIGKILL mid-load and restarted: every acknowledged ranking stored once."""
    from preflab.annotate.loadtest import run_load

    res = run_load(tmp_path / "load", labelers=8, rankings=100, kill_at=0.4, timeout_s=120, store=postgres_url,
                   servers=2)
    print(f"load: {res['acknowledged']} rankings by server {res['acknowledged_by_server']}, submit p50/p95 "
          f"{res['latency_ms']['submit']['p50']}/{res['latency_ms']['submit']['p95']} ms, kill9 {res['kill9']}")
    assert res["client_errors"] == [] and (res["store"], res["servers"]) == ("postgresql", 2)
    assert res["tasks"] >= 100 and res["acknowledged"] == res["tasks"] == res["stored"] == res["queue_done"]
    assert min(res["acknowledged_by_server"]) > 0  # both servers took submissions
    assert res["kill9"]["at_acknowledged"] >= 0.4 * res["tasks"] and res["retried_requests"] > 0
    assert res["kill9"]["acknowledged_before_kill_lost"] == 0
    assert res["lost_acknowledged"] == 0 and res["stored_twice"] == 0 and res["stored_unacknowledged"] == 0
    assert res["exactly_once"] is True
