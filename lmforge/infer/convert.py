"""OpenAI-shaped requests -> the canonical row the Template encodes.

One place for this mapping, shared by every engine and the server, so that a conversation means
the same tokens whichever way it arrives:

- an assistant message with ``tool_calls`` becomes one ``tool_call`` message per call, its content
  the JSON ``{"name": ..., "arguments": {...}}`` (arguments parsed from OpenAI's JSON text);
- a ``tool`` message becomes a ``tool_response`` message;
- ``content`` given as a list of parts keeps its text parts (joined by newlines); an image part
  (``image_url`` with a data URL or a local path, or ``image``) becomes an ``<image>`` tag where it
  stood and its reference joins the row's ``images`` (after the request's own ``images``); a video part
  (``video_url`` with a video file's data URL or path, or ``video`` with a list of frames or a file) becomes a
  ``<video>`` tag and joins the row's ``videos`` likewise.
"""
from __future__ import annotations

import json
from typing import Any

from lmforge.dataset.media import IMAGE_TAG, VIDEO_TAG
from lmforge.infer.errors import InferRequestError
from lmforge.infer.protocol import ChatMessage, InferRequest

#: roles a conversation may end on when the model is to reply next
REPLY_TO_ROLES = ("user", "tool_response")


def parse_request(data: InferRequest | dict[str, Any], *, index: int | None = None) -> InferRequest:
    """Validate a dict as an :class:`InferRequest`; a bad field fails with one line naming it."""
    if isinstance(data, InferRequest):
        return data
    from pydantic import ValidationError

    try:
        return InferRequest.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if err["type"] == "literal_error" else ""
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}{got}" if where else msg)
        raise InferRequestError("; ".join(problems), index=index) from None


def _content_text(msg: ChatMessage, i: int, images: list[str], videos: list | None = None) -> str | None:
    content = msg.content
    if content is None or isinstance(content, str):
        return content
    text, prev_text = "", False
    for j, part in enumerate(content):
        kind = part.get("type", "text")
        if kind == "text":
            text += ("\n" if prev_text else "") + str(part.get("text", ""))
            prev_text = True
        elif kind in ("image_url", "image"):
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise InferRequestError(f"messages.{i}.content.{j}.{kind}: expected a URL string")
            images.append(url)
            text += IMAGE_TAG
            prev_text = False
        elif kind in ("video_url", "video") and videos is not None:
            video = part.get(kind)
            video = video.get("url") if isinstance(video, dict) else video
            if not (isinstance(video, str) and video) and not (isinstance(video, list) and video):
                raise InferRequestError(f"messages.{i}.content.{j}.{kind}: expected a video URL or a list of frames")
            videos.append(video)
            text += VIDEO_TAG
            prev_text = False
        else:
            raise InferRequestError(f"messages.{i}.content.{j}: content part type {kind!r} is not supported "
                                    "(text, image_url, video_url)")
    return text


def _tool_call_content(call: Any) -> str:
    args: Any = call.function.arguments
    try:
        args = json.loads(args) if isinstance(args, str) and args.strip() else (args or {})
    except json.JSONDecodeError:
        pass  # a model's malformed arguments are history too: keep them as text
    return json.dumps({"name": call.function.name, "arguments": args}, ensure_ascii=False)


def to_canonical_row(request: InferRequest | dict[str, Any], *, index: int | None = None) -> dict[str, Any]:
    """The canonical row ``{"messages": [...], "tools": ...}`` for ``request``.

    Raises :class:`InferRequestError` for a conversation the model cannot reply to (empty, a message
    without content, or one that does not end on a user or tool turn).
    """
    request = parse_request(request, index=index)
    if not request.messages:
        raise InferRequestError("messages must not be empty", index=index)
    messages: list[dict[str, Any]] = []
    images: list[str] = list(request.images)
    videos: list = list(request.videos)
    try:
        for i, m in enumerate(request.messages):
            text = _content_text(m, i, images, videos)
            if m.role == "assistant" and m.tool_calls:
                if text:
                    messages.append({"role": "assistant", "content": text})
                messages.extend({"role": "tool_call", "content": _tool_call_content(c)} for c in m.tool_calls)
            elif m.role == "tool":
                messages.append({"role": "tool_response", "content": text or ""})
            elif text is None:
                raise InferRequestError(f"messages.{i} ({m.role}) has no content")
            else:
                messages.append({"role": m.role, "content": text})
    except InferRequestError as e:
        if index is None or e.index is not None:
            raise
        raise InferRequestError(e.reason, index=index) from None
    last = messages[-1]["role"]
    if last not in REPLY_TO_ROLES:
        raise InferRequestError(f"the last message is from {last!r}; the model replies to a user or tool message",
                                index=index)
    row: dict[str, Any] = {"messages": messages, "tools": request.tools or None}
    if images:
        row["images"] = _normalize_media(images, index, "image")
    if videos:
        row["videos"] = _normalize_media(videos, index, "video")
    return row


def _normalize_media(items: list, index: int | None, kind: str) -> list:
    """Each image (data: URLs, local paths, file:// URLs; remote URLs are refused) or video (its frames, or its
    file) checked to open, as a dataset row's are."""
    from lmforge.dataset.media import MediaError, normalize_image, normalize_video

    normalize = normalize_video if kind == "video" else normalize_image
    out = []
    for k, item in enumerate(items):
        try:
            out.append(normalize(item))
        except MediaError as e:
            raise InferRequestError(f"{kind} {k}: {e}", index=index) from None
    return out
