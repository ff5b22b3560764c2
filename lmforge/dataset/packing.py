"""Packing: several encoded rows in one sequence, with position ids that restart per row.

Rows are grouped into bins of at most ``max_length`` tokens by best-fit decreasing, so little
space is wasted and no row is split. Attention never crosses rows: the collator flattens a batch
into one padding-free sequence, and transformers derives a block-diagonal (or varlen) mask from
the restarting ``position_ids``.
"""
from __future__ import annotations

import bisect
import logging
from typing import Any, Iterable

logger = logging.getLogger(__name__)


def plan_bins(lengths: Iterable[int], max_length: int) -> list[list[int]]:
    """Indices of rows per bin; best-fit decreasing (each row goes where it leaves least room)."""
    order = sorted(range(len(lengths := list(lengths))), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), kept sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"row {i} has {n} tokens, more than --max_length {max_length}; it cannot be packed")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, b = free.pop(k)
            bins[b].append(i)
            if cap - n > 0:
                bisect.insort(free, (cap - n, b))
        else:
            bins.append([i])
            if max_length - n > 0:
                bisect.insort(free, (max_length - n, len(bins) - 1))
    return bins


def concat_rows(rows: list[dict[str, Any]], with_scale: bool | None = None) -> dict[str, Any]:
    """One packed row: ids and labels concatenated, position ids restarting at each row.

    The first label of every row is -100: in a flattened sequence, the token before it belongs to
    another row and must not learn to predict it (unpacked, nothing predicts a first token either).
    """
    out: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": []}
    has_scale = any(r.get("loss_scale") is not None for r in rows) if with_scale is None else with_scale
    if has_scale:
        out["loss_scale"] = []
    for r in rows:
        ids = list(r["input_ids"])
        labels = list(r["labels"])
        labels[0] = -100
        out["input_ids"] += ids
        out["labels"] += labels
        out["position_ids"] += list(range(len(ids)))
        if has_scale:
            scale = r.get("loss_scale")
            out["loss_scale"] += list(scale) if scale is not None else [1.0] * len(ids)
    for key in ("images", "videos"):  # image and video references in token order (template/vision.py)
        if any(r.get(key) for r in rows):
            out[key] = [ref for r in rows for ref in (r.get(key) or [])]
    out["length"] = len(out["input_ids"])
    return out


def pack_dataset(ds: Any, max_length: int) -> Any:
    """Pack an encoded ``datasets.Dataset`` (columns input_ids, labels, [loss_scale], length)."""
    from datasets import Dataset

    lengths = ds["length"] if "length" in ds.column_names else [len(x) for x in ds["input_ids"]]
    bins = plan_bins(lengths, max_length)
    cols = [c for c in ("input_ids", "labels", "loss_scale", "images", "videos") if c in ds.column_names]
    slim = ds.select_columns(cols)
    # Every packed row gets the same columns (from_list takes its schema from the first row).
    with_scale = "loss_scale" in cols and any(s is not None for s in slim["loss_scale"])
    packed = [concat_rows([slim[i] for i in b], with_scale) for b in bins]
    for key in ("images", "videos"):
        if key in cols:
            for row in packed:
                row.setdefault(key, [])
    total = sum(lengths)
    logger.info("Packed %d rows into %d sequences of up to %d tokens (%.1f%% filled)",
                len(lengths), len(bins), max_length, 100 * total / max(1, len(bins) * max_length))
    return Dataset.from_list(packed)
