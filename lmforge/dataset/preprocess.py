"""Map one raw row, in any supported format, onto the canonical row.

Every source (files, hubs, built-ins) goes through :func:`preprocess_row`, so templates and
trainers only ever see one shape::

    {"messages": [{"role": ..., "content": str, "loss": bool | None}, ...] | None,
     "tools": str | None,              # JSON list of OpenAI tool schemas
     "images": list[str] | None,      # absolute paths or data: URLs (see media.py)
     "videos": list[list[str]] | None,  # each video a list of frame images
     "rejected_response": str | None,  # preference pairs
     "rejected_messages": list | None,
     "label": bool | None,             # KTO
     "text": str | None,               # pre-training
     ...extra columns, unchanged}

Every canonical key is always present (``None`` when unused) so that Arrow schemas of different
sources line up. The mapping is idempotent: a canonical row maps to itself.

Errors name the row's source (``file:line``) and the field, because a message that only says
"KeyError: 'content'" after ten minutes of loading is how data bugs cost a day. An empty user turn
or assistant reply (a CSV row ``q2,`` or ``,r3``, ``"content": ""``) is an error too: trained as it
is, it teaches the model to answer with nothing, and nobody would see why.
"""
from __future__ import annotations

import json
from typing import Any, Callable

__all__ = [
    "CANONICAL_COLUMNS",
    "ORIGIN_COLUMN",
    "ROLES",
    "DatasetError",
    "detect_format",
    "iter_jsonl_rows",
    "preprocess_row",
]

CANONICAL_COLUMNS = ("messages", "tools", "images", "videos", "rejected_response", "rejected_messages", "label", "text")
# Where a loaded row came from ("file:line"), added by the loader and dropped by encoding.
ORIGIN_COLUMN = "_origin"
ROLES = ("system", "user", "assistant", "tool_call", "tool_response")

# Accepted spellings of each role, across OpenAI, ShareGPT and the canonical form itself.
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool_call": "tool_call",
    "function_call": "tool_call",
    "tool_response": "tool_response",
    "tool": "tool_response",
    "function": "tool_response",
    "function_response": "tool_response",
    "observation": "tool_response",
}

FORMAT_HINT = (
    "messages, conversations, instruction/output, query/response, prompt/completion, "
    "prompt/chosen/rejected, text (use --columns to rename)"
)


class DatasetError(ValueError):
    """A dataset could not be loaded or a row could not be mapped; the message says where."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        super().__init__(message)
        self.source = source
        self.field = field

    def __reduce__(self):  # keep source/field across worker processes
        return (_rebuild_error, (str(self), self.source, self.field))


def _rebuild_error(message: str, source: str | None, field: str | None) -> DatasetError:
    return DatasetError(message, source=source, field=field)


class _FieldError(Exception):
    """Raised deep in the mappers; :func:`preprocess_row` adds the row's source."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _json_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _as_list(value: Any, field: str, what: str) -> list:
    """Lists may arrive JSON-encoded (CSV cells); accept both."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _FieldError(field, f"expected {what}, got a string that is not JSON ({e.msg})") from None
    if not isinstance(value, (list, tuple)):
        raise _FieldError(field, f"expected {what}, got {_type_name(value)}")
    return list(value)


def _as_str(value: Any, field: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _FieldError(field, f"expected a string, got {_type_name(value)}")
    return value


def utf8_problem(text: str) -> str | None:
    """Why ``text`` (read with ``errors="surrogateescape"``) is not UTF-8 (its first bad byte), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "a lone surrogate"
        return f"not valid UTF-8 ({what} at character {e.start + 1}); re-save the file as UTF-8"


def _empty(field: str, what: str) -> _FieldError:
    return _FieldError(field, f"empty {what}; the row would train on nothing there (fill it in, or --strict false "
                              "skips such rows)")


def _required(value: Any, field: str, what: str) -> str:
    """A text that must say something: a user turn, an assistant reply, a pre-training text."""
    text = _as_str(value, field)
    if not text.strip():
        raise _empty(field, what)
    return text


# ----------------------------------------------------------------------------- messages


