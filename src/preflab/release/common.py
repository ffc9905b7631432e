"""What the release commands share: OpenAI-style errors and request bodies, the loopback rule, hashes of
models."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationError

from preflab.errors import PreflabError
from preflab.http_body import BodyError, read_json

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_public: bool) -> None:
    """Servers bind 127.0.0.1 unless told otherwise: a non-loopback address needs ``--allow-public``."""
    if not is_loopback(host) and not allow_public:
        raise PreflabError(f"--host {host} is not a loopback address; pass --allow-public to expose the server "
                           "(and set a token)")


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, **kw: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, **kw), status_code=status)


async def body_error_response(_request, e: BodyError):
    """The exception handler that answers a refused body (``http_body.BodyError``) as an OpenAI error."""
    return error_response(e.status, e.message, code=e.code)


async def json_object(request, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object of at most ``limit`` bytes; ``BodyError`` otherwise."""
    body = await read_json(request, limit)
    if not isinstance(body, dict):
        raise BodyError(400, "invalid_json", "the body must be a JSON object")
    return body


def content_text(content: Any) -> str:
    """A chat message's content as text: a string, or OpenAI's list of content parts, whose text parts
    (``{"type": "text", "text": ...}``) are joined by newlines as vLLM joins them. ``ValueError`` for
    anything else (an image part, a number)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')


TextContent = Annotated[str, BeforeValidator(content_text)]  # a message's content field, as text


def chat_request(body: Any, schema: type, served: str, server: str) -> tuple[Any, Any]:
    """``(request, None)`` for a chat body that ``schema`` validates and that names the ``served``
    model, else ``(None, the error response)``: 400 ``invalid_value`` naming the field, or 404
    ``model_not_found`` (``server`` says who answers, e.g. "this server" or "the router")."""
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        msg, param = validation_message(e)
        return None, error_response(400, msg, param=param, code="invalid_value")
    if req.model != served:
        return None, error_response(404, f"the model {req.model!r} does not exist here; {server} serves {served!r}",
                                    param="model", code="model_not_found")
    return req, None


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """The first error of a request's validation, in words, and the field it names (OpenAI's ``param``)."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    return f"{loc}: {e['msg']}" if loc else e["msg"], loc or None


def bearer_ok(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time); no token set: always."""
    import hmac

    if token is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_hash(spec: str) -> str:
    """sha256 over a model directory's files (names and contents), resolving ``tiny:``/``bundled:``
    specs to their directory; a hub id without a local copy hashes its name."""
    from preflab import models

    path = Path(models.resolve(spec))
    if not path.is_dir():
        return hashlib.sha256(f"name:{spec}".encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling, fsync and rename: readers see the old
    file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


RUN_MODEL_ORDER = ("ppo_ptx", "ppo", "dpo", "rs", "sft")  # a run directory without its pipeline config


def pipeline_model(run: Path) -> Path:
    """The model a pipeline run (``RUN/pipeline_config.json``) trained for release: its rounds'
    trainer (``round.method``, else the first of ``rl``, else of ``preference``; the rule of
    ``config.round_method``) after its last round, or SFT for a run that trains no policy. A
    PreflabError when that model is not there yet: never another model in its place."""
    from preflab.config import PipelineConfig, renamed_sections, round_dir, round_method

    data, _ = renamed_sections(json.loads((run / "pipeline_config.json").read_text(encoding="utf-8")))
    cfg = PipelineConfig.model_validate(data)
    method = round_method(cfg) if (*cfg.rl, *cfg.preference) else "sft"
    model = (run if method == "sft" else round_dir(run, cfg.rounds)) / method / "model"
    if not (model / "config.json").is_file():
        raise PreflabError(f"{run}: the run's trained model {model.relative_to(run)} is not there yet "
                           f"(finish the run: preflab pipeline --out {run}), or pass a model directory")
    return model


def resolve_model(path: str) -> str:
    """A model spec from a model directory, a stage's run directory (``RUN/model``), a pipeline run
    (its trained policy: ``pipeline_model``; a run directory without its config: the first of
    ppo_ptx, ppo, dpo, rs, sft there) or a spec (``tiny:7``, ``bundled:...``)."""
    p = Path(path)
    if not p.is_dir() or (p / "config.json").is_file():
        return path
    if (p / "model" / "config.json").is_file():
        return str(p / "model")
    if (p / "pipeline_config.json").is_file():
        return str(pipeline_model(p))
    for stage in RUN_MODEL_ORDER:
        if (p / stage / "model" / "config.json").is_file():
            return str(p / stage / "model")
    raise PreflabError(f"{path}: neither a model directory (config.json) nor a run directory with a model "
                       f"(model/ or one of {', '.join(f'{s}/model' for s in RUN_MODEL_ORDER)})")
