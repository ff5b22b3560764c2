"""Metrics logged between two Trainer logs, reduced exactly over every process (``lmforge.utils.distributed``).

Kept apart from the trainers so that it imports nothing heavy (the two-process tests use it directly).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lmforge.utils.distributed import collective_device, gather_objects, global_sum

__all__ = ["MetricStore"]


class MetricStore:
    """Values logged between two Trainer logs, kept as exact reductions over every process: sums and counts
    for means, sums of squares for standard deviations, running min/max (so uneven per-process subsets add
    up right, and a std is the std of the global batch, not a mean of per-process stds)."""

    def __init__(self, device: Any = None):
        self.device = collective_device() if device is None else device
        self._data: dict[str, dict[str, list]] = {"train": {}, "eval": {}}

    def add(self, split: str, key: str, value: Tensor | float, reduce: str = "mean") -> None:
        """``reduce``: ``mean`` (over every value added), ``std`` (unbiased, over every value added), ``sum`` (a
        count), ``min`` or ``max``. Every process must add the same keys in the same order (each add is a
        collective)."""
        value = torch.as_tensor(value).detach().float().reshape(-1)
        device = self.device
        if reduce in ("mean", "std", "sum"):
            parts = [value.sum(), torch.tensor(float(value.numel()))]
            if reduce == "std":
                parts.append((value.double() ** 2).sum().float())
            stat = global_sum(torch.stack([p.to(device) for p in parts]).double())
        elif reduce in ("min", "max"):
            pick = min if reduce == "min" else max
            local = float(pick(value.tolist())) if value.numel() else None
            found = [v for v in gather_objects(local) if v is not None]
            if not found:
                return
            stat = [pick(found)]
        else:
            raise ValueError(f"MetricStore reduce must be mean, std, sum, min or max, got {reduce!r}")
        slot = self._data[split].get(key)
        if reduce in ("mean", "std", "sum"):
            new = [reduce, *[float(x) for x in stat]]
            self._data[split][key] = new if slot is None else [reduce, *[a + b for a, b in zip(slot[1:], new[1:])]]
        else:
            v = float(stat[0])
            pick = min if reduce == "min" else max
            self._data[split][key] = [reduce, v] if slot is None else [reduce, pick(slot[1], v)]

    def pop(self, split: str) -> dict[str, float]:
        """The reduced values of ``split`` (rounded to 6 places), then forget them."""
        out = {}
        for key, slot in self._data[split].items():
            if slot[0] == "mean":
                if slot[2]:
                    out[key] = round(slot[1] / slot[2], 6)
            elif slot[0] == "sum":
                out[key] = round(slot[1], 6)
            elif slot[0] == "std":
                total, n, squares = slot[1:]
                if n > 1:
                    out[key] = round(math.sqrt(max(squares - total * total / n, 0.0) / (n - 1)), 6)
            else:
                out[key] = round(slot[1], 6)
        self._data[split] = {}
        return out

    def pop_into(self, logs: dict[str, float]) -> tuple[str, dict[str, float]]:
        """Add the stored values of the split a Trainer ``logs`` dict belongs to (``eval_`` keys mean eval)
        to it, prefixed like its keys; returns (split, the values)."""
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stored = self.pop(split)
        prefix = "eval_" if split == "eval" else ""
        logs.update({f"{prefix}{k}": v for k, v in stored.items()})
        return split, stored
