"""``rag``: answers from a folder of documents, citing them.

The user's last message is the query; the ``top_k`` nearest chunks of the index (``lmforge rag index``) go
into the prompt as numbered passages, and the model is asked to answer from them only and cite ``[n]``.
The citations do not depend on the model obeying: the reply always ends with the list of the passages it
was given (``Sources: [1] file.md ...``), and ``AgentReply.sources`` carries each one's file, span and
similarity, so a page or a script can show where an answer came from. Passages under ``min_score`` are
left out; with none left the agent says the documents do not cover the question instead of guessing.
"""
from __future__ import annotations

from typing import Any

from lmforge.agents.base import Agent, AgentError, AgentReply, check_messages, last_user_text
from lmforge.registry import AGENTS

DEFAULT_SYSTEM = ("Answer the question using only the numbered passages below, and cite the passages you used as "
                  "[1], [2]. If they do not contain the answer, say that the documents do not say.")
NOT_COVERED = "The documents I have do not cover this question."


def format_passages(hits: list[dict[str, Any]]) -> str:
    return "\n\n".join(f"[{i}] ({h['source']}) {h['text']}" for i, h in enumerate(hits, 1))


def system_prompt(system: str, hits: list[dict[str, Any]]) -> str:
    """The system message the model answers under: the instructions, then the numbered passages."""
    return f"{system}\n\n{format_passages(hits)}"


def cite(content: str, hits: list[dict[str, Any]]) -> str:
    if not hits:
        return content
    listed = "; ".join(f"[{i}] {h['source']}" for i, h in enumerate(hits, 1))
    return f"{content.rstrip()}\n\nSources: {listed}"


@AGENTS.register("rag")
class RagAgent(Agent):
    name = "rag"
    description = "answers from a folder of documents (lmforge rag index), citing the passages it used"

    def __init__(self, generator: Any, *, index: Any = None, top_k: int = 4, min_score: float = 0.0,
                 system: str | None = None, embedding_model: str | None = None, embedder: str = "auto",
                 extractive: bool = False, **settings: Any):
        super().__init__(generator, **settings)
        if index is None:
            raise AgentError("agent rag: pass --index (a folder made by lmforge rag index)")
        if isinstance(index, (str, bytes)) or hasattr(index, "__fspath__"):
            index = open_index(index, embedding_model, embedder)
        self.index, self.top_k, self.min_score = index, int(top_k), float(min_score)
        self.system = system or DEFAULT_SYSTEM
        self.extractive = bool(extractive)

    def retrieve(self, query: str) -> list[dict[str, Any]]:
        return [h for h in self.index.search(query, self.top_k) if h["score"] >= self.min_score]

    def prompt(self, messages: list[dict[str, str]], hits: list[dict[str, Any]]) -> list[dict[str, str]]:
        """The conversation the model sees: the system prompt with the passages, then the user's turns."""
        return [{"role": "system", "content": system_prompt(self.system, hits)},
                *[m for m in messages if m["role"] != "system"]]

    def chat(self, messages: list[dict[str, Any]]) -> AgentReply:
        messages = check_messages(messages)
        hits = self.retrieve(last_user_text(messages))
        if not hits:
            return AgentReply(NOT_COVERED, [], refused=True, meta={"reason": "no passage above min_score"})
        prompt = self.prompt(messages, hits)
        if self.extractive:
            if self.generator is None:
                raise AgentError(f"agent {self.name}: no model to answer with (pass --model or --url)")
            answer = self.generator.extract(prompt, [h["text"] for h in hits], temperature=self.temperature,
                                            max_tokens=self.max_tokens)
        else:
            answer = self._generate(prompt)[0]
        sources = [{"n": i, "source": h["source"], "title": h.get("title"), "score": h["score"],
                    "start": h["start"], "end": h["end"], "text": h["text"]} for i, h in enumerate(hits, 1)]
        return AgentReply(cite(answer, hits), sources)


def open_index(folder: Any, embedding_model: str | None = None, embedder: str = "auto") -> Any:
    """The index at ``folder`` with the embedder it was built with (``embedding_model`` overrides the model)."""
    import json
    from pathlib import Path

    from lmforge.agents.embedders import load_embedder
    from lmforge.agents.index import IndexFolderError, VectorIndex

    meta_path = Path(folder) / "index.json"
    if not meta_path.is_file():
        raise IndexFolderError(f"--index {folder}: no index there (build one with lmforge rag index --docs DIR "
                               f"--index {folder})")
    kind, _, rest = json.loads(meta_path.read_text(encoding="utf-8"))["embedder"].partition(":")
    model = embedding_model or rest.rsplit(":", 2 if kind == "hf" else 1)[0]
    return VectorIndex(folder, load_embedder(model, kind if embedder == "auto" else embedder))
