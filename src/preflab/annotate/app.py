"""The web app (FastAPI): the labeling page, the admin page and their JSON API.

Every route but the login page and its static files needs a token: ``Authorization:
Bearer TOKEN`` or the HttpOnly, SameSite=Strict cookie that ``POST /api/login`` sets. A
wrong or missing token gets 401 (pages redirect to /login) and no data; admin routes need
an admin account (403 otherwise). POST bodies must be JSON (which a cross-site form cannot
send) and at most ``MAX_BODY`` bytes, parsed by ``preflab.http_body`` (a body over the limit is
refused before it is read; NaN and deep nesting are invalid JSON). Store work runs in the thread pool, one store
connection per thread (SQLite WAL: readers and the single writer do not block each other; on a PostgreSQL
store several servers share the database).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from preflab.annotate import stats, tasks
from preflab.annotate.accounts import Account, authenticate
from preflab.annotate.markdown import render
from preflab.annotate.project import load_project
from preflab.annotate.validate import FLAGS, MAX_BODY, Invalid, parse_order_only
from preflab.errors import DataError
from preflab.feedback.store import PreferenceStore, is_url
from preflab.http_body import BodyError, check_length, read_json

STATIC = Path(__file__).parent / "static"
COOKIE = "preflab_token"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PUBLIC_FILES = {"login.html", "login.js", "app.css"}


def _error(e: Invalid) -> JSONResponse:
    return JSONResponse({"error": e.message, "field": e.field}, status_code=e.status)


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.cookies.get(COOKIE)


async def _json_body(request: Request) -> Any:
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise Invalid("body", "Content-Type must be application/json", 415)
    try:
        return await read_json(request, MAX_BODY)
    except BodyError as e:
        raise Invalid("body", e.message, e.status) from None


def _is_id(v: Any) -> bool:
    """A row id SQLite can hold (a 64-bit integer; JSON true is no id)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63


def _task_id(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 18:
        raise Invalid("task_id", f"must be a task number, got {raw[:40]!r}", 404)
    return int(raw)


def create_app(store_path: str | Path, project_name: str | None = None) -> FastAPI:
    """The app for one project of the store at ``store_path`` (a SQLite file or a postgresql:// URL)."""
    store_path = store_path if is_url(store_path) else Path(store_path)
    if isinstance(store_path, Path) and not store_path.is_file():
        raise DataError(f"{store_path}: store not found (create a project first: `preflab annotate create`)")
    local = threading.local()

    def store() -> PreferenceStore:
        s = getattr(local, "store", None)
        if s is None:
            s = local.store = PreferenceStore(store_path)
        return s

    with PreferenceStore(store_path) as s:
        project = load_project(s, project_name)
    guidelines_html = render(project.guidelines)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="preflab annotate")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            check_length(request.headers, MAX_BODY)
        except BodyError as e:
            response: Response = _error(Invalid("body", e.message, e.status))
        else:
            response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    @app.exception_handler(Invalid)
    async def invalid(request: Request, e: Invalid) -> JSONResponse:
        return _error(e)

    @app.exception_handler(DataError)
    async def data_error(request: Request, e: DataError) -> JSONResponse:
        return JSONResponse({"error": str(e), "field": "body"}, status_code=422)

    async def user(request: Request, admin: bool = False) -> Account:
        token = _token(request)
        acc = await run_in_threadpool(lambda: authenticate(store(), token))
        if acc is None:
            raise Invalid("token", "missing or wrong token: log in at /login", 401)
        if admin and not acc.is_admin:
            raise Invalid("token", "this page is for admins", 403)
        return acc

    async def page(request: Request, name: str, admin: bool = False) -> Response:
        try:
            await user(request, admin)
        except Invalid as e:
            if e.status == 401:
                return RedirectResponse("/login", status_code=303)
            return _error(e)
        return FileResponse(STATIC / name, media_type="text/html")

    @app.get("/login")
    async def login_page() -> FileResponse:
        return FileResponse(STATIC / "login.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(request: Request, name: str) -> Response:
        if name not in PUBLIC_FILES:
            await user(request)
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise Invalid("name", "no such file", 404)
        return FileResponse(path)

    @app.post("/api/login")
    async def login(request: Request) -> JSONResponse:
        body = await _json_body(request)
        token = body.get("token") if isinstance(body, dict) else None
        acc = await run_in_threadpool(lambda: authenticate(store(), token if isinstance(token, str) else None))
        if acc is None:
            raise Invalid("token", "wrong token", 401)
        resp = JSONResponse({"name": acc.name, "role": acc.role})
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/", max_age=12 * 3600,
                        secure=request.url.scheme == "https")  # behind a TLS proxy (X-Forwarded-Proto)
        return resp

    @app.post("/api/logout")
    async def logout() -> JSONResponse:
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.get("/")
    async def label_page(request: Request) -> Response:
        return await page(request, "label.html")

    @app.get("/admin")
    async def admin_page(request: Request) -> Response:
        return await page(request, "admin.html", admin=True)

    @app.get("/api/me")
    async def me(request: Request) -> dict[str, Any]:
        acc = await user(request)
        done = await run_in_threadpool(lambda: tasks.done_count(store(), project, acc.name))
        return {"name": acc.name, "role": acc.role, "project": project.name, "k": project.k, "done": done,
                "flags": list(FLAGS), "guidelines_html": guidelines_html}

    @app.get("/api/task")
    async def task(request: Request) -> dict[str, Any]:
        acc = await user(request)
        t = await run_in_threadpool(lambda: tasks.next_task(store(), project, acc.name))
        return {"task": t}

    @app.post("/api/tasks/{task_id}/submit")
    async def submit(request: Request, task_id: str) -> dict[str, Any]:
        acc = await user(request)
        tid = _task_id(task_id)
        body = await _json_body(request)
        done = await run_in_threadpool(lambda: tasks.submit(store(), project, acc.name, tid, body))
        return done._asdict()  # {"ranking_id", "duplicate", "updated"}

    @app.post("/api/tasks/{task_id}/skip")
    async def skip(request: Request, task_id: str) -> dict[str, Any]:
        acc = await user(request)
        tid = _task_id(task_id)
        await run_in_threadpool(lambda: tasks.skip(store(), project, acc.name, tid))
        return {"skipped": tid}

    @app.get("/api/admin/stats")
    async def admin_stats(request: Request) -> dict[str, Any]:
        await user(request, admin=True)
        return await run_in_threadpool(lambda: stats.project_stats(store(), project))

    @app.post("/api/admin/adjudicate")
    async def adjudicate(request: Request) -> dict[str, Any]:
        acc = await user(request, admin=True)
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise Invalid("body", "must be a JSON object", 400)
        pid, cids = body.get("prompt_id"), body.get("candidate_ids")
        if not _is_id(pid):
            raise Invalid("prompt_id", "must be a prompt id (an integer)")
        if not isinstance(cids, list) or not all(_is_id(c) for c in cids):
            raise Invalid("candidate_ids", "must be a list of candidate ids")
        order = parse_order_only(body, len(cids))
        rid = await run_in_threadpool(lambda: stats.adjudicate(store(), project, acc.name, pid, cids, order))
        return {"ranking_id": rid}

    app.state.project = project
    return app
