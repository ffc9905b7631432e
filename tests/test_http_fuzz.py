"""Bad input at every endpoint of the three HTTP servers (`preflab serve`, `preflab route`, the labeling
app): malformed, huge, deeply nested, non-UTF-8 and NaN bodies, and every field of a valid body
swapped for a value of the wrong type or range. No answer is a 5xx, none hangs (a client timeout),
and each server still answers /health and a valid request afterwards. Fixed inputs, no randomness."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("fastapi")

from annotate_helpers import make_project  # noqa: E402
from preflab.annotate.validate import MAX_BODY as ANNOTATE_MAX_BODY  # noqa: E402
from preflab.release.fake import ThreadServer, fake_backend  # noqa: E402

LIMIT = 64 * 1024  # serve's and route's body limit here (the labeling app's is its own)
ADMIN = "fuzz-admin"
HI = [{"role": "user", "content": "hi"}]

BODIES = {
    "empty": b"",
    "truncated": b'{"model": "tiny", "messages": [{"role": "us',
    "not-json": b"hello there",
    "trailing-garbage": b'{"a": 1} {"b": 2}',
    "null": b"null",
    "number": b"1",
    "string": b'"text"',
    "array": b"[1, 2, 3]",
    "nan": b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "infinity": b"[Infinity, -Infinity]",
    "huge-float": b'{"a": 1e999}',
    "huge-int": b'{"a": ' + b"9" * 5000 + b"}",
    "deep-array": b"[" * 30_000 + b"]" * 30_000,
    "deep-object": b'{"a": ' * 6_000 + b"1" + b"}" * 6_000,
    "unclosed-deep": b"[" * 60_000,
    "non-utf8": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}',
    "utf16": '{"model": "tiny"}'.encode("utf-16"),
    "control-char": b'{"a": "\x00\x01"}',
    "lone-surrogate": b'{"model": "tiny", "user": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}',
    "duplicate-keys": b'{"model": "tiny", "model": 3}',
    "over-the-limit": b'{"a": "' + b"x" * max(LIMIT, ANNOTATE_MAX_BODY) + b'"}',
}

# values that replace one field of a valid body
ODD_VALUES = [None, True, -1, 2 ** 64, -(2 ** 63) - 1, 1e308, "", "x" * 5000, "\ud800", [[]], {"a": {}},
              [{"type": "text"}]]


def _variants(base: dict) -> list[dict]:
    """``base`` with each field, and each field of its first message (if any), replaced by each odd value."""
    out = []
    for key in base:
        out += [{**base, key: v} for v in ODD_VALUES]
        out.append({k: v for k, v in base.items() if k != key})  # the field missing
    if base.get("messages"):
        msg = base["messages"][0]
        for key in msg:
            out += [{**base, "messages": [{**msg, key: v}]} for v in ODD_VALUES]
        out += [{**base, "messages": [v]} for v in ODD_VALUES]
    return out


class Fuzzer:
    def __init__(self, client: httpx.Client, headers: dict[str, str] | None = None):
        self.client, self.headers, self.failures = client, headers or {}, []

    def send(self, method: str, path: str, content: bytes | None = None, *, label: str, **headers: str) -> None:
        try:
            r = self.client.request(method, path, content=content, headers={
                "content-type": "application/json", **self.headers, **headers})
        except httpx.TimeoutException:
            self.failures.append(f"{method} {path} [{label}]: no answer (hang)")
            return
        except httpx.TransportError as e:  # the server dropped the connection instead of answering
            self.failures.append(f"{method} {path} [{label}]: {type(e).__name__}: {e}")
            return
        if r.status_code >= 500:
            self.failures.append(f"{method} {path} [{label}]: {r.status_code} {r.text[:200]}")

    def endpoint(self, method: str, path: str, base: dict | None = None) -> None:
        for label, body in BODIES.items():
            self.send(method, path, body, label=label)
        self.send(method, path, (b"[" * 4096 for _ in range(LIMIT // 4096 + 1)), label="chunked-over-the-limit")
        self.send(method, path, json.dumps(base or {}).encode(), label="text/plain", **{"content-type": "text/plain"})
        for i, body in enumerate(_variants(base or {})):
            self.send(method, path, json.dumps(body).encode(), label=f"variant {i}: {json.dumps(body)[:120]}")


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=20)


@pytest.fixture(scope="module")
def serve_url():
    from preflab.release.serve import LocalModel, build_app

    model = LocalModel("tiny:7", name="tiny", max_prompt_tokens=64, max_new_tokens=2)
    with ThreadServer(build_app(model, max_body=LIMIT)) as server:
        yield server.url


def test_serve_survives_bad_input(serve_url):
    with _client(serve_url) as c:
        f = Fuzzer(c)
        f.endpoint("POST", "/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 2,
                                                    "temperature": 0.5, "top_p": 0.9, "n": 1, "stream": False,
                                                    "seed": 1, "user": "u", "max_completion_tokens": 2})
        for path in ("/health", "/v1/models"):
            f.endpoint("GET", path)
        assert f.failures == []
        assert c.get("/health").status_code == 200
        assert c.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 2}).status_code == 200


def test_route_survives_bad_input(serve_url, tmp_path):
    from preflab.release.route import RouteConfig
    from preflab.release.route_app import build_app

    with ThreadServer(fake_backend("cand")) as cand:
        cfg = RouteConfig.model_validate({
            "store": str(tmp_path / "store.sqlite"), "model": "preflab", "max_body_bytes": LIMIT,
            "backends": [{"name": "prod", "url": serve_url, "model": "tiny", "role": "incumbent"},
                         {"name": "cand", "url": cand.url, "model": "cand", "share": 0.5}]})
        with ThreadServer(build_app(cfg, admin_token=ADMIN)) as router, _client(router.url) as c:
            ok = {"model": "preflab", "messages": HI, "max_tokens": 2, "user": "u1"}
            xid = c.post("/v1/chat/completions", json=ok).json()["id"]
            f = Fuzzer(c, {"authorization": f"Bearer {ADMIN}"})
            f.endpoint("POST", "/v1/chat/completions", {**ok, "temperature": 0.5, "top_p": 0.9, "stream": False,
                                                        "seed": 1})
            f.endpoint("POST", "/v1/feedback", {"id": xid, "thumbs": "down", "flags": ["x"], "note": "n",
                                                "user": "u", "feedback_id": "f"})
            f.endpoint("POST", "/admin/shares", {"shares": {"cand": 0.1}})
            f.endpoint("POST", "/admin/rollback", {"backends": ["cand"], "reason": "r"})
            f.endpoint("POST", "/admin/promote", {"backend": "prod", "reason": "r"})
            for path in ("/health", "/v1/models", "/admin/state"):
                f.endpoint("GET", path)
            assert f.failures == []
            health = c.get("/health")
            assert health.status_code == 200 and health.json()["backends"]["prod"]["available"]
            assert c.post("/v1/chat/completions", json=ok).status_code == 200
            metrics = c.get("/admin/state", headers=f.headers).json()["metrics"]
            assert metrics["prod"]["errors_total"] == metrics["cand"]["errors_total"] == 0  # bad input is no failure


def test_labeling_app_survives_bad_input(tmp_path):
    from preflab.annotate.app import create_app

    path = tmp_path / "s.sqlite"
    _, tokens = make_project(path)
    with ThreadServer(create_app(path)) as server, _client(server.url) as c:
        alice, boss = ({"authorization": f"Bearer {tokens[n]}"} for n in ("alice", "boss"))
        task = c.get("/api/task", headers=alice).json()["task"]["task_id"]
        labeler, admin = Fuzzer(c, alice), Fuzzer(c, boss)
        labeler.endpoint("POST", "/api/login", {"token": tokens["alice"]})
        labeler.endpoint("POST", f"/api/tasks/{task}/submit", {"order": [[0], [1], [2], [3]], "scores": [1, 2, 3, 4],
                                                              "flags": [[], [], [], []], "note": "n"})
        labeler.endpoint("POST", f"/api/tasks/{task}/skip")
        for raw in ("abc", "-1", "9" * 30, "%00", "1.5"):
            labeler.endpoint("POST", f"/api/tasks/{raw}/submit")
        admin.endpoint("POST", "/api/admin/adjudicate", {"prompt_id": 1, "candidate_ids": [1, 2, 3, 4],
                                                         "order": [[0], [1], [2], [3]]})
        for page in ("/", "/admin", "/login", "/api/me", "/api/task", "/api/admin/stats", "/static/label.js",
                     "/static/..%2Fapp.py"):
            admin.endpoint("GET", page)
        labeler.endpoint("POST", "/api/logout")
        assert labeler.failures + admin.failures == []
        assert c.get("/login").status_code == 200
        assert c.get("/api/me", headers=boss).json()["name"] == "boss"
