"""The engine interface every backend implements (hf, native).

Engines are synchronous at heart; the async twins let the server await generation without
blocking its event loop. A backend may override them with a native async path.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Iterable, Iterator

from lmforge.infer.errors import InferRequestError
from lmforge.infer.protocol import ChatCompletionResponse, ChatCompletionStreamResponse, InferRequest, RequestConfig


class InferEngine(ABC):
    """Generate replies for conversations.

    Attributes every engine sets: ``model_name`` (as shown in /v1/models), ``adapters`` (name -> folder
    of each LoRA adapter served beside the base), ``max_model_len`` (prompt + reply limit in tokens),
    ``template`` (the lmforge Template used to encode requests and decode replies).
    """

    model_name: str
    adapters: dict[str, str]
    max_model_len: int
    # Whether count_prompt_tokens runs in this process without waiting on another: the server then counts a
    # short token-id prompt on its event loop (a length and a range check) instead of in its tokenizer pool.
    counts_locally: bool = False

    @abstractmethod
    def infer(self, requests: list[InferRequest], request_config: RequestConfig | None = None, *,
              use_tqdm: bool | None = None) -> list[ChatCompletionResponse]:
        """Replies for all requests (batched internally); one response per request, ``n`` choices each."""

    @abstractmethod
    def infer_stream(self, request: InferRequest, request_config: RequestConfig | None = None
                     ) -> Iterator[ChatCompletionStreamResponse]:
        """Chunks of one reply as they are generated; the last chunk carries finish_reason and usage."""

    async def infer_async(self, request: InferRequest, request_config: RequestConfig | None = None
                          ) -> ChatCompletionResponse:
        return (await asyncio.to_thread(self.infer, [request], request_config, use_tqdm=False))[0]

    async def infer_stream_async(self, request: InferRequest, request_config: RequestConfig | None = None
                                 ) -> AsyncIterator[ChatCompletionStreamResponse]:
        """Runs the sync stream in a worker thread; stops generating when the consumer goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        cancelled = False

        def produce() -> None:
            try:
                for chunk in self.infer_stream(request, request_config):
                    if cancelled:
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        task = loop.run_in_executor(None, produce)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled = True
            await asyncio.shield(task) if task.done() else None

    def count_prompt_tokens(self, request: InferRequest) -> int:
        """Tokens of the encoded prompt (the server checks it against ``max_model_len``)."""
        raise NotImplementedError

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Load new weights (``(name, tensor)`` pairs under the plain transformers names) into the model
        that generates: an online-RL trainer calls this after its optimizer steps when the engine does
        not share the policy's parameters. Names not given keep their values."""
        raise NotImplementedError(f"the {type(self).__name__} engine cannot take weight updates "
                                  "(update_weights), so it cannot serve RL rollouts from a changing policy")


def infer_each(engine: InferEngine, requests: list[InferRequest], request_config: RequestConfig | None = None
               ) -> list[ChatCompletionResponse | InferRequestError]:
    """``engine.infer`` over ``requests``, where a request the engine rejects (an
    :class:`InferRequestError` naming its index: a prompt over ``max_model_len``, say) gets that error in
    its place and the others are still answered. An error that names no request is raised."""
    out: list[ChatCompletionResponse | InferRequestError] = [None] * len(requests)  # type: ignore[list-item]
    todo = list(range(len(requests)))
    while todo:
        try:
            results = engine.infer([requests[i] for i in todo], request_config, use_tqdm=False)
        except InferRequestError as e:
            if e.index is None or not 0 <= e.index < len(todo):
                raise
            out[todo.pop(e.index)] = e
            continue
        for i, r in zip(todo, results):
            out[i] = r
        break
    return out