def _content_text(content: Any, field: str, images: list) -> str | None:
    """Content may be a string or OpenAI content parts; image parts become ``<image>`` tags (video parts
    ``<video>`` tags; ``images`` collects both in order, a video as ``("video", value)``)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _FieldError(field, f"expected a string or a list of content parts, got {_type_name(content)}")
    pieces = []
    for j, part in enumerate(content):
        f = f"{field}[{j}]"
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, dict):
            raise _FieldError(f, f"expected a content part object, got {_type_name(part)}")
        kind = part.get("type", "text")
        if kind == "text":
            pieces.append(_as_str(part.get("text"), f"{f}.text"))
        elif kind in ("image_url", "image"):
            url = part.get(kind)
            if isinstance(url, dict):
                url = url.get("url")
            images.append(url if not isinstance(url, str) else _as_str(url, f"{f}.{kind}"))
            pieces.append("<image>")
        elif kind in ("video", "video_url"):
            url = part.get(kind)
            images.append(("video", url.get("url") if isinstance(url, dict) else url))
            pieces.append("<video>")
        else:
            raise _FieldError(f"{f}.type", f"unsupported content part type {kind!r} "
                                           "(expected text, image_url, image, video)")
    return "".join(pieces)


def _tool_call_content(call: Any, field: str) -> str:
    """One tool call as canonical JSON ``{"name", "arguments"}``; arguments parsed when JSON."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError as e:
            raise _FieldError(field, f'a tool call must be JSON {{"name": ..., "arguments": ...}} ({e.msg})') from None
    if not isinstance(call, dict):
        raise _FieldError(field, f"expected a tool call object, got {_type_name(call)}")
    if isinstance(call.get("function"), dict):  # OpenAI {"type": "function", "function": {...}}
        call, field = call["function"], f"{field}.function"
    name = _as_str(call.get("name"), f"{field}.name")
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass  # not JSON: keep the model's text as it is
    return _json_dumps({"name": name, "arguments": args})


def _is_json_payload(content: Any) -> bool:
    """A dict, or a list that is not OpenAI content parts."""
    if isinstance(content, dict):
        return True
    return isinstance(content, list) and not all(isinstance(p, dict) and "type" in p for p in content)


def _loss_flag(msg: dict, field: str) -> bool | None:
    """``loss`` (bool) or OpenAI fine-tuning's ``weight`` (0/1) says whether a turn is trained on."""
    for key in ("loss", "weight"):
        value = msg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise _FieldError(f"{field}.{key}", f"expected true/false (or 0/1), got {value!r}")
    return None


def _message(role: str, content: str | None, loss: bool | None = None) -> dict:
    return {"role": role, "content": content, "loss": loss}


def _normalize_messages(value: Any, field: str, images: list[str]) -> list[dict]:
    """OpenAI / ShareGPT / canonical message lists -> canonical messages."""
    items = _as_list(value, field, "a list of messages")
    if not items:
        raise _FieldError(field, "empty message list")
    out: list[dict] = []
    for i, msg in enumerate(items):
        f = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise _FieldError(f, f"expected a message object, got {_type_name(msg)}")
        role_key, content_key = ("from", "value") if "from" in msg else ("role", "content")
        raw_role = msg.get(role_key)
        if not isinstance(raw_role, str) or raw_role not in ROLE_ALIASES:
            raise _FieldError(
                f"{f}.{role_key}",
                f"unknown role {raw_role!r} (expected one of {', '.join(ROLE_ALIASES)})",
            )
        role = ROLE_ALIASES[raw_role]
        loss = _loss_flag(msg, f)
        content = msg.get(content_key)
        if role == "tool_response" and _is_json_payload(content):
            content = _json_dumps(content)  # a tool's result given as an object, not text
        content = _content_text(content, f"{f}.{content_key}", images)
        calls = msg.get("tool_calls") or ([msg["function_call"]] if msg.get("function_call") else [])
        if calls:
            if role != "assistant":
                raise _FieldError(f"{f}.tool_calls", f"only assistant messages may carry tool_calls, not {raw_role!r}")
            calls = _as_list(calls, f"{f}.tool_calls", "a list of tool calls")
            if content:
                out.append(_message("assistant", content, loss))
            out.extend(_message("tool_call", _tool_call_content(c, f"{f}.tool_calls[{j}]"), loss) for j, c in enumerate(calls))
            continue
        if role == "tool_call":
            content = _tool_call_content(content, f"{f}.{content_key}")
        if content is None:
            raise _FieldError(f"{f}.{content_key}", "missing content")
        if role in ("user", "assistant") and not content.strip():
            raise _empty(f"{f}.{content_key}", f"{role} message")
        out.append(_message(role, content, loss))
    return out


