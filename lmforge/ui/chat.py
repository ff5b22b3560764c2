"""Chat in the browser, over a local engine or any OpenAI-compatible server.

The one hook: a *responder* turns a conversation into a stream of reply events::

    respond(messages: list[dict], settings: ChatSettings) -> Iterator[dict]

``messages`` are OpenAI-shaped (system, user, assistant with ``tool_calls``, tool). Each event is one of
``{"text": delta}``, ``{"tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]}``
or ``{"tool_result": {"tool_call_id", "name", "content"}}``. The page folds the events into the
conversation and shows tool calls and results as their own collapsible messages. ``engine_responder``
and ``openai_responder`` are the two built in; an agent that calls tools itself is a third responder
(it yields its tool calls, their results, then the answer) and needs no change to the page.
"""
from __future__ import annotations

import json
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

Responder = Callable[[list[dict], "ChatSettings"], Iterator[dict]]

_BASE = "(base model)"  # the adapter dropdown's entry for no adapter
_REDRAW_S = 0.05  # at most ~20 page updates a second while a reply streams


@dataclass
class ChatSettings:
    """Sampling settings and options of one turn (the page's side panel)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int | None = 512
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    tools: list[dict] | None = None
    adapter: str | None = None
    stream: bool = True


def _whole(message: Any) -> Iterator[dict]:
    """The events of a reply that came in one piece (``--stream false``)."""
    if message.content:
        yield {"text": message.content}
    if message.tool_calls:
        yield {"tool_calls": [c.model_dump() for c in message.tool_calls]}


def _deltas(chunks: Any) -> Iterator[Any]:
    """The first choice's delta of each streamed chunk (the last chunk may carry only usage)."""
    for chunk in chunks:
        if chunk.choices:
            yield chunk.choices[0].delta


def engine_responder(engine: Any) -> Responder:
    """Replies from an lmforge engine (``lmforge.infer``): streamed chunks, tool calls parsed by its template."""

    def respond(messages: list[dict], settings: ChatSettings) -> Iterator[dict]:
        from lmforge.infer import InferRequest, RequestConfig

        config = RequestConfig(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                               top_p=settings.top_p, top_k=settings.top_k,
                               repetition_penalty=settings.repetition_penalty, stop=list(settings.stop))
        request = InferRequest(messages=messages, tools=settings.tools or None, adapter=settings.adapter)
        if not settings.stream:
            yield from _whole(engine.infer([request], config, use_tqdm=False)[0].choices[0].message)
            return
        with closing(engine.infer_stream(request, config)) as chunks:  # closing it stops generation
            for delta in _deltas(chunks):
                if delta.content:
                    yield {"text": delta.content}
                if delta.tool_calls:
                    yield {"tool_calls": [{k: v for k, v in c.items() if k != "index"} for c in delta.tool_calls]}

    return respond


def openai_responder(client: Any, model: str) -> Responder:
    """Replies from an OpenAI-compatible server through the ``openai`` client (tool-call pieces joined)."""

    def respond(messages: list[dict], settings: ChatSettings) -> Iterator[dict]:
        kwargs: dict[str, Any] = dict(model=model, messages=messages, temperature=settings.temperature,
                                      top_p=settings.top_p, stream=settings.stream)
        if settings.max_new_tokens:
            kwargs["max_tokens"] = settings.max_new_tokens
        if settings.stop:
            kwargs["stop"] = settings.stop
        if settings.tools:
            kwargs["tools"] = settings.tools
        extra = {k: v for k, v, unset in (("top_k", settings.top_k, -1),
                                          ("repetition_penalty", settings.repetition_penalty, 1.0)) if v != unset}
        if extra:  # not OpenAI's own parameters: sent only when set (vLLM, SGLang and lmforge read them)
            kwargs["extra_body"] = extra
        response = client.chat.completions.create(**kwargs)
        if not settings.stream:
            yield from _whole(response.choices[0].message)
            return
        calls: dict[int, dict] = {}
        try:
            for delta in _deltas(response):
                if delta.content:
                    yield {"text": delta.content}
                for piece in delta.tool_calls or []:  # OpenAI streams a call's name and arguments in pieces
                    call = calls.setdefault(piece.index, {"id": None, "type": "function",
                                                          "function": {"name": "", "arguments": ""}})
                    call["id"] = piece.id or call["id"]
                    if piece.function is not None:
                        call["function"]["name"] += piece.function.name or ""
                        call["function"]["arguments"] += piece.function.arguments or ""
        finally:
            response.close()
        if calls:
            yield {"tool_calls": [calls[i] for i in sorted(calls)]}

    return respond


