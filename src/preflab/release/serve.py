"""``preflab serve``: one model behind an OpenAI-compatible HTTP API.

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events,
``data: {chunk}`` lines ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.
Sampling is preflab's own (``rollout.HFGenerator`` over the chat template of
``data.chat.render_prompt``); one request samples at a time (a lock). Tokenizing and sampling run
in worker threads, so the event loop keeps answering ``/health`` while a request is served. The
stream sends the response token by token once it is sampled (the engine has no per-step callback).

Errors are OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): 413 for a body
over ``--max-body-bytes`` (refused before it is read), 400 for bad JSON (``invalid_json``: NaN and
deep nesting too, see ``preflab.http_body``), a field of the wrong type or out of range
(``invalid_value``) and a prompt longer than ``--max-prompt-tokens``, 401 without the bearer token
(when one is set), 404 for a model name this server does not serve. The server binds 127.0.0.1 unless
``--allow-public`` is given. On GPUs, vLLM's own server (``vllm serve MODEL_DIR``) speaks the same
API and stands in for this one (docs/release.md).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, StrictBool

try:
    from fastapi import Request
except ModuleNotFoundError as e:  # the extra is missing: say which one
    raise ModuleNotFoundError(f"{e}; install the server extra: pip install 'preflab[annotate]'") from None

from preflab.http_body import BodyError
from preflab.release.common import (
    TextContent,
    bearer_ok,
    body_error_response,
    chat_request,
    check_bind,
    error_response,
    json_object,
    model_hash,
)

MAX_BODY = 1 << 20  # bytes of one request body (--max-body-bytes)

# ---------------------------------------------------------------------------------------------
# Request schema
# ---------------------------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: TextContent  # a string or OpenAI's list of text parts


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completion request this server honours; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: StrictBool = False
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 64 - 1)  # what torch.manual_seed takes
    user: str | None = None


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS sampled) or "length"
    prompt_tokens: int
    completion_tokens: int
    token_texts: list[str]


class PromptTooLong(ValueError):
    pass


class LocalModel:
    """A model and its tokenizer with preflab's sampler; ``complete`` is safe to call from threads."""

    def __init__(self, spec: str, *, name: str | None = None, bf16: bool = False, max_prompt_tokens: int = 2048,
                 max_new_tokens: int = 256):
        from preflab import models
        from preflab.rollout import HFGenerator

        self.spec, self.name = spec, name or spec
        self.version = model_hash(spec)[:16]
        self.tokenizer = models.load_tokenizer(spec)
        self.model = models.load_policy(spec, dtype="bf16" if bf16 else "fp32")
        self.model.eval()
        self.generator = HFGenerator(self.model, self.tokenizer, bf16=bf16)
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.lock = threading.Lock()
        self.created = int(time.time())

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        from preflab.rollout import encode_prompts

        ids = encode_prompts(self.tokenizer, [messages])[0]
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; this server takes at most "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)")
        return ids

    def complete(self, ids: list[int], *, max_tokens: int, temperature: float, top_p: float,
                 seed: int | None) -> Completion:
        import torch

        with self.lock, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.generator.generate([ids], max_new_tokens=min(max_tokens, self.max_new_tokens),
                                          temperature=temperature, top_p=top_p)
        tokens = out.response[0][out.response_mask[0].bool()].tolist()
        ended = bool(out.ended[0])
        body = tokens[:-1] if ended and tokens else tokens
        pieces = [self.tokenizer.decode(body[:i + 1]) for i in range(len(body))]
        token_texts = [p[len(pieces[i - 1]):] if i else p for i, p in enumerate(pieces)]
        return Completion(out.texts[0], "stop" if ended else "length", len(ids), len(tokens), token_texts)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def build_app(model: LocalModel, *, token: str | None = None, max_body: int = MAX_BODY):
    """The FastAPI app serving ``model`` (anything with ``name``, ``version``, ``encode``, ``complete``);
    request bodies of at most ``max_body`` bytes."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="preflab serve", docs_url=None, redoc_url=None)
    app.state.requests = 0
    app.add_exception_handler(BodyError, body_error_response)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.url.path.startswith("/v1/") and not bearer_ok(request.headers.get("authorization"), token):
            return error_response(401, "missing or wrong bearer token", type_="authentication_error",
                                  code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.name, "version": model.version}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": model.created,
                                            "owned_by": "preflab", "version": model.version}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req, refused = chat_request(await json_object(request, max_body), ChatRequest, model.name, "this server")
        if refused:
            return refused
        try:
            ids = await run_in_threadpool(model.encode, [m.model_dump() for m in req.messages])
        except PromptTooLong as e:
            return error_response(400, str(e), param="messages", code="context_length_exceeded")
        app.state.requests += 1
        max_tokens = req.max_completion_tokens or req.max_tokens or model.max_new_tokens
        done = await run_in_threadpool(model.complete, ids, max_tokens=max_tokens, temperature=req.temperature,
                                       top_p=req.top_p, seed=req.seed)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        headers = {"x-preflab-model-version": model.version}
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        if not req.stream:
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model.name,
                "system_fingerprint": model.version,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": done.finish_reason}],
                "usage": usage}, headers=headers)
        return StreamingResponse(sse_chunks(cid, created, model.name, done, usage), media_type="text/event-stream",
                                 headers=headers)

    return app


def sse_chunks(cid: str, created: int, name: str, done: Completion, usage: dict[str, int]):
    """OpenAI's stream: a role chunk, one chunk per token, a finish chunk, then ``[DONE]``."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in done.token_texts:
        if piece:
            yield chunk({"content": piece})
    yield chunk({}, done.finish_reason, usage=usage)
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# preflab serve
# ---------------------------------------------------------------------------------------------


