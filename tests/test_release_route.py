"""preflab route: sticky canary routing, logging, feedback into the labeling queue, automatic and
manual rollback, admin tokens, back-end death, and a bounded load test (loopback only)."""

import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from helpers import wait_for
from preflab.release.fake import ThreadServer, fake_backend
from preflab.release.route import RouteConfig, State, bucket, pick
from preflab.release.route_app import build_app

ADMIN = "admin-secret"


def _cfg(tmp_path: Path, inc_url: str, cand_url: str, share: float = 0.05, *, config: dict | None = None,
         **thresholds) -> RouteConfig:
    return RouteConfig.model_validate({
        "store": str(tmp_path / "store.sqlite"), "model": "preflab", "cooldown_s": 5, **(config or {}),
        "backends": [{"name": "prod", "url": inc_url, "model": "prod", "role": "incumbent"},
                     {"name": "cand", "url": cand_url, "model": "cand", "share": share}],
        "thresholds": {"min_requests": 20, "consecutive_errors": 3, **thresholds}})


def _db(cfg: RouteConfig) -> sqlite3.Connection:
    c = sqlite3.connect(cfg.store)
    c.row_factory = sqlite3.Row
    return c


def _ask(client: httpx.Client, user: str, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "preflab", "user": user,
                                                     "messages": [{"role": "user", "content": f"hi {user}"}],
                                                     **extra})




@pytest.fixture
def two():
    with ThreadServer(fake_backend("prod")) as inc, ThreadServer(fake_backend("cand")) as cand:
        yield inc, cand


def test_buckets_are_sticky_and_shares_cumulative():
    st = State("prod", {"a": 0.1, "b": 0.2})
    order = ["prod", "a", "b"]
    assert pick(st, order, 0.05) == "a" and pick(st, order, 0.15) == "b" and pick(st, order, 0.5) == "prod"
    assert bucket("u1", "") == bucket("u1", "") != bucket("u2", "")
    assert bucket("u1", "salt") != bucket("u1", "")
    with pytest.raises(ValueError, match="incumbent"):
        RouteConfig.model_validate({"store": "x", "backends": [{"name": "a", "url": "u", "model": "a"},
                                                               {"name": "b", "url": "u", "model": "b"}]})
    with pytest.raises(ValueError, match="SQLite store file; a postgresql:// store is not supported"):
        RouteConfig.model_validate({"store": "postgresql://u@db/prefs", "backends": [
            {"name": "a", "url": "u", "model": "a", "role": "incumbent"}, {"name": "b", "url": "u", "model": "b"}]})


