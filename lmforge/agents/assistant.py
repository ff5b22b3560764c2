"""Domain assistants as configuration: a YAML file, no code per domain.

    name: medical-qa
    description: answers health questions from a reviewed leaflet collection
    system: You are a careful assistant ...
    documents: docs/medical          # indexed on first use into index/ beside it (relative to this file)
    embedding_model: minilm
    top_k: 3
    tools: [search_documents]        # names in AGENT_TOOLS (built-ins below; plugins add more)
    policy:
      disclaimer: "This is general information, not medical advice. Please see a doctor ..."
      min_score: 0.3                 # passages below this similarity do not count as covering the question
      require_sources: true          # with no passage above min_score: say so instead of answering
      refuse:
        - topic: dosage
          patterns: ['\\bdos(e|es|age|ing)\\b', '\\bhow (much|many)\\b.*\\b(take|give)\\b']
          unless_documented: true    # answer when a retrieved passage matches and covers the question
          message: "I can't advise on doses beyond what my documents say ..."

The policy is enforced here, around the model, not asked of it: a refusal rule that matches the user's
message answers with its message and the model is not called (unless ``unless_documented`` and a passage
above ``min_score`` covers the question: see ``Policy.documents``); ``require_sources`` stops answers the documents do
not support; the ``disclaimer`` is appended to every answer that does not already end with it. Tools are
offered to the model with the request and run here when it calls them (``max_tool_turns`` rounds).
"""
from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path
from typing import Any

from lmforge.agents.base import Agent, AgentError, AgentReply, check_messages, last_user_text, shipped_configs
from lmforge.agents.rag import NOT_COVERED, cite, format_passages
from lmforge.registry import AGENTS, Registry

AGENT_TOOLS: Registry[Any] = Registry("agent tool")
_CONFIG_KEYS = {"name", "description", "system", "documents", "index", "embedding_model", "embedder", "top_k",
                "tools", "policy", "max_tokens", "temperature", "max_tool_turns"}
_POLICY_KEYS = {"disclaimer", "min_score", "require_sources", "refuse"}
_RULE_KEYS = {"topic", "patterns", "unless_documented", "message"}
_COMMON = set("about above after again against being below between could doing during every few further "
              "having other should their there these those through under until where which while would "
              "often daily safely safe usual usually normal right still really maybe always never "
              "someone something people person please thanks thank".split())


def find_config(name: str) -> Path | None:
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    return next((c for c in shipped_configs() if c.stem == name), None)


def _default_index(config: Path, docs_dir: Path) -> Path:
    """Beside the documents; for a shipped configuration (the package may be read-only) in the cache."""
    if config.resolve().parent == shipped_configs()[0].resolve().parent:
        from lmforge.dataset.encode import cache_root

        return cache_root() / "agents" / f"{config.stem}-index"
    return docs_dir.parent / f".{docs_dir.name}-index"


# ---------------------------------------------------------------------------------------------- tools

class Tool:
    """A function the model may call: ``schema`` (OpenAI function format) and ``run(agent, **arguments) -> str``."""

    schema: dict[str, Any] = {}

    def run(self, agent: "DomainAssistant", **arguments: Any) -> str:
        raise NotImplementedError


