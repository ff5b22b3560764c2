"""Token ids of the task types' inputs: the one place that decides how a query, a document, a
query/document pair or a text to classify becomes tokens, for training and serving alike.

- Embedding: ``prompt + text`` tokenized with the tokenizer's own special tokens and nothing
  else, as sentence-transformers does (so an exported model embeds the same ids); queries get
  ``--query_prompt``, documents ``--document_prompt``.
- Generative rerankers: the prompt Qwen3-Reranker uses, through the chat template: a system line
  asking for "yes" or "no", then ``<Instruct>``, ``<Query>`` and ``<Document>`` lines as the user
  turn, and the generation prompt, after which the model answers.
- Cross-encoder rerankers (a classifier head scores the pair): on a decoder model the text
  ``<Query>: ...\n<Document>: ...`` with the tokenizer's special tokens (the head reads no
  instruction, so the prompt's tokens would be spent for nothing); encoders take the tokenizer's
  own pair encoding (``[CLS] query [SEP] document [SEP]``).
- Classifiers: the conversation rendered by the chat template (a text is one user turn), or for
  encoders the text itself.

:class:`TaskEncoder` is also the "template" :func:`lmforge.dataset.encode.encode_dataset` takes
(``encode(row)``, ``cache_key()``, ``features``), so task datasets are cached like chat ones.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from lmforge.dataset.tasks import RETRIEVAL_TASKS, encode_label, retrieval_parts

RERANK_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                 'Note that the answer can only be "yes" or "no".')
DEFAULT_RERANK_INSTRUCTION = "Given a query, judge whether the document answers it"
ENCODING_VERSION = 1


class TaskTooLong(ValueError):
    """An input longer than ``max_length`` with truncation ``raise`` (or that no truncation can fit)."""


class TaskEncoder:
    """Encodes canonical rows of one task for one tokenizer (see the module docstring)."""

    mode = "task"

    def __init__(self, task: str, tokenizer: Any, template: Any = None, *, decoder: bool, max_length: int | None,
                 truncation_strategy: str = "right", query_prompt: str | None = None,
                 document_prompt: str | None = None, rerank_instruction: str | None = None,
                 label_spec: dict[str, Any] | None = None):
        if task not in (*RETRIEVAL_TASKS, "seq_cls"):
            raise ValueError(f"TaskEncoder: unknown task {task!r}")
        # prompts through the chat template: a generative reranker's, and a classifier's on a decoder that has one
        chat = task == "generative_reranker" or (task == "seq_cls" and decoder
                                                 and bool(getattr(tokenizer, "chat_template", None)))
        self.decoder = decoder
        if chat and template is None:
            raise ValueError("TaskEncoder(chat=True) needs the template that renders the prompts")
        if task == "generative_reranker" and not chat:
            raise ValueError("a generative reranker needs a chat template to prompt the model with")
        self.task, self.tokenizer, self.template, self.chat = task, tokenizer, template if chat else None, chat
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.query_prompt, self.document_prompt = query_prompt or "", document_prompt or ""
        self.rerank_instruction = rerank_instruction or DEFAULT_RERANK_INSTRUCTION
        self.label_spec = label_spec

    # ------------------------------------------------------------------------- one input

    def _fit(self, ids: list[int], what: str) -> list[int] | None:
        """``ids`` within ``max_length`` by the truncation strategy; None means drop the row."""
        limit = self.max_length
        if limit is None or len(ids) <= limit:
            return ids
        if self.truncation_strategy == "delete":
            return None
        if self.truncation_strategy == "raise":
            raise TaskTooLong(f"{what} is {len(ids)} tokens, over the limit of {limit}")
        return ids[:limit] if self.truncation_strategy == "right" else ids[len(ids) - limit:]

    def text_ids(self, text: str, kind: str = "document") -> list[int] | None:
        """An embedding input: ``kind`` is ``query`` or ``document`` (which prompt goes before it)."""
        prompt = self.query_prompt if kind == "query" else self.document_prompt
        ids = list(self.tokenizer(prompt + text, add_special_tokens=True)["input_ids"])
        return self._fit(ids, f"the {kind}")

    def _pair_prompt(self, query: str, document: str) -> list[int]:
        if not self.chat:  # a decoder cross-encoder
            return list(self.tokenizer(f"<Query>: {query}\n<Document>: {document}", add_special_tokens=True)
                        ["input_ids"])
        user = f"<Instruct>: {self.rerank_instruction}\n<Query>: {query}\n<Document>: {document}"
        messages = [{"role": "system", "content": RERANK_SYSTEM}, {"role": "user", "content": user}]
        text = self.template.render(messages, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def pair_ids(self, query: str, document: str) -> list[int] | None:
        """A reranker input: the query/document pair; too long, the document is cut (``right``/``left``)."""
        if not self.chat and not self.decoder:  # an encoder: its own pair encoding
            full = list(self.tokenizer(query, document, add_special_tokens=True)["input_ids"])
            if self.max_length is None or len(full) <= self.max_length or self.truncation_strategy in ("delete",
                                                                                                        "raise"):
                return self._fit(full, "the query/document pair")
            return list(self.tokenizer(query, document, truncation="only_second", max_length=self.max_length)
                        ["input_ids"])
        ids = self._pair_prompt(query, document)
        if self.max_length is None or len(ids) <= self.max_length or self.truncation_strategy in ("delete", "raise"):
            return self._fit(ids, "the query/document prompt")
        doc_ids = self.tokenizer.encode(document, add_special_tokens=False)
        keep = len(doc_ids) - (len(ids) - self.max_length)
        while keep > 0:  # a cut may re-tokenize a little differently at its edge: shorten until it fits
            part = doc_ids[:keep] if self.truncation_strategy == "right" else doc_ids[len(doc_ids) - keep:]
            ids = self._pair_prompt(query, self.tokenizer.decode(part))
            if len(ids) <= self.max_length:
                return ids
            keep -= max(1, len(ids) - self.max_length)
        raise TaskTooLong(f"the query alone fills the {self.max_length} tokens of a query/document prompt")

    def classify_ids(self, messages: list[dict]) -> list[int] | None:
        """A classifier input: a conversation (a single text is one user turn)."""
        if self.chat:
            text = self.template.render(messages)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            text = "\n".join(m["content"] for m in messages if m.get("content"))
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return self._fit(ids, "the text")

    # ------------------------------------------------------------------------- rows

    def encode(self, row: dict) -> dict | None:
        """A canonical row's ids; None when a sequence is too long and truncation is ``delete``."""
        if self.task == "seq_cls":
            messages = row.get("messages") or ([{"role": "user", "content": row["text"]}] if row.get("text") else [])
            if not messages:
                raise ValueError("a classifier row needs a text or messages")
            if not self.label_spec:
                raise ValueError("encoding a classifier's rows needs its label spec (problem type, classes)")
            ids = self.classify_ids(messages)
            if ids is None:
                return None
            return {"input_ids": ids, "label": encode_label(row.get("label"), self.label_spec), "length": len(ids)}
        query, positive, negatives = retrieval_parts(row)
        if self.task == "embedding":
            seqs = [self.text_ids(query, "query"), self.text_ids(positive)] + [self.text_ids(n) for n in negatives]
        else:
            seqs = [self.pair_ids(query, positive)] + [self.pair_ids(query, n) for n in negatives]
        if any(s is None for s in seqs):
            return None
        out: dict[str, Any] = {"input_ids": seqs[0]}
        if self.task == "embedding":
            out["positive_ids"], seqs = seqs[1], seqs[1:]
        out["negative_ids"] = seqs[1:]
        out["label"] = row.get("label")
        out["length"] = max(len(s) for s in seqs + [out["input_ids"]])
        return out

    @property
    def features(self) -> dict[str, Any]:
        """Arrow types of the encoded columns (fixed, so an empty list in the first row types nothing wrong)."""
        from datasets import List, Value

        ids = List(Value("int32"))
        out: dict[str, Any] = {"input_ids": ids, "length": Value("int32")}
        if self.task == "seq_cls":
            single = (self.label_spec or {}).get("problem_type") == "single_label"
            out["label"] = Value("int64") if single else List(Value("float32"))
            return out
        if self.task == "embedding":
            out["positive_ids"] = ids
        out.update(negative_ids=List(ids), label=Value("float32"))
        return out

    def cache_key(self) -> str:
        tok = self.tokenizer
        payload = {"version": ENCODING_VERSION, "task": self.task, "chat": self.chat, "decoder": self.decoder,
                   "tokenizer": str(getattr(tok, "name_or_path", "")), "vocab_size": len(tok),
                   "template": self.template.cache_key() if self.chat else None, "max_length": self.max_length,
                   "truncation": self.truncation_strategy, "prompts": [self.query_prompt, self.document_prompt],
                   "instruction": self.rerank_instruction, "labels": self.label_spec}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def safe_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