def _history(value: Any, field: str) -> list[dict]:
    """``[[query, response], ...]`` -> alternating user/assistant messages."""
    if value is None or value == "":
        return []
    out = []
    for i, pair in enumerate(_as_list(value, field, "a list of [query, response] pairs")):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _FieldError(f"{field}[{i}]", f"expected a [query, response] pair, got {pair!r:.80}")
        out.append(_message("user", _required(pair[0], f"{field}[{i}][0]", "user turn")))
        out.append(_message("assistant", _required(pair[1], f"{field}[{i}][1]", "assistant reply")))
    return out


def _turns(value: Any, field: str, images: list[str], default_role: str) -> list[dict]:
    """A TRL field that is either plain text (one ``default_role`` turn) or a message list."""
    if isinstance(value, str):
        return [_message(default_role, _required(value, field, f"{default_role} turn"))]
    return _normalize_messages(value, field, images)


def _last_assistant(messages: list[dict], field: str) -> str:
    if not messages or messages[-1]["role"] != "assistant":
        raise _FieldError(field, "expected the conversation to end with an assistant message")
    return messages[-1]["content"]


# ----------------------------------------------------------------------------- formats
# Each mapper returns (partial canonical row, keys it consumed). Extra keys pass through.

_Mapped = tuple[dict, tuple[str, ...]]


def _map_messages(row: dict, images: list[str]) -> _Mapped:
    return {"messages": _normalize_messages(row["messages"], "messages", images)}, ("messages",)


def _map_conversations(row: dict, images: list[str]) -> _Mapped:
    return {"messages": _normalize_messages(row["conversations"], "conversations", images)}, ("conversations",)


def _map_alpaca(row: dict, images: list[str]) -> _Mapped:
    instruction = _as_str(row["instruction"], "instruction")
    extra = _as_str(row.get("input"), "input", optional=True)
    query = f"{instruction}\n{extra}" if extra else instruction
    if not query.strip():
        raise _empty("instruction", "instruction (and no input)")
    messages = _history(row.get("history"), "history")
    messages += [_message("user", query), _message("assistant", _required(row["output"], "output", "output"))]
    return {"messages": messages}, ("instruction", "input", "output", "history")


def _map_query_response(row: dict, images: list[str]) -> _Mapped:
    messages = _history(row.get("history"), "history")
    messages += [
        _message("user", _required(row["query"], "query", "query")),
        _message("assistant", _required(row["response"], "response", "response")),
    ]
    return {"messages": messages}, ("query", "response", "history")


def _map_prompt_completion(row: dict, images: list[str]) -> _Mapped:
    messages = _turns(row["prompt"], "prompt", images, "user")
    messages += _turns(row["completion"], "completion", images, "assistant")
    return {"messages": messages}, ("prompt", "completion")


def _map_preference(row: dict, images: list[str]) -> _Mapped:
    """TRL preference rows; ``prompt`` may be absent when chosen/rejected hold whole conversations."""
    prompt = _turns(row["prompt"], "prompt", images, "user") if row.get("prompt") is not None else []
    chosen = _turns(row["chosen"], "chosen", images, "assistant")
    rejected = _turns(row["rejected"], "rejected", [], "assistant")
    _last_assistant(chosen, "chosen")
    out = {"messages": prompt + chosen, "rejected_response": _last_assistant(rejected, "rejected")}
    if rejected[:-1] != chosen[:-1]:  # the rejected branch differs before its last turn
        out["rejected_messages"] = prompt + rejected
    return out, ("prompt", "chosen", "rejected")


