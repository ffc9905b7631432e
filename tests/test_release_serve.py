"""preflab serve: the OpenAI-compatible API over a tiny model (in-process), errors, auth, binding."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from preflab.release.serve import LocalModel, build_app  # noqa: E402

MSG = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def local():
    return LocalModel("tiny:7", name="tiny", max_prompt_tokens=64, max_new_tokens=6)


@pytest.fixture(scope="module")
def client(local):
    return TestClient(build_app(local))


def test_models_and_health(client, local):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "version": local.version}
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny"]


def test_completion_matches_the_sampler(client, local):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 4,
                                                   "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 4
    assert r.headers["x-preflab-model-version"] == local.version
    # the same greedy request straight through the sampler gives the same text
    direct = local.complete(local.encode(MSG), max_tokens=4, temperature=0, top_p=1.0, seed=None)
    assert choice["message"]["content"] == direct.text
    assert body["usage"]["prompt_tokens"] == len(local.encode(MSG))


def test_max_tokens_is_capped_by_the_server(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 500,
                                                   "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] <= 6


def test_streaming_reassembles_the_same_text(client):
    req = {"model": "tiny", "messages": MSG, "max_tokens": 5, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


def test_seed_makes_sampling_repeatable(client):
    req = {"model": "tiny", "messages": MSG, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    a = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    b = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    assert a == b


@pytest.mark.parametrize("body,status,code,param", [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400, "invalid_value", "messages"),
    (json.dumps({"model": "tiny", "messages": MSG, "max_tokens": "many"}).encode(), 400, "invalid_value",
     "max_tokens"),
    (json.dumps({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).encode(), 400,
     "invalid_value", "messages.0.role"),
    (json.dumps({"messages": MSG}).encode(), 400, "invalid_value", "model"),
    (json.dumps({"model": "gpt-9", "messages": MSG}).encode(), 404, "model_not_found", "model"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 500}]}).encode(), 400,
     "context_length_exceeded", "messages"),
    # a client's bad value is a 400, never a 500 (which a router would count against the model)
    (json.dumps({"model": "tiny", "messages": MSG, "seed": 2 ** 64}).encode(), 400, "invalid_value", "seed"),
    (json.dumps({"model": "tiny", "messages": MSG, "seed": -2 ** 63 - 1}).encode(), 400, "invalid_value", "seed"),
    (json.dumps({"model": "tiny", "messages": MSG, "stream": "yes"}).encode(), 400, "invalid_value", "stream"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(), 400, "invalid_value", "messages.0.content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "invalid_json", None),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None, id="deeply-nested"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json", None),
])
def test_bad_requests_get_openai_errors(client, body, status, code, param):
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"]
    assert err["type"] == "invalid_request_error"


def test_openai_list_content_is_the_same_prompt(client):
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi."}]
    req = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    listed = client.post("/v1/chat/completions", json={**req, "messages": [{"role": "user", "content": parts}]})
    joined = client.post("/v1/chat/completions", json={**req, "messages": [{"role": "user", "content": "Say\nhi."}]})
    assert listed.status_code == 200, listed.text
    assert listed.json()["choices"] == joined.json()["choices"]
    assert listed.json()["usage"] == joined.json()["usage"]


def test_body_over_the_limit_is_413_before_it_is_read(local):
    """A declared 50 MB body is refused from its header (nothing sent); a chunked one at the limit."""
    import socket

    from preflab.release.fake import ThreadServer

    with ThreadServer(build_app(local, max_body=1000)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 50000000\r\n\r\n")
            answer = b""  # comes without a byte of the body sent
            while b"}}" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413") and b'"code":"body_too_large"' in answer
    c = TestClient(build_app(local, max_body=1000))
    r = c.post("/v1/chat/completions", content=(b" " * 400 for _ in range(3)),  # no Content-Length
               headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    ok = {"model": "tiny", "messages": MSG, "max_tokens": 1}
    assert c.post("/v1/chat/completions", json=ok).status_code == 200


def test_tokenizing_does_not_block_health():
    """A request whose prompt is still being tokenized: /health answers meanwhile (the tokenizer
    is held until /health has answered; were /health queued behind it, its request would time out)."""
    import threading

    import httpx

    from preflab.release.fake import ThreadServer

    started, release = threading.Event(), threading.Event()

    class SlowTokenizer:
        name, version, max_new_tokens = "slow", "v0", 4

        def encode(self, messages):
            started.set()
            release.wait(30)
            return [1]

        def complete(self, ids, **kw):
            from preflab.release.serve import Completion

            return Completion("ok", "stop", 1, 1, ["ok"])

    with ThreadServer(build_app(SlowTokenizer())) as server:
        req = {"model": "slow", "messages": MSG}
        slow = threading.Thread(target=httpx.post, args=(server.url + "/v1/chat/completions",),
                                kwargs={"json": req, "timeout": 60})
        slow.start()
        try:
            assert started.wait(30)
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # the tokenizer is still held
        finally:
            release.set()
            slow.join()


def test_bearer_token(local):
    c = TestClient(build_app(local, token="s3cret"))
    req = {"model": "tiny", "messages": MSG, "max_tokens": 2}
    r = c.post("/v1/chat/completions", json=req)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/v1/chat/completions", json=req, headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/health").status_code == 200  # liveness needs no token


def test_public_address_needs_the_flag():
    from click.testing import CliRunner

    from preflab.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", "tiny:7", "--host", "0.0.0.0"], standalone_mode=False)
    assert r.exception is not None and "--allow-public" in str(r.exception)
    from preflab.release.common import check_bind, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    check_bind("0.0.0.0", allow_public=True)
