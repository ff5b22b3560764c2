"""Reading a request body: bounded in size and in time, then UTF-8 and JSON checked.

Starlette reads a body for as long as the client takes to send it, so a client that sends half a
body and waits would hold its connection (and its buffered bytes) forever; here the whole body
must arrive within ``timeout`` seconds (408 beyond) and hold at most ``limit`` bytes (413 beyond,
checked against Content-Length first and again while reading). A client that hangs up while
sending raises :class:`~starlette.requests.ClientDisconnect`, which the request log counts as 499.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Optional

from fastapi import Request
from pydantic import ValidationError

from lmforge.serve.errors import APIError, from_validation_error

# json.loads turns only "\uD800".."\uDFFF" escapes into lone surrogates; the text walk below runs only
# when the raw body holds one, so a large body is not copied once more to look for them.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _check_text(obj: Any, path: str = "body") -> None:
    """Strings must be encodable: JSON escapes can smuggle in lone surrogates (``"\\ud800"``)."""
    stack = [(obj, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{where}: the string holds an unpaired surrogate escape, which is not text",
                               param=where, code="invalid_text") from None
        elif isinstance(value, dict):
            stack.extend((v, f"{k}" if where == "body" else f"{where}.{k}") for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))


async def read_body(request: Request, limit: int, timeout: Optional[float] = None) -> bytes:
    """The raw body: at most ``limit`` bytes (413), all of it within ``timeout`` seconds (408)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is {int(declared)} bytes; the limit is {limit} (--max_request_bytes)",
                       code="request_too_large")
    body = bytearray()
    info = getattr(request.state, "lmforge", None)  # the request log's record: it notes the bytes read
    chunks = request.stream().__aiter__()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout and timeout > 0 else None
    while True:
        try:
            if deadline is None:
                chunk = await chunks.__anext__()
            else:
                chunk = await asyncio.wait_for(chunks.__anext__(), max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive within {timeout:g} s (--body_timeout); "
                                f"{len(body)} bytes were received", code="request_timeout") from None
        body += chunk
        if info is not None:
            info.body_bytes = len(body)
        if len(body) > limit:
            raise APIError(413, f"Request body is over {limit} bytes (--max_request_bytes)", code="request_too_large")
    return bytes(body)


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    if not body.strip():
        raise APIError(400, "Empty request body; send a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"Request body is not valid UTF-8 (bad byte 0x{body[e.start]:02x} at offset {e.start})",
                       code="invalid_encoding") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"Malformed JSON in the request body: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    except (ValueError, RecursionError) as e:  # NaN/Infinity, a 5000-digit number, nesting too deep
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise APIError(400, f"Malformed JSON in the request body: {reason}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"The request body must be a JSON object, got a JSON {type(obj).__name__}",
                       code="invalid_json")
    if _SURROGATE_ESCAPE.search(text):
        _check_text(obj)
    return obj


async def read_json(request: Request, limit: int, timeout: Optional[float] = None) -> dict[str, Any]:
    """The body as a JSON object, or a 400/408/413 that says what is wrong with it."""
    return parse_json(await read_body(request, limit, timeout))


def validate(model: type, body: dict[str, Any]):
    """``model`` validated from ``body``; a failure is a 400 naming the fields."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None
    except RecursionError:
        raise APIError(400, "Invalid request: nested too deeply", code="invalid_value") from None