def _map_text(row: dict, images: list[str]) -> _Mapped:
    return {"text": _required(row["text"], "text", "text")}, ()


# (name, required keys, mapper) in detection order: the first whose keys are all present wins.
FORMATS: tuple[tuple[str, tuple[str, ...], Callable[[dict, list], _Mapped]], ...] = (
    ("messages", ("messages",), _map_messages),
    ("conversations", ("conversations",), _map_conversations),
    ("preference", ("chosen", "rejected"), _map_preference),
    ("alpaca", ("instruction", "output"), _map_alpaca),
    ("query_response", ("query", "response"), _map_query_response),
    ("prompt_completion", ("prompt", "completion"), _map_prompt_completion),
    ("text", ("text",), _map_text),
)


def _detect(row: dict):
    present = {k for k, v in row.items() if v is not None}
    return next((f for f in FORMATS if present.issuperset(f[1])), None)


def detect_format(row: dict) -> str | None:
    """The name of the first format whose columns are present (and not null) in ``row``."""
    fmt = _detect(row)
    return fmt and fmt[0]


# ----------------------------------------------------------------------------- canonical columns


def _tools(value: Any) -> str | None:
    """Tool schemas -> one canonical JSON string (bare function schemas get the OpenAI wrapper)."""
    if value is None or value == "":
        return None
    tools = _as_list(value, "tools", "a list of tool schemas")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, str):
            try:
                tool = json.loads(tool)
            except json.JSONDecodeError as e:
                raise _FieldError(f"tools[{i}]", f"expected a tool schema object, got a non-JSON string ({e.msg})") from None
        if not isinstance(tool, dict):
            raise _FieldError(f"tools[{i}]", f"expected a tool schema object, got {_type_name(tool)}")
        if "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        out.append(tool)
    return _json_dumps(out) if out else None


def _media_list(value: Any, field: str) -> list:
    """One reference, a list of them, or that list as JSON text (CSV cells)."""
    if value is None or value == "":
        return []
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [value]
    if isinstance(value, (str, list, tuple)):
        return _as_list(value, field, "a list of image paths or URLs")
    return [value]  # one PIL image, bytes or Image-feature dict


def _media(row: dict, found: list, source: str) -> tuple[list[str] | None, list[list[str]] | None]:
    """``images``/``videos`` (or LLaVA's ``image``/``video``) plus media found in content parts, normalised
    and checked to open (see :mod:`lmforge.dataset.media`)."""
    from lmforge.dataset import media

    base = media.source_dir(source)
    image_key = "images" if row.get("images") is not None else "image"
    video_key = "videos" if row.get("videos") is not None else "video"
    raw_images = _media_list(row.get(image_key), image_key) + [v for v in found if not isinstance(v, tuple)]
    if video_key == "video":  # one video: its frames, or a file
        raw_videos = [row["video"]] if row.get("video") not in (None, "", []) else []
    else:
        raw_videos = _as_list(row["videos"], "videos", "a list of videos (each a list of frame images)")
    raw_videos += [v[1] for v in found if isinstance(v, tuple)]
    images, videos = [], []
    for i, img in enumerate(raw_images):
        try:
            images.append(media.normalize_image(img, base))
        except media.MediaError as e:
            raise _FieldError(f"{image_key}[{i}]", str(e)) from None
    for i, vid in enumerate(raw_videos):
        try:
            videos.append(media.normalize_video(vid, base))
        except media.MediaError as e:
            raise _FieldError(f"{video_key}[{i}]", str(e)) from None
    return images or None, videos or None


def _check_tags(out: dict) -> None:
    """``<image>``/``<video>`` tags in the messages must not outnumber the row's images/videos; with no tags
    at all, the template puts them before the first user message."""
    from lmforge.dataset.media import IMAGE_TAG, VIDEO_TAG, count_tags

    for tag, key in ((IMAGE_TAG, "images"), (VIDEO_TAG, "videos")):
        have = len(out.get(key) or [])
        for msgs_key in ("messages", "rejected_messages"):
            tags = sum(count_tags(m["content"], tag) for m in out.get(msgs_key) or [])
            if tags and tags != have:
                raise _FieldError(msgs_key, f"the messages hold {tags} {tag} tag(s) but the row has {have} {key}")


