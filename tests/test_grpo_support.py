"""Shared pieces for the GRPO tests: a scripted engine whose answers (and so rewards) the test chooses."""
from __future__ import annotations

import re
from typing import Any, Callable

from lmforge.infer.base import InferEngine
from lmforge.infer.protocol import (ChatCompletionResponse, ChatMessage, Choice, ChoiceLogprobs, Function, TokenLogprob,
                                    ToolCall, Usage)

QUESTION = re.compile(r"What is (\d+) ([+\-*]) (\d+)\?")


def question_of(engine: "ScriptedEngine", request: Any) -> tuple[int, str, int] | None:
    """The arith question a request asks (from its token ids or its first user message)."""
    prompt = getattr(request, "prompt", None)
    text = engine.tokenizer.decode(prompt) if prompt is not None else next(
        m.content for m in request.messages if m.role == "user")
    m = QUESTION.search(text)
    return (int(m.group(1)), m.group(2), int(m.group(3))) if m else None


class ScriptedEngine(InferEngine):
    """``script(engine, request, k) -> str | dict | (str, "length")``: the k-th sample's text, a tool call
    ``{"tool": name, "arguments": {...}}``, or a text cut at the length limit (no ``<|im_end|>``). Token ids are
    the text's ids plus ``<|im_end|>``. Asked for log-probs, it reports ``logprob`` for every token. Records
    requests, weight updates, and for each infer call the thread and the number of updates so far."""

    supports_raw_prompt = True

    def __init__(self, tokenizer: Any, script: Callable[..., Any]):
        self.tokenizer, self.script = tokenizer, script
        self.model_name, self.adapters, self.max_model_len, self.template = "scripted", {}, 1024, None
        self.requests: list[list[Any]] = []
        self.updates: list[dict[str, Any]] = []
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.logprob = -0.5
        self.calls: list[tuple[str, int]] = []

    def infer(self, requests, request_config=None, *, use_tqdm=None):
        import threading

        self.calls.append((threading.current_thread().name, len(self.updates)))
        self.requests.append(list(requests))
        out = []
        for r in requests:
            choices = []
            for k in range(request_config.n):
                said = self.script(self, r, k)
                if isinstance(said, dict):
                    text = f"<tool_call>{said}</tool_call>"
                    msg = ChatMessage(role="assistant", content=None, tool_calls=[ToolCall(function=Function(
                        name=said["tool"], arguments=__import__("json").dumps(said["arguments"])))])
                    reason = "tool_calls"
                elif isinstance(said, tuple):
                    text, msg, reason = said[0], ChatMessage(role="assistant", content=said[0]), said[1]
                else:
                    text, msg, reason = said, ChatMessage(role="assistant", content=said), "stop"
                ids = self.tokenizer.encode(text, add_special_tokens=False) + ([self.end] if reason != "length" else [])
                logprobs = None
                if request_config.logprobs:
                    logprobs = ChoiceLogprobs(content=[TokenLogprob(token="t", logprob=self.logprob, bytes=None)
                                                       for _ in ids])
                choices.append(Choice(index=k, message=msg, finish_reason=reason, token_ids=ids, logprobs=logprobs))
            out.append(ChatCompletionResponse(model="scripted", choices=choices, usage=Usage()))
        return out

    def infer_stream(self, request, request_config=None):
        raise NotImplementedError

    def update_weights(self, named_tensors):
        self.updates.append({k: v.clone() for k, v in named_tensors})
