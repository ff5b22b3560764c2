"""Collators for preference data: encoded rows -> one batch the PreferenceTrainer scores in one pass.

Paired rows (``chosen_input_ids`` ... ``rejected_labels`` from the template's ``rlhf`` mode)
become one batch of ``2B`` sequences, the ``B`` chosen first and the ``B`` rejected after, so
both go through the model in a single forward pass. KTO rows (``input_ids``, ``labels``,
``label``) become ``B`` sequences plus ``B`` mismatched ones under ``kl_*`` keys: prompt ``i``
followed by the completion of row ``i + 1`` (mod ``B``), the pairs KTO uses to estimate its
reference point (a batch of one row can only pair a row with itself: the pipeline asks for
``per_device_train_batch_size >= 2``).

Padding and padding-free flattening are :class:`lmforge.trainers.collator.Collator`'s; per-row
scalars (``ref_chosen_logps``, ``ref_rejected_logps``, ``margin``, ``label``) ride along as
float or bool tensors [B].
"""
from __future__ import annotations

from typing import Any

from lmforge.trainers.collator import Collator

IGNORE_INDEX = -100
SCALAR_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "margin")


def completion_start(labels: list[int]) -> int:
    """Start of the last run of labelled tokens (the final reply); everything before it is the prompt."""
    k = len(labels)
    while k > 0 and labels[k - 1] == IGNORE_INDEX:
        k -= 1
    while k > 0 and labels[k - 1] != IGNORE_INDEX:
        k -= 1
    return k


class PreferenceCollator:
    """Batches for the PreferenceTrainer; ``kind`` is ``pair`` (dpo, orpo, simpo, cpo, rm) or ``kto``."""

    def __init__(self, pad_token_id: int, *, kind: str = "pair", padding_free: bool = False,
                 pad_to_multiple_of: int | None = None, base: Any = None):
        if kind not in ("pair", "kto"):
            raise ValueError(f"PreferenceCollator kind must be 'pair' or 'kto', got {kind!r}")
        self.kind = kind
        # ``base``: the sft collator of a vision-language model (trainers/vision_collator.py) adds the pixels
        self.base = base or Collator(pad_token_id, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of)

    def _sequences(self, rows: list[dict[str, Any]], prefix: str = "") -> list[dict[str, Any]]:
        out = [{"input_ids": r[f"{prefix}input_ids"], "labels": r[f"{prefix}labels"]} for r in rows]
        for seq, r in zip(out, rows):
            for key in ("images", "videos"):  # the chosen and the rejected sequence each carry the prompt's media
                if r.get(f"{prefix}{key}"):
                    seq[key] = r[f"{prefix}{key}"]
        return out

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.kind == "pair":
            missing = [k for k in ("chosen_input_ids", "rejected_input_ids") if k not in rows[0]]
            if missing:
                raise KeyError(f"preference rows need {missing}: encode the data with the template in 'rlhf' mode")
            batch = self.base(self._sequences(rows, "chosen_") + self._sequences(rows, "rejected_"))
        else:
            if "label" not in rows[0] or any(r.get("label") is None for r in rows):
                raise KeyError("KTO rows need a 'label' (true: desirable, false: undesirable) on every row")
            if any(r.get("images") or r.get("videos") for r in rows):
                raise ValueError("KTO on rows with images or videos is not supported yet (its mismatched pairs join "
                                 "two rows' tokens); use --rlhf_type dpo with chosen and rejected replies")
            batch = self.base(self._sequences(rows))
            batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
            kl = self.base(self._mismatched(rows))
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        for key in SCALAR_COLUMNS:
            values = [r.get(key) for r in rows]
            if all(v is not None for v in values):
                batch[key] = torch.tensor(values, dtype=torch.float32)
        return batch

    @staticmethod
    def _mismatched(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Prompt ``i`` + completion ``i+1``: token ids are joined, not re-rendered (close enough for an estimate)."""
        out = []
        n = len(rows)
        for i, row in enumerate(rows):
            other = rows[(i + 1) % n]
            p = completion_start(row["labels"])
            c = completion_start(other["labels"])
            out.append({"input_ids": list(row["input_ids"][:p]) + list(other["input_ids"][c:]),
                        "labels": [IGNORE_INDEX] * p + list(other["labels"][c:])})
        return out