_LABELS = {"true": True, "1": True, "false": False, "0": False}


def _label(value: Any) -> bool | None:
    """KTO's desirable flag; CSV cells arrive as text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        if value.strip().lower() in _LABELS:
            return _LABELS[value.strip().lower()]
    elif isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise _FieldError("label", f"expected true/false, got {value!r}")


_NOT_EXTRA = frozenset((*CANONICAL_COLUMNS, ORIGIN_COLUMN, "system"))


def preprocess_row(raw: dict, *, source: str = "<row>", columns: dict | None = None) -> dict:
    """Map one raw row onto the canonical row; raise :class:`DatasetError` naming source and field.

    ``columns`` renames raw columns (``{"src": "dst"}``) before the format is detected.
    """
    if not isinstance(raw, dict):
        raise DatasetError(f"{source}: expected a row object (a mapping of columns), got {_type_name(raw)}", source=source)
    row = dict(raw)
    for src, dst in (columns or {}).items():
        if src in row:
            row[dst] = row.pop(src)
    fmt = _detect(row)
    if fmt is None:
        raise DatasetError(
            f"{source}: cannot detect the format; columns are {sorted(row)}; expected one of: {FORMAT_HINT}",
            source=source,
        )
    mapper = fmt[2]
    try:
        found_images: list[str] = []
        mapped, consumed = mapper(row, found_images)
        out: dict[str, Any] = {
            "messages": None,
            "tools": _tools(row.get("tools")),
            "images": None,
            "videos": None,
            "rejected_response": None if row.get("rejected_response") is None
            else _required(row["rejected_response"], "rejected_response", "rejected response"),
            "rejected_messages": None,
            "label": _label(row.get("label")),
            "text": _as_str(row.get("text"), "text", optional=True),
        }
        if row.get("rejected_messages") is not None:
            out["rejected_messages"] = _normalize_messages(row["rejected_messages"], "rejected_messages", [])
        out.update(mapped)
        out["images"], out["videos"] = _media(row, found_images, source)
        system = _as_str(row.get("system"), "system", optional=True)
        for key in ("messages", "rejected_messages"):
            msgs = out[key]
            if system and msgs and msgs[0]["role"] != "system":
                out[key] = [_message("system", system), *msgs]
        _check_tags(out)
    except _FieldError as e:
        raise DatasetError(f"{source}: field {e.field!r}: {e.reason}", source=source, field=e.field) from None
    media_aliases = {k for k in ("image", "video") if row.get(f"{k}s") is None}  # LLaVA's singular columns
    for k, v in row.items():  # extra columns pass through unchanged
        if k not in _NOT_EXTRA and k not in consumed and k not in media_aliases:
            out[k] = v
    return out


def iter_jsonl_rows(path: str, *, source: str | None = None, columns: dict | None = None,
                    fallback: Callable[[dict], dict | None] | None = None):
    """Each line of a local JSONL file as ``(where, canonical row, None)`` or ``(where, None, error)``.

    For work that answers rows one by one (batch inference, evaluation): a malformed line becomes an
    error naming ``file:line`` and the rest go on. ``fallback(raw)`` may rewrite a row whose format is
    not detected (e.g. an eval row with only a question) before it is mapped.
    """
    source = source or str(path)
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{source}:{lineno}"
            bad = utf8_problem(line)
            if bad:
                yield where, None, f"{where}: {bad}"
                continue
            try:
                raw = json.loads(line)
                if isinstance(raw, dict):
                    raw = {columns.get(k, k) if columns else k: v for k, v in raw.items()}
                    if fallback is not None and detect_format(raw) is None:
                        raw = fallback(raw) or raw
                yield where, preprocess_row(raw, source=where), None
            except json.JSONDecodeError as e:
                yield where, None, f"{where}: invalid JSON: {e.msg}"
            except DatasetError as e:
                yield where, None, str(e)
