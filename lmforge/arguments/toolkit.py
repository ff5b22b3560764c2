"""Arguments of the toolkit commands: ``env``, ``presets``, ``rag index|query``, ``agent``, ``preference train``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.arguments.base import field
from lmforge.arguments.infer import InferArguments
from lmforge.arguments.rlhf import RlhfArguments


@dataclass
class EnvArguments:
    """Check that this machine can run lmforge: lmforge env [--json]."""

    json: bool = field(False, "print the report as JSON (for scripts) instead of a table")
    output_dir: str = field("output", "where training will write (its free disk space is checked)")
    model: Optional[str] = field(None, "also check a local model folder (its tokenizer files against the installed "
                                       "transformers)")
    min_free_gb: float = field(5.0, "warn when a checked folder has less free disk than this (GiB); under 1 GiB "
                                    "is an error")


@dataclass
class PresetsArguments:
    """List the training presets: lmforge presets (use one with --preset NAME on pt/sft/rlhf)."""

    json: bool = field(False, "print the presets as JSON")


@dataclass
class RagIndexArguments:
    """Index a folder of documents for retrieval: lmforge rag index --docs DIR --index DIR."""

    docs: Optional[str] = field(None, "folder of documents (.txt, .md, .rst; .pdf when pypdf is installed)")
    index: Optional[str] = field(None, "the index folder (created, or updated: only changed documents are re-embedded)")
    embedding_model: str = field("minilm", "a sentence-transformers model (folder or hub id), an embedding model "
                                           "folder, or minilm (all-MiniLM-L6-v2)")
    embedder: str = field("auto", "sentence-transformers, hf (mean-pooled transformers model), a plugin's, or auto "
                                  "(sentence-transformers when the folder has modules.json)")
    chunk_size: int = field(800, "characters per chunk (paragraphs are kept together up to this)")
    chunk_overlap: int = field(100, "characters repeated between the pieces of a paragraph longer than chunk_size")
    rebuild: bool = field(False, "re-embed every document (needed after changing the embedder or chunking)")
    external_plugins: list[str] = field(default_factory=list, help="Python files that register embedders, agents, ...")


@dataclass
class AgentModelArguments(InferArguments):
    """The model an agent answers with: a local model (--model/--ckpt_dir) or a server (--url)."""

    url: Optional[str] = field(None, "answer with an OpenAI-compatible server at this URL instead of a local model")
    url_api_key: Optional[str] = field(None, "API key of the --url server")
    served_model: Optional[str] = field(None, "model name to ask the --url server for")
    index: Optional[str] = field(None, "rag: the index folder (lmforge rag index)")
    embedding_model: Optional[str] = field(None, "rag: embedding model for queries (default: the one the index "
                                                 "was built with)")
    retrieve_k: int = field(4, "rag: passages retrieved per question")
    min_score: float = field(0.0, "rag: passages less similar than this (cosine) are not used")
    extractive: bool = field(False, "rag: answer only with a verbatim span of the retrieved passages (constrained "
                                    "decoding; a local model on the hf engine)")
    max_new_tokens: Optional[int] = field(256, "most tokens generated per reply")


@dataclass
class RagQueryArguments(AgentModelArguments):
    """Ask questions over an index: lmforge rag query --index DIR --query "..." [--model M | --url URL]."""

    query: list[str] = field(default_factory=list, help="questions (each answered on its own)")
    retrieve_only: bool = field(False, "print the retrieved passages; generate nothing (no model needed)")
    json: bool = field(False, "print one JSON object per question")


@dataclass
class AgentArguments(AgentModelArguments):
    """Serve agents over HTTP: lmforge agent --agent rag|preference|CONFIG.yaml [--model M | --url URL]."""

    agent: list[str] = field(default_factory=list, help="agents to serve: rag, preference, assistant configs "
                                                        "(a .yaml path or a shipped name such as medical-qa)")
    feedback_file: Optional[str] = field(None, "preference: the JSONL feedback is appended to")
    host: str = field("127.0.0.1", "address to listen on")
    port: int = field(8100, "port to listen on")
    api_key: Optional[str] = field(None, "require 'Authorization: Bearer KEY' on every route but /health")


@dataclass
class PreferenceArguments(RlhfArguments):
    """One round of training on recorded feedback: lmforge preference train --feedback_file F --model M."""

    rlhf_type: Literal["dpo", "kto"] = field("dpo", "dpo: choices (and up/down pairs); kto: every judgement")
    feedback_file: Optional[str] = field(None, "the feedback JSONL (lmforge agent --agent preference writes it)")
    rounds_dir: str = field("output/preference", "round-N folders and state.json (the current model) go here")
    holdout: int = field(5, "every N-th record (by id) is held out to evaluate the round (0: none)")
    min_rows: int = field(8, "refuse to train a round on fewer training rows")
    judge: Optional[str] = field(None, "a reward (REWARDS: built-in or --external_plugins) that scores sampled "
                                       "answers; rounds are then compared on its mean")
    judge_samples: int = field(4, "answers sampled per held-out conversation for --judge")
    judge_max_tokens: int = field(64, "most tokens per answer sampled for --judge")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.feedback_file:
            from lmforge.arguments.base import ArgumentError

            raise ArgumentError("--feedback_file is required (the JSONL of recorded feedback)")
