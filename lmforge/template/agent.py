"""Agent templates: how one model family writes tools, tool calls and tool results as text.

One canonical agent row (``tools``, ``tool_call`` and ``tool_response`` messages) trains any model:
an agent template turns it into the plain text that model expects, and reads tool calls back out
of what the model generates. Four duties:

- ``format_tools(tools, system)``: the system prompt that shows the tools;
- ``format_tool_calls(calls, content)``: the assistant's text for one turn of calls;
- ``format_tool_responses(responses)``: the text of the tool results that answer them
  (sent in the role ``response_role``, "user" unless a template says otherwise);
- ``get_toolcall(text)``: the calls in generated text, as :class:`~lmforge.infer.protocol.Function`
  (``parse_tool_calls`` also returns the text left once the calls are removed).

Parsing never raises: text that is not a well-formed call stays in the content.

How a Template uses one (see ``Template._agent_turns``): with ``--agent_template NAME``, or when the
chat template does not render tools itself, the agent template rewrites the conversation into plain
system/user/assistant messages that the chat template then renders. When the chat template renders
tools natively (Qwen's ``<tool_call>`` style, say) that rendering is kept, and the matching agent
template is picked for parsing only (``detect_agent_template``).

Registered in ``AGENT_TEMPLATES``: ``hermes`` (also ``qwen``), ``react_en`` (also ``react``),
``llama3`` (also ``llama3_json``), ``glm4``, ``mistral``. Add your own with
``AGENT_TEMPLATES.register("name", MyAgentTemplate)`` in an ``--external_plugins`` file.
"""
from __future__ import annotations

import json
import re
from typing import Any

from lmforge.registry import AGENT_TEMPLATES

__all__ = ["AgentTemplate", "HermesAgentTemplate", "ReactAgentTemplate", "Llama3AgentTemplate",
           "Glm4AgentTemplate", "MistralAgentTemplate", "get_agent_template", "detect_agent_template"]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _args_text(arguments: Any) -> str:
    """Arguments as JSON text (a string that is not JSON is kept as it is)."""
    return arguments if isinstance(arguments, str) else _dumps(arguments)