def test_load_share_stickiness_logging_feedback_queue(tmp_path, two):
    """300 requests from 16 clients (150 users, 2 each), feedback on every 3rd: the canary share is
    within its binomial interval, users stick, every request and feedback is logged exactly once, and
    every thumbs-down exchange becomes exactly one K=2 labeling task."""
    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url, share=0.05)
    acked: list[tuple[str, str, str]] = []
    feedback_ids: list[str] = []
    negatives: set[str] = set()
    lock = threading.Lock()
    with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router:
        local = threading.local()

        def one(i: int) -> None:
            user = f"user{i % 150}"
            if not hasattr(local, "c"):  # one connection per client thread
                local.c = httpx.Client(base_url=router.url, timeout=30)
            c = local.c
            r = _ask(c, user, stream=(i % 7 == 0))
            assert r.status_code == 200, r.text
            xid = r.headers["x-preflab-exchange-id"]
            if i % 7 == 0:
                assert r.text.rstrip().endswith("data: [DONE]")
            else:
                assert r.json()["id"] == xid and r.json()["model"] == "preflab"
            with lock:
                acked.append((xid, user, r.headers["x-preflab-backend"]))
            if i % 3 == 0:
                down = i % 2 == 0
                f = c.post("/v1/feedback", json={"id": xid, "thumbs": "down" if down else "up",
                                                 "note": f"n{i}", "user": user})
                assert f.status_code == 200, f.text
                with lock:
                    feedback_ids.append(f.json()["id"])
                    if down:
                        negatives.add(xid)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(300)))
        db = _db(cfg)
        assert wait_for(lambda: db.execute("SELECT COUNT(*) FROM route_feedback WHERE negative = 1 AND task_id IS NULL"
                                        ).fetchone()[0] == 0, 60)
    rows = db.execute("SELECT id, user, backend, status, latency_ms, model_version, response FROM route_exchanges"
                      ).fetchall()
    assert len(rows) == 300 and {r["id"] for r in rows} == {a[0] for a in acked}
    assert all(r["status"] == "ok" and r["latency_ms"] > 0 for r in rows)
    assert {r["model_version"] for r in rows} <= {"prod-v1", "cand-v1"}
    per_user: dict[str, set[str]] = {}
    for _, user, backend in acked:
        per_user.setdefault(user, set()).add(backend)
    assert all(len(b) == 1 for b in per_user.values())  # sticky
    n_cand_users = sum(b == {"cand"} for b in per_user.values())
    expected = {u: bucket(u, "") < 0.05 for u in per_user}
    assert n_cand_users == sum(expected.values())
    mean, sd = 150 * 0.05, (150 * 0.05 * 0.95) ** 0.5
    assert abs(n_cand_users - mean) <= 3 * sd  # the binomial interval of the share
    assert cand.app.state.requests == 2 * n_cand_users and inc.app.state.requests >= 300 - 2 * n_cand_users
    fb = db.execute("SELECT id, exchange_id, negative, task_id FROM route_feedback").fetchall()
    assert sorted(r["id"] for r in fb) == sorted(feedback_ids) and len(fb) == 100
    tasks = db.execute("SELECT q.id, q.queue, q.candidate_ids, p.uid FROM queue q JOIN prompts p ON p.id = q.prompt_id"
                       ).fetchall()
    assert {t["uid"] for t in tasks} == {f"route:{x}" for x in negatives} and len(tasks) == len(negatives)
    assert {t["queue"] for t in tasks} == {"annotate:feedback"}
    assert all(len(json.loads(t["candidate_ids"])) == 2 for t in tasks)
    assert {r["task_id"] for r in fb if r["negative"]} == {t["id"] for t in tasks}
    # the labeling app sees them: its project and queue API
    from preflab.annotate.project import load_project
    from preflab.feedback.store import PreferenceStore

    with PreferenceStore(cfg.store) as store:
        project = load_project(store, "feedback")
        assert project.k == 2 and store.queue_counts(project.queue)["pending"] == len(negatives)
        task = store.next_task("alice", project.queue)
        texts = [t for _, t, _ in store.candidates(task.prompt_id)]
        assert texts[1] == "hello from prod"


def test_candidate_death_retries_to_incumbent_and_rolls_back(tmp_path, two):
    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url, share=0.5)
    with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router, httpx.Client(base_url=router.url,
                                                                                 timeout=30) as c:
        users = [f"u{i}" for i in range(40)]
        cand_users = [u for u in users if bucket(u, "") < 0.5]
        for u in users[:10]:
            assert _ask(c, u).status_code == 200
        cand.stop()  # the candidate dies
        codes = [_ask(c, u).status_code for u in cand_users]
        assert codes == [200] * len(cand_users)  # served by the incumbent (retried)
        state = json.loads(cfg.state_path.read_text())
        assert state["shares"]["cand"] == 0.0 and state["incumbent"] == "prod"
        db = _db(cfg)
        ev = db.execute("SELECT detail FROM route_events WHERE kind = 'auto_rollback'").fetchall()
        assert len(ev) == 1 and "consecutive errors" in json.loads(ev[0]["detail"])["reason"]
        assert db.execute("SELECT COUNT(*) FROM route_events WHERE kind = 'backend_error'").fetchone()[0] >= 1
        retried = db.execute("SELECT COUNT(*) FROM route_exchanges WHERE retried_from = 'cand'").fetchone()[0]
        assert retried >= 3
        inc.stop()  # now nothing is left: a clear 503
        r = _ask(c, "u-late")
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
        assert db.execute("SELECT status, http_status FROM route_exchanges ORDER BY created_at DESC LIMIT 1"
                          ).fetchone()[:] == ("error", 503)