# ----------------------------------------------------------------------------------- the conversation


def apply_event(conv: list[dict], event: dict) -> None:
    """Fold one reply event into ``conv`` (whose last message is the assistant reply being written)."""
    reply = conv[-1]
    if "text" in event:
        reply["content"] = (reply.get("content") or "") + event["text"]
    elif "tool_calls" in event:
        reply.setdefault("tool_calls", []).extend(event["tool_calls"])
    elif "tool_result" in event:  # an agent ran a tool: its result, then a new assistant message goes on
        result = event["tool_result"]
        conv.append({"role": "tool", "tool_call_id": result.get("tool_call_id"), "name": result.get("name"),
                     "content": str(result.get("content", ""))})
        conv.append({"role": "assistant", "content": ""})


def _arguments(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(text)


def to_display(conv: list[dict], error: str | None = None) -> list[dict]:
    """The chat as the page shows it: tool calls and results as titled, collapsible messages."""
    out: list[dict] = []
    for m in conv:
        role = m.get("role")
        if role == "user":
            out.append({"role": "user", "content": m.get("content") or ""})
        elif role == "assistant":
            if m.get("content") or not m.get("tool_calls"):
                out.append({"role": "assistant", "content": m.get("content") or ""})
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                out.append({"role": "assistant", "content": f"```json\n{_arguments(fn.get('arguments', ''))}\n```",
                            "metadata": {"title": f"Tool call: {fn.get('name', '?')}"}})
        elif role == "tool":
            out.append({"role": "assistant", "content": m.get("content") or "",
                        "metadata": {"title": f"Tool result: {m.get('name') or m.get('tool_call_id') or ''}"}})
    if error:
        out.append({"role": "assistant", "content": error, "metadata": {"title": "Error"}})
    return out


def _trim_reply(conv: list[dict]) -> list[dict]:
    """``conv`` up to and including its last user message (what Regenerate answers again)."""
    for i in range(len(conv) - 1, -1, -1):
        if conv[i].get("role") == "user":
            return [dict(m) for m in conv[:i + 1]]
    return []


def run_turn(respond: Responder | None, conv: list[dict], system: str, settings: ChatSettings,
             keep_history: bool = True) -> Iterator[tuple[list[dict], list[dict]]]:
    """Answer the last user message of ``conv``: yields (display, conversation) as the reply grows."""
    conv = [dict(m) for m in conv] + [{"role": "assistant", "content": ""}]
    if respond is None:
        yield to_display(conv[:-1], "No model loaded yet."), conv[:-1]
        return
    history = conv[:-1] if keep_history else _trim_reply(conv[:-1])[-1:]
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + history
    last = 0.0
    try:
        for event in respond(messages, settings):
            apply_event(conv, event)
            if time.monotonic() - last >= _REDRAW_S:
                last = time.monotonic()
                yield to_display(conv), conv
    except Exception as e:  # noqa: BLE001 - shown in the chat; the user message stays for Regenerate
        while conv and conv[-1].get("role") == "assistant" and not conv[-1].get("content") \
                and not conv[-1].get("tool_calls"):
            conv.pop()
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        yield to_display(conv, f"{type(e).__name__}: {reason}"), conv
        return
    yield to_display(conv), conv


# ------------------------------------------------------------------------------------------ the panel


def adapter_of(choice: str | None) -> str | None:
    """The request's adapter for the dropdown's choice: "" asks for the base model explicitly."""
    return None if choice is None else "" if choice == _BASE else choice


def adapter_choices(engine: Any) -> tuple[list[str], str]:
    """(dropdown entries, the one chosen) for an engine: answer with its first adapter, as ``infer`` does."""
    names = list(getattr(engine, "adapters", {}) or {})
    return [_BASE, *names], (names[0] if names else _BASE)


def parse_tools(text: str | None) -> list[dict] | None:
    """A JSON list of OpenAI tool definitions (or None for an empty box); errors say what is wrong."""
    if not text or not text.strip():
        return None
    try:
        tools = json.loads(text)
    except ValueError as e:
        raise ValueError(f"tools: not JSON ({e})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError('tools: expected a list of objects like {"type": "function", "function": {"name": ...}}')
    return tools


def chat_panel(gr: Any, get_responder: Callable[[], Responder | None], *, prefix: str, defaults: Any,
               adapters: list[str] | None = None, default_adapter: str | None = None, tools: list | None = None,
               keep_history: bool = True, stream: bool = True) -> dict[str, Any]:
    """The chat column and its settings, inside the current layout. ``defaults`` holds the sampling
    defaults (a ``GenerationArguments``: the ``infer`` flags and their help text)."""
    from lmforge.arguments import GenerationArguments
    from lmforge.ui.forms import flags_of

    help_of = {f.name: f.help for f in flags_of(GenerationArguments)}

    def info(name: str) -> dict:
        return dict(label=name, info=help_of.get(name, ""), elem_id=f"{prefix}-{name}")

    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(elem_id=f"{prefix}-chatbot", height=460, label="Chat")
            with gr.Row():
                message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=5,
                                     elem_id=f"{prefix}-message")
                send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{prefix}-send")
            with gr.Row():
                regenerate = gr.Button("Regenerate", elem_id=f"{prefix}-regenerate")
                stop = gr.Button("Stop", elem_id=f"{prefix}-stop")
                clear = gr.Button("Clear", elem_id=f"{prefix}-clear")
        with gr.Column(scale=1):
            system = gr.Textbox(label="system prompt", lines=3, elem_id=f"{prefix}-system",
                                info="sent as the first message of every turn (empty: the template's default)")
            temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, **info("temperature"))
            top_p = gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, **info("top_p"))
            top_k = gr.Number(value=defaults.top_k, precision=0, **info("top_k"))
            max_new_tokens = gr.Number(value=defaults.max_new_tokens, precision=0, **info("max_new_tokens"))
            repetition_penalty = gr.Slider(0.5, 2.0, value=defaults.repetition_penalty, step=0.05,
                                           **info("repetition_penalty"))
            adapter = gr.Dropdown([_BASE, *(adapters or [])], value=default_adapter or _BASE, label="adapter",
                                  visible=bool(adapters), elem_id=f"{prefix}-adapter")
            tools_box = gr.Code(json.dumps(tools, indent=2) if tools else "", language="json", label="tools (JSON)",
                                elem_id=f"{prefix}-tools")
    conv = gr.State([])
    settings_inputs = [system, temperature, top_p, top_k, max_new_tokens, repetition_penalty, adapter, tools_box]
    stop_words = list(getattr(defaults, "stop", []) or [])

    def settings_of(temp, p, k, max_new, rep, adapter_name, tools_text) -> ChatSettings:
        return ChatSettings(temperature=float(temp), top_p=float(p), top_k=int(k if k is not None else -1),
                            max_new_tokens=int(max_new) if max_new else None, repetition_penalty=float(rep),
                            stop=stop_words, tools=parse_tools(tools_text),
                            adapter=adapter_of(adapter_name), stream=stream)

    def answer(conv_now: list[dict], system_text: str, *rest: Any):
        try:
            settings = settings_of(*rest)
        except ValueError as e:
            yield to_display(conv_now, str(e)), conv_now
            return
        yield from run_turn(get_responder(), conv_now, system_text or "", settings, keep_history)

    def submit(text: str, conv_now: list[dict], *rest: Any):
        if not (text or "").strip():
            yield to_display(conv_now), conv_now, text
            return
        conv_now = [*conv_now, {"role": "user", "content": text}]
        yield to_display(conv_now), conv_now, ""
        for display, new in answer(conv_now, *rest):
            yield display, new, ""

    def again(conv_now: list[dict], *rest: Any):
        trimmed = _trim_reply(conv_now)
        if not trimmed:
            yield to_display(conv_now), conv_now
            return
        yield from answer(trimmed, *rest)

    events = [
        message.submit(submit, [message, conv, *settings_inputs], [chatbot, conv, message]),
        send.click(submit, [message, conv, *settings_inputs], [chatbot, conv, message]),
        regenerate.click(again, [conv, *settings_inputs], [chatbot, conv]),
    ]
    stop.click(None, cancels=events)
    clear.click(lambda: ([], [], ""), None, [chatbot, conv, message], cancels=events)
    chatbot.clear(lambda: [], None, conv, cancels=events)  # the chat's own bin icon forgets the conversation too
    return {"chatbot": chatbot, "message": message, "conv": conv, "system": system, "temperature": temperature,
            "adapter": adapter}