@click.command("serve")
@click.option("--model", "model_spec", required=True, help="Model directory, run directory, hub id, bundled: or tiny:.")
@click.option("--name", default=None, help="The model name clients send (default: the --model value).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--allow-public", is_flag=True, help="Allow a --host that is not a loopback address.")
@click.option("--token", envvar="PREFLAB_SERVE_TOKEN", default=None,
              help="Bearer token the /v1 endpoints require (env PREFLAB_SERVE_TOKEN).")
@click.option("--max-prompt-tokens", default=2048, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(1),
              help="Upper bound on a request's max_tokens (and its default).")
@click.option("--max-body-bytes", default=MAX_BODY, show_default=True, type=click.IntRange(1),
              help="Larger request bodies get 413 before they are read.")
@click.option("--bf16/--no-bf16", default=False, show_default=True)
@click.option("--threads", default=None, type=click.IntRange(1))
def cli(model_spec, name, host, port, allow_public, token, max_prompt_tokens, max_new_tokens, max_body_bytes, bf16,
        threads):
    """Serve one model behind an OpenAI-compatible API: /v1/chat/completions (streaming too),
    /v1/models, /health.

    \b
    Examples:
      preflab serve --model runs/demo/ppo/model --name ppo --port 8001
      curl -s localhost:8001/v1/chat/completions -H 'content-type: application/json' \\
           -d '{"model": "ppo", "messages": [{"role": "user", "content": "Hi"}]}'
    On GPUs, vLLM's server speaks the same API: vllm serve runs/demo/ppo/model --served-model-name ppo
    """
    import uvicorn

    from preflab import models
    from preflab.release.common import resolve_model

    check_bind(host, allow_public)
    models.set_threads(threads)
    spec = resolve_model(model_spec)
    local = LocalModel(spec, name=name or model_spec, bf16=bf16, max_prompt_tokens=max_prompt_tokens,
                       max_new_tokens=max_new_tokens)
    click.echo(f"serving {local.name!r} (version {local.version}) on http://{host}:{port}", err=True)
    uvicorn.run(build_app(local, token=token, max_body=max_body_bytes), host=host, port=port, log_level="warning")
