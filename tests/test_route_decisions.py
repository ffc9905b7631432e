"""The router's decisions on both sides: shares with several candidates (the split over many users,
bucket edges, stickiness when a share is raised), every rollback threshold just below and just
above, and what counts as negative feedback (the /v1/feedback handler, in process)."""

import json
import sqlite3
import time

import pytest

from preflab.release.route import Canary, RouteConfig, Router, State, Thresholds, bucket, pick
from preflab.release.route_app import build_app


def _cfg(tmp_path, shares=None, **thresholds):
    shares = shares or {"a": 0.1, "b": 0.2}
    backends = [{"name": "prod", "url": "http://127.0.0.1:9", "model": "prod", "role": "incumbent"}]
    backends += [{"name": n, "url": "http://127.0.0.1:9", "model": n, "share": s} for n, s in shares.items()]
    return RouteConfig.model_validate({"store": str(tmp_path / "store.sqlite"), "salt": "pepper",
                                       "backends": backends, "thresholds": thresholds})


# ---------------------------------------------------------------------------------------------
# Shares
# ---------------------------------------------------------------------------------------------


def test_bucket_edges_with_three_candidates_in_config_order():
    st = State("prod", {"a": 0.125, "b": 0.25, "c": 0.0625, "z": 0.0})  # binary fractions: exact edges
    order = ["a", "prod", "b", "z", "c"]  # the incumbent's place in the order does not matter
    eps = 1e-12
    cases = [(0.0, "a"), (0.125 - eps, "a"), (0.125, "b"), (0.375 - eps, "b"), (0.375, "c"), (0.4375 - eps, "c"),
             (0.4375, "prod"), (0.999, "prod")]
    assert [pick(st, order, b) for b, _ in cases] == [w for _, w in cases]
    # a candidate of share 0 owns no bucket; the order of the candidates decides who owns which
    assert pick(st, ["c", "b", "a", "prod"], 0.06) == "c" and pick(st, ["c", "b", "a", "prod"], 0.07) == "b"


def test_observed_split_over_many_users_matches_three_shares():
    st = State("prod", {"a": 0.1, "b": 0.2, "c": 0.05})
    order = ["prod", "a", "b", "c"]
    n = 40_000
    counts = {"prod": 0, "a": 0, "b": 0, "c": 0}
    for i in range(n):
        counts[pick(st, order, bucket(f"user-{i}", "pepper"))] += 1
    for name, share in {"a": 0.1, "b": 0.2, "c": 0.05, "prod": 0.65}.items():
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(counts[name] - n * share) < 5 * sd, (name, counts)
    # the salt reshuffles who is where, not how many
    moved = sum(pick(st, order, bucket(f"user-{i}", "pepper")) != pick(st, order, bucket(f"user-{i}", ""))
                for i in range(2000))
    assert moved > 500


def test_buckets_are_sticky_and_raising_a_share_only_adds_users_to_it():
    before = State("prod", {"a": 0.1, "b": 0.2})
    order = ["prod", "a", "b"]
    users = [f"u{i}" for i in range(5000)]
    where = {u: pick(before, order, bucket(u, "s")) for u in users}
    assert all(pick(before, order, bucket(u, "s")) == where[u] for u in users)  # sticky
    # the last candidate's share raised: its users stay, it only gains from the incumbent
    after = State("prod", {"a": 0.1, "b": 0.3})
    now = {u: pick(after, order, bucket(u, "s")) for u in users}
    assert all(now[u] == "b" for u in users if where[u] == "b")
    assert all(now[u] == "a" for u in users if where[u] == "a")
    gained = [u for u in users if now[u] != where[u]]
    assert gained and all(where[u] == "prod" and now[u] == "b" for u in gained)
    assert 0.06 < len(gained) / len(users) < 0.14  # about 0.1 of the users
    # the first candidate's share raised: it keeps every user it had
    after = State("prod", {"a": 0.15, "b": 0.2})
    assert all(pick(after, order, bucket(u, "s")) == "a" for u in users if where[u] == "a")
    # a rollback to 0 sends a candidate's users to the incumbent and no one else moves
    rolled = State("prod", {"a": 0.1, "b": 0.0})
    assert all(pick(rolled, order, bucket(u, "s")) == ("prod" if where[u] == "b" else where[u]) for u in users)


def test_shares_over_one_are_refused():
    with pytest.raises(ValueError, match="more than 1"):
        RouteConfig.model_validate({"store": "x", "backends": [
            {"name": "p", "url": "u", "model": "p", "role": "incumbent"},
            {"name": "a", "url": "u", "model": "a", "share": 0.6}, {"name": "b", "url": "u", "model": "b", "share": 0.41}]})


# ---------------------------------------------------------------------------------------------
# Rollback thresholds, just below and just above
# ---------------------------------------------------------------------------------------------


def canary(window=200, **fill):
    c = Canary(window)
    for ok, latency, refusal in fill.get("requests", []):
        c.add(ok, latency, refusal)
    c.feedback.extend(fill.get("feedback", []))
    return c


