"""The OpenAI-compatible HTTP app over an :class:`~lmforge.infer.base.InferEngine`.

``create_app(engine, args)`` returns a FastAPI app with POST /v1/chat/completions, POST
/v1/completions, GET /v1/models[/{id}], GET /health and GET /metrics, and for embedding,
reranker and classifier models POST /v1/embeddings, /v1/rerank and /v1/classify (:mod:`lmforge.serve.pooling`). Each request passes, in
order: auth, body checks (size, read time, UTF-8, JSON), schema validation, model lookup, a
character bound on the prompt (:mod:`lmforge.serve.budget`: nothing is tokenised before
admission), the admission queue, and then, inside the admitted slot, the prompt's token count;
whatever fails answers in OpenAI's error shape and the server carries on. One log line and one set
of metrics is written per request by an ASGI middleware, so that errors raised anywhere (401, 404
on an unknown path, a client gone mid-upload or mid-stream) are counted too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from lmforge.infer.base import InferEngine
from lmforge.infer.errors import InferRequestError
from lmforge.infer.protocol import (
    InferRequest,
    RequestConfig,
    Usage,
)
from lmforge.serve.auth import BearerAuth, load_api_keys
from lmforge.serve.body import read_json, validate
from lmforge.serve.budget import (
    TRIM_AFTER_BYTES,
    PromptBound,
    chars_per_token,
    chat_texts,
    release_memory,
)
from lmforge.serve.errors import (
    APIError,
    aborted,
    bad_input,
    from_validation_error,
    install_error_handlers,
    unexpected,
)
from lmforge.serve.limiter import ConcurrencyLimiter, Slot
from lmforge.serve.metrics import CONTENT_TYPE, ServerMetrics, engine_lines
from lmforge.serve.pooling import add_pooling_routes, generation_only
from lmforge.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    VIDEO_PARTS,
    MediaRefused,
    PromptRequest,
    SamplingFields,
    check_media,
    check_videos_decode,
    media_parts,
)
from lmforge.serve.stream_replies import (
    chat_stream,
    completion_stream,
    count_usage,
    legacy_logprobs,
)
from lmforge.serve.streaming import EventStreamResponse, orjson
from lmforge.utils.gc_heap import frozen_heap

logger = logging.getLogger("lmforge.serve")

_ENDPOINTS = {"/v1/chat/completions": ("chat", "chatcmpl"), "/v1/completions": ("completions", "cmpl"),
              "/v1/models": ("models", "req"), "/health": ("health", "req"), "/metrics": ("metrics", "req")}
_QUIET = ("health", "metrics")  # scraped often: logged at DEBUG, not counted
_INLINE_COUNT_IDS = 4096  # token-id prompts up to this long are counted on the event loop (<= 0.3 ms, slow CPU)
# Prompts tokenised at once (inside admitted slots): each may be up to max_model_len x chars_per_token
# characters, so this bounds the tokenizer's memory when --max_concurrency is large (native engine).
TOKENIZE_WORKERS = 4


@dataclass
class ServeConfig:
    """What the app needs from :class:`~lmforge.arguments.DeployArguments` (any object with these names works)."""

    served_model_name: Optional[str] = None
    api_key: Optional[str] = None
    api_key_file: Optional[str] = None
    max_concurrency: Optional[int] = None  # None: the engine's max_num_seqs (native), else 8
    max_queue: int = 64
    queue_timeout: Optional[float] = 600.0
    max_request_bytes: int = 16 * 1024 * 1024
    body_timeout: Optional[float] = 30.0
    metrics_public: bool = False
    max_new_tokens: Optional[int] = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    allow_local_media: bool = False  # requests may name image and video files on this machine

    @classmethod
    def from_args(cls, args: Any) -> "ServeConfig":
        if args is None:
            return cls()
        if isinstance(args, cls):
            return args
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


@dataclass
class RequestInfo:
    """What the request log line and metrics need; handlers fill it in as they learn it."""

    id: str
    method: str
    path: str
    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    model: str = ""
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: Optional[float] = None
    queue_wait: Optional[float] = None
    status: Optional[int] = None  # overrides the HTTP status: 499 (client gone) or 500 (failed mid-stream)
    error: Optional[str] = None
    body_bytes: int = 0


class ServeState:
    """Everything the handlers share: the engine, served names, limits, defaults, auth and metrics."""

    def __init__(self, engine: InferEngine, cfg: ServeConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.base_name = cfg.served_model_name or _default_name(getattr(engine, "model_name", None))
        self.adapters: dict[str, str] = dict(getattr(engine, "adapters", None) or {})
        if self.base_name in self.adapters:
            raise ValueError(f"adapter name {self.base_name!r} is also the served model name; rename one")
        self.created = int(time.time())
        self.limiter = ConcurrencyLimiter(cfg.max_concurrency, cfg.max_queue, cfg.queue_timeout)
        self.auth = BearerAuth(load_api_keys(cfg.api_key, cfg.api_key_file))
        self.metrics = ServerMetrics(lambda: self.limiter.running, lambda: self.limiter.waiting,
                                     cfg.max_concurrency, cfg.max_queue)
        self.bound = PromptBound(getattr(engine, "max_model_len", None), chars_per_token(engine))
        self.endpoints = dict(_ENDPOINTS)  # path -> (metrics name, request-id prefix); the rollout app adds its own
        self.executor: Optional[ThreadPoolExecutor] = None
        self.tokenize_pool: Optional[ThreadPoolExecutor] = None
        self._trimming = self._trim_wanted = False
        self.aborting: Optional[asyncio.Event] = None  # set at shutdown once running requests had their time

    def give_back_memory(self) -> None:
        """After a large body: collect what reference cycles hold (an exception keeps its frames and a
        validation error its input), then trim the heap; one at a time, in a worker thread."""
        self._trim_wanted = True
        if self._trimming:
            return  # the running trim goes round once more
        self._trimming = True

        def run() -> None:
            import gc

            try:
                while self._trim_wanted:
                    self._trim_wanted = False
                    gc.collect()
                    release_memory()
            finally:
                self._trimming = False

        asyncio.get_running_loop().run_in_executor(None, run)

    async def shutdown(self, timeout: float) -> None:
        """Stop admitting (queued requests get 503), give running ones ``timeout`` s, then end them with 503."""
        self.limiter.drain()
        deadline = time.monotonic() + max(timeout, 0.0)
        while self.limiter.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.limiter.running and self.aborting is not None:
            logger.warning("ending %d request(s) still running after the %.3g s shutdown grace period",
                           self.limiter.running, timeout)
            self.aborting.set()

    async def run_or_abort(self, awaitable: Any) -> Any:
        """Await a non-streaming generation, unless shutdown ends it first (then 503)."""
        task = asyncio.ensure_future(awaitable)
        if self.aborting is None:
            return await task
        abort = asyncio.ensure_future(self.aborting.wait())
        try:
            await asyncio.wait({task, abort}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
            if not task.done():
                task.cancel()  # an engine thread cannot be interrupted: it finishes and its result is dropped
        if task.cancelled():
            raise aborted()
        return task.result()

    # ---- models -------------------------------------------------------------------------------
    def served_models(self) -> dict[str, Optional[str]]:
        """Served name -> adapter name ("": the base model, even when the engine has a default adapter)."""
        return {self.base_name: "", **{name: name for name in self.adapters}}

    def resolve(self, model: str) -> Optional[str]:
        served = self.served_models()
        if model not in served:
            raise APIError(404, f"The model {model!r} does not exist on this server; served models: "
                                f"{', '.join(served)}", param="model", code="model_not_found")
        return served[model]

    def model_card(self, name: str) -> dict[str, Any]:
        adapter = self.served_models()[name]
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "root": name if not adapter else self.adapters[adapter],
                "parent": None if not adapter else self.base_name}
        max_len = getattr(self.engine, "max_model_len", None)
        if max_len:
            card["max_model_len"] = max_len
        return card

    # ---- limits and sampling ------------------------------------------------------------------
    async def count_prompt(self, http: Request, info: RequestInfo, request: InferRequest,
                           param: str = "messages") -> Optional[int]:
        """Prompt tokens, or None when the engine cannot count; input the engine rejects becomes a 400.

        Runs in the small tokenizer pool, inside an admitted slot; a client that leaves meanwhile
        stops the wait (499), and a count not started yet is dropped from the pool's queue. A token-id prompt
        of up to ``_INLINE_COUNT_IDS`` ids on an engine that counts in this process is counted here, on the
        event loop: a range check of the ids, where the pool's thread would cost two handovers of the
        interpreter lock and two tasks per request.
        """
        loop = asyncio.get_running_loop()
        try:
            ids = getattr(request, "prompt", None)
            if isinstance(ids, list) and len(ids) <= _INLINE_COUNT_IDS and getattr(self.engine, "counts_locally",
                                                                                   False):
                return self.engine.count_prompt_tokens(request)
            job = loop.run_in_executor(self.tokenize_pool, self.engine.count_prompt_tokens, request)
            return await self.until_disconnect(http, info, job, "client disconnected while its prompt was counted")
        except NotImplementedError:
            return None
        except ValueError as e:  # InferRequestError and the template's own errors
            raise bad_input(e, param) from None
        except Exception as e:  # noqa: BLE001 - a chat template's raise_exception is the client's mistake
            if type(e).__module__.startswith("jinja2"):
                raise APIError(400, f"The model's chat template rejected the messages: {e}", param=param,
                               code="invalid_messages") from None
            raise

    def video_refusal(self) -> Optional[str]:
        """Why the served model takes no videos (None: it takes them, or the engine has no template to ask and
        decides per request)."""
        template = getattr(self.engine, "template", None)
        if template is None:
            return None
        vision = getattr(template, "vision", None)
        return "it is a text-only model" if vision is None else vision.no_video

    async def check_videos(self, http: Request, info: RequestInfo, messages: list) -> None:
        """Decode-check the video parts in the tokenizer pool: a bad one is a 400 naming its part."""
        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(self.tokenize_pool, check_videos_decode, messages)
            await self.until_disconnect(http, info, job, "client disconnected while its videos were read")
        except MediaRefused as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None

    def request_config(self, req: SamplingFields, prompt_tokens: Optional[int], new_tokens: Optional[int], *,
                       param_prompt: str, logprobs: bool = False, top_logprobs: Optional[int] = None
                       ) -> RequestConfig:
        """Sampling settings: the request's, else the server's defaults; max_tokens checked against the context."""
        limit = getattr(self.engine, "max_model_len", None)
        what = "the prompt" if param_prompt == "prompt" else f"the prompt ({param_prompt})"
        if limit and prompt_tokens is not None:
            if prompt_tokens >= limit:
                raise APIError(400, f"This model's maximum context length is {limit} tokens, but {what} is "
                                    f"{prompt_tokens} tokens, leaving no room for a reply; shorten it",
                               param=param_prompt, code="context_length_exceeded")
            room = limit - prompt_tokens
            if new_tokens is not None and new_tokens > room:
                raise APIError(400, f"max_tokens is {new_tokens}, but {what} is {prompt_tokens} tokens and the "
                                    f"context length is {limit}: at most {room} new tokens fit",
                               param="max_tokens", code="context_length_exceeded")
            if new_tokens is None:
                new_tokens = min(self.cfg.max_new_tokens or room, room)
        elif new_tokens is None:
            new_tokens = self.cfg.max_new_tokens
        c = self.cfg
        top_k = req.top_k if req.top_k is not None else c.top_k
        return RequestConfig(
            max_tokens=new_tokens,
            temperature=req.temperature if req.temperature is not None else c.temperature,
            top_p=req.top_p if req.top_p is not None else c.top_p,
            top_k=-1 if top_k == 0 else top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None
            else c.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            stop=req.stop if req.stop is not None else list(c.stop), seed=req.seed, n=req.n, logprobs=logprobs,
            top_logprobs=top_logprobs, stream=req.stream, ignore_eos=req.ignore_eos)

    async def until_disconnect(self, http: Request, info: RequestInfo, awaitable: Any, why: str) -> Any:
        """``awaitable``'s result, or a 499 as soon as the client has gone."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(_wait_disconnect(http))
        finished = False
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            finished = task.done()
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()  # a count already running in a thread finishes there; its result is dropped
        if not finished:
            info.status, info.error = 499, why
            raise APIError(499, why)
        return task.result()

    async def acquire(self, request: Request, info: RequestInfo) -> Slot:
        """Wait for a slot, giving up if the client goes away while queued."""
        if self.limiter.try_acquire():
            info.queue_wait = 0.0
            self.metrics.queue_wait.observe(0.0)
            return Slot(self.limiter)
        acquire = asyncio.ensure_future(self.limiter.acquire())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({acquire, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not acquire.done():
                acquire.cancel()  # the limiter passes a slot granted meanwhile to the next waiter
            gone.cancel()
            await asyncio.wait({acquire, gone})
        client_gone = not gone.cancelled() and gone.exception() is None
        if acquire.cancelled() or client_gone:
            if not acquire.cancelled() and acquire.exception() is None:
                self.limiter.release()
            info.status, info.error = 499, "client disconnected while queued"
            raise APIError(499, info.error)
        if isinstance(acquire.exception(), APIError):
            self.metrics.rejected.inc(reason=acquire.exception().code or "rejected")
        info.queue_wait = acquire.result()
        self.metrics.queue_wait.observe(info.queue_wait)
        return Slot(self.limiter)

    def stream_response(self, body: AsyncIterator[str], slot: Slot, info: RequestInfo) -> "EventStreamResponse":
        def on_close() -> None:
            if slot.held:  # the body never ran: the client left before the first byte
                info.status = info.status or 499
                info.error = info.error or "client disconnected before the stream started"
            slot.release()

        return EventStreamResponse(body, on_close=on_close)

    # ---- one log line per request -------------------------------------------------------------
    def finish(self, info: RequestInfo, http_status: int) -> None:
        status = info.status or http_status
        latency = time.perf_counter() - info.start
        if info.endpoint in _QUIET:
            logger.debug("%s %s %s status=%d latency=%.3fs", info.id, info.method, info.path, status, latency)
            return
        generated = info.queue_wait is not None  # token counters only count what reached the engine
        self.metrics.record(endpoint=info.endpoint, model=info.model, status=status, latency=latency,
                            stream=info.stream, prompt_tokens=info.prompt_tokens if generated else 0,
                            completion_tokens=info.completion_tokens if generated else 0, ttft=info.ttft)
        line = (f"id={info.id} {info.method} {info.path} model={info.model or '-'} status={status} "
                f"stream={str(info.stream).lower()} prompt_tokens={info.prompt_tokens} "
                f"completion_tokens={info.completion_tokens} latency={latency:.3f}s")
        if info.ttft is not None:
            line += f" ttft={info.ttft:.3f}s"
        if info.queue_wait:
            line += f" queued={info.queue_wait:.3f}s"
        if info.error:
            line += f" error={json.dumps(info.error[:300], ensure_ascii=False)}"
        logger.log(logging.WARNING if status >= 500 else logging.INFO, line)


def _default_name(model_name: Optional[str]) -> str:
    if not model_name:
        return "model"
    name = str(model_name).rstrip("/\\")
    return name if name.startswith("builtin:") else name.replace("\\", "/").split("/")[-1] or name


async def _wait_disconnect(request: Request) -> None:
    """Returns once the client has gone (the body has been read, so only a disconnect can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


_UPLOAD_GONE = "client disconnected while sending the request body"


class RequestLogMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which buffers streams): times each request, adds X-Request-Id,
    and writes its log line and metrics when the last byte has gone (or the client has)."""

    def __init__(self, app: Any, state: ServeState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint, prefix = self.state.endpoints.get(path, ("models", "req") if path.startswith("/v1/models/")
                                                    else ("other", "req"))
        # The path is the client's text (a model id in /v1/models/ID, any unknown path): shortened, and
        # escaped so that a "%0A" in it cannot forge log lines.
        info = RequestInfo(id=f"{prefix}-{uuid.uuid4().hex[:24]}", method=scope.get("method", "")[:10],
                           path=repr(path[:200])[1:-1], endpoint=endpoint)
        scope.setdefault("state", {})["lmforge"] = info
        status = 500
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", info.id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            info.status = info.status or 499
            raise
        except ClientDisconnect:  # hung up while sending its body: the client's doing, one log line
            info.status, info.error = 499, _UPLOAD_GONE
        except Exception as exc:  # noqa: BLE001 - answered here so the connection stays usable
            logger.exception("unexpected error in %s %s", info.method, info.path)
            err = unexpected(exc)
            info.status, info.error = 500, err.message
            if not started:
                await err.response()(scope, receive, send_with_id)
        finally:
            self.state.finish(info, status)
            if info.body_bytes >= TRIM_AFTER_BYTES:
                self.state.give_back_memory()


# ---- the app -------------------------------------------------------------------------------------

def create_app(engine: InferEngine, args: Any = None) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``; ``args`` is a DeployArguments (or ServeConfig)."""
    cfg = ServeConfig.from_args(args)
    if cfg.max_concurrency is None:  # a continuously batching engine serves as many as it batches
        cfg.max_concurrency = getattr(engine, "max_num_seqs", None) or 8
    state = ServeState(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The engine's async twins run generation in the loop's default executor; asyncio sizes that
        # for CPU-bound work (cores + 4), which would silently cap concurrency below --max_concurrency.
        state.executor = ThreadPoolExecutor(max_workers=max(32, 4 * cfg.max_concurrency),
                                            thread_name_prefix="lmforge-serve")
        asyncio.get_running_loop().set_default_executor(state.executor)
        state.tokenize_pool = ThreadPoolExecutor(max_workers=min(cfg.max_concurrency, TOKENIZE_WORKERS),
                                                 thread_name_prefix="lmforge-tokenize")
        state.aborting = asyncio.Event()
        logger.info("serving %s on /v1 (adapters: %s; max_concurrency %d, max_queue %d, auth %s; event loop %s, "
                    "JSON %s)", state.base_name, ", ".join(state.adapters) or "none", cfg.max_concurrency,
                    cfg.max_queue, "on" if state.auth.enabled else "off",
                    type(asyncio.get_running_loop()).__module__.split(".")[0], "orjson" if orjson else "json")
        with frozen_heap():  # the engine and the app are built: no full collection over them mid-request
            yield
        state.limiter.drain()
        state.aborting.set()
        state.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmforge", summary="OpenAI-compatible server", lifespan=lifespan)
    app.state.lmforge = state
    install_error_handlers(app)
    app.add_middleware(RequestLogMiddleware, state=state)

    async def check_auth(request: Request) -> None:
        state.auth.check(request.headers.get("authorization"))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_auth)])

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [state.model_card(name) for name in state.served_models()]}

    @v1.get("/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        state.resolve(model)
        return state.model_card(model)

    generates = generation_only(state)  # an embedding/reranker/classifier server answers chat routes with 400

    @v1.post("/chat/completions", dependencies=[generates])
    async def chat_completions(request: Request) -> Response:
        info: RequestInfo = request.state.lmforge
        req: ChatCompletionRequest = validate(ChatCompletionRequest, await read_json(request, cfg.max_request_bytes,
                                                                                    cfg.body_timeout))
        adapter = state.resolve(req.model)
        info.model, info.stream = req.model, req.stream
        state.bound.check(chat_texts(req.messages, req.tools), "messages")
        videos = [where for where, part in media_parts(req.messages) if part.type in VIDEO_PARTS]
        refusal = state.video_refusal() if videos else None
        if refusal:
            raise APIError(400, f"The model {req.model!r} takes no videos: {refusal}", param=videos[0],
                           code="invalid_video")
        try:
            check_media(req.messages, cfg.allow_local_media)
        except MediaRefused as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        try:
            infer_req = InferRequest(messages=[m.to_engine() for m in req.messages], tools=req.engine_tools(),
                                     adapter=adapter)
        except ValidationError as e:
            raise from_validation_error(e) from None
        slot = await state.acquire(request, info)
        try:
            if videos:
                await state.check_videos(request, info, req.messages)
            prompt_tokens = await state.count_prompt(request, info, infer_req)
            rc = state.request_config(req, prompt_tokens, req.new_tokens(), param_prompt="messages",
                                      logprobs=req.logprobs, top_logprobs=req.top_logprobs)
        except BaseException:
            slot.release()
            raise
        info.prompt_tokens = prompt_tokens or 0
        if req.stream:
            return state.stream_response(chat_stream(state, info, slot, req, infer_req, rc, prompt_tokens), slot, info)
        try:
            resp = await state.run_or_abort(engine.infer_async(infer_req, rc))
        except InferRequestError as e:
            raise bad_input(e) from None
        finally:
            slot.release()
        count_usage(info, resp.usage)
        body = resp.model_dump(mode="json", exclude={"choices": {"__all__": {"token_ids"}}})
        body.update(id=info.id, model=req.model)
        return JSONResponse(body)

    @v1.post("/completions", dependencies=[generates])
    async def completions(request: Request) -> Response:
        info: RequestInfo = request.state.lmforge
        req: CompletionRequest = validate(CompletionRequest, await read_json(request, cfg.max_request_bytes,
                                                                              cfg.body_timeout))
        adapter = state.resolve(req.model)
        if not getattr(engine, "supports_raw_prompt", True):
            raise APIError(501, f"The {type(engine).__name__} engine cannot continue raw text; use "
                                "/v1/chat/completions", code="not_implemented")
        info.model, info.stream = req.model, req.stream
        prompts = req.prompts()
        if req.echo and any(not isinstance(p, str) for p in prompts):
            raise APIError(400, "echo needs a text prompt (not token ids)", param="echo", code="invalid_value")
        for p in prompts:
            state.bound.check_prompt(p)
        infer_reqs = [PromptRequest(prompt=p, adapter=adapter) for p in prompts]
        slot = await state.acquire(request, info)
        try:
            counts = [await state.count_prompt(request, info, r, "prompt") for r in infer_reqs]
            known = [c for c in counts if c is not None]
            rc = state.request_config(req, max(known) if known else None, req.max_tokens, param_prompt="prompt",
                                      logprobs=req.logprobs is not None, top_logprobs=req.logprobs)
        except BaseException:
            slot.release()
            raise
        info.prompt_tokens = sum(c or 0 for c in counts)
        if req.stream:
            return state.stream_response(completion_stream(state, info, slot, req, infer_reqs, rc, counts), slot,
                                         info)
        try:
            results = await state.run_or_abort(asyncio.to_thread(engine.infer, infer_reqs, rc, use_tqdm=False))
        except InferRequestError as e:
            raise bad_input(e, "prompt") from None
        finally:
            slot.release()
        choices = []
        usage = Usage()
        for p_i, (prompt, resp) in enumerate(zip(prompts, results)):
            usage.prompt_tokens += resp.usage.prompt_tokens
            usage.completion_tokens += resp.usage.completion_tokens
            for c in resp.choices:
                text = (prompt if req.echo else "") + (c.message.content or "")
                choices.append({"index": p_i * req.n + c.index, "text": text, "finish_reason": c.finish_reason,
                                "logprobs": legacy_logprobs(c.logprobs)})
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        count_usage(info, usage)
        return JSONResponse({"id": info.id, "object": "text_completion", "created": int(time.time()),
                             "model": req.model, "choices": choices, "usage": usage.model_dump()})

    app.include_router(v1)
    add_pooling_routes(app, state, check_auth)  # /v1/embeddings, /v1/rerank, /v1/classify

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Open to load balancers; the counts only for a caller with a key (when keys are set)."""
        if state.limiter.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        try:
            state.auth.check(request.headers.get("authorization"))
        except APIError:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "running": state.limiter.running, "waiting": state.limiter.waiting})

    @app.get("/metrics", dependencies=[] if cfg.metrics_public else [Depends(check_auth)])
    async def metrics() -> Response:
        # an engine in another process answers over its pipe: off the event loop
        stats = await asyncio.to_thread(lambda: getattr(state.engine, "stats", None))
        text = state.metrics.render() + "".join(line + "\n" for line in engine_lines(stats))
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    return app
