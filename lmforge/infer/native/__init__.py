"""The ``native`` engine: paged KV cache, continuous batching and CUDA graphs in PyTorch + Triton.

``NativeEngine`` is imported lazily so that ``import lmforge.infer.native.cache`` and friends
(pure Python) stay cheap.
"""
from __future__ import annotations

from typing import Any

__all__ = ["NativeEngine"]


def __getattr__(name: str) -> Any:
    if name == "NativeEngine":
        from lmforge.infer.native.engine import NativeEngine

        return NativeEngine
    raise AttributeError(name)
