"""Keep the start-up heap out of the garbage collector's full passes while an engine or a server runs.

CPython's full (oldest-generation) collection walks every object the collector tracks: about 430,000 once torch,
transformers and an engine are loaded, 0.20-0.28 s on an H200 host, during which the engine's step loop and a
server's event loop stand still. One landed inside three of the five timed benchmark runs that checked: 0.28 s of
a 2.7 s generation run, most of the prefill benchmark's time outside its steps (benchmarks/RESULTS.md,
2026-12-01). The objects alive once an engine has started (modules, the model's Python objects, the tokenizer,
CUDA graph wrappers) live as long as it does, so :func:`frozen_heap` collects once and moves them to the permanent
generation, which collections skip (``gc.freeze``; vLLM's API server does the same after start-up); objects made
later are collected as before. Leaving the block hands them back (``gc.unfreeze``), so a process that goes on
afterwards (a test session, a notebook) can again reclaim cycles among them.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from typing import Iterator

logger = logging.getLogger(__name__)


def freeze() -> int:
    """Collect, then freeze every tracked object; returns how many are now frozen."""
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    logger.debug("garbage collector: %d start-up objects frozen", count)
    return count


@contextlib.contextmanager
def frozen_heap() -> Iterator[int]:
    """:func:`freeze` for the block; ``gc.unfreeze()`` after it (also on error)."""
    count = freeze()
    try:
        yield count
    finally:
        gc.unfreeze()
