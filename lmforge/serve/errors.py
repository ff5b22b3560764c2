"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every failure the server reports goes through :class:`APIError`, so a client (the official
``openai`` package included) sees the status it expects and a message that names the field.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("lmforge.serve")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 501: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error to send to the client as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Pydantic puts union-member and validator tags ("str", "list[ContentPart]", "function-after[...]")
# into an error's location; they mean nothing to a client, so the path shown skips them.
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _FIELD.fullmatch(part) and part not in _TAGS:
            out += f".{part}" if out else part
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def from_validation_error(exc: ValidationError | RequestValidationError, max_listed: int = 3) -> APIError:
    """A 400 whose message lists the failing fields (``messages[0].role: ...``) and whose param is the first."""
    by_path: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if loc and loc[0] == "body":  # FastAPI's own body validation prefixes "body"
            loc = loc[1:]
        path = _path(loc) or "body"
        msg = err.get("msg", "invalid value")
        msg = msg.removeprefix("Value error, ")
        if msg not in by_path.setdefault(path, []):
            by_path[path].append(msg)
        if "input" in err and err.get("type") != "missing" and path not in got:
            got[path] = err["input"]
    # A union field reports every alternative: "content: should be a string" beside "content[0]: image
    # parts are not supported". The deeper error is the one about what was actually sent.
    deeper = [p for p in by_path if any(q != p and (q.startswith(p + "[") or q.startswith(p + ".")) for q in by_path)]
    for p in deeper:
        del by_path[p]
    parts = []
    for path, msgs in list(by_path.items())[:max_listed]:
        detail = " or ".join(msgs) if len(msgs) > 1 else msgs[0]
        hint = f" (got {_short(got[path])})" if path in got and not isinstance(got[path], (dict, list)) else ""
        parts.append(f"{path}: {detail}{hint}")
    more = len(by_path) - max_listed
    message = "Invalid request: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
    return APIError(400, message, param=next(iter(by_path), None), code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error (ours, FastAPI's, Starlette's, unexpected ones) to OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _note_error(request, exc)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation_error(exc)
        _note_error(request, err)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown path {request.url.path[:100]!r}; see GET /v1/models, POST /v1/chat/completions"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        err = APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                       headers=getattr(exc, "headers", None))
        _note_error(request, err)
        return err.response()

    # Unexpected exceptions are answered by RequestLogMiddleware (app.py), not by an Exception
    # handler here: Starlette re-raises after such a handler, and uvicorn then closes the
    # connection under a keep-alive client that may already be sending its next request.


def aborted() -> APIError:
    """A request the server's shutdown cut short."""
    return APIError(503, "The server shut down before this request finished", code="shutting_down")


def bad_input(e: Exception, param: str = "messages") -> APIError:
    """An engine's InferRequestError (a ValueError) as a 400; PromptTooLongError keeps its own code."""
    from lmforge.infer.errors import PromptTooLongError

    too_long = isinstance(e, PromptTooLongError)
    return APIError(400, str(e), param=param, code="context_length_exceeded" if too_long else "invalid_input")


def unexpected(exc: BaseException) -> APIError:
    return APIError(500, f"Internal server error ({type(exc).__name__}); see the server log")


def _note_error(request: Request, err: APIError) -> None:
    """Keep the message for the request log line."""
    info = getattr(request.state, "lmforge", None)
    if info is not None:
        info.error = err.message
