"""The annotation app over HTTP (in-process ASGI client): authentication, no leaks, 4xx that name
the field with nothing written, idempotent double submit, body limits, security headers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the annotate extra is not installed (pip install -e '.[annotate]')")

from fastapi.testclient import TestClient  # noqa: E402

from annotate_helpers import GOLD, make_project  # noqa: E402
from preflab.annotate.app import COOKIE, create_app  # noqa: E402
from preflab.annotate.validate import MAX_BODY  # noqa: E402
from preflab.feedback.store import PreferenceStore  # noqa: E402

API = [("GET", "/api/me"), ("GET", "/api/task"), ("POST", "/api/tasks/1/submit"), ("POST", "/api/tasks/1/skip"),
       ("GET", "/api/admin/stats"), ("POST", "/api/admin/adjudicate"), ("GET", "/static/label.js")]
RANKED = {"order": [[0], [1], [2], [3]]}


@pytest.fixture
def app(tmp_path):
    path = tmp_path / "s.sqlite"
    _, tokens = make_project(path)
    client = TestClient(create_app(path))
    return client, tokens, path


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def counts(path):
    with PreferenceStore(path) as s:
        return s.counts()


def test_every_route_needs_a_token(app):
    client, tokens, _ = app
    for headers in ({}, auth("pfl_wrong"), auth(tokens["alice"] + "x"), {"Cookie": f"{COOKIE}=nope"}):
        for method, path in API:
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers)
            assert r.json() == {"error": "missing or wrong token: log in at /login", "field": "token"}
        for page in ("/", "/admin"):
            r = client.get(page, headers=headers, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"] == "/login" and "prompt" not in r.text.lower()
    assert client.get("/login").status_code == 200 and client.get("/static/app.css").status_code == 200


def test_login_cookie_and_roles(app):
    client, tokens, _ = app
    assert client.post("/api/login", json={"token": "pfl_nope"}).status_code == 401
    r = client.post("/api/login", json={"token": tokens["alice"]})
    assert r.json() == {"name": "alice", "role": "labeler"}
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # plain HTTP on loopback
    tls = TestClient(client.app, base_url="https://testserver")  # as behind a TLS proxy
    assert "secure" in tls.post("/api/login", json={"token": tokens["bob"]}).headers["set-cookie"].lower()
    assert client.get("/api/me").json()["name"] == "alice"  # the cookie authenticates
    assert client.get("/").status_code == 200
    assert client.get("/api/admin/stats").status_code == 403
    assert client.get("/admin").status_code == 403
    client.post("/api/logout")
    assert client.get("/api/me").status_code == 401
    assert client.get("/api/admin/stats", headers=auth(tokens["boss"])).status_code == 200


def test_labeler_sees_neither_others_rankings_nor_gold(app):
    client, tokens, _ = app
    seen_by_bob = []
    while (t := client.get("/api/task", headers=auth(tokens["bob"])).json()["task"]) is not None:
        seen_by_bob.append(t)
        r = client.post(f"/api/tasks/{t['task_id']}/submit", headers=auth(tokens["bob"]),
                        json={**RANKED, "note": "SECRET-NOTE-BOB", "flags": [["hallucination"], [], [], []]})
        assert r.status_code == 200
    assert GOLD.prompt in [t["prompt"] for t in seen_by_bob]  # gold items look like any task
    texts = [client.get("/api/me", headers=auth(tokens["alice"])).text]
    while (r := client.get("/api/task", headers=auth(tokens["alice"]))).json()["task"] is not None:
        texts.append(r.text)
        t = r.json()["task"]
        assert set(t) == {"task_id", "prompt", "k", "responses"}
        client.post(f"/api/tasks/{t['task_id']}/submit", headers=auth(tokens["alice"]), json=RANKED)
    blob = "\n".join(texts)
    assert "SECRET-NOTE-BOB" not in blob and "bob" not in blob and "hallucination\"]" not in blob
    assert '"order"' not in blob and "gold" not in blob.lower()
    stats = client.get("/api/admin/stats", headers=auth(tokens["boss"])).json()
    assert stats["progress"]["done"] == 14 and {r["labeler"] for r in stats["labelers"]} == {"alice", "bob"}


@pytest.mark.parametrize("body, status, field", [
    ({"order": [[0], [1], [2]]}, 422, "order"),  # missing rank
    ({"order": [[0, 1], [1], [2], [3]]}, 422, "order"),  # duplicate
    ({"order": [[0], [1], [2], [4]]}, 422, "order"),  # out of range
    ({"order": [[0], [1], [2], [3]], "scores": [0, 1, 2, 3]}, 422, "scores[0]"),
    ({"order": [[0], [1], [2], [3]], "task_id": 5}, 422, "task_id"),
])
def test_bad_submission_is_4xx_naming_the_field(app, body, status, field):
    client, tokens, path = app
    t = client.get("/api/task", headers=auth(tokens["alice"])).json()["task"]
    before = counts(path)
    r = client.post(f"/api/tasks/{t['task_id']}/submit", headers=auth(tokens["alice"]), json=body)
    assert (r.status_code, r.json()["field"]) == (status, field) and r.json()["error"]
    assert counts(path) == before


def test_task_ownership_body_limits_and_idempotency(app):
    client, tokens, path = app
    t = client.get("/api/task", headers=auth(tokens["alice"])).json()["task"]
    url = f"/api/tasks/{t['task_id']}/submit"
    before = counts(path)
    cases = [
        (client.post(url, headers=auth(tokens["bob"]), json=RANKED), 403, "task_id"),  # wrong labeler
        (client.post("/api/tasks/99999/submit", headers=auth(tokens["alice"]), json=RANKED), 404, "task_id"),
        (client.post("/api/tasks/abc/submit", headers=auth(tokens["alice"]), json=RANKED), 404, "task_id"),
        (client.post(url, headers={**auth(tokens["alice"]), "Content-Type": "application/json"},
                     content=json.dumps({**RANKED, "note": "x" * MAX_BODY})), 413, "body"),
        (client.post(url, headers={**auth(tokens["alice"]), "Content-Type": "application/json"},
                     content=b"{not json"), 400, "body"),
        (client.post(url, headers={**auth(tokens["alice"]), "Content-Type": "text/plain"},
                     content=json.dumps(RANKED)), 415, "body"),
    ]
    chunks = (b'{"order": [[0], [1], [2], [3]], "note": "' + b"x" * 8192 for _ in range(10))  # no Content-Length
    cases.append((client.post(url, headers={**auth(tokens["alice"]), "Content-Type": "application/json"},
                              content=chunks), 413, "body"))
    for r, status, field in cases:
        assert (r.status_code, r.json()["field"]) == (status, field), r.text
    assert counts(path) == before
    first = client.post(url, headers=auth(tokens["alice"]), json=RANKED).json()
    again = client.post(url, headers=auth(tokens["alice"]), json=RANKED).json()
    assert first == {"ranking_id": again["ranking_id"], "duplicate": False, "updated": False}
    assert again == {**first, "duplicate": True}
    r = client.post(url, headers=auth(tokens["alice"]), json={"order": [[3], [2], [1], [0]]})
    assert (r.status_code, r.json()["field"]) == (409, "task_id")
    assert counts(path)["rankings"] == before["rankings"] + 1


def test_static_files_only_from_the_package(app):
    client, tokens, _ = app
    h = auth(tokens["alice"])
    assert client.get("/static/label.js", headers=h).status_code == 200
    for name in ("..%2Fapp.py", ".hidden", "nope.js", "%2e%2e"):
        assert client.get(f"/static/{name}", headers=h).status_code == 404, name


def test_security_headers(app):
    client, tokens, _ = app
    for r in (client.get("/login"), client.get("/api/me", headers=auth(tokens["alice"])), client.get("/api/me")):
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
        assert "server" not in r.headers


def test_admin_adjudicates_over_http(app):
    client, tokens, _ = app
    for name, reverse in (("alice", False), ("bob", True)):  # same prompt, opposite rankings of the texts
        t = client.get("/api/task", headers=auth(tokens[name])).json()["task"]
        by_text = sorted(range(4), key=lambda d: t["responses"][d], reverse=reverse)
        r = client.post(f"/api/tasks/{t['task_id']}/submit", headers=auth(tokens[name]),
                        json={"order": [[d] for d in by_text]})
        assert r.status_code == 200
    boss = auth(tokens["boss"])
    item = client.get("/api/admin/stats", headers=boss).json()["disagreements"][0]
    assert set(item["ranks"]) == {"alice", "bob"}
    url = "/api/admin/adjudicate"
    bad = client.post(url, headers=boss, json={"prompt_id": item["prompt_id"], "candidate_ids": item["candidate_ids"],
                                               "order": [[0], [1]]})
    assert (bad.status_code, bad.json()["field"]) == (422, "order")
    ok = client.post(url, headers=boss, json={"prompt_id": item["prompt_id"], "candidate_ids": item["candidate_ids"],
                                              "order": [[1], [0, 2], [3]]})
    assert ok.status_code == 200 and isinstance(ok.json()["ranking_id"], int)
    assert client.post(url, headers=auth(tokens["alice"]), json={}).status_code == 403
    assert client.get("/api/admin/stats", headers=boss).json()["progress"]["adjudicated"] == 1


def test_a_correction_over_http_answers_updated(app):
    """Issue 27, item 10: the same order with a new note and scores updates the stored ranking."""
    client, tokens, path = app
    t = client.get("/api/task", headers=auth(tokens["alice"])).json()["task"]
    url = f"/api/tasks/{t['task_id']}/submit"
    first = client.post(url, headers=auth(tokens["alice"]), json={**RANKED, "note": "B looks copied"}).json()
    fixed = client.post(url, headers=auth(tokens["alice"]),
                        json={**RANKED, "scores": [7, 5, 2, 1], "note": "B is copied from A"}).json()
    assert fixed == {"ranking_id": first["ranking_id"], "duplicate": True, "updated": True}
    with PreferenceStore(path) as s:
        (r,) = s.rankings(labeler="alice")
    assert r.meta["note"] == "B is copied from A" and sorted(r.meta["scores"]) == [1, 2, 5, 7]


def test_notes_reach_the_admin_api_only(app):
    """Issue 27, item 11: every note with its labeler, task and prompt in the admin API; a labeler
    sees none of another's."""
    client, tokens, _ = app
    noted = {}
    for name, note in (("alice", "B is copied from A"), ("bob", ""), ("carol", "all four are fine")):
        t = client.get("/api/task", headers=auth(tokens[name])).json()["task"]
        r = client.post(f"/api/tasks/{t['task_id']}/submit", headers=auth(tokens[name]), json={**RANKED, "note": note})
        assert r.status_code == 200, r.text
        noted[name] = t
    stats = client.get("/api/admin/stats", headers=auth(tokens["boss"])).json()
    assert stats["progress"]["notes"] == 2
    assert [(n["labeler"], n["task_id"], n["prompt"], n["note"]) for n in stats["notes"]] == [
        ("carol", noted["carol"]["task_id"], noted["carol"]["prompt"], "all four are fine"),  # newest first
        ("alice", noted["alice"]["task_id"], noted["alice"]["prompt"], "B is copied from A")]
    assert client.get("/api/admin/stats", headers=auth(tokens["alice"])).status_code == 403
    assert "copied" not in json.dumps(client.get("/api/task", headers=auth(tokens["bob"])).json())
