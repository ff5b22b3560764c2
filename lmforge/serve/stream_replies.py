"""The bodies of streamed generation replies (chat and text completions) as server-sent events.

The engine's chat chunks are rewritten to one id and the requested model name (chat), or to the
completions API's choices and legacy logprobs (text); a last chunk carries the usage totals when the
client asked for them, then ``[DONE]``. The stream holds the request's admission slot and frees it however
it ends (client gone, server shutting down, an engine error reported as an error event).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from lmforge.infer.errors import InferRequestError
from lmforge.infer.protocol import (
    ChatCompletionStreamResponse,
    ChoiceLogprobs,
    InferRequest,
    RequestConfig,
    Usage,
)
from lmforge.serve.errors import APIError, aborted, bad_input
from lmforge.serve.limiter import Slot
from lmforge.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    PromptRequest,
)
from lmforge.serve.streaming import StreamAborted, merge_streams, sse

if TYPE_CHECKING:
    from lmforge.serve.app import RequestInfo, ServeState

logger = logging.getLogger("lmforge.serve")


def count_usage(info: RequestInfo, usage: Optional[Usage]) -> None:
    if usage is not None:
        info.prompt_tokens, info.completion_tokens = usage.prompt_tokens, usage.completion_tokens


def legacy_logprobs(lp: Optional[ChoiceLogprobs], offset: int = 0) -> Optional[dict[str, Any]]:
    """Chat-style logprobs -> the completions API's parallel lists."""
    if lp is None:
        return None
    tokens, offsets, pos = [], [], offset
    for t in lp.content:
        tokens.append(t.token)
        offsets.append(pos)
        pos += len(t.token)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in lp.content],
            "top_logprobs": [{x.token: x.logprob for x in t.top_logprobs} for t in lp.content],
            "text_offset": offsets}


def chat_stream(state: ServeState, info: RequestInfo, slot: Slot, req: ChatCompletionRequest,
                 infer_req: InferRequest, rc: RequestConfig, prompt_tokens: Optional[int]) -> AsyncIterator[str]:
    """Chat chunks rewritten to one id and the requested model name; the role is sent once per choice."""
    usage = Usage(prompt_tokens=prompt_tokens or 0)
    started: set[int] = set()
    created = int(time.time())

    def to_sse(_: int, chunk: ChatCompletionStreamResponse) -> Optional[str]:
        if chunk.usage is not None:
            usage.prompt_tokens, usage.completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
        if not chunk.choices:
            return None
        choices = []
        for c in chunk.choices:  # built by hand: model_dump was the costliest step per chunk
            d = c.delta
            role = None if c.index in started else "assistant"
            started.add(c.index)
            for k, call in enumerate(d.tool_calls or []):
                call.setdefault("index", k)  # streamed tool calls carry their position (OpenAI's shape)
            if info.ttft is None and (d.content or d.tool_calls):
                info.ttft = time.perf_counter() - info.start
            choices.append({"index": c.index, "delta": {"role": role, "content": d.content, "tool_calls": d.tool_calls},
                            "finish_reason": c.finish_reason,
                            "logprobs": None if c.logprobs is None else c.logprobs.model_dump(mode="json")})
        data = {"id": info.id, "object": chunk.object, "created": created, "model": req.model, "choices": choices}
        if req.include_usage:
            data["usage"] = None  # OpenAI's shape: null on every chunk, the totals on a last one
        return sse(data)

    def usage_chunk() -> Optional[str]:
        return _usage_sse(req, info, "chat.completion.chunk", created, usage)

    streams = [state.engine.infer_stream_async(infer_req, rc)]
    return _run_stream(state, info, slot, streams, to_sse, usage_chunk, usage)


def completion_stream(state: ServeState, info: RequestInfo, slot: Slot, req: CompletionRequest,
                       infer_reqs: list[PromptRequest], rc: RequestConfig, counts: list[Optional[int]]
                       ) -> AsyncIterator[str]:
    """Text-completion chunks; with several prompts, choice ``k`` of prompt ``p`` is index ``p * n + k``."""
    usage = Usage(prompt_tokens=sum(c or 0 for c in counts))
    echoed: set[int] = set()
    created = int(time.time())

    def to_sse(p: int, chunk: ChatCompletionStreamResponse) -> Optional[str]:
        if chunk.usage is not None:
            usage.prompt_tokens += chunk.usage.prompt_tokens - (counts[p] or 0)
            usage.completion_tokens += chunk.usage.completion_tokens
        choices = []
        for c in chunk.choices:
            index = p * req.n + c.index
            text = c.delta.content or ""
            if req.echo and index not in echoed:
                echoed.add(index)
                text = str(infer_reqs[p].prompt) + text
            if not text and c.finish_reason is None:
                continue
            if info.ttft is None and c.delta.content:
                info.ttft = time.perf_counter() - info.start
            choices.append({"index": index, "text": text, "finish_reason": c.finish_reason,
                            "logprobs": legacy_logprobs(c.logprobs)})
        if not choices:
            return None
        data = {"id": info.id, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices}
        if req.include_usage:
            data["usage"] = None
        return sse(data)

    def usage_chunk() -> Optional[str]:
        return _usage_sse(req, info, "text_completion", created, usage)

    streams = [state.engine.infer_stream_async(r, rc) for r in infer_reqs]
    return _run_stream(state, info, slot, streams, to_sse, usage_chunk, usage)


def _usage_sse(req: Any, info: RequestInfo, obj: str, created: int, usage: Usage) -> Optional[str]:
    """The last chunk of a stream with the totals, when the client asked for them (stream_options)."""
    if not req.include_usage:
        return None
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return sse({"id": info.id, "object": obj, "created": created, "model": req.model,
                "choices": [], "usage": usage.model_dump()})


async def _run_stream(state: ServeState, info: RequestInfo, slot: Slot, streams: list, to_sse, usage_chunk,
                      usage: Usage) -> AsyncIterator[str]:
    """Shared stream body: chunks as SSE events, then usage and [DONE]; the slot is freed however it ends.

    The caller already holds a slot. If the client goes away, Starlette stops iterating and
    :class:`EventStreamResponse` closes this generator: the ``finally`` below then closes the engine
    streams (which stops generation after the token in flight) and frees the slot.
    """
    merged = merge_streams(streams, state.aborting)
    try:
        async for i, chunk in merged:
            piece = to_sse(i, chunk)
            if piece is not None:
                yield piece
        tail = usage_chunk()
        if tail is not None:
            yield tail
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        info.status, info.error = 499, "client disconnected mid-stream"
        raise
    except Exception as e:  # noqa: BLE001 - reported to the client as an error event, then logged
        if isinstance(e, InferRequestError):
            err = bad_input(e, "prompt" if info.endpoint == "completions" else "messages")
        elif isinstance(e, StreamAborted):
            err = aborted()
        else:
            logger.exception("generation failed for %s", info.id)
            err = APIError(500, f"Generation failed ({type(e).__name__}: {e})")
        info.status, info.error = err.status, err.message
        yield sse(err.body())
    finally:
        try:
            await merged.aclose()  # stops the engine streams now, not when garbage-collected
        finally:
            slot.release()
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        count_usage(info, usage)
