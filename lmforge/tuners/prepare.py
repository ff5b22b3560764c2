"""Tuners: turn a loaded model into one whose chosen parameters train.

Each tuner is a function ``(model, args) -> model`` registered in ``TUNERS`` under its
``--train_type``; a plugin may register more (``--external_plugins``). LoRA, DoRA and QLoRA are
peft's; ``full`` and ``freeze`` only set ``requires_grad``.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator

from lmforge.registry import TUNERS
from lmforge.utils.errors import SetupError

logger = logging.getLogger(__name__)


def _matches(name: str, patterns: list[str]) -> bool:
    """A pattern matches a parameter name as a prefix, or (if it has regex characters) as a regex search."""
    for p in patterns:
        if name.startswith(p) or (any(c in p for c in "^$*+?[]()|\\") and re.search(p, name)):
            return True
    return False


def _apply_trainable_patterns(model: Any, args: Any) -> None:
    patterns = list(getattr(args, "trainable_parameters", []) or [])
    if patterns:
        for name, p in model.named_parameters():
            if _matches(name, patterns):
                p.requires_grad_(True)


@contextlib.contextmanager
def peft_checkpointing_query() -> Iterator[None]:
    """While peft wraps a model, its ``is_gradient_checkpointing`` query reads the current property.

    peft 0.21 (the newest release) asks a model ``is_gradient_checkpointing`` when it wraps it, a
    name transformers 5 deprecated for ``is_activation_checkpointing`` with a FutureWarning on every
    read. For the duration of the wrap the old name returns the new property's value (the same
    answer, no deprecated code path), then the original is restored. Remove once peft asks for
    ``is_activation_checkpointing`` itself.
    """
    from transformers import PreTrainedModel

    old = PreTrainedModel.__dict__.get("is_gradient_checkpointing")
    if old is None or not hasattr(PreTrainedModel, "is_activation_checkpointing"):
        yield
        return
    PreTrainedModel.is_gradient_checkpointing = property(lambda self: self.is_activation_checkpointing)
    try:
        yield
    finally:
        PreTrainedModel.is_gradient_checkpointing = old


def _target_modules(args: Any, model: Any = None) -> Any:
    targets = list(args.target_modules or ["all-linear"])
    regex = len(targets) == 1 and any(c in targets[0] for c in "^$*+?[]()|\\")
    family = _vision_family(model) if model is not None else None
    if family is not None and not regex:
        # Vision-language models: the linear layers (all, or those named) of the parts not frozen by
        # --freeze_vit/--freeze_aligner/--freeze_llm: all-linear means the language model by default.
        from lmforge.model.vision import GROUPS, frozen_groups, linear_targets

        names = None if targets == ["all-linear"] else targets
        return linear_targets(model, family, set(GROUPS) - frozen_groups(args), names)
    if targets == ["all-linear"]:
        return "all-linear"
    if regex:
        return targets[0]  # peft treats a string as a full-match regex
    return targets


def _vision_family(model: Any) -> Any:
    from lmforge.model.vision import require_family

    return require_family(model)


def _freeze_vision_parts(model: Any, args: Any) -> None:
    """``--freeze_vit/--freeze_aligner/--freeze_llm`` on a vision-language model (no-op for a text model)."""
    family = _vision_family(model)
    if family is None:
        return
    from lmforge.model.vision import frozen_groups

    frozen = frozen_groups(args)
    for name, p in model.named_parameters():
        if family.group_of(name) in frozen:
            p.requires_grad_(False)
    logger.info("%s model: %s frozen", family.name, ", ".join(sorted(frozen)) or "no part")


def _lora(model: Any, args: Any, *, use_dora: bool = False) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=_peft_task_type(model),
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=_target_modules(args, model),
        modules_to_save=list(args.modules_to_save) or None,
        use_dora=use_dora,
    )
    if getattr(args, "gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    with peft_checkpointing_query():
        model = get_peft_model(model, config)
    _apply_trainable_patterns(model, args)
    _lean_lora(model, args)
    return model


def _lean_lora(model: Any, args: Any) -> None:
    """``--lean_lora`` (default true): the adapter path in the activations' dtype, its add inside the GEMM."""
    from lmforge.tuners.lean_lora import patch_lean_lora

    if not getattr(args, "lean_lora", True):
        return
    n = patch_lean_lora(model)
    if n:
        logger.info("lean LoRA: %d adapted layers compute the adapter path in the activations' dtype", n)


