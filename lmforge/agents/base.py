"""The agent interface: an :class:`Agent` answers a conversation through a :class:`Generator` (a local engine or
an OpenAI-compatible server) and returns an :class:`AgentReply` (text, cited sources, whether it refused).

Agents are registered in ``AGENTS`` (``lmforge/registry.py``) by name; a plugin file given with
``--external_plugins`` registers more. ``build_agent(name, generator, **settings)`` makes one; a path to a
YAML file builds a domain assistant from that configuration (``lmforge.agents.assistant``). The web page
(``lmforge app --agent NAME``) and the HTTP endpoints of ``lmforge.agents.http`` call only this API.
"""
from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MAX_MESSAGES = 200
MAX_CONTENT_CHARS = 32_000


class AgentError(ValueError):
    """A request or configuration an agent cannot use; the message names the field."""


@dataclasses.dataclass
class AgentReply:
    content: str
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"n", "source", "score", "text"}
    refused: bool = False
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_messages(messages: Any, *, last_user: bool = True) -> list[dict[str, str]]:
    """Canonical ``[{"role", "content"}]`` from a request, or an :class:`AgentError` naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise AgentError("messages: expected a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise AgentError(f"messages: {len(messages)} messages; at most {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise AgentError(f"messages[{i}]: expected role system, user or assistant")
        content = m.get("content")
        if not isinstance(content, str):
            raise AgentError(f"messages[{i}].content: expected a string")
        if len(content) > MAX_CONTENT_CHARS:
            raise AgentError(f"messages[{i}].content: {len(content)} characters; at most {MAX_CONTENT_CHARS}")
        out.append({"role": m["role"], "content": content})
    if last_user and out[-1]["role"] != "user":
        raise AgentError(f"messages[{len(out) - 1}]: the last message must be the user's")
    return out


def last_user_text(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


# ------------------------------------------------------------------------------------------ generators

class Generator:
    """Replies to a conversation: ``generate(messages, n=..., temperature=..., max_tokens=..., seed=...)``."""

    name = "generator"

    def generate(self, messages: list[dict[str, Any]], *, n: int = 1, temperature: float = 0.0,
                 max_tokens: int = 256, seed: int | None = None) -> list[str]:
        raise NotImplementedError

    def respond(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, temperature: float = 0.0,
                max_tokens: int = 256) -> tuple[str, list[dict[str, str]]]:
        """One reply to a conversation offered ``tools``: its text and the tool calls (``{"name", "arguments"}``,
        arguments as JSON text) the model made."""
        raise NotImplementedError

    def extract(self, messages: list[dict[str, Any]], passages: list[str], *, temperature: float = 0.0,
                max_tokens: int = 256) -> str:
        """A reply that copies a span of ``passages`` (``lmforge.agents.extractive``): needs the model's logits."""
        raise AgentError(f"--extractive needs a local model answering through the hf engine; {self.name} cannot "
                         "(a server returns text, not next-token scores)")


