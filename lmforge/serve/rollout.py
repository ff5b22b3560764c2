"""The rollout server (``lmforge rollout``): the OpenAI app plus the three routes an RL trainer needs.

- ``GET /rollout/info``: the served model, ``max_model_len``, the engine, how many weight updates it took;
- ``POST /rollout/generate``: ``{"requests": [...], "config": RequestConfig}`` -> ``{"responses": [...]}``:
  engine requests in (a chat ``{"messages", "tools"}``, or token ids ``{"prompt": [ids], "tools"}``; either may
  carry ``images`` and ``videos`` (and image or video content parts), data: URLs, or files on this machine with
  ``--allow_local_media``),
  :class:`~lmforge.infer.protocol.ChatCompletionResponse` out, with each choice's ``token_ids``;
- ``POST /rollout/update_weights``: a safetensors body of ``name -> tensor`` (transformers names, any
  subset) loaded with ``engine.update_weights`` between generations.

The OpenAI routes (``/v1/chat/completions``, ``/health``, ...) stay, so the policy being trained can
be chatted with or evaluated while it trains. Auth (``--api_key``) covers every route but
``/health``. A generate call is admitted like a chat request (one slot of ``--max_concurrency``, a
bounded queue, 429 beyond it, the same body limits and character bound, the same log line and
metrics), and weight updates run one at a time. A trainer reaches the server through
:class:`lmforge.rlhf.rollout.RolloutClient` (``--rollout_url``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from lmforge.infer.base import InferEngine
from lmforge.infer.errors import InferRequestError
from lmforge.infer.protocol import InferRequest, RequestConfig
from lmforge.serve.app import create_app
from lmforge.serve.body import read_body, read_json
from lmforge.serve.errors import APIError, from_validation_error
from lmforge.serve.schemas import MediaRefused, PromptRequest, check_media_url

logger = logging.getLogger("lmforge.serve")

DEFAULT_MAX_WEIGHTS_BYTES = 1024 ** 3
WEIGHTS_TIMEOUT = 600.0  # seconds a weight upload may take (at least; --body_timeout if larger)


def create_rollout_app(engine: InferEngine, args: Any = None) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` with the ``/rollout`` routes added (``args``: RolloutArguments)."""
    app = create_app(engine, args)
    state = app.state.lmforge
    max_json = state.cfg.max_request_bytes
    max_weights = getattr(args, "max_weights_request_bytes", None) or DEFAULT_MAX_WEIGHTS_BYTES
    counters = {"weight_updates": 0}
    state.endpoints.update({"/rollout/generate": ("rollout_generate", "req"),
                            "/rollout/update_weights": ("rollout_update_weights", "req"),
                            "/rollout/info": ("rollout_info", "req")})
    weights_lock = asyncio.Lock()  # one weight upload (up to --max_weights_request_bytes) in memory at a time

    async def check_auth(request: Request) -> None:
        state.auth.check(request.headers.get("authorization"))

    router = APIRouter(prefix="/rollout", dependencies=[Depends(check_auth)])

    @router.get("/info")
    async def info() -> dict[str, Any]:
        return {"model": state.base_name, "max_model_len": getattr(engine, "max_model_len", None),
                "engine": type(engine).__name__, "weight_updates": counters["weight_updates"]}

    @router.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        info = request.state.lmforge
        body = await read_json(request, max_json, state.cfg.body_timeout)
        info.model = state.base_name
        items = body.get("requests")
        if not isinstance(items, list) or not items:
            raise APIError(400, "'requests' must be a non-empty list of engine requests", param="requests")
        try:
            reqs = [PromptRequest.model_validate({k: v for k, v in r.items() if k != "messages" or v})
                    if isinstance(r, dict) and "prompt" in r else InferRequest.model_validate(r) for r in items]
            cfg = RequestConfig.model_validate(body.get("config") or {})
        except ValidationError as e:
            raise from_validation_error(e) from None
        for i, r in enumerate(reqs):
            _check_media(r, state.cfg.allow_local_media, f"requests[{i}]")
            if isinstance(r, PromptRequest):
                state.bound.check_prompt(r.prompt, f"requests[{i}].prompt")
            else:
                state.bound.check(_request_texts(r), f"requests[{i}].messages")
        slot = await state.acquire(request, info)
        try:
            results = await state.run_or_abort(asyncio.to_thread(engine.infer, reqs, cfg, use_tqdm=False))
        except InferRequestError as e:
            param = f"requests[{e.index}]" if e.index is not None else "requests"
            raise APIError(400, e.reason, param=param, code="invalid_request") from None
        finally:
            slot.release()
        for r in results:
            info.prompt_tokens += r.usage.prompt_tokens
            info.completion_tokens += r.usage.completion_tokens
        return JSONResponse({"responses": [r.model_dump(mode="json") for r in results]})

    @router.post("/update_weights")
    async def update_weights(request: Request) -> JSONResponse:
        from lmforge.rlhf.rollout import bytes_to_tensors

        async with weights_lock:
            try:
                timeout = state.cfg.body_timeout
                # a weight chunk is up to 256 MiB: give it minutes, not the seconds a chat body gets
                body = await read_body(request, max_weights, max(timeout, WEIGHTS_TIMEOUT) if timeout else None)
            except APIError as e:
                if e.status == 413:
                    e.message += " (--max_weights_request_bytes); send smaller chunks"
                raise
            try:
                tensors = bytes_to_tensors(body)
            except Exception as e:  # noqa: BLE001 - any parse failure is the client's
                raise APIError(400, f"the body is not safetensors: {e}", code="invalid_body") from None
            del body
            try:
                await asyncio.to_thread(engine.update_weights, list(tensors.items()))
            except (KeyError, ValueError) as e:
                raise APIError(400, str(e).strip("'\""), code="invalid_weights") from None
            counters["weight_updates"] += 1
        logger.info("rollout: %d tensors updated (update %d)", len(tensors), counters["weight_updates"])
        return JSONResponse({"updated": len(tensors), "weight_updates": counters["weight_updates"]})

    app.include_router(router)
    return app


def _request_texts(request: InferRequest) -> list:
    """The client text of an engine request (messages and tools), for the character bound."""
    out: list = []
    for m in request.messages:
        content = m.content
        out.append(content if isinstance(content, str) else str(content) if content is not None else None)
        out += [m.reasoning_content, m.name]
        out += [str(c.function) for c in m.tool_calls or []]
    out += [str(t) for t in request.tools or []]
    return out



def _check_media(request: InferRequest, allow_local: bool, param: str) -> None:
    """A generate request's images, videos (frames or files) and media content parts under the chat routes' media
    policy: the engine reads whatever a request names, so this is where local files are refused."""
    refs = [(f"{param}.images[{k}]", ref, "image") for k, ref in enumerate(request.images)]
    for k, video in enumerate(request.videos):
        refs += [(f"{param}.videos[{k}]", ref, "video") for ref in ([video] if isinstance(video, str) else video)]
    for i, m in enumerate(request.messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("image_url", "image", "video_url", "video"):
                continue
            value = part.get(kind)
            value = value.get("url") if isinstance(value, dict) else value
            refs += [(f"{param}.messages[{i}].content[{j}]", ref, "video" if kind.startswith("video") else "image")
                     for ref in (value if isinstance(value, list) else [value]) if isinstance(ref, str)]
    for where, ref, what in refs:
        try:
            check_media_url(ref, allow_local, where, what)
        except MediaRefused as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None
