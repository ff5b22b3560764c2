"""The routes of embedding, reranker and classifier models: ``/v1/embeddings``, ``/v1/rerank``, ``/v1/classify``.

- ``POST /v1/embeddings``: OpenAI's shape (``input`` a text, texts, token ids or lists of them;
  ``encoding_format`` ``float`` or ``base64``, the little-endian float32 bytes the official client
  asks for by default; ``dimensions`` keeps the first D dimensions, normalised again). lmforge adds
  ``input_type`` (``query`` / ``document``): the prompt the model was trained with goes first.
- ``POST /v1/rerank`` (also ``/rerank``, ``/v2/rerank``): the Cohere/Jina/vLLM shape, ``{"query",
  "documents": [text or {"text"}], "top_n", "return_documents"}`` -> ``results`` sorted by
  ``relevance_score`` (in [0, 1]); an embedding model reranks by cosine similarity.
- ``POST /v1/classify``: vLLM's shape, ``{"input": text or texts}`` -> per text ``label``, ``probs``.

Each request goes the way a chat request goes (:mod:`lmforge.serve.app`): the API key, the body
bounded in size and time, the schema (errors name the field), the model name, the character bound
of every input before anything is tokenized, then a slot of the admission queue (429 when full,
503 on timeout or shutdown) inside which the inputs are encoded and scored; one log line and one
set of metrics per request, under its own endpoint name. Concurrent requests are batched together
by the engine (:mod:`lmforge.infer.pooling`). A chat route on such a server answers 400 naming
the routes that work, and these routes on a chat server do the same.
"""
from __future__ import annotations

import asyncio
import base64
import time
from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator

from lmforge.infer.errors import InferRequestError
from lmforge.serve.body import read_json, validate
from lmforge.serve.errors import APIError
from lmforge.serve.schemas import _Strict

MAX_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request
MAX_DOCUMENTS = 1000
ROUTES = {"/v1/embeddings": ("embeddings", "embd"), "/v1/rerank": ("rerank", "rerank"),
          "/rerank": ("rerank", "rerank"), "/v2/rerank": ("rerank", "rerank"), "/v1/classify": ("classify", "classify")}
SERVES = {"embedding": "/v1/embeddings and /v1/rerank", "reranker": "/v1/rerank",
          "generative_reranker": "/v1/rerank", "seq_cls": "/v1/classify"}


def _inputs(v: Any, what: str, limit: int) -> Any:
    """A text, texts, token ids or lists of token ids, none of them empty."""
    def ids(x: Any) -> bool:
        return isinstance(x, list) and all(type(t) is int for t in x)

    if not (isinstance(v, str) or (isinstance(v, list) and v and (all(isinstance(x, str) for x in v) or ids(v)
                                                                  or all(ids(x) for x in v)))):
        raise ValueError(f"{what} must be a string, a non-empty list of strings, a list of token ids, or a list of "
                         f"lists of token ids (got {type(v).__name__})")
    items = [v] if isinstance(v, str) or ids(v) else v
    if len(items) > limit:
        raise ValueError(f"at most {limit} inputs per request, got {len(items)}")
    for i, x in enumerate(items):
        if not x or (isinstance(x, str) and not x.strip()):
            raise ValueError(f"input {i} is empty")
    return v