class EngineGenerator(Generator):
    """A local lmforge engine (``lmforge.infer``: hf, native, vllm)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.name = getattr(engine, "model_name", "engine")

    def generate(self, messages: list[dict[str, Any]], *, n: int = 1, temperature: float = 0.0,
                 max_tokens: int = 256, seed: int | None = None) -> list[str]:
        from lmforge.infer import InferRequest, RequestConfig

        cfg = RequestConfig(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
        [resp] = self.engine.infer([InferRequest(messages=messages)], cfg, use_tqdm=False)
        return [c.message.content or "" for c in resp.choices]

    def respond(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, temperature: float = 0.0,
                max_tokens: int = 256) -> tuple[str, list[dict[str, str]]]:
        from lmforge.infer import InferRequest, RequestConfig

        cfg = RequestConfig(temperature=temperature, max_tokens=max_tokens)
        [resp] = self.engine.infer([InferRequest(messages=messages, tools=tools or None)], cfg, use_tqdm=False)
        msg = resp.choices[0].message
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
        return msg.content or "", calls

    def extract(self, messages: list[dict[str, Any]], passages: list[str], *, temperature: float = 0.0,
                max_tokens: int = 256) -> str:
        from lmforge.agents.extractive import extractive_reply
        from lmforge.infer.hf import HfEngine

        if not isinstance(self.engine, HfEngine):
            raise AgentError(f"--extractive decodes with transformers' generate: use --infer_backend hf (the engine "
                             f"here is {type(self.engine).__name__})")
        return extractive_reply(self.engine, messages, passages, max_tokens=max_tokens, temperature=temperature)


class ServerGenerator(Generator):
    """An OpenAI-compatible server (``lmforge deploy``, vLLM, ...): ``POST {url}/v1/chat/completions``."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None, timeout: float = 300.0):
        from lmforge.utils.log import mask_secret

        base = url.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise AgentError(f"--url {url!r}: expected http://host:port")
        self.base = base[:-3] if base.endswith("/v1") else base
        self.api_key, self.model, self.timeout = api_key, model, timeout
        mask_secret(api_key)
        self.name = model or self.base

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base + path, data=json.dumps(payload).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            body = e.read()[:300].decode(errors="replace")
            raise ConnectionError(f"{self.base}{path}: HTTP {e.code}: {body}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"{self.base}{path}: {getattr(e, 'reason', e)}") from None

    def generate(self, messages: list[dict[str, Any]], *, n: int = 1, temperature: float = 0.0,
                 max_tokens: int = 256, seed: int | None = None) -> list[str]:
        payload: dict[str, Any] = {"model": self.model or "default", "messages": messages, "n": n,
                                   "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            payload["seed"] = seed
        out = self._post("/v1/chat/completions", payload)
        return [c["message"].get("content") or "" for c in out.get("choices", [])]

    def respond(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, temperature: float = 0.0,
                max_tokens: int = 256) -> tuple[str, list[dict[str, str]]]:
        payload = {"model": self.model or "default", "messages": messages, "temperature": temperature,
                   "max_tokens": max_tokens, **({"tools": tools} if tools else {})}
        msg = (self._post("/v1/chat/completions", payload).get("choices") or [{}])[0].get("message") or {}
        calls = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}
                 for c in msg.get("tool_calls") or []]
        return msg.get("content") or "", calls


# ---------------------------------------------------------------------------------------------- agents

class Agent:
    """Answers conversations. Subclasses set ``name``/``description`` and implement :meth:`chat`; ``settings``
    (from flags or a config file) are their keyword arguments."""

    name = "agent"
    description = ""

    def __init__(self, generator: Generator | None, **settings: Any):
        self.generator = generator
        self.max_tokens = int(settings.pop("max_tokens", 256))
        self.temperature = float(settings.pop("temperature", 0.0))
        if settings:
            raise AgentError(f"agent {self.name}: unknown setting(s) {sorted(settings)}")

    def chat(self, messages: list[dict[str, Any]]) -> AgentReply:
        messages = check_messages(messages)
        return AgentReply(self._generate(messages)[0])

    def _generate(self, messages: list[dict[str, Any]], **kw: Any) -> list[str]:
        if self.generator is None:
            raise AgentError(f"agent {self.name}: no model to answer with (pass --model or --url)")
        kw.setdefault("temperature", self.temperature)
        kw.setdefault("max_tokens", self.max_tokens)
        return self.generator.generate(messages, **kw)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "generator": getattr(self.generator, "name", None)}


def build_agent(name: str, generator: Generator | None = None, **settings: Any) -> Agent:
    """The registered agent ``name``, or a domain assistant from a YAML configuration (a path, or the name of a
    shipped one such as ``medical-qa``)."""
    from lmforge.registry import AGENTS

    if name in AGENTS:
        return AGENTS.get(name)(generator, **settings)
    from lmforge.agents.assistant import DomainAssistant, find_config

    path = find_config(name)
    if path is None:
        raise AgentError(f"--agent: {AGENTS.unknown_message(name)}; or a domain assistant's .yaml file "
                         f"(shipped: {', '.join(p.stem for p in shipped_configs())})")
    return DomainAssistant.from_config(path, generator, **settings)


def shipped_configs() -> list[Path]:
    return sorted((Path(__file__).parent / "configs").glob("*.yaml"))
