"""Eval of embedding models, rerankers and classifiers: rows -> items, and the answerer that ranks or classifies.

Retrieval sets (rows with a query, its relevant document and ``rejected_response`` hard negatives,
e.g. ``builtin:arith-retrieval``): the corpus is every document of the set (relevant ones and
negatives, de-duplicated). An embedding model embeds the corpus once and answers each query with
the ``RANKED`` most similar documents; a reranker answers with the query's own candidates (its
relevant document and negatives) in the order of its scores. The ``retrieval`` metric then scores
the ranked list (:mod:`lmforge.eval.task_metrics`).

Classification sets (a text and its ``label``): the answer is the class the classifier picks
(every class with probability over 0.5 for a multi-label model), scored by ``classification``.

Answers go through the same resume cache and report as generated ones (:mod:`lmforge.eval.runner`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from lmforge.eval.data import EvalItem, EvalSet, row_key
from lmforge.eval.task_metrics import RANKED

logger = logging.getLogger("lmforge.eval")

OnResult = Callable[[EvalItem, dict], None]


def task_items(name: str, rows: list[tuple[str, dict | None, str | None]], task: str) -> list[EvalItem]:
    """Items of a task set from canonical task rows (``lmforge.dataset.tasks``); unreadable rows keep their error."""
    from lmforge.dataset.tasks import retrieval_parts

    items = []
    for i, (where, row, error) in enumerate(rows):
        if row is None:
            items.append(EvalItem(i, f"{name}:{i}:unreadable", [], None, {}, error))
            continue
        if task == "seq_cls":
            messages = [{k: m[k] for k in ("role", "content")} for m in row.get("messages") or []] or \
                [{"role": "user", "content": row.get("text") or ""}]
            reference, extra = row.get("label"), {}
        else:
            query, reference, negatives = retrieval_parts(row)
            messages, extra = [{"role": "user", "content": query}], {"rejected_response": negatives}
        items.append(EvalItem(i, row_key(name, i, messages, {"task": task}), messages, reference, extra))
    return items


def _text(item: EvalItem) -> str:
    return "\n".join(m["content"] for m in item.messages if m.get("content"))


class PoolingAnswerer:
    """Answers task items with a :class:`~lmforge.infer.pooling.PoolingEngine`, ``batch_size`` inputs per call."""

    supports_loglikelihood = False

    def __init__(self, engine: Any, *, batch_size: int = 64):
        self.engine, self.task, self.batch_size = engine, engine.task, max(1, batch_size)
        self.corpus: list[str] = []
        self.vectors: Any = None

    def prepare(self, ds: EvalSet) -> None:
        """An embedding model's corpus (every document of the set) is embedded once, before any query."""
        if self.task != "embedding":
            return
        import torch

        docs = dict.fromkeys(d for it in ds.items if not it.error
                             for d in [it.reference, *it.row.get("rejected_response", [])])
        self.corpus = list(docs)
        parts = [self.engine.embed(self.corpus[lo:lo + self.batch_size], input_type="document")[0]
                 for lo in range(0, len(self.corpus), self.batch_size)]
        self.vectors = torch.cat(parts) if parts else None
        logger.info("eval %s: embedded a corpus of %d documents", ds.name, len(self.corpus))

    def answer(self, items: list[EvalItem], on_result: OnResult) -> None:
        for lo in range(0, len(items), self.batch_size):
            chunk = items[lo:lo + self.batch_size]
            try:
                answers = self._answer(chunk)
            except ValueError as e:  # one bad input: answer the rows one by one so only it fails
                if len(chunk) == 1:
                    on_result(chunk[0], {"error": str(e)})
                    continue
                for it in chunk:
                    self.answer([it], on_result)
                continue
            for it, response in zip(chunk, answers):
                on_result(it, {"response": response})

    def _answer(self, items: list[EvalItem]) -> list[Any]:
        if self.task == "seq_cls":
            probs, _ = self.engine.classify([_text(it) for it in items])
            names = self.engine.label_names or [str(i) for i in range(probs.shape[1])]
            if self.engine.problem_type == "multi_label_classification":
                return [[names[j] for j, p in enumerate(row) if p > 0.5] for row in probs.tolist()]
            if self.engine.problem_type == "regression":
                return [row[0] if len(row) == 1 else row for row in probs.tolist()]
            return [names[int(row.argmax())] for row in probs]
        if self.task == "embedding":
            queries, _ = self.engine.embed([_text(it) for it in items], input_type="query")
            top = (queries @ self.vectors.T).topk(min(RANKED, len(self.corpus)), dim=1).indices.tolist()
            return [[self.corpus[j] for j in row] for row in top]
        out = []
        for it in items:
            candidates = list(dict.fromkeys([it.reference, *it.row.get("rejected_response", [])]))
            scores, _ = self.engine.rerank(_text(it), candidates)
            out.append([candidates[j] for j in sorted(range(len(candidates)), key=lambda j: -scores[j])][:RANKED])
        return out