def test_bad_backend_answers_are_502(tmp_path):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    broken = FastAPI()

    @broken.post("/v1/chat/completions")
    async def boom():
        return JSONResponse({"error": "boom"}, status_code=500)

    with ThreadServer(broken) as inc, ThreadServer(fake_backend("cand")) as cand:
        cfg = _cfg(tmp_path, inc.url, cand.url, share=0.0)
        with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
            r = _ask(c, "x")
            assert r.status_code == 502 and r.json()["error"]["code"] == "backend_error"


def test_negative_feedback_rolls_back(tmp_path, two):
    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url, share=1.0, min_feedback=8, negative_feedback_rate=0.3)
    with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
        for i in range(8):
            r = _ask(c, f"u{i}")
            assert r.headers["x-preflab-backend"] == "cand"
            c.post("/v1/feedback", json={"id": r.json()["id"], "thumbs": "down", "flags": ["unhelpful"]})
        assert _ask(c, "u0").headers["x-preflab-backend"] == "prod"
        ev = _db(cfg).execute("SELECT detail FROM route_events WHERE kind = 'auto_rollback'").fetchone()
        assert "negative feedback" in json.loads(ev["detail"])["reason"]


@pytest.mark.parametrize("reply,delay,thresholds,reason", [
    ("I can't help with that.", 0.0, {"min_requests": 6, "refusal_rate": 0.5}, "refusal rate"),
    ("fine", 0.15, {"min_requests": 6, "latency_p95_ms": 100}, "latency p95"),
])
def test_canary_thresholds_roll_back(tmp_path, reply, delay, thresholds, reason):
    with ThreadServer(fake_backend("prod")) as inc, ThreadServer(fake_backend("cand", reply=reply,
                                                                                delay_s=delay)) as cand:
        cfg = _cfg(tmp_path, inc.url, cand.url, share=1.0, **thresholds)
        with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
            served = [_ask(c, f"u{i}").headers["x-preflab-backend"] for i in range(8)]
            assert served == ["cand"] * 6 + ["prod"] * 2  # rolled back after the 6th
        ev = _db(cfg).execute("SELECT backend, detail FROM route_events WHERE kind = 'auto_rollback'").fetchall()
        assert len(ev) == 1 and ev[0]["backend"] == "cand" and reason in json.loads(ev[0]["detail"])["reason"]
        assert json.loads(cfg.state_path.read_text())["shares"] == {"cand": 0.0}


def test_admin_needs_token_and_changes_state_atomically(tmp_path, two):
    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url, share=0.05)
    with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router, httpx.Client(base_url=router.url,
                                                                                 timeout=30) as c:
        assert c.post("/admin/rollback", json={}).status_code == 401
        assert c.post("/admin/rollback", json={}, headers={"authorization": "Bearer nope"}).status_code == 401
        auth = {"authorization": f"Bearer {ADMIN}"}
        r = c.post("/admin/shares", json={"shares": {"cand": 0.03}}, headers=auth)
        assert r.status_code == 200 and r.json()["shares"] == {"cand": 0.03}
        assert json.loads(cfg.state_path.read_text())["shares"] == {"cand": 0.03}
        for bad in ({"shares": {"cand": 1.5}}, {"shares": {"nobody": 0.1}}, {"shares": {"cand": "x"}}):
            r = c.post("/admin/shares", json=bad, headers=auth)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
        assert json.loads(cfg.state_path.read_text())["shares"] == {"cand": 0.03}  # unchanged
        assert c.post("/admin/rollback", json={}, headers=auth).json()["shares"] == {"cand": 0.0}
        r = c.post("/admin/promote", json={"backend": "cand"}, headers=auth).json()
        assert r["incumbent"] == "cand" and r["shares"] == {"prod": 0.0}
        assert _ask(c, "anyone").headers["x-preflab-backend"] == "cand"
        assert c.get("/admin/state", headers=auth).json()["metrics"]["cand"]["requests_total"] >= 1
    # the state survives a restart
    with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
        assert _ask(c, "anyone").headers["x-preflab-backend"] == "cand"
        assert c.post("/admin/rollback", json={}).status_code == 403  # no admin token: admin is off
    kinds = [r[0] for r in _db(cfg).execute("SELECT kind FROM route_events ORDER BY id")]
    assert kinds == ["start", "shares", "rollback", "promote", "start"]


