"""Eval metrics of embedding models, rerankers and classifiers, registered beside the others in ``EVAL_METRICS``.

``retrieval``: a row's prediction is the ranked list of documents the model returned (the top
``RANKED`` of the corpus for an embedding model, the query's candidates for a reranker) and its
reference the relevant document. Per row: ``recall@k`` (the relevant document among the first k),
``mrr@10`` (1/rank, 0 beyond rank 10) and ``ndcg@10`` (with one relevant document, 1/log2(rank+1)
within the first 10); the dataset value is the mean over queries (TREC's definitions).

``classification``: a row's prediction is the class name (or id) chosen, a list of them for
multi-label rows; per row ``accuracy`` (exact, the whole set for multi-label). The dataset adds
``macro_f1`` (the unweighted mean over classes of per-class F1, classes taken from references and
predictions; for multi-label rows the per-class decisions of every row count).
"""
from __future__ import annotations

import math
from typing import Any

from lmforge.eval.metrics import EvalMetric
from lmforge.registry import EVAL_METRICS

RANKED = 10  # documents kept per query in the predictions file
RECALL_AT = (1, 5, 10)


def _rank(prediction: Any, reference: Any) -> int | None:
    """1-based position of ``reference`` in the ranked ``prediction`` list (None if absent)."""
    ranked = list(prediction) if isinstance(prediction, (list, tuple)) else []
    return ranked.index(reference) + 1 if reference in ranked else None


@EVAL_METRICS.register("retrieval")
class Retrieval(EvalMetric):
    """recall@1/5/10, mrr@10 and ndcg@10 of a ranked list of documents against the relevant one."""

    name = "retrieval"

    def score_row(self, prediction, reference, row):
        rank = _rank(prediction, reference)
        out = {f"recall@{k}": float(rank is not None and rank <= k) for k in RECALL_AT}
        out["mrr@10"] = 1.0 / rank if rank is not None and rank <= 10 else 0.0
        out["ndcg@10"] = 1.0 / math.log2(rank + 1) if rank is not None and rank <= 10 else 0.0
        return out

    def extract(self, prediction, row):
        return None


def _as_set(value: Any) -> set[str]:
    if value is None:
        return set()
    return {str(v) for v in value} if isinstance(value, (list, tuple)) else {str(value)}


@EVAL_METRICS.register("classification")
class Classification(EvalMetric):
    """accuracy per row; macro_f1 over the dataset."""

    name = "classification"

    def score_row(self, prediction, reference, row):
        return {"accuracy": float(_as_set(prediction) == _as_set(reference))}

    def aggregate(self, scores, predictions, references, rows):
        out = super().aggregate(scores, predictions, references, rows)
        pairs = [(_as_set(p), _as_set(r)) for p, r in zip(predictions, references)]
        classes = sorted(set().union(*[p | r for p, r in pairs])) if pairs else []
        f1s = []
        for c in classes:
            tp = sum(c in p and c in r for p, r in pairs)
            fp = sum(c in p and c not in r for p, r in pairs)
            fn = sum(c not in p and c in r for p, r in pairs)
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        out["macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
        return out


def default_metric(task: str) -> str:
    """The metric ``--eval_metric auto`` picks for a task model."""
    return "classification" if task == "seq_cls" else "retrieval"
