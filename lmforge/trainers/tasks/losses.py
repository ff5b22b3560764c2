"""Losses of the task types, registered in ``TASK_LOSSES`` under the names ms-swift uses (``--loss_type``).

Embedding losses take L2-normalised query vectors ``q`` [B, D] and document vectors ``docs``
[N, D] (row ``i``'s positive at column ``positive[i]``) and a ``mask`` [B, N] of the documents
row ``i`` may be compared with; reranker losses take one score per query/document pair, grouped
per query with the positive first. Each returns ``(loss, accuracy)``: accuracy is the fraction of
queries whose positive scored above all their candidates (the top-1 a log line shows).

- ``infonce``: softmax cross-entropy of ``q . d / temperature`` over the allowed documents (the
  other rows' documents when ``--infonce_use_batch``, always the row's own hard negatives).
- ``cosine_similarity``: squared error between ``cos(q, d)`` and the pair's target (its label, else
  1 for the positive and 0 for a negative).
- ``contrastive`` (Hadsell et al., 2006, on cosine distance ``1 - cos``): ``t d^2 + (1 - t)
  max(0, margin - d)^2``, halved.
- ``reranker`` / ``generative_reranker`` (pointwise): binary cross-entropy of each pair's score
  against its label (1 for the positive, 0 for a negative, or the row's own relevance).
- ``listwise_reranker`` / ``listwise_generative_reranker``: softmax cross-entropy over each
  query's candidates (groups of fewer than two candidates are skipped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.registry import TASK_LOSSES


@dataclass(frozen=True)
class TaskLoss:
    """A registered task loss: the function and the task types it fits (a plugin registers one the same way)."""

    fn: Callable[..., tuple[Tensor, Tensor]]
    tasks: tuple[str, ...]


DEFAULT_LOSS = {"embedding": "infonce", "reranker": "listwise_reranker",
                "generative_reranker": "listwise_generative_reranker"}


def _register(name: str, *tasks: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        TASK_LOSSES.register(name, TaskLoss(fn, tasks))
        return fn

    return wrap


def loss_for(task: str, name: str | None) -> Callable:
    """The loss ``name`` (default: the task's) checked to fit ``task``; the error lists those that do."""
    name = name or DEFAULT_LOSS[task]
    fits = [n for n in TASK_LOSSES.names() if task in TASK_LOSSES.get(n).tasks]
    if name not in TASK_LOSSES or task not in TASK_LOSSES.get(name).tasks:
        raise ValueError(f"--loss_type {name!r} does not apply to --task_type {task}; choose one of {', '.join(fits)}")
    return TASK_LOSSES.get(name).fn


def _top1(scores: Tensor, positive: Tensor) -> Tensor:
    """1.0 where a row's positive has the highest score among its candidates (masked out: -inf)."""
    return (scores.argmax(-1) == positive).float()


# -------------------------------------------------------------------------------------- embedding


@_register("infonce", "embedding")
def infonce(q: Tensor, docs: Tensor, positive: Tensor, mask: Tensor, *, temperature: float, **_: Any
            ) -> tuple[Tensor, Tensor]:
    logits = (q @ docs.T).float() / temperature
    logits = logits.masked_fill(~mask, float("-inf"))
    return F.cross_entropy(logits, positive), _top1(logits.detach(), positive)


def _pair_targets(q: Tensor, docs: Tensor, positive: Tensor, own: Tensor, label: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine of every (query, own document) pair, its target, and the cosines as a [B, N] score matrix."""
    cos = (q @ docs.T).float()
    rows = torch.arange(q.shape[0], device=q.device)
    target = torch.zeros_like(cos)
    pos_target = torch.where(torch.isnan(label), torch.ones_like(label), label).to(cos.dtype)
    target[rows, positive] = pos_target
    return cos[own], target[own], cos.masked_fill(~own, float("-inf"))


@_register("cosine_similarity", "embedding")
def cosine_similarity(q: Tensor, docs: Tensor, positive: Tensor, mask: Tensor, *, own: Tensor, label: Tensor,
                      **_: Any) -> tuple[Tensor, Tensor]:
    cos, target, scores = _pair_targets(q, docs, positive, own, label)
    return F.mse_loss(cos, target), _top1(scores.detach(), positive)


@_register("contrastive", "embedding")
def contrastive(q: Tensor, docs: Tensor, positive: Tensor, mask: Tensor, *, own: Tensor, label: Tensor,
                margin: float, **_: Any) -> tuple[Tensor, Tensor]:
    cos, target, scores = _pair_targets(q, docs, positive, own, label)
    distance = 1.0 - cos
    losses = target * distance.pow(2) + (1 - target) * F.relu(margin - distance).pow(2)
    return 0.5 * losses.mean(), _top1(scores.detach(), positive)


# -------------------------------------------------------------------------------------- rerankers


def group_matrix(scores: Tensor, group_sizes: Tensor) -> Tensor:
    """Flat pair scores [S] -> [B, G] (each query's candidates, positive first; missing ones -inf)."""
    sizes = group_sizes.tolist()
    out = scores.new_full((len(sizes), max(sizes)), float("-inf"))
    start = 0
    for i, n in enumerate(sizes):
        out[i, :n] = scores[start:start + n]
        start += n
    return out


def _group_accuracy(scores: Tensor, group_sizes: Tensor) -> Tensor:
    grouped = group_matrix(scores.detach(), group_sizes)
    return _top1(grouped, torch.zeros(grouped.shape[0], dtype=torch.long, device=scores.device))


@_register("reranker", "reranker")
@_register("generative_reranker", "generative_reranker")
def pointwise_reranker(scores: Tensor, labels: Tensor, group_sizes: Tensor, **_: Any) -> tuple[Tensor, Tensor]:
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype)), _group_accuracy(scores, group_sizes)


@_register("listwise_reranker", "reranker")
@_register("listwise_generative_reranker", "generative_reranker")
def listwise_reranker(scores: Tensor, labels: Tensor, group_sizes: Tensor, *, temperature: float = 1.0,
                      **_: Any) -> tuple[Tensor, Tensor]:
    grouped = group_matrix(scores, group_sizes) / temperature
    keep = group_sizes >= 2
    if not bool(keep.any()):  # nothing to rank: a zero that still reaches every parameter in the graph
        return scores.sum() * 0.0, _group_accuracy(scores, group_sizes)
    grouped = grouped[keep]
    target = torch.zeros(grouped.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(grouped, target), _group_accuracy(scores, group_sizes)
