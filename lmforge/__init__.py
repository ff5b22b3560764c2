"""lmforge: fine-tune, align, serve, evaluate and export large language models.

Heavy libraries (torch, transformers, peft) are imported lazily, inside the functions that need
them, so ``import lmforge`` and ``lmforge --help`` stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "sft_main": "lmforge.pipelines.sft",
    "pt_main": "lmforge.pipelines.sft",
    "rlhf_main": "lmforge.pipelines.rlhf",
    "infer_main": "lmforge.pipelines.infer",
    "deploy_main": "lmforge.pipelines.deploy",
    "export_main": "lmforge.pipelines.export",
    "merge_lora_main": "lmforge.pipelines.export",
    "eval_main": "lmforge.pipelines.eval",
    "sample_main": "lmforge.pipelines.sample",
    "rollout_main": "lmforge.pipelines.rollout",
    "ModelArguments": "lmforge.arguments",
    "DataArguments": "lmforge.arguments",
    "TemplateArguments": "lmforge.arguments",
    "TunerArguments": "lmforge.arguments",
    "TrainArguments": "lmforge.arguments",
    "PtArguments": "lmforge.arguments",
    "RlhfArguments": "lmforge.arguments",
    "InferArguments": "lmforge.arguments",
    "DeployArguments": "lmforge.arguments",
    "ExportArguments": "lmforge.arguments",
    "EvalArguments": "lmforge.arguments",
    "SampleArguments": "lmforge.arguments",
    "RolloutArguments": "lmforge.arguments",
    "get_template": "lmforge.template",
    "Template": "lmforge.template",
    "get_model_tokenizer": "lmforge.model",
    "load_dataset": "lmforge.dataset",
    "Registry": "lmforge.registry",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
