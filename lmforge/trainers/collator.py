"""Collators: rows of token ids -> a batch of tensors.

``padded``: right-padded rectangle with an attention mask. ``padding-free`` (packing): the whole
batch flattened into one sequence with restarting ``position_ids`` and no attention mask, which
transformers turns into a block-diagonal mask (sdpa/eager) or varlen attention (flash).

With ``boundaries`` (set when the model runs lmforge's varlen attention) a padding-free batch also
carries the sequence boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``, the keywords transformers'
flash-attention path reads), counted here on the host: the attention layer would otherwise find them
with a ``nonzero`` and a ``max`` on the GPU, two reads that stall the host before every forward.
"""
from __future__ import annotations

from typing import Any


class Collator:
    def __init__(self, pad_token_id: int, *, padding_free: bool = False, pad_to_multiple_of: int | None = None,
                 boundaries: bool = False):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of
        self.boundaries = boundaries

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
        """Rows (packed or not) -> one row: ids, labels and positions concatenated as tensors.

        A row without ``position_ids`` is one sequence; a packed row's positions restart at each of its
        sequences. The first label of every sequence becomes -100 (as ``concat_rows`` does when packing):
        the token before it belongs to another sequence.
        """
        import torch

        ids, labels, positions, scales = [], [], [], []
        with_scale = any(r.get("loss_scale") is not None for r in rows)
        for r in rows:
            n = len(r["input_ids"])
            ids.append(torch.tensor(r["input_ids"], dtype=torch.long))
            lab = torch.tensor(r["labels"], dtype=torch.long)
            pos = r.get("position_ids")
            pos = torch.arange(n) if pos is None else torch.tensor(pos, dtype=torch.long)
            lab[pos == 0] = -100
            labels.append(lab)
            positions.append(pos)
            if with_scale:
                s = r.get("loss_scale")
                scales.append(torch.tensor(s, dtype=torch.float32) if s is not None else torch.ones(n))
        pos = torch.cat(positions)
        out = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None], "position_ids": pos[None]}
        if with_scale:
            out["loss_scale"] = torch.cat(scales)[None]
        if self.boundaries:  # the attention's own rule, so both paths see the same sequences
            from lmforge.model.kernels.varlen_attention import segments_from_position_ids

            seg = segments_from_position_ids(pos[None], 1, pos.numel())
            cu = seg.cu if seg is not None else torch.tensor([0, pos.numel()], dtype=torch.int32)
            longest = seg.max_len if seg is not None else pos.numel()
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=longest, max_length_k=longest)
        return out
