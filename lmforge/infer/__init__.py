"""Generation: protocol types, the engine interface, and engines (hf; native on CUDA)."""
from lmforge.infer.convert import to_canonical_row
from lmforge.infer.errors import InferRequestError, PromptTooLongError
from lmforge.infer.protocol import (ChatCompletionResponse, ChatCompletionStreamResponse, ChatMessage, Choice,
                                    InferRequest, RequestConfig, StreamChoice, Usage)

__all__ = ["ChatCompletionResponse", "ChatCompletionStreamResponse", "ChatMessage", "Choice", "InferRequest",
           "InferRequestError", "PromptTooLongError", "RequestConfig", "StreamChoice", "Usage", "get_engine",
           "to_canonical_row"]


def get_engine(backend: str = "hf", **kwargs):
    """Build an engine by name (``hf``, ``native``); kwargs go to its constructor."""
    if backend == "hf":
        from lmforge.infer.hf import HfEngine

        return HfEngine(**kwargs)
    if backend == "native":
        from lmforge.infer.native import NativeEngine

        return NativeEngine(**kwargs)
    raise ValueError(f"unknown --infer_backend {backend!r}; expected hf or native")
