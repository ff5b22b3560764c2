"""Request and response types shared by every engine and the server (OpenAI-shaped)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Function(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: _id("call"))
    type: Literal["function"] = "function"
    function: Function


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "tool_call", "tool_response"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None
    reasoning_content: Optional[str] = None


class InferRequest(BaseModel):
    """One conversation to continue.

    ``adapter`` picks a served LoRA adapter by name; ``None`` means the engine's default (the base
    model, or the adapter of an adapter ``--ckpt_dir``) and ``""`` the base model explicitly.
    """

    messages: list[ChatMessage]
    tools: Optional[list[dict[str, Any]]] = None
    images: list[str] = Field(default_factory=list)
    # each a list of frame references or one video file (path or data:video/ URL), placed by <video> tags
    videos: list[Union[str, list[str]]] = Field(default_factory=list)
    adapter: Optional[str] = None
    # This request's own sampling seed (over RequestConfig.seed): its samples come from its own generator,
    # whatever else shares the batch, so work spread differently over processes samples the same.
    seed: Optional[int] = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must not be empty")
        return v


class RequestConfig(BaseModel):
    """Sampling settings for one request. temperature 0 is greedy."""

    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: list[str] = Field(default_factory=list)
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=128)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    stream: bool = False
    ignore_eos: bool = False  # keep generating past end-of-turn tokens (benchmarks); as vLLM's extension

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> list[str]:
        if v is None:
            return []
        return [v] if isinstance(v, str) else list(v)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


FinishReason = Optional[Literal["stop", "length", "tool_calls", "abort"]]


class Choice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason = None
    logprobs: Optional[ChoiceLogprobs] = None
    token_ids: Optional[list[int]] = None  # generated ids, for RL and tests (not part of OpenAI's shape)


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class StreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[StreamChoice]
    usage: Optional[Usage] = None
