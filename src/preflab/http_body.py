"""Request bodies of preflab's HTTP servers (``serve``, ``route``, the labeling app): one size limit
and one JSON parser, so every server refuses bad input the same way.

A body over the limit is refused from its ``Content-Length`` header, before a byte of it is read;
a body sent without one (chunked) is read only up to the limit. The parser takes UTF-8 JSON as
RFC 8259 defines it, without Python's extensions (``NaN``, ``Infinity``; ``1e400`` neither),
nested at most ``MAX_DEPTH`` deep, its strings Unicode text (no lone surrogate such as
``"\ud800"``, which tokenizers and databases refuse). Every refusal is a ``BodyError`` (413 or 400) for the server to answer in its
own error shape, never an exception of the parser (a ``RecursionError`` included).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

MAX_DEPTH = 64  # arrays and objects inside each other
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate gets into JSON text


class BodyError(ValueError):
    """A request body the server refuses: ``status`` (413 or 400), ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def too_large(limit: int) -> BodyError:
    return BodyError(413, "body_too_large", f"the request body is over {limit} bytes")


def check_length(headers: Mapping[str, str], limit: int) -> None:
    """Refuse a body whose declared ``Content-Length`` is over ``limit`` (or not a number)."""
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large(limit)


async def read_body(request, limit: int) -> bytes:
    """The body of a Starlette ``request``, at most ``limit`` bytes (``BodyError`` 413 beyond)."""
    check_length(request.headers, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_deep() -> BodyError:
    return BodyError(400, "invalid_json", f"the body's JSON nests deeper than {MAX_DEPTH} levels")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is out of a double's range")
    return x


def depth(obj: Any) -> int:
    """How deep arrays and objects nest in ``obj`` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        items = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if items is None:
            continue
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            break
        stack.extend((v, d + 1) for v in items if isinstance(v, dict | list))
    return deepest


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON: UTF-8, no NaN or Infinity, nested at most ``MAX_DEPTH`` deep (``BodyError`` 400)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(400, "invalid_json", f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise too_deep() from None
    except ValueError as e:
        raise BodyError(400, "invalid_json", f"the body is not valid JSON ({e})") from None
    if depth(obj) > MAX_DEPTH:
        raise too_deep()
    if SURROGATE_ESCAPE.search(text):
        try:  # a lone surrogate cannot be encoded; the parser joins a pair into one character
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BodyError(400, "invalid_json", "the body's JSON has a lone surrogate (\\ud800-\\udfff), "
                            "which is not Unicode text") from None
    return obj


async def read_json(request, limit: int) -> Any:
    """The body of ``request`` parsed by ``parse_json``, at most ``limit`` bytes."""
    return parse_json(await read_body(request, limit))
