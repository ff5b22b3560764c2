"""HTTP request and response bodies of the OpenAI-compatible endpoints.

These are stricter than the engine's protocol types on purpose: a request comes from an untrusted
client, so types are not coerced (``"10"`` is not a number, ``true`` is not 1), numbers must be
finite and in range, and every error names the field. Unknown fields are ignored, as OpenAI's own
clients add new optional fields over time.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmforge.infer.protocol import ChatMessage, InferRequest, ToolCall

# Seeds reach torch.manual_seed, which takes a signed or unsigned 64-bit value.
_SEED_MIN, _SEED_MAX = -(2 ** 63), 2 ** 64 - 1
MAX_STOP_WORDS = 16
MAX_BATCH_PROMPTS = 64


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Strict):
    class _Name(_Strict):
        name: str

    type: Literal["function"] = "function"
    function: _Name


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Optional[Literal["auto", "low", "high"]] = None


class VideoURL(_Strict):
    url: str = Field(min_length=1)


class ContentPart(_Strict):
    """A text, image or video part. Videos come as vLLM takes them (``video_url``: a video file's data URL) or
    as lmforge's own clients send frame lists (``video``: frame image data URLs, as ``openai_messages`` writes)."""

    type: Literal["text", "image_url", "video_url", "video", "input_audio", "file"]
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None
    video_url: Optional[VideoURL] = None
    video: Optional[list[Annotated[str, Field(min_length=1)]]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _supported(self) -> "ContentPart":
        if self.type in ("image_url", "video_url", "video"):
            if getattr(self, self.type) is None:
                what = "a list of frame image URLs" if self.type == "video" else "an object with a 'url'"
                raise ValueError(f"a {self.type} content part needs {self.type!r}: {what}")
            return self
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported by this server; send text, "
                             "image_url, video_url or video")
        if self.text is None:
            raise ValueError("a text content part needs a 'text' string")
        return self

    def media_urls(self) -> list[str]:
        """The image, video file or frame URLs this part names."""
        if self.type == "image_url":
            return [self.image_url.url]
        if self.type == "video_url":
            return [self.video_url.url]
        return list(self.video) if self.type == "video" else []


class MediaRefused(ValueError):
    """An image or video the server does not read; ``param`` names the content part, ``code`` is the error's."""

    def __init__(self, message: str, param: str, what: str = "image"):
        super().__init__(message)
        self.param = param
        self.code = f"invalid_{what}"


VIDEO_PARTS = ("video_url", "video")


def media_parts(messages: list["Message"]) -> list[tuple[str, "ContentPart"]]:
    """``(path, part)`` of every image and video part, e.g. ``("messages[0].content[1]", part)``."""
    return [(f"messages[{i}].content[{j}]", part) for i, m in enumerate(messages)
            for j, part in enumerate(m.content if isinstance(m.content, list) else []) if part.type != "text"]


def check_media(messages: list["Message"], allow_local: bool) -> None:
    """Images and videos must be base64 ``data:`` URLs, or (``--allow_local_media``) files on this machine; the
    server never fetches remote URLs. Raises :class:`MediaRefused` naming the part."""
    for where, part in media_parts(messages):
        what = "video" if part.type in VIDEO_PARTS else "image"
        for url in part.media_urls():
            check_media_url(url, allow_local, where, what)


def check_videos_decode(messages: list["Message"]) -> None:
    """Every video part opens (its file's first frame decodes; its frames read and share one size), so that a bad
    one is refused naming its part rather than failing inside the engine. Run after :func:`check_media`."""
    from lmforge.dataset.media import MediaError, normalize_video

    for where, part in media_parts(messages):
        if part.type in VIDEO_PARTS:
            try:
                normalize_video(part.media_urls()[0] if part.type == "video_url" else part.video)
            except MediaError as e:
                raise MediaRefused(f"the video does not decode: {e}", where, "video") from None


def check_media_url(url: str, allow_local: bool, where: str, what: str = "image") -> None:
    """One image (``what``: or video) reference under that policy; ``where`` names it in the :class:`MediaRefused`."""
    if url.startswith("data:"):
        return
    if url.lower().startswith(("http://", "https://")):
        raise MediaRefused(f"remote {what} URLs are not fetched by this server; send the {what} as a base64 "
                           "data: URL", where, what)
    if not allow_local:
        raise MediaRefused(f"local {what} files are not accepted (start the server with --allow_local_media "
                           "to allow them); send a base64 data: URL", where, what)


class Message(_Strict):
    """One chat message as OpenAI sends it; ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None

    @model_validator(mode="after")
    def _needs_content(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role!r} message needs 'content'")
        return self

    def text(self) -> Optional[str]:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content

    def to_engine(self) -> ChatMessage:
        content: Any = self.text()
        if isinstance(self.content, list) and any(p.type != "text" for p in self.content):
            content = [p.model_dump(exclude_none=True) for p in self.content]  # images, videos: infer/convert.py
        calls = None
        if self.tool_calls:
            calls = [ToolCall(**({"id": c.id} if c.id else {}), function=c.function.model_dump())
                     for c in self.tool_calls]
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=content,
                           name=self.name, tool_calls=calls, tool_call_id=self.tool_call_id,
                           reasoning_content=self.reasoning_content)


class PromptRequest(InferRequest):
    """Raw text (or token ids) to continue, with no chat template: what /v1/completions hands the engine.

    Engines accept it in ``infer``, ``infer_stream`` and ``count_prompt_tokens`` (HfEngine.encode
    checks ``getattr(request, "prompt", None)``): ``prompt`` is encoded as is (a text with no special
    tokens added, token ids checked against the vocabulary) and ``messages`` is ignored; everything
    else (adapter, sampling, stop, logprobs, usage) is as for chat. An engine that cannot do this
    sets ``supports_raw_prompt = False`` and /v1/completions answers 501.
    """

    messages: list[ChatMessage] = Field(default_factory=list)
    prompt: Union[str, list[int]]


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"] = Field("text", description="only plain text is supported")


class SamplingFields(_Strict):
    """Fields shared by chat and text completions (OpenAI's, plus top_k, min_p, repetition_penalty)."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False  # vLLM's extension: generate past end-of-turn tokens, to exactly max_tokens (benchmarks)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> Optional[list[str]]:
        if v is None:
            return None
        words = [v] if isinstance(v, str) else v
        if len(words) > MAX_STOP_WORDS:
            raise ValueError(f"at most {MAX_STOP_WORDS} stop sequences, got {len(words)}")
        if any(not w for w in words):
            raise ValueError("stop sequences must not be empty strings")
        return words

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: Optional[dict]) -> None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None

    @model_validator(mode="after")
    def _checks(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, "
                                 f"which is not among the tools ({', '.join(names) or 'none given'})")
        return self

    def new_tokens(self) -> Optional[int]:
        """``max_completion_tokens`` is OpenAI's newer name for ``max_tokens``; either may be sent."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def engine_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools the model is shown: none for tool_choice 'none', only the named one for a named choice."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = self.tools
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == self.tool_choice.function.name]
        return [t.model_dump(exclude_none=True) for t in tools]


class CompletionRequest(SamplingFields):
    """A raw-text completion: the prompt is encoded as is, with no chat template."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        """One clear message instead of pydantic's four (one per member of the union)."""
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(v, str) or (isinstance(v, list) and (all(isinstance(x, str) for x in v) or ids(v)
                                                           or all(ids(x) for x in v))):
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of lists "
                         f"of token ids (got {type(v).__name__})")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > MAX_BATCH_PROMPTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_BATCH_PROMPTS} prompts per request, got {len(v)}")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("token-id prompts must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: Optional[str]) -> None:
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this server")
        return None

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: Optional[int]) -> None:
        if v not in (None, 1):
            raise ValueError("best_of is not supported by this server; use n")
        return None

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt(s) as a list: each item a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)
