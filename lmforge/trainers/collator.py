"""Collators: rows of token ids -> a batch of tensors.

``padded``: right-padded rectangle with an attention mask. ``padding-free`` (packing): the whole
batch flattened into one sequence with restarting ``position_ids`` and no attention mask, which
transformers turns into a block-diagonal mask (sdpa/eager) or varlen attention (flash).
"""
from __future__ import annotations

from typing import Any


class Collator:
    def __init__(self, pad_token_id: int, *, padding_free: bool = False, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return self._flatten(rows) if self.padding_free else self._pad(rows)

    def _pad(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(rows)
        ids = torch.full((b, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, n), -100, dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.long)
        scale = torch.zeros((b, n), dtype=torch.float32) if any(r.get("loss_scale") is not None for r in rows) else None
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.as_tensor(r["input_ids"])
            labels[i, :k] = torch.as_tensor(r["labels"])
            mask[i, :k] = 1
            if scale is not None:
                s = r.get("loss_scale")
                scale[i, :k] = torch.as_tensor(s, dtype=torch.float32) if s is not None else 1.0
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if scale is not None:
            out["loss_scale"] = scale
        return out

    def _flatten(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from lmforge.dataset.packing import concat_rows

        # A packed row already holds several rows; split it back on its restarting positions.
        pieces: list[dict[str, Any]] = []
        for r in rows:
            pos = r.get("position_ids")
            if pos is None:
                pieces.append(r)
                continue
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for s, e in zip(starts, starts[1:]):
                piece = {"input_ids": r["input_ids"][s:e], "labels": r["labels"][s:e]}
                if r.get("loss_scale") is not None:
                    piece["loss_scale"] = r["loss_scale"][s:e]
                pieces.append(piece)
        flat = concat_rows(pieces)
        out = {
            "input_ids": torch.tensor([flat["input_ids"]], dtype=torch.long),
            "labels": torch.tensor([flat["labels"]], dtype=torch.long),
            "position_ids": torch.tensor([flat["position_ids"]], dtype=torch.long),
        }
        if "loss_scale" in flat:
            out["loss_scale"] = torch.tensor([flat["loss_scale"]], dtype=torch.float32)
        return out
