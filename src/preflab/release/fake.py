"""A fake OpenAI-compatible back end and a uvicorn server in a thread, for tests and load tests of
the router (``preflab route``) without sampling a model."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def fake_backend(name: str, *, reply: str | None = None, delay_s: float = 0.0) -> FastAPI:
    """Answers every chat completion with ``reply`` (default: "hello from NAME"); counts requests in
    ``app.state.requests``; streams the reply word by word when asked."""
    app = FastAPI()
    app.state.requests = 0
    text = reply if reply is not None else f"hello from {name}"

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests += 1
        if delay_s:
            await asyncio.sleep(delay_s)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        headers = {"x-preflab-model-version": f"{name}-v1"}
        if body.get("model") != name:
            return JSONResponse({"error": {"message": f"unknown model {body.get('model')!r}",
                                           "type": "invalid_request_error", "param": "model",
                                           "code": "model_not_found"}}, status_code=404)
        if body.get("stream"):
            def events():
                for i, w in enumerate(text.split(" ")):
                    delta = {"content": (" " if i else "") + w}
                    yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "model": name,
                                                 "choices": [{"index": 0, "delta": delta,
                                                              "finish_reason": None}]}) + "\n\n"
                yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "model": name,
                                             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()), "model": name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
                            headers=headers)

    return app


class ThreadServer:
    """``with ThreadServer(app) as s:`` serves ``app`` on 127.0.0.1:``s.port`` until ``s.stop()``."""

    def __init__(self, app, port: int = 0):
        import socket

        import uvicorn

        if not port:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> ThreadServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