def _peft_task_type(model: Any) -> str:
    """SEQ_CLS for a sequence classifier (a reward model, a classifier, a reranker: peft then also trains its new
    head), FEATURE_EXTRACTION for a bare transformer body (an embedding model), else CAUSAL_LM."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return "FEATURE_EXTRACTION" if getattr(model, "base_model", model) is model else "CAUSAL_LM"


@TUNERS.register("lora")
def lora(model: Any, args: Any) -> Any:
    return _lora(model, args)


@TUNERS.register("dora")
def dora(model: Any, args: Any) -> Any:
    return _lora(model, args, use_dora=True)


@TUNERS.register("qlora")
def qlora(model: Any, args: Any) -> Any:
    """LoRA on a 4-bit base; the model must have been loaded with ``qlora_quantization_config``.

    peft's ``prepare_model_for_kbit_training`` also casts every parameter that is not quantized (embeddings,
    output head, norms) to float32, a guard for float16 training: on a bf16 base that doubles the embedding and
    head (2.2 GB more on a 7B model), makes the residual stream and the activations kept for backward float32,
    and runs the head's GEMM in float32. Those parameters are frozen, so with a bf16 base they stay bf16 here
    and the run computes as bf16 LoRA does; a float16 base still gets peft's preparation."""
    import torch
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        raise ValueError("train_type qlora: the base model is not quantized (load it with qlora_quantization_config)")
    if any(p.dtype == torch.float16 for p in model.parameters()):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return _lora(model, args)


@TUNERS.register("full")
def full(model: Any, args: Any) -> Any:
    for p in model.parameters():
        p.requires_grad_(True)
    _freeze_vision_parts(model, args)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("train_type full: --freeze_vit/--freeze_aligner/--freeze_llm froze every parameter")
    return model


@TUNERS.register("freeze")
def freeze(model: Any, args: Any) -> Any:
    """Freeze parameters matching ``--freeze_parameters``; ``--trainable_parameters`` wins over it."""
    if not args.freeze_parameters and not args.trainable_parameters:
        raise ValueError("train_type freeze needs --freeze_parameters (and/or --trainable_parameters) patterns, "
                         "e.g. --freeze_parameters model.embed_tokens model.layers.0.")
    frozen = 0
    for name, p in model.named_parameters():
        freeze_it = _matches(name, args.freeze_parameters) if args.freeze_parameters else True
        p.requires_grad_(not freeze_it)
        frozen += int(freeze_it)
    _freeze_vision_parts(model, args)
    _apply_trainable_patterns(model, args)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("train_type freeze: the patterns froze every parameter; nothing would train")
    return model


def qlora_quantization_config(args: Any) -> Any:
    """bitsandbytes 4-bit config for QLoRA; a clear error where it cannot run."""
    import torch

    if not torch.cuda.is_available():
        raise SetupError("train_type qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU use --train_type lora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SetupError("train_type qlora needs bitsandbytes: pip install 'lmforge[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=args.quant_bits == 4,
        load_in_8bit=args.quant_bits == 8,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def prepare_model(model: Any, args: Any) -> Any:
    """Apply the tuner named by ``args.train_type``."""
    if args.train_type not in TUNERS:
        raise ValueError(TUNERS.unknown_message(args.train_type))
    model = TUNERS.get(args.train_type)(model, args)
    logger.info(trainable_summary(model))
    return model


def trainable_summary(model: Any) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {train:,} of {total:,} ({100 * train / max(total, 1):.3f}%)"