def _args_obj(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _function(tool: dict) -> dict:
    """An OpenAI tool schema ``{"type": "function", "function": {...}}`` (or the bare function) -> the function."""
    return tool.get("function", tool) if isinstance(tool.get("function"), dict) else tool


def _as_call(call: dict) -> dict:
    """``{"name", "arguments"}`` of a canonical or OpenAI tool call."""
    f = call.get("function", call) if isinstance(call.get("function"), dict) else call
    return {"name": f.get("name"), "arguments": f.get("arguments", f.get("parameters", {}))}


def _valid_call(obj: Any, *arg_keys: str) -> dict | None:
    """``{"name", "arguments"}`` from a parsed JSON object, or None when it is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in arg_keys if k in obj), {})
    if isinstance(args, str):  # arguments given as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": args}


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class AgentTemplate:
    """Base class; subclasses set ``name`` and write the four duties. See the module docstring."""

    name: str = "agent"
    #: role of the message that carries tool results when the conversation is rendered as plain messages
    response_role: str = "user"
    #: text that starts a tool call in generated output; streaming holds text back from there on
    call_markers: tuple[str, ...] = ()

    # ---- the four duties ------------------------------------------------------------------------

    def format_tools(self, tools: list[dict], system: str | None = None) -> str:
        raise NotImplementedError

    def format_tool_calls(self, calls: list[dict], content: str | None = None) -> str:
        raise NotImplementedError

    def format_tool_responses(self, responses: list[str]) -> str:
        raise NotImplementedError

    def parse_tool_calls(self, text: str) -> tuple[str, list[dict]]:
        """``(content, [{"name", "arguments": dict}, ...])``; content is ``text`` when there are no calls."""
        raise NotImplementedError

    def get_toolcall(self, text: str) -> list[Any]:
        """The tool calls in generated ``text`` as OpenAI ``Function`` objects (arguments as JSON text)."""
        from lmforge.infer.protocol import Function

        return [Function(name=c["name"], arguments=_args_text(c["arguments"])) for c in self.parse_tool_calls(text)[1]]

    # ---- helpers --------------------------------------------------------------------------------

    def stream_hold(self, text: str) -> int:
        """Where ``text`` (a reply being generated) may start a tool call: stream only ``text[:index]``."""
        hold = len(text)
        for m in self.call_markers:
            k = text.find(m)
            hold = min(hold, k if k >= 0 else len(text) - _partial_marker_len(text, m))
        return hold

    @staticmethod
    def tool_functions(tools: list[dict]) -> list[dict]:
        return [_function(t) for t in tools]

    @classmethod
    def detect(cls, rendered_call: str) -> bool:
        """Whether a chat template's native rendering of a tool call looks like this template's style."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class HermesAgentTemplate(AgentTemplate):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as Qwen2.5, Qwen3 and Hermes write them."""

    name = "hermes"
    call_markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def format_tools(self, tools: list[dict], system: str | None = None) -> str:
        head = f"{system}\n\n" if system else ""
        lines = "\n".join(_dumps(f) for f in self.tool_functions(tools))
        return (f"{head}# Tools\n<tools>\n{lines}\n</tools>\nTo call a tool, write <tool_call>\n"
                '{"name": <name>, "arguments": <JSON object>}\n</tool_call>')

    def format_tool_calls(self, calls: list[dict], content: str | None = None) -> str:
        parts = [content] if content else []
        for c in map(_as_call, calls):
            parts.append(f'<tool_call>\n{{"name": {_dumps(c["name"])}, "arguments": {_args_text(c["arguments"])}}}'
                         "\n</tool_call>")
        return "\n".join(parts)

    def format_tool_responses(self, responses: list[str]) -> str:
        return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in responses)

    def parse_tool_calls(self, text: str) -> tuple[str, list[dict]]:
        calls, kept, pos = [], [], 0
        for m in self._CALL.finditer(text):
            try:
                call = _valid_call(json.loads(m.group(1)), "arguments", "parameters")
            except json.JSONDecodeError:
                call = None
            if call is None:
                continue  # malformed: left in the content
            calls.append(call)
            kept.append(text[pos:m.start()])
            pos = m.end()
        if not calls:
            return text, []
        kept.append(text[pos:])
        return "".join(kept).strip(), calls

    @classmethod
    def detect(cls, rendered_call: str) -> bool:
        return "<tool_call>" in rendered_call


class ReactAgentTemplate(AgentTemplate):
    """ReAct: ``Thought: ...`` / ``Action: name`` / ``Action Input: {...}``, results as ``Observation: ...``."""

    name = "react_en"
    call_markers = ("Action:",)
    _CALL = re.compile(r"Action:[ \t]*(.*?)[ \t]*\nAction Input:[ \t]*(.*?)\s*(?=\nObservation:|\nAction:|"
                       r"\nThought:|\nFinal Answer:|$)", re.DOTALL)

    def format_tools(self, tools: list[dict], system: str | None = None) -> str:
        fns = self.tool_functions(tools)
        lines = "\n\n".join(f"{f.get('name')}: {f.get('description', '')} Parameters: "
                            f"{_dumps(f.get('parameters', {}))}" for f in fns)
        names = ", ".join(str(f.get("name")) for f in fns)
        head = f"{system}\n\n" if system else ""
        return (f"{head}Answer the question as well as you can. These tools are available:\n\n{lines}\n\n"
                "Work in this format:\n\nThought: what to do next\nAction: the tool to use, one of "
                f"[{names}]\nAction Input: the tool's arguments as a JSON object\nObservation: the tool's "
                "result\n... (Thought/Action/Action Input/Observation may repeat)\nThought: I can answer now\n"
                "Final Answer: the answer to the question")

    def format_tool_calls(self, calls: list[dict], content: str | None = None) -> str:
        parts = [content.rstrip()] if content else []
        for c in map(_as_call, calls):
            parts.append(f"Action: {c['name']}\nAction Input: {_args_text(c['arguments'])}")
        return "\n".join(parts)

    def format_tool_responses(self, responses: list[str]) -> str:
        return "\n".join(f"Observation: {r}" for r in responses)

    def parse_tool_calls(self, text: str) -> tuple[str, list[dict]]:
        calls, first = [], None
        for m in self._CALL.finditer(text):
            name, raw = m.group(1).strip(), m.group(2).strip()
            try:
                args = json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                return text, []  # a malformed call: the whole reply is content
            call = _valid_call({"name": name, "arguments": args}, "arguments")
            if call is None:
                return text, []
            calls.append(call)
            first = m.start() if first is None else first
        if not calls:
            return text, []
        return text[:first].strip(), calls

    @classmethod
    def detect(cls, rendered_call: str) -> bool:
        return "Action Input:" in rendered_call