@AGENT_TOOLS.register("search_documents")
class SearchDocuments(Tool):
    schema = {"type": "function", "function": {
        "name": "search_documents", "description": "Search the assistant's documents",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}

    def run(self, agent: "DomainAssistant", query: str = "", **_: Any) -> str:
        hits = agent.retrieve(str(query))
        return format_passages(hits) if hits else "no matching passage"


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


@AGENT_TOOLS.register("calculator")
class Calculator(Tool):
    """Arithmetic on numbers only (parsed, never evaluated as Python)."""

    schema = {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}

    def run(self, agent: "DomainAssistant", expression: str = "", **_: Any) -> str:
        def ev(node: ast.AST) -> float:
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
                return node.value
            if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
                if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 100:
                    raise ValueError("exponent too large")
                return _OPS[type(node.op)](ev(node.left), ev(node.right))
            if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
                return _OPS[type(node.op)](ev(node.operand))
            raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

        try:
            return str(ev(ast.parse(str(expression)[:200], mode="eval").body))
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
            return f"error: {e}"


# ---------------------------------------------------------------------------------------------- policy

class Policy:
    def __init__(self, spec: dict[str, Any] | None, source: str):
        spec = dict(spec or {})
        unknown = set(spec) - _POLICY_KEYS
        if unknown:
            raise AgentError(f"{source}: policy: unknown key(s) {sorted(unknown)}; known: {sorted(_POLICY_KEYS)}")
        self.disclaimer = str(spec.get("disclaimer") or "").strip()
        self.min_score = float(spec.get("min_score", 0.0))
        self.require_sources = bool(spec.get("require_sources", False))
        self.rules = []
        for i, rule in enumerate(spec.get("refuse") or []):
            where = f"{source}: policy.refuse[{i}]"
            if not isinstance(rule, dict) or set(rule) - _RULE_KEYS or not rule.get("patterns") or not rule.get("message"):
                raise AgentError(f"{where}: expected {{topic, patterns: [regex, ...], message, unless_documented}}")
            try:
                patterns = [re.compile(p, re.IGNORECASE) for p in rule["patterns"]]
            except re.error as e:
                raise AgentError(f"{where}: bad pattern: {e}") from None
            self.rules.append({"topic": rule.get("topic", f"rule {i}"), "patterns": patterns,
                               "unless_documented": bool(rule.get("unless_documented", False)),
                               "message": str(rule["message"]).strip()})

    @staticmethod
    def matches(rule: dict[str, Any], text: str) -> bool:
        return any(p.search(text) for p in rule["patterns"])

    def refusal(self, question: str, hits: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The first rule that refuses ``question`` given the passages retrieved for it, else None."""
        for rule in self.rules:
            if not self.matches(rule, question):
                continue
            if rule["unless_documented"] and any(self.documents(rule, question, h["text"]) for h in hits):
                continue
            return rule
        return None

    def documents(self, rule: dict[str, Any], question: str, passage: str) -> bool:
        """Whether ``passage`` covers ``question`` for ``rule``: it matches one of the rule's patterns and holds
        every content word of the question (5+ letters, not a common word, not a word the rule matches) -- so
        a leaflet's doses of one medicine never answer a question about another."""
        if not self.matches(rule, passage):
            return False
        words = {w for w in re.findall(r"[a-z][a-z'-]{4,}", question.lower())
                 if w not in _COMMON and not self.matches(rule, w)}
        text = passage.lower()
        return all(re.search(rf"\b{re.escape(w.rstrip('s'))}", text) for w in words)

    def finish(self, content: str) -> str:
        if self.disclaimer and not content.rstrip().endswith(self.disclaimer):
            content = f"{content.rstrip()}\n\n{self.disclaimer}"
        return content


# --------------------------------------------------------------------------------------------- the agent

@AGENTS.register("assistant")
class DomainAssistant(Agent):
    name = "assistant"
    description = "a domain assistant described by a YAML file (system prompt, documents, tools, policy)"

    def __init__(self, generator: Any, *, system: str = "", index: Any = None, top_k: int = 3, tools: Any = (),
                 policy: dict[str, Any] | None = None, max_tool_turns: int = 3, source: str = "assistant",
                 **settings: Any):
        super().__init__(generator, **settings)
        self.system, self.index, self.top_k, self.max_tool_turns = system, index, int(top_k), int(max_tool_turns)
        self.policy = Policy(policy, source)
        self.tools = {}
        for name in tools or ():
            if name not in AGENT_TOOLS:
                raise AgentError(f"{source}: tools: {AGENT_TOOLS.unknown_message(name)}")
            self.tools[name] = AGENT_TOOLS.get(name)()
        if "search_documents" in self.tools and index is None:
            raise AgentError(f"{source}: tool search_documents needs documents (the 'documents' key)")

    @classmethod
    def from_config(cls, path: str | Path, generator: Any, **overrides: Any) -> "DomainAssistant":
        import yaml

        path = Path(path)
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise AgentError(f"{path}: cannot read it: {e}") from None
        if not isinstance(spec, dict):
            raise AgentError(f"{path}: expected a mapping of {sorted(_CONFIG_KEYS)}")
        unknown = set(spec) - _CONFIG_KEYS
        if unknown:
            raise AgentError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(_CONFIG_KEYS)}")
        spec.update({k: v for k, v in overrides.items() if v is not None})
        index = spec.pop("index", None)
        docs = spec.pop("documents", None)
        emb_model, emb_kind = spec.pop("embedding_model", None) or "minilm", spec.pop("embedder", None) or "auto"
        if docs is not None and not hasattr(index, "search"):
            from lmforge.agents.embedders import load_embedder
            from lmforge.agents.index import VectorIndex, build_index

            docs_dir = (path.parent / docs).resolve()
            folder = (path.parent / index).resolve() if index else _default_index(path, docs_dir)
            embedder = load_embedder(emb_model, emb_kind)
            build_index(docs_dir, folder, embedder)  # incremental: unchanged documents are not re-embedded
            index = VectorIndex(folder, embedder)
        agent = cls(generator, index=index, source=str(path), **{k: v for k, v in spec.items()
                                                                  if k not in ("name", "description")})
        agent.name = str(spec.get("name") or path.stem)
        agent.description = str(spec.get("description") or "")
        return agent

    def retrieve(self, query: str) -> list[dict[str, Any]]:
        if self.index is None:
            return []
        return [h for h in self.index.search(query, self.top_k) if h["score"] >= self.policy.min_score]

    def chat(self, messages: list[dict[str, Any]]) -> AgentReply:
        messages = check_messages(messages)
        question = last_user_text(messages)
        hits = self.retrieve(question)
        rule = self.policy.refusal(question, hits)
        if rule is not None:
            return AgentReply(self.policy.finish(rule["message"]), refused=True, meta={"rule": rule["topic"]})
        if self.policy.require_sources and self.index is not None and not hits:
            return AgentReply(self.policy.finish(NOT_COVERED), refused=True, meta={"rule": "require_sources"})
        system = self.system + (f"\n\nUse these passages and cite them as [n]:\n\n{format_passages(hits)}" if hits else "")
        convo = [{"role": "system", "content": system.strip()}, *[m for m in messages if m["role"] != "system"]]
        answer, calls = self._answer(convo)
        sources = [{"n": i, "source": h["source"], "score": h["score"], "text": h["text"]} for i, h in enumerate(hits, 1)]
        return AgentReply(self.policy.finish(cite(answer, hits)), sources, meta={"tool_calls": calls})

    def _answer(self, convo: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        """Generate; run the tools the model calls (offered only when configured), up to ``max_tool_turns``."""
        if not self.tools:
            return self._generate(convo)[0], []
        if self.generator is None:
            raise AgentError(f"agent {self.name}: no model to answer with (pass --model or --url)")
        calls: list[dict[str, Any]] = []
        schemas = [t.schema for t in self.tools.values()]
        while True:
            content, wanted = self.generator.respond(convo, schemas, temperature=self.temperature,
                                                     max_tokens=self.max_tokens)
            if not wanted or len(calls) >= self.max_tool_turns:
                return content, calls
            for call in wanted:
                result = self.run_tool(call["name"], call["arguments"])
                calls.append({**call, "result": result})
                convo = [*convo, {"role": "tool_call", "content": json.dumps(call)},
                         {"role": "tool_response", "content": result}]

    def run_tool(self, name: str, arguments: str | dict) -> str:
        """Run a configured tool on JSON arguments; errors come back as text for the model to read."""
        tool = self.tools.get(name)
        if tool is None:
            return f"error: no tool {name!r} (available: {', '.join(self.tools)})"
        try:
            args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments or {})
        except json.JSONDecodeError as e:
            return f"error: arguments are not JSON ({e.msg})"
        if not isinstance(args, dict):
            return "error: arguments must be a JSON object"
        return tool.run(self, **args)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "tools": list(self.tools), "documents": len(self.index) if self.index else 0,
                "disclaimer": self.policy.disclaimer, "refuses": [r["topic"] for r in self.policy.rules]}
