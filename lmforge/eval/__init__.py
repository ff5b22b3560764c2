"""Evaluation: score a model or an OpenAI-compatible server on datasets, write reports, compare runs.

``run_eval(EvalArguments)`` answers and scores (:mod:`lmforge.eval.runner`); metrics live in
:mod:`lmforge.eval.metrics` (registry :data:`lmforge.registry.EVAL_METRICS`); reports and
comparisons in :mod:`lmforge.eval.report`; lm-evaluation-harness / EvalScope in :mod:`lmforge.eval.harness`.
Names resolve lazily so that importing this package imports neither torch nor matplotlib.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "run_eval": "lmforge.eval.runner",
    "score_set": "lmforge.eval.runner",
    "EvalMetric": "lmforge.eval.metrics",
    "get_eval_metric": "lmforge.eval.metrics",
    "compare_reports": "lmforge.eval.report",
    "load_report": "lmforge.eval.report",
    "write_report": "lmforge.eval.report",
    "run_harness": "lmforge.eval.harness",
    "lm_eval_command": "lmforge.eval.harness",
    "evalscope_command": "lmforge.eval.harness",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.eval' has no attribute {name!r}")