class EmbeddingRequest(_Strict):
    model: str = Field(min_length=1, max_length=512)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None
    input_type: Optional[Literal["query", "document"]] = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        return _inputs(v, "input", MAX_INPUTS)

    def items(self) -> list:
        v = self.input
        return [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else list(v)


class RerankDocument(_Strict):
    text: str


class RerankRequest(_Strict):
    model: str = Field(min_length=1, max_length=512)
    query: str = Field(min_length=1)
    documents: list[Union[str, RerankDocument]] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: Optional[int] = Field(None, ge=1)
    return_documents: bool = True

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ClassifyRequest(_Strict):
    model: str = Field(min_length=1, max_length=512)
    input: Union[str, list[str]]

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not all(isinstance(x, str) for x in v):
            raise ValueError("input must be a string or a list of strings")
        return _inputs(v, "input", MAX_INPUTS)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def _a(task: str) -> str:
    return f"an {task}" if task[0] in "aeiou" else f"a {task}"


def _engine_task(engine: Any) -> str:
    return getattr(engine, "task", None) or "causal_lm"


def generation_only(state: Any):
    """A dependency for the chat routes: on an embedding/reranker/classifier server they answer 400."""
    async def check() -> None:
        task = _engine_task(state.engine)
        if task != "causal_lm":
            raise APIError(400, f"This server serves {_a(task)} model, which does not generate text; use "
                                f"{SERVES.get(task, '/v1/embeddings')}", code="model_not_supported")

    return Depends(check)


def add_pooling_routes(app: FastAPI, state: Any, check_auth: Any) -> None:
    """Register the routes of the module docstring on ``app`` (its :class:`~lmforge.serve.app.ServeState`)."""
    cfg, engine = state.cfg, state.engine
    state.endpoints.update(ROUTES)

    def need(task_ok: tuple[str, ...], path: str) -> None:
        task = _engine_task(engine)
        if task not in task_ok:
            what = "generates text" if task == "causal_lm" else f"is {_a(task)} model"
            hint = "/v1/chat/completions" if task == "causal_lm" else SERVES[task]
            raise APIError(400, f"{path} needs a {' or '.join(task_ok)} model; this server's model {what} "
                                f"(use {hint})", code="model_not_supported")

    async def admitted(request: Request, info: Any, run: Any, param: str) -> Any:
        """Run ``run()`` in a worker thread inside an admission slot; a bad input is a 400 naming it."""
        slot = await state.acquire(request, info)
        try:
            return await state.run_or_abort(asyncio.to_thread(run))
        except InferRequestError as e:
            where = f"{param}[{e.index}]" if e.index is not None else param
            raise APIError(400, e.reason, param=where, code="invalid_input") from None
        finally:
            slot.release()

    async def begin(request: Request, schema: type, tasks: tuple[str, ...]) -> tuple[Any, Any]:
        """The request's log record and its validated body, once the model is known and can do this."""
        info = request.state.lmforge
        req = validate(schema, await read_json(request, cfg.max_request_bytes, cfg.body_timeout))
        state.resolve(req.model)
        info.model = req.model
        need(tasks, request.url.path)
        return info, req

    def check_texts(texts: list, param: str) -> None:
        for i, text in enumerate(texts):
            if isinstance(text, str):
                state.bound.check([text], f"{param}[{i}]")
            else:
                state.bound.check_prompt(text, f"{param}[{i}]")

    router = APIRouter(dependencies=[Depends(check_auth)])

    @router.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        info, req = await begin(request, EmbeddingRequest, ("embedding",))
        items = req.items()
        check_texts(items, "input")
        vectors, tokens = await admitted(
            request, info, lambda: engine.embed(items, input_type=req.input_type, dimensions=req.dimensions), "input")
        info.prompt_tokens = tokens
        data = []
        for i, v in enumerate(vectors):
            value = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") \
                if req.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse({"object": "list", "data": data, "model": req.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def rerank(request: Request) -> JSONResponse:
        info, req = await begin(request, RerankRequest, ("reranker", "generative_reranker", "embedding"))
        texts = req.texts()
        state.bound.check([req.query], "query")
        check_texts(texts, "documents")
        scores, tokens = await admitted(request, info, lambda: engine.rerank(req.query, texts), "documents")
        info.prompt_tokens = tokens
        order = sorted(range(len(texts)), key=lambda i: -scores[i])[:req.top_n or len(texts)]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": texts[i]}} if req.return_documents else {})} for i in order]
        return JSONResponse({"id": info.id, "model": req.model, "results": results,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        router.add_api_route(path, rerank, methods=["POST"])

    @router.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        info, req = await begin(request, ClassifyRequest, ("seq_cls",))
        texts = req.texts()
        check_texts(texts, "input")
        probs, tokens = await admitted(request, info, lambda: engine.classify(texts), "input")
        info.prompt_tokens = tokens
        names = engine.label_names
        data = []
        for i, p in enumerate(probs.tolist()):
            best = max(range(len(p)), key=p.__getitem__)
            data.append({"index": i, "label": names[best] if names else str(best), "probs": p, "num_classes": len(p)})
        return JSONResponse({"id": info.id, "object": "list", "created": int(time.time()), "model": req.model,
                             "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                     "completion_tokens": 0}})

    app.include_router(router)
