"""Batches of the task types: every sequence of a batch in one padded rectangle, one forward pass.

- embedding: the ``B`` queries, then their ``B`` positives, then the hard negatives (the first
  ``num_negatives`` of each row), with ``negative_counts`` [B]; ``doc_hash`` [N] identifies each
  document's token ids, so a row's own positive appearing elsewhere in the batch (another row's
  negative, say) is not counted as a negative of it; ``pair_label`` [B] is the row's relevance
  score (NaN where the row has none).
- rerankers: each row's candidates, positive first, as flat pairs with ``group_sizes`` [B] and
  ``pair_labels`` [S] (1 for the positive, 0 for a negative, or the row's own relevance);
  generative rerankers are left-padded (the next-token logits of every row at the last position).
- seq_cls: the texts and ``labels`` (class ids, multi-hot rows, or regression targets).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from lmforge.model.tasks import pad_sequences as pad


def _hash(ids: list[int]) -> int:
    return int.from_bytes(hashlib.blake2b(bytes(str(list(ids)), "ascii"), digest_size=7).digest(), "big")


class TaskCollator:
    def __init__(self, task: str, pad_token_id: int, *, num_negatives: int | None = None):
        self.task, self.pad_token_id, self.num_negatives = task, pad_token_id, num_negatives
        self.side = "left" if task == "generative_reranker" else "right"

    def _negatives(self, row: dict[str, Any]) -> list[list[int]]:
        negatives = list(row.get("negative_ids") or [])
        return negatives if self.num_negatives is None else negatives[:self.num_negatives]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.task == "seq_cls":
            batch = pad([r["input_ids"] for r in rows], self.pad_token_id, self.side)
            labels = [r["label"] for r in rows]
            batch["labels"] = torch.tensor(labels, dtype=torch.long if isinstance(labels[0], int) else torch.float32)
            return batch
        labels = [float("nan") if r.get("label") is None else float(r["label"]) for r in rows]
        negatives = [self._negatives(r) for r in rows]
        if self.task == "embedding":
            docs = [r["positive_ids"] for r in rows] + [n for ns in negatives for n in ns]
            batch = pad([r["input_ids"] for r in rows] + docs, self.pad_token_id, self.side)
            batch["negative_counts"] = torch.tensor([len(ns) for ns in negatives], dtype=torch.long)
            batch["doc_hash"] = torch.tensor([_hash(d) for d in docs], dtype=torch.long)
            batch["pair_label"] = torch.tensor(labels, dtype=torch.float32)
            return batch
        pairs, targets = [], []
        for row, ns, label in zip(rows, negatives, labels):
            pairs += [row["input_ids"], *ns]
            targets += [1.0 if label != label else label] + [0.0] * len(ns)  # NaN: the row's pair is the positive
        batch = pad(pairs, self.pad_token_id, self.side)
        batch["group_sizes"] = torch.tensor([1 + len(ns) for ns in negatives], dtype=torch.long)
        batch["pair_labels"] = torch.tensor(targets, dtype=torch.float32)
        return batch