def test_cli_admin_commands(tmp_path, two, monkeypatch):
    from click.testing import CliRunner

    from preflab.cli import app

    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url, share=0.05)
    with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router:
        run = CliRunner().invoke
        r = run(app, ["route", "rollback", "--url", router.url], standalone_mode=False)
        assert r.exception is not None and "admin-token" in str(r.exception)
        monkeypatch.setenv("PREFLAB_ROUTE_ADMIN_TOKEN", ADMIN)
        r = run(app, ["route", "shares", "cand=0.02", "--url", router.url])
        assert r.exit_code == 0 and json.loads(r.output)["shares"] == {"cand": 0.02}
        r = run(app, ["route", "rollback", "--url", router.url])
        assert r.exit_code == 0 and json.loads(r.output)["shares"] == {"cand": 0.0}
        r = run(app, ["route", "promote", "cand", "--url", router.url])
        assert r.exit_code == 0 and json.loads(r.output)["incumbent"] == "cand"
        r = run(app, ["route", "status", "--url", router.url])
        assert r.exit_code == 0 and "metrics" in json.loads(r.output)


@pytest.mark.parametrize("body,status,code", [
    (b"{oops", 400, "invalid_json"),
    (json.dumps({"model": "preflab", "messages": "hi"}).encode(), 400, "invalid_value"),
    (json.dumps({"model": 3, "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "invalid_value"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model_not_found"),
    (b'{"model": "preflab", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "invalid_json"),
    (b'{"model": "preflab", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', 400,
     "invalid_json"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", id="deeply-nested"),
    (b'{"model": "preflab", "messages": [{"role": "user", "content": "\xff"}]}', 400, "invalid_json"),
    (json.dumps({"model": "preflab", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(),
     400, "invalid_value"),
    (json.dumps({"model": "preflab", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     400, "invalid_value"),
    (json.dumps({"model": "preflab", "messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode(), 413,
     "body_too_large"),
])
def test_router_rejects_malformed_requests(tmp_path, two, body, status, code):
    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url)
    with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and r.json()["error"]["code"] == code
        f = c.post("/v1/feedback", json={"id": "chatcmpl-nope", "thumbs": "down"})
        assert f.status_code == 404 and f.json()["error"]["code"] == "exchange_not_found"
        f = c.post("/v1/feedback", json={"id": "x", "thumbs": "sideways"})
        assert f.status_code == 400 and f.json()["error"]["param"] == "thumbs"
    assert _db(cfg).execute("SELECT COUNT(*) FROM route_exchanges").fetchone()[0] == 0


def _broken_backend():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    broken = FastAPI()

    @broken.post("/v1/chat/completions")
    async def boom():
        return JSONResponse({"error": "boom"}, status_code=500)

    return broken


def _metrics(c: httpx.Client, name: str) -> dict:
    return c.get("/admin/state", headers={"authorization": f"Bearer {ADMIN}"}).json()["metrics"][name]


def test_a_clients_bad_request_never_counts_against_the_candidate(tmp_path):
    """A real `preflab serve` as the candidate: `seed: 2**64` is the client's 400, passed on; however many,
    the candidate is not rolled back, and a restarted router counts none of them either."""
    from preflab.release.serve import LocalModel
    from preflab.release.serve import build_app as serve_app

    model = LocalModel("tiny:7", name="cand", max_prompt_tokens=64, max_new_tokens=2)
    with ThreadServer(fake_backend("prod")) as inc, ThreadServer(serve_app(model)) as cand:
        cfg = _cfg(tmp_path, inc.url, cand.url, share=1.0, min_requests=3)
        with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router, httpx.Client(base_url=router.url,
                                                                                     timeout=30) as c:
            for _ in range(5):
                r = _ask(c, "u1", seed=2 ** 64)
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text
                assert r.json()["error"]["param"] == "seed"
            assert _ask(c, "u1", max_tokens=2).headers["x-preflab-backend"] == "cand"
            assert _metrics(c, "cand")["errors_total"] == 0
        assert json.loads(cfg.state_path.read_text())["shares"] == {"cand": 1.0}
        with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router, httpx.Client(base_url=router.url,
                                                                                     timeout=30) as c:
            m = _metrics(c, "cand")
            assert (m["errors_total"], m["requests_total"], m["consecutive_errors"]) == (0, 1, 0)
    rows = _db(cfg).execute("SELECT backend, status, http_status FROM route_exchanges ORDER BY created_at").fetchall()
    assert [tuple(r) for r in rows] == [("cand", "rejected", 400)] * 5 + [("cand", "ok", 200)]


def test_the_candidates_errors_survive_a_restart(tmp_path):
    """Failures retried on the incumbent count for the candidate, in the log too: a restarted router
    has the same errors, requests and feedback as before."""
    with ThreadServer(fake_backend("prod")) as inc, ThreadServer(_broken_backend()) as cand:
        cfg = _cfg(tmp_path, inc.url, cand.url, share=1.0)
        with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router, httpx.Client(base_url=router.url,
                                                                                     timeout=30) as c:
            answers = [_ask(c, f"u{i}") for i in range(4)]
            assert [r.headers["x-preflab-backend"] for r in answers] == ["prod"] * 4  # retried or rolled back
            assert c.post("/v1/feedback", json={"id": answers[0].json()["id"], "thumbs": "down"}).status_code == 200
            before = {n: _metrics(c, n) for n in ("cand", "prod")}
        assert (before["cand"]["errors_total"], before["cand"]["consecutive_errors"]) == (3, 3)
        assert json.loads(cfg.state_path.read_text())["shares"] == {"cand": 0.0}
        with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router, httpx.Client(base_url=router.url,
                                                                                     timeout=30) as c:
            after = {n: _metrics(c, n) for n in ("cand", "prod")}
    assert after == before
    assert before["prod"]["feedback"] == 1 and before["prod"]["requests_total"] == 4


def test_health_shows_a_dead_backend_as_unavailable(tmp_path):
    """Without a request reaching it, a killed back end is unavailable at the next health check, and
    available again once it answers."""
    with ThreadServer(fake_backend("prod")) as inc:
        cand = ThreadServer(fake_backend("cand")).start()
        cfg = _cfg(tmp_path, inc.url, cand.url, share=0.0, config={"health_interval_s": 0.1})
        with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
            def available() -> dict:
                return {n: b["available"] for n, b in c.get("/health").json()["backends"].items()}

            assert wait_for(lambda: available() == {"prod": True, "cand": True})
            cand.stop()
            assert wait_for(lambda: available() == {"prod": True, "cand": False})
            backends = c.get("/health").json()["backends"]
            assert "ConnectError" in backends["cand"]["error"] and backends["cand"]["last_checked"] > 0
            again = ThreadServer(fake_backend("cand"), port=cand.port).start()
            try:
                assert wait_for(lambda: available() == {"prod": True, "cand": True})
            finally:
                again.stop()


def test_list_content_reaches_the_backend_and_the_log_as_text(tmp_path, two):
    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url, share=0.0)
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"model": "preflab", "messages": [{"role": "user", "content": parts}]})
        assert r.status_code == 200, r.text
    prompt = _db(cfg).execute("SELECT prompt FROM route_exchanges").fetchone()[0]
    assert json.loads(prompt) == [{"role": "user", "content": "hello\nthere"}]


def test_a_truncated_state_file_is_one_error_line(tmp_path, two, capsys):
    from preflab.cli import main

    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url)
    path = _write_cfg(cfg, tmp_path / "route.yaml")
    cfg.state_path.write_text('{"incumbent": "prod", "sha')
    with pytest.raises(SystemExit) as e:
        main(["route", "start", "--config", str(path), "--port", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"error: {cfg.state_path}: not a valid route state file")


def _start(args: list[str], port: int, timeout: float = 120.0):
    import os
    import signal  # noqa: F401
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "preflab.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ok = wait_for(lambda: _healthy(port) or proc.poll() is not None, timeout)
    if not ok or proc.poll() is not None:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {proc.stderr.read().decode()[-2000:]}")
    return proc


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _write_cfg(cfg: RouteConfig, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(exclude_none=True)))
    return path


def test_real_serve_behind_the_router(tmp_path):
    """A real `preflab serve` (tiny model) as the incumbent: completions and streams pass through,
    its 400 for an oversized prompt reaches the client, and a thumbs-down task gets its sample."""
    from helpers import free_port, wait_for

    port = free_port()
    serve = _start(["serve", "--model", "tiny:7", "--name", "prod", "--port", str(port), "--max-new-tokens", "4",
                    "--max-prompt-tokens", "64"], port)
    try:
        with ThreadServer(fake_backend("cand")) as cand:
            cfg = _cfg(tmp_path, f"http://127.0.0.1:{port}", cand.url, share=0.0)
            with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=60) as c:
                r = _ask(c, "u1", max_tokens=3, temperature=0)
                assert r.status_code == 200 and r.headers["x-preflab-backend"] == "prod"
                text = r.json()["choices"][0]["message"]["content"]
                s = _ask(c, "u1", max_tokens=3, temperature=0, stream=True)
                chunks = [json.loads(ln[6:]) for ln in s.text.splitlines() if ln.startswith("data: {")]
                assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == text
                assert {ch["id"] for ch in chunks} == {s.headers["x-preflab-exchange-id"]}
                big = c.post("/v1/chat/completions", json={"model": "preflab",
                                                           "messages": [{"role": "user", "content": "x" * 300}]})
                assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"
                big = c.post("/v1/chat/completions", json={"model": "preflab", "stream": True,
                                                           "messages": [{"role": "user", "content": "x" * 300}]})
                assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"
                f = c.post("/v1/feedback", json={"id": r.json()["id"], "thumbs": "down", "note": "gibberish"})
                assert f.status_code == 200
                db = _db(cfg)
                assert wait_for(lambda: db.execute("SELECT task_id FROM route_feedback").fetchone()[0] is not None, 60)
                assert [tuple(r) for r in db.execute("SELECT status, http_status FROM route_exchanges WHERE "
                                                     "status != 'ok'")] == [("rejected", 400)] * 2
                versions = {row[0] for row in db.execute("SELECT model_version FROM route_exchanges "
                                                         "WHERE status = 'ok'")}
                assert len(versions) == 1 and len(versions.pop()) == 16  # serve's model hash
    finally:
        serve.kill()
        serve.wait()


def test_kill9_of_candidate_and_router_loses_nothing_acknowledged(tmp_path):
    """Candidate (a process) killed with SIGKILL under load: clients see no error, the router rolls
    it back. Then the router killed with SIGKILL and restarted: every acknowledged request and
    feedback is in the store."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import free_port

    cport = free_port()
    code = ("import uvicorn; from preflab.release.fake import fake_backend; "
            f"uvicorn.run(fake_backend('cand'), host='127.0.0.1', port={cport}, log_level='error')")
    cand = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    assert wait_for(lambda: _healthy(cport), 60)
    with ThreadServer(fake_backend("prod")) as inc:
        cfg = _cfg(tmp_path, inc.url, f"http://127.0.0.1:{cport}", share=0.3)
        path = _write_cfg(cfg, tmp_path / "route.yaml")
        port = free_port()
        args = ["route", "start", "--config", str(path), "--port", str(port), "--admin-token", ADMIN]
        router = _start(args, port)
        acked, fb_acked, http_errors = [], [], []
        stop = threading.Event()
        lock = threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        r = _ask(c, f"k{k}-{i % 20}")
                        if r.status_code != 200:
                            with lock:
                                http_errors.append(r.status_code)
                            continue
                        with lock:
                            acked.append(r.json()["id"])
                        f = c.post("/v1/feedback", json={"id": r.json()["id"], "thumbs": "up",
                                                         "feedback_id": f"fb-{k}-{i}"})
                        if f.status_code == 200:
                            with lock:
                                fb_acked.append(f"fb-{k}-{i}")
                    except httpx.HTTPError:  # the router is down: try again
                        time.sleep(0.02)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        try:
            assert wait_for(lambda: len(fb_acked) >= 30, 60)
            os.kill(cand.pid, signal.SIGKILL)
            cand.wait()
            assert wait_for(lambda: json.loads(cfg.state_path.read_text())["shares"]["cand"] == 0.0, 30)
            n = len(fb_acked)
            assert wait_for(lambda: len(fb_acked) >= n + 30, 60)
            os.kill(router.pid, signal.SIGKILL)
            router.wait()
        finally:
            stop.set()
            for t in threads:
                t.join(20)
        assert http_errors == []  # the candidate's death never reached a client
        router = _start(args, port)
        try:
            db = _db(cfg)
            logged = {r[0] for r in db.execute("SELECT id FROM route_exchanges")}
            fbs = {r[0] for r in db.execute("SELECT id FROM route_feedback")}
            assert set(acked) <= logged and set(fb_acked) <= fbs
            assert len(acked) == len(set(acked))
            assert db.execute("SELECT COUNT(*) FROM route_events WHERE kind = 'auto_rollback'").fetchone()[0] == 1
            assert db.execute("SELECT COUNT(*) FROM route_exchanges WHERE retried_from = 'cand'").fetchone()[0] >= 1
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                assert c.get("/health").json()["shares"] == {"cand": 0.0}  # the rollback survived the restart
                errors = db.execute("SELECT COUNT(*) FROM route_events WHERE kind = 'backend_error' AND "
                                    "backend = 'cand'").fetchone()[0]
                assert errors >= 1 and _metrics(c, "cand")["errors_total"] == errors  # so did the candidate's errors
                r = _ask(c, "after")
                assert r.status_code == 200
                # a retried feedback (same feedback_id) is stored once
                assert c.post("/v1/feedback", json={"id": r.json()["id"], "feedback_id": "once"}).json()["status"] \
                    == "recorded"
                assert c.post("/v1/feedback", json={"id": r.json()["id"], "feedback_id": "once"}).json()["status"] \
                    == "duplicate"
        finally:
            router.kill()
            router.wait()
            cand.kill()


def test_thumbs_down_reaches_the_labeling_app_and_the_rm_data(tmp_path, two):
    """The loop closes: a thumbs-down becomes a task the labeling app serves; the labeler's ranking
    lands in the store's rm split, which `preflab rm data.train=store:PATH` reads."""
    from fastapi.testclient import TestClient

    from preflab.annotate.accounts import create_account
    from preflab.annotate.app import create_app
    from preflab.feedback.store import PreferenceStore

    inc, cand = two
    cfg = _cfg(tmp_path, inc.url, cand.url, share=1.0)
    with ThreadServer(build_app(cfg)) as router, httpx.Client(base_url=router.url, timeout=30) as c:
        r = _ask(c, "u1")
        assert c.post("/v1/feedback", json={"id": r.json()["id"], "thumbs": "down", "flags": ["hallucination"],
                                            "note": "made up"}).status_code == 200
        db = _db(cfg)
        assert wait_for(lambda: db.execute("SELECT task_id FROM route_feedback").fetchone()[0] is not None)
    with PreferenceStore(cfg.store) as store:
        token = create_account(store, "alice")
    app = TestClient(create_app(cfg.store, "feedback"))
    auth = {"Authorization": f"Bearer {token}"}
    task = app.get("/api/task", headers=auth).json()["task"]
    assert task["prompt"] == "hi u1" and task["k"] == 2
    texts = task["responses"]  # in this labeler's display order
    assert sorted(texts) == ["hello from cand", "hello from prod"]
    best = texts.index("hello from prod")
    sub = app.post(f"/api/tasks/{task['task_id']}/submit", headers=auth, json={"order": [[best], [1 - best]]})
    assert sub.status_code == 200, sub.text
    with PreferenceStore(cfg.store) as store:
        ranked = store.grouped_kway(split="rm")
        assert len(ranked) == 1 and ranked[0]["prompt"] == "hi u1"
        assert ranked[0]["responses"][ranked[0]["order"][0][0]] == "hello from prod"