class Llama3AgentTemplate(AgentTemplate):
    """Llama 3.1/3.2 JSON tool calls: the reply is ``{"name": ..., "parameters": {...}}`` (one per line)."""

    name = "llama3"
    _PYTHON_TAG = "<|python_tag|>"

    def format_tools(self, tools: list[dict], system: str | None = None) -> str:
        head = f"{system}\n\n" if system else ""
        lines = "\n\n".join(_dumps(t) for t in tools)
        return (f"{head}You have these functions available. To call one, reply with only a JSON object "
                '{"name": function name, "parameters": object of argument names and values}, one object '
                f"per line for several calls; otherwise answer normally.\n\n{lines}")

    def format_tool_calls(self, calls: list[dict], content: str | None = None) -> str:
        parts = [content] if content else []
        parts += [f'{{"name": {_dumps(c["name"])}, "parameters": {_args_text(c["arguments"])}}}'
                  for c in map(_as_call, calls)]
        return "\n".join(parts)

    def format_tool_responses(self, responses: list[str]) -> str:
        return "\n".join(responses)

    def parse_tool_calls(self, text: str) -> tuple[str, list[dict]]:
        body = text.strip()
        if body.startswith(self._PYTHON_TAG):
            body = body[len(self._PYTHON_TAG):].strip()
        if not body.startswith(("{", "[")):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        try:
            while pos < len(body):
                obj, end = decoder.raw_decode(body, pos)
                for o in obj if isinstance(obj, list) else [obj]:
                    call = _valid_call(o, "parameters", "arguments")
                    if call is None:
                        return text, []
                    calls.append(call)
                pos = end
                while pos < len(body) and body[pos] in " \t\r\n;,":
                    pos += 1
        except json.JSONDecodeError:
            return text, []
        return "", calls

    def stream_hold(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith(("{", "[", self._PYTHON_TAG)) or self._PYTHON_TAG.startswith(body):
            return 0  # may be a call: hold it all
        return len(text)

    @classmethod
    def detect(cls, rendered_call: str) -> bool:
        return '"parameters"' in rendered_call or cls._PYTHON_TAG in rendered_call


class Glm4AgentTemplate(AgentTemplate):
    """GLM-4: a call is the tool's name on a line of its own, then its arguments as JSON."""

    name = "glm4"
    _NAME = re.compile(r"[A-Za-z_][\w.\-]*")

    def format_tools(self, tools: list[dict], system: str | None = None) -> str:
        head = f"{system}\n\n" if system else ""
        blocks = "\n\n".join(f"## {f.get('name')}\n\n{_dumps(f)}\nCall it by writing its name on one line and "
                             "its arguments as JSON on the next." for f in self.tool_functions(tools))
        return f"{head}# Available tools\n\n{blocks}"

    def format_tool_calls(self, calls: list[dict], content: str | None = None) -> str:
        parts = [content] if content else []
        parts += [f"{c['name']}\n{_args_text(c['arguments'])}" for c in map(_as_call, calls)]
        return "\n".join(parts)

    def format_tool_responses(self, responses: list[str]) -> str:
        return "\n".join(responses)

    def parse_tool_calls(self, text: str) -> tuple[str, list[dict]]:
        body, decoder, calls, pos = text.strip(), json.JSONDecoder(), [], 0
        while pos < len(body):
            m = self._NAME.match(body, pos)
            nl = body.find("\n", pos)
            if m is None or nl < 0 or body[m.end():nl].strip():
                return text, []
            try:
                args, end = decoder.raw_decode(body, nl + 1)
            except json.JSONDecodeError:
                return text, []
            call = _valid_call({"name": m.group(0), "arguments": args}, "arguments")
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos].isspace():
                pos += 1
        return ("", calls) if calls else (text, [])

    def stream_hold(self, text: str) -> int:
        body = text.lstrip()
        first, nl, rest = body.partition("\n")
        if self._NAME.fullmatch(first.strip() or "x") and (not nl or not rest.strip() or rest.lstrip()[0] == "{"):
            return 0
        return len(text)


