"""Evaluation metrics over model predictions (the ``METRICS`` registry, ``--eval_metric``).

An entry is an object (or a class the Trainer instantiates with no arguments) with two methods:

- ``preprocess(logits, labels) -> Tensor``: called per eval batch as transformers'
  ``preprocess_logits_for_metrics``, so the Trainer keeps ``[B, T]`` token ids instead of
  ``[B, T, V]`` logits for the whole eval set. ``labels`` are unshifted (HF style:
  ``labels[t]`` is the target of ``logits[t-1]``); the predictions returned here are shifted to
  line up with them (``pred[t]`` predicts ``labels[t]``; ``pred[0]`` is -100).
- ``compute(eval_pred) -> dict[str, float]``: the Trainer's ``compute_metrics``. It also accepts
  raw 3-D logits as predictions (and applies ``preprocess`` itself), and transformers'
  ``batch_eval_metrics`` mode (``compute_result=False`` per batch, ``True`` on the last one).

The Trainer prefixes the keys with ``eval_``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.registry import METRICS

IGNORE_INDEX = -100


def _first(x: Any) -> Any:
    """Model outputs may come as a tuple (logits, past_key_values, ...): keep the logits."""
    return x[0] if isinstance(x, (tuple, list)) else x


def shifted_argmax(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """Greedy next-token predictions lined up with unshifted labels: ``pred[:, t] = argmax logits[:, t-1]``."""
    logits = _first(logits)
    pred = torch.full(logits.shape[:-1], IGNORE_INDEX, dtype=torch.long, device=logits.device)
    pred[:, 1:] = logits[:, :-1].argmax(dim=-1)
    return pred


def _as_numpy(x: Any) -> np.ndarray:
    x = _first(x)
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class TokenMetric:
    """Base class: aligns predictions with labels, accumulates counts, reports ratios.

    Subclasses implement ``counts(pred, labels, mask) -> dict[name, (numerator, denominator)]``
    on aligned ``[B, T]`` arrays. Counting (not averaging per batch) keeps ``batch_eval_metrics``
    exact.
    """

    def __init__(self) -> None:
        self._acc: dict[str, list[float]] = {}

    def preprocess(self, logits: Tensor, labels: Tensor) -> Tensor:
        return shifted_argmax(logits, labels)

    def counts(self, pred: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, tuple[float, float]]:
        raise NotImplementedError

    def compute(self, eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        pred, labels = _as_numpy(eval_pred.predictions), _as_numpy(eval_pred.label_ids)
        if pred.ndim == labels.ndim + 1:      # raw logits: no preprocess ran
            pred = shifted_argmax(torch.from_numpy(pred)).numpy()
        if pred.shape != labels.shape:
            raise ValueError(f"predictions {pred.shape} and labels {labels.shape} differ in shape")
        mask = labels != IGNORE_INDEX
        for name, (num, den) in self.counts(pred, labels, mask).items():
            acc = self._acc.setdefault(name, [0.0, 0.0])
            acc[0] += float(num)
            acc[1] += float(den)
        if compute_result is False:           # batch_eval_metrics: more batches to come
            return {}
        result = {name: (num / den if den else float("nan")) for name, (num, den) in self._acc.items()}
        self._acc = {}
        return result

    def __call__(self, eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        return self.compute(eval_pred, compute_result)


@METRICS.register("token_accuracy")
class TokenAccuracy(TokenMetric):
    """Fraction of labelled tokens whose greedy prediction is exactly the label (teacher forcing)."""

    def counts(self, pred, labels, mask):
        return {"token_acc": (((pred == labels) & mask).sum(), mask.sum())}


@METRICS.register("exact_match_rows")
class ExactMatchRows(TokenMetric):
    """Fraction of rows whose every labelled token is predicted right, and token accuracy beside it.

    Stricter than token accuracy: for short answers (the arithmetic task) a row counts only when the
    whole answer would come out under greedy decoding with teacher forcing.
    """

    def counts(self, pred, labels, mask):
        wrong = (pred != labels) & mask
        has_label = mask.any(axis=1)
        row_ok = has_label & ~wrong.any(axis=1)
        return {
            "exact_match": (row_ok.sum(), has_label.sum()),
            "token_acc": ((~wrong & mask).sum(), mask.sum()),
        }