def spread(n, errors):
    """n requests with ``errors`` failures spaced out (never two in a row)."""
    step = n // max(errors, 1)
    return [(not (errors and i % step == step - 1 and i // step < errors), 10.0, False) for i in range(n)]


T = Thresholds(window=200, min_requests=20, error_rate=0.05, consecutive_errors=5, latency_p95_ms=200,
               refusal_rate=0.5, negative_feedback_rate=0.3, min_feedback=20)


def test_error_rate_just_below_and_just_above():
    assert sum(not ok for ok, _, _ in spread(40, 2)) == 2
    assert canary(requests=spread(40, 2)).breach(T) is None  # 0.05: not above 0.05
    why = canary(requests=spread(40, 3)).breach(T)  # 0.075
    assert why is not None and why.startswith("error rate 0.075")
    # below min_requests the rate is not judged, however high
    assert canary(requests=spread(19, 4)).breach(T) is None
    assert canary(requests=spread(20, 4)).breach(T).startswith("error rate 0.200")


def test_consecutive_errors_just_below_and_at_the_threshold():
    ok = [(True, 10.0, False)] * 3
    err = (False, 10.0, False)
    assert canary(requests=ok + [err] * 4).breach(T) is None
    assert canary(requests=ok + [err] * 5).breach(T).startswith("5 consecutive errors")
    assert canary(requests=[err] * 4 + ok[:1] + [err] * 4).breach(T) is None  # a success resets the run


def test_latency_p95_just_below_and_just_above():
    # 30 successes at 10, 20, ..., 300 ms: p95 is the 29th smallest (index int(0.95 * 30) = 28): 290 ms
    reqs = [(True, 10.0 * (i + 1), False) for i in range(30)]
    t = T.model_copy(update={"latency_p95_ms": 290})
    assert canary(requests=reqs).summary()["latency_p95_ms"] == 290.0
    assert canary(requests=reqs).breach(t) is None  # 290 is not above 290
    assert canary(requests=reqs).breach(t.model_copy(update={"latency_p95_ms": 289.9})).startswith("latency p95")
    # a failed request's latency (a timeout) is not part of the percentile
    slow_fail = [(False, 99_999.0, False)] * 5 + reqs  # with them it would be 99,999
    assert canary(requests=slow_fail).summary()["latency_p95_ms"] == 290.0
    assert canary(requests=slow_fail).breach(t.model_copy(update={"error_rate": 1.0})) is None


def test_refusal_rate_just_below_and_just_above_among_answered_requests():
    def reqs(refusals, n=20, failures=0):
        return [(True, 10.0, i < refusals) for i in range(n)] + [(False, 10.0, False)] * failures

    t = T.model_copy(update={"error_rate": 1.0})
    assert canary(requests=reqs(10)).breach(t) is None  # 0.5 is not above 0.5
    assert canary(requests=reqs(11)).breach(t).startswith("refusal rate 0.550")
    # failures do not dilute the rate: 10 of 20 answers refuse whatever failed beside them
    assert canary(requests=reqs(10, failures=4)).summary()["refusal_rate"] == 0.5


def test_negative_feedback_reads_the_intervals_lower_end():
    # 20 ratings: 10 negative -> rate 0.5 but Wilson lower end 0.2993 (<= 0.3): no rollback;
    # 11 negative -> lower end 0.3421: rollback.
    ten = canary(feedback=[True] * 10 + [False] * 10)
    assert ten.summary()["negative_feedback_interval"][0] == pytest.approx(0.2993, abs=1e-4)
    assert ten.breach(T) is None
    why = canary(feedback=[True] * 11 + [False] * 9).breach(T)
    assert why is not None and why.startswith("negative feedback 0.550")
    # fewer than min_feedback ratings are not judged, even all negative
    assert canary(feedback=[True] * 19).breach(T) is None
    assert canary(feedback=[True] * 20).breach(T) is not None


def test_the_window_forgets_old_requests():
    old_errors = [(False, 10.0, False), (True, 10.0, False)] * 3
    c = canary(window=20, requests=old_errors + [(True, 10.0, False)] * 20)
    s = c.summary()
    assert s["window_requests"] == 20 and s["error_rate"] == 0.0 and s["errors_total"] == 3
    assert c.breach(T) is None
    assert canary(window=20, requests=[(True, 10.0, False)] * 17 + old_errors[:3]).breach(T) is not None
    # min_requests counts the requests in the window, not every request since the start
    small = canary(window=10, requests=spread(30, 6))
    assert small.summary()["requests_total"] == 30 and small.summary()["error_rate"] == pytest.approx(0.2)
    assert small.breach(T) is None


def test_watch_rolls_back_only_a_live_candidate_and_records_why(tmp_path):
    cfg = _cfg(tmp_path, min_requests=20, error_rate=0.05, consecutive_errors=50)
    router = Router(cfg)
    for name in ("prod", "a", "b"):
        for ok, lat, ref in spread(40, 3):  # 0.075 > 0.05 on every back end
            router.canary[name].add(ok, lat, ref)
    router.watch("prod")  # the incumbent is never rolled back
    assert router.state.shares == {"a": 0.1, "b": 0.2}
    router.watch("b")
    assert router.state.shares == {"a": 0.1, "b": 0.0}
    assert json.loads(cfg.state_path.read_text())["shares"] == {"a": 0.1, "b": 0.0}
    router.watch("b")  # already at 0: no second event
    db = sqlite3.connect(cfg.store)
    ev = db.execute("SELECT backend, detail FROM route_events WHERE kind = 'auto_rollback'").fetchall()
    assert len(ev) == 1 and ev[0][0] == "b" and json.loads(ev[0][1])["reason"].startswith("automatic: error rate")
    # a: 10 more successes, 3 errors in 50 = 0.06, still above 0.05: rolled back too
    for _ in range(10):
        router.canary["a"].add(True, 10.0, False)
    router.watch("a")
    assert router.state.shares["a"] == 0.0
    # exactly at the threshold (2 errors in 40 = 0.05): no rollback
    cfg2 = _cfg(tmp_path / "x", min_requests=20, error_rate=0.05, consecutive_errors=50)
    (tmp_path / "x").mkdir()
    r2 = Router(cfg2)
    for ok, lat, ref in spread(40, 2):  # 0.05: not above
        r2.canary["a"].add(ok, lat, ref)
    r2.watch("a")
    assert r2.state.shares == {"a": 0.1, "b": 0.2}


# ---------------------------------------------------------------------------------------------
# What counts as negative feedback
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def app_and_log(tmp_path):
    from fastapi.testclient import TestClient

    cfg = _cfg(tmp_path, shares={"a": 0.5})
    app = build_app(cfg)
    router = app.state.router
    for xid, backend in (("x-a", "a"), ("x-prod", "prod")):
        router.log.exchange({"id": xid, "created_at": time.time(), "user": "u", "backend": backend,
                             "model_version": backend, "prompt": "[]", "response": "hi", "status": "ok",
                             "http_status": 200, "latency_ms": 1.0, "stream": 0})
    return TestClient(app), router, cfg  # no `with`: the feedback worker (lifespan) stays off


@pytest.mark.parametrize("body,negative", [
    ({"thumbs": "down"}, True),
    ({"thumbs": "up"}, False),
    ({"thumbs": "up", "flags": ["unsafe"]}, True),  # a flag is negative whatever the thumbs
    ({"flags": ["unhelpful"]}, True),
    ({"note": "meh"}, False),  # a note alone is not
    ({}, False),
])
def test_negative_feedback_is_thumbs_down_or_a_flag(app_and_log, body, negative):
    client, router, cfg = app_and_log
    r = client.post("/v1/feedback", json={"id": "x-a", **body})
    assert r.status_code == 200, r.text
    assert r.json()["negative"] is negative
    assert list(router.canary["a"].feedback) == [negative] and not router.canary["prod"].feedback
    row = sqlite3.connect(cfg.store).execute("SELECT negative FROM route_feedback").fetchone()
    assert row[0] == int(negative)


def test_feedback_counts_for_the_back_end_that_answered(app_and_log):
    client, router, _ = app_and_log
    for _ in range(3):
        assert client.post("/v1/feedback", json={"id": "x-prod", "thumbs": "down"}).status_code == 200
    assert list(router.canary["prod"].feedback) == [True] * 3 and not router.canary["a"].feedback


def test_requests_land_where_pick_of_the_salted_bucket_says(tmp_path):
    """Through the router (in process) to three fake back ends: every user's requests go to
    ``pick(state, order, bucket(user, salt))``; the user comes from the body, else the header."""
    from fastapi.testclient import TestClient

    from preflab.release.fake import ThreadServer, fake_backend

    with ThreadServer(fake_backend("prod")) as p, ThreadServer(fake_backend("a")) as a, \
            ThreadServer(fake_backend("b")) as b:
        cfg = RouteConfig.model_validate({
            "store": str(tmp_path / "s.sqlite"), "salt": "pepper", "backends": [
                {"name": "prod", "url": p.url, "model": "prod", "role": "incumbent"},
                {"name": "a", "url": a.url, "model": "a", "share": 0.25},
                {"name": "b", "url": b.url, "model": "b", "share": 0.25}]})
        with TestClient(build_app(cfg)) as client:  # one event loop for the router's back-end client
            seen = _ask_each(client)
        st, order = State("prod", {"a": 0.25, "b": 0.25}), ["prod", "a", "b"]
        assert seen == {u: pick(st, order, bucket(u, "pepper")) for u in seen}
        assert set(seen.values()) == {"prod", "a", "b"}


def _ask_each(client) -> dict:
    seen = {}
    for i in range(30):
        user = f"user{i}"
        msgs = [{"role": "user", "content": "hi"}]
        r1 = client.post("/v1/chat/completions", json={"model": "preflab", "user": user, "messages": msgs})
        r2 = client.post("/v1/chat/completions", json={"model": "preflab", "messages": msgs},
                         headers={"x-user-id": user})
        assert r1.status_code == r2.status_code == 200, r1.text
        seen[user] = r1.headers["x-preflab-backend"]
        assert r2.headers["x-preflab-backend"] == seen[user]
        assert r1.json()["choices"][0]["message"]["content"] == f"hello from {seen[user]}"
    return seen