class MistralAgentTemplate(AgentTemplate):
    """Mistral: ``[AVAILABLE_TOOLS][...]`` in the prompt and ``[TOOL_CALLS][{...}, ...]`` in the reply."""

    name = "mistral"
    call_markers = ("[TOOL_CALLS]",)

    def format_tools(self, tools: list[dict], system: str | None = None) -> str:
        head = f"{system}\n\n" if system else ""
        return f"{head}[AVAILABLE_TOOLS]{_dumps(tools)}[/AVAILABLE_TOOLS]"

    def format_tool_calls(self, calls: list[dict], content: str | None = None) -> str:
        body = [{"name": c["name"], "arguments": _args_obj(c["arguments"])} for c in map(_as_call, calls)]
        return (f"{content}\n" if content else "") + "[TOOL_CALLS]" + _dumps(body)

    def format_tool_responses(self, responses: list[str]) -> str:
        return "\n".join(f"[TOOL_RESULTS]{_dumps({'content': r})}[/TOOL_RESULTS]" for r in responses)

    def parse_tool_calls(self, text: str) -> tuple[str, list[dict]]:
        k = text.find("[TOOL_CALLS]")
        if k < 0:
            return text, []
        body = text[k + len("[TOOL_CALLS]"):].strip()
        try:
            obj, _ = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            return text, []
        calls = [_valid_call(o, "arguments", "parameters") for o in (obj if isinstance(obj, list) else [obj])]
        if not calls or any(c is None for c in calls):
            return text, []
        return text[:k].strip(), calls

    @classmethod
    def detect(cls, rendered_call: str) -> bool:
        return "[TOOL_CALLS]" in rendered_call


for _cls, _aliases in ((HermesAgentTemplate, ("qwen",)), (ReactAgentTemplate, ("react",)),
                       (Llama3AgentTemplate, ("llama3_json",)), (Glm4AgentTemplate, ()), (MistralAgentTemplate, ())):
    for _name in (_cls.name, *_aliases):
        AGENT_TEMPLATES.register(_name, _cls)


def get_agent_template(name: str | AgentTemplate) -> AgentTemplate:
    """A registered agent template by name (a class or factory is instantiated), or one passed in."""
    if isinstance(name, AgentTemplate):
        return name
    if name not in AGENT_TEMPLATES:
        raise ValueError(AGENT_TEMPLATES.unknown_message(name))
    obj = AGENT_TEMPLATES.get(name)
    return obj() if callable(obj) and not isinstance(obj, AgentTemplate) else obj


_PROBE_TOOL = {"type": "function", "function": {"name": "lmforge_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def detect_agent_template(render: Any) -> tuple[bool, str | None]:
    """Does a chat template render tools itself, and in which registered style?

    ``render(messages, tools)`` renders with the chat template. Returns ``(native, name)``: native is
    true when the tools show up in the rendering; name is the agent template whose ``detect``
    recognises how it renders a tool call (None if none does).
    """
    user = [{"role": "user", "content": "Q"}]
    try:
        with_tools = render(user, [_PROBE_TOOL])
    except Exception:  # noqa: BLE001 - a template that cannot take tools
        return False, None
    if "lmforge_probe_tool" not in with_tools:
        return False, None
    call = {"type": "function", "id": "call_0", "function": {"name": "lmforge_probe_tool", "arguments": {"x": 1}}}
    try:
        text = render(user + [{"role": "assistant", "content": "", "tool_calls": [call]}], [_PROBE_TOOL])
    except Exception:  # noqa: BLE001
        return True, None
    text = text[len(with_tools):] if text.startswith(with_tools) else text
    for name in ("hermes", "mistral", "llama3", "react_en"):
        if AGENT_TEMPLATES.get(name).detect(text):
            return True, name
    return True, None
