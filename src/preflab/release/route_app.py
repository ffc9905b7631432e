"""The router's HTTP app (``build_app``): OpenAI's chat completions routed by ``route.Router``,
feedback, health, metrics and the admin endpoints; the request bodies it accepts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from preflab.errors import PreflabError
from preflab.http_body import BodyError
from preflab.release.common import (
    TextContent,
    bearer_ok,
    body_error_response,
    chat_request,
    error_response,
    json_object,
    validation_message,
)

try:
    from fastapi import Request
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"{e}; install the server extra: pip install 'preflab[annotate]'") from None

from preflab.release.route import (
    Backend,
    BackendDown,
    FeedbackWorker,
    RouteConfig,
    Router,
    bucket,
    pick,
    response_content,
)


def build_app(cfg: RouteConfig, *, admin_token: str | None = None, token: str | None = None):
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from preflab.feedback.rubric import is_refusal

    router = Router(cfg)
    client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)),
                               limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
    worker = FeedbackWorker(cfg, router)

    async def probe(b: Backend) -> None:
        try:
            r = await client.get(b.url.rstrip("/") + "/health", headers=router.headers(b),
                                 timeout=min(cfg.timeout_s, 5.0))
            error = f"health check: HTTP {r.status_code}" if r.status_code >= 500 else None
        except httpx.HTTPError as e:
            error = f"health check: {type(e).__name__}: {e}"
        router.mark(b.name, error)

    async def check_health() -> None:
        """Every ``health_interval_s``: is each back end answering (any answer below 500 counts)?"""
        while True:
            await asyncio.gather(*(probe(b) for b in cfg.backends))
            await asyncio.sleep(cfg.health_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        worker.start()
        checks = asyncio.create_task(check_health())
        try:
            yield
        finally:
            checks.cancel()
            worker.stop()
            await client.aclose()

    app = FastAPI(title="preflab route", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.router = router
    app.add_exception_handler(BodyError, body_error_response)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        if path.startswith("/admin"):
            if admin_token is None:
                return error_response(403, "admin endpoints are off: start the router with --admin-token",
                                      type_="permission_error", code="admin_disabled")
            if not bearer_ok(request.headers.get("authorization"), admin_token):
                return error_response(401, "missing or wrong admin token", type_="authentication_error",
                                      code="invalid_api_key")
        elif path.startswith("/v1/") and not bearer_ok(request.headers.get("authorization"), token):
            return error_response(401, "missing or wrong bearer token", type_="authentication_error",
                                  code="invalid_api_key")
        return await call_next(request)

    async def read_json(request: Request) -> dict[str, Any]:
        return await json_object(request, cfg.max_body_bytes)

    async def count_failure(name: str, latency: float, error: str, xid: str) -> None:
        """A failed attempt on ``name``: counted by its canary and logged under it."""
        router.canary[name].add(False, latency, False)
        await run_in_threadpool(router.log.event, "backend_error", name,
                                {"exchange": xid, "error": error, "latency_ms": latency})
        router.watch(name)

    @app.get("/health")
    async def health():
        st = router.state
        return {"status": "ok", "incumbent": st.incumbent, "shares": st.shares,
                "backends": {n: {"available": router.available(n), "last_checked": router.health[n]["checked_at"],
                                 "error": router.health[n]["error"]} for n in router.order}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "preflab"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        req, refused = chat_request(body, ChatBody, cfg.model, "the router")
        if refused:
            return refused
        body["messages"] = [m.model_dump() for m in req.messages]  # list-of-parts content as text
        user = body.get("user") if isinstance(body.get("user"), str) else request.headers.get("x-user-id")
        state = router.state
        first = pick(state, router.order, bucket(user, cfg.salt))
        tries = [first] + ([state.incumbent] if first != state.incumbent else [])
        xid = f"chatcmpl-{uuid.uuid4().hex}"
        if not router.available(first) and len(tries) > 1:  # down: counts as a failure of it
            tries = tries[1:]
            await count_failure(first, 0.0, f"{first}: unavailable ({router.health[first]['error']})", xid)
        base = {"id": xid, "user": user, "prompt": json.dumps(body["messages"], ensure_ascii=False),
                "stream": int(bool(body.get("stream")))}
        errors: list[str] = []
        unreachable = True
        for name in tries:
            b = router.backends[name]
            t0 = time.perf_counter()
            fwd = {**body, "model": b.model}
            try:
                if body.get("stream"):
                    resp = await open_stream(client, b, fwd, router.headers(b))
                else:
                    resp = await client.post(b.url.rstrip("/") + "/v1/chat/completions", json=fwd,
                                             headers=router.headers(b))
                    if resp.status_code >= 500:
                        raise BackendDown(f"{name}: HTTP {resp.status_code}", unreachable=False)
            except (httpx.HTTPError, BackendDown) as e:
                latency = (time.perf_counter() - t0) * 1000
                unreachable = unreachable and (isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
                                               or getattr(e, "unreachable", False))
                errors.append(f"{name}: {type(e).__name__}: {e}")
                router.mark_down(name, errors[-1])
                await count_failure(name, latency, errors[-1], xid)
                continue
            router.mark(name, None)
            retried_from = first if name != first else None
            if body.get("stream") and resp.status_code != 200:  # a 4xx before any event: pass it on as JSON
                raw = await resp.aread()
                await resp.aclose()
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = None
                return await rejected(base, name, resp.status_code, data, raw.decode(errors="replace"),
                                      (time.perf_counter() - t0) * 1000)
            if body.get("stream"):
                return StreamingResponse(relay(resp, b, base, t0, retried_from), media_type="text/event-stream",
                                         headers={"x-preflab-exchange-id": xid, "x-preflab-backend": name})
            latency = (time.perf_counter() - t0) * 1000
            try:
                data = resp.json()
            except ValueError:
                data = None
            if resp.status_code != 200 or not isinstance(data, dict):  # the back end's own 4xx: pass it on
                return await rejected(base, name, resp.status_code, data, resp.text, latency)
            text = response_content(data)
            version = resp.headers.get("x-preflab-model-version") or data.get("system_fingerprint") or b.model
            await run_in_threadpool(router.log.exchange, {
                **base, "created_at": time.time(), "backend": name, "model_version": version, "response": text,
                "status": "ok", "http_status": 200, "latency_ms": latency, "retried_from": retried_from})
            router.canary[name].add(True, latency, is_refusal(text))
            router.watch(name)
            data.update(id=xid, model=cfg.model)
            return JSONResponse(data, headers={"x-preflab-exchange-id": xid, "x-preflab-backend": name})
        status = 503 if unreachable else 502
        await run_in_threadpool(router.log.exchange, {
            **base, "created_at": time.time(), "backend": tries[-1], "status": "error", "http_status": status,
            "error": "; ".join(errors), "retried_from": tries[0] if len(tries) > 1 else None})
        return error_response(status, "no back end could serve the request: " + "; ".join(errors),
                              type_="server_error", code="backend_unavailable" if unreachable else "backend_error")

    async def rejected(base: dict, name: str, status: int, data: Any, text: str, latency: float):
        """A back end's 4xx (e.g. a prompt too long for it): logged as ``rejected`` and passed on."""
        body = data if isinstance(data, dict) else {"error": {"message": text[:500], "type": "invalid_request_error",
                                                             "param": None, "code": None}}
        await run_in_threadpool(router.log.exchange, {
            **base, "created_at": time.time(), "backend": name, "status": "rejected", "http_status": status,
            "latency_ms": latency, "error": json.dumps(body)[:1000]})
        return JSONResponse(body, status_code=status, headers={"x-preflab-exchange-id": base["id"]})

    async def open_stream(client, b: Backend, body: dict, headers: dict):
        req = client.build_request("POST", b.url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers)
        resp = await client.send(req, stream=True)
        if resp.status_code >= 500:
            await resp.aclose()
            raise BackendDown(f"{b.name}: HTTP {resp.status_code}", unreachable=False)
        return resp

    async def relay(resp, b: Backend, base: dict, t0: float, retried_from: str | None):
        """Pass the back end's events on, rewriting id/model; log before the final ``[DONE]``."""
        parts: list[str] = []
        status, error = "ok", None
        version = resp.headers.get("x-preflab-model-version") or b.model
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    continue
                for ch in chunk.get("choices") or []:
                    parts.append((ch.get("delta") or {}).get("content") or "")
                chunk.update(id=base["id"], model=cfg.model)
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except httpx.HTTPError as e:  # the back end died mid-stream: too late to retry
            status, error = "error", f"{b.name} broke off the stream: {type(e).__name__}"
            router.mark_down(b.name, error)
            yield "data: " + json.dumps({"error": {"message": error, "type": "server_error",
                                                   "code": "backend_error"}}) + "\n\n"
        finally:
            await resp.aclose()
        latency = (time.perf_counter() - t0) * 1000
        text = "".join(parts)
        await run_in_threadpool(router.log.exchange, {
            **base, "created_at": time.time(), "backend": b.name, "model_version": version, "response": text,
            "status": status, "http_status": resp.status_code, "latency_ms": latency, "retried_from": retried_from,
            "error": error})
        if status != "ok":
            await count_failure(b.name, latency, error, base["id"])
            return
        router.canary[b.name].add(True, latency, is_refusal(text))
        router.watch(b.name)
        yield "data: [DONE]\n\n"

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        body = await read_json(request)
        try:
            fb = Feedback.model_validate(body)
        except ValidationError as e:
            msg, param = validation_message(e)
            return error_response(400, msg, param=param, code="invalid_value")
        rows = await run_in_threadpool(router.log.rows, "SELECT backend FROM route_exchanges WHERE id = ? "
                                       "AND status = 'ok'", (fb.id,))
        if not rows:
            return error_response(404, f"no logged exchange {fb.id!r}", param="id", code="exchange_not_found")
        fid = fb.feedback_id or uuid.uuid4().hex
        negative = fb.thumbs == "down" or bool(fb.flags)
        try:
            await run_in_threadpool(router.log.write, "INSERT INTO route_feedback(id, exchange_id, created_at, user, "
                                    "thumbs, flags, note, negative) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    (fid, fb.id, time.time(), fb.user, fb.thumbs, json.dumps(fb.flags), fb.note,
                                     int(negative)))
        except sqlite3.IntegrityError:  # the same feedback_id again (a client retry): already recorded
            return {"id": fid, "exchange_id": fb.id, "status": "duplicate"}
        name = rows[0]["backend"]
        router.canary[name].feedback.append(negative)
        router.watch(name)
        worker.wake()
        return {"id": fid, "exchange_id": fb.id, "status": "recorded", "negative": negative}

    @app.get("/admin/state")
    async def admin_state():
        return {**router.state.to_dict(), "metrics": {n: c.summary() for n, c in router.canary.items()},
                "thresholds": cfg.thresholds.model_dump()}

    @app.post("/admin/rollback")
    async def admin_rollback(request: Request):
        body = await read_json(request)
        names = body.get("backends")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            return error_response(400, "backends: a list of names", param="backends", code="invalid_value")
        try:
            return router.rollback(names, str(body.get("reason", "by hand"))).to_dict()
        except PreflabError as e:
            return error_response(400, str(e), code="invalid_value")

    @app.post("/admin/promote")
    async def admin_promote(request: Request):
        body = await read_json(request)
        if not isinstance(body.get("backend"), str):
            return error_response(400, "backend: the name of the back end to promote", param="backend",
                                  code="invalid_value")
        try:
            return router.promote(body["backend"], str(body.get("reason", "by hand"))).to_dict()
        except PreflabError as e:
            return error_response(400, str(e), code="invalid_value")

    @app.post("/admin/shares")
    async def admin_shares(request: Request):
        body = await read_json(request)
        shares = body.get("shares")
        if not isinstance(shares, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                   for v in shares.values()):
            return error_response(400, "shares: {name: share in [0, 1]}", param="shares", code="invalid_value")
        try:
            return router.set_shares({k: float(v) for k, v in shares.items()}).to_dict()
        except PreflabError as e:
            return error_response(400, str(e), code="invalid_value")

    return app


class ChatMessage(BaseModel):
    """A message as the router forwards it: any role the back end takes, the content as text."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: TextContent  # a string or OpenAI's list of text parts


class ChatBody(BaseModel):
    """What the router reads of a chat completion request; every other field goes on as sent."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="The exchange id (the completion's id).")
    thumbs: Literal["up", "down"] | None = None
    flags: list[str] = Field(default_factory=list, max_length=16)
    note: str | None = Field(None, max_length=4000)
    user: str | None = None
    feedback_id: str | None = Field(None, max_length=200, description="An idempotency key: a retry with the "
                                    "same one is recorded once.")


