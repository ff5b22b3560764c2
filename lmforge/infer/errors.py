"""Errors an engine raises for a request it cannot serve.

They subclass ``ValueError`` so that callers that only know "bad input" still catch them; the
server maps them to HTTP 400 and ``lmforge infer`` reports them per row and carries on.
"""
from __future__ import annotations


class InferRequestError(ValueError):
    """A request that cannot be generated for: the message says which request and why.

    ``index`` is the request's position in the list given to ``infer`` (None for a single request).
    """

    def __init__(self, message: str, *, index: int | None = None):
        super().__init__(message if index is None else f"request {index}: {message}")
        self.index = index
        self.reason = message


class PromptTooLongError(InferRequestError):
    """The encoded prompt leaves no room for a reply within ``max_model_len``."""

    def __init__(self, prompt_tokens: int, max_model_len: int, *, index: int | None = None):
        super().__init__(f"the prompt is {prompt_tokens} tokens but max_model_len is {max_model_len}; "
                         f"shorten the conversation or raise --max_model_len", index=index)
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
