"""Optimizer factories (the ``OPTIMIZERS`` registry, ``--optimizer``).

An entry is ``make(model, args) -> torch.optim.Optimizer``; the Trainer builds the learning-rate
scheduler on top. ``args`` is read with ``getattr`` defaults, so both lmforge's ``TrainArguments``
and transformers' ``TrainingArguments`` work: ``learning_rate``, ``weight_decay``, ``adam_beta1``,
``adam_beta2``, ``adam_epsilon``, and for ``multi_lr`` ``loraplus_lr_ratio`` (16) and
``embedding_lr_ratio`` (0.1).

Only parameters with ``requires_grad`` are given to the optimizer. Each param group carries a
``name`` key ("lora_B", "embedding/no_decay", ...) so logs and tests can tell them apart.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from lmforge.registry import OPTIMIZERS

NamedParams = list[tuple[str, nn.Parameter]]


def resolve_lr(args: Any) -> float:
    """``args.learning_rate``, or lmforge's default for the train type when it is still unset."""
    lr = getattr(args, "learning_rate", None)
    if lr is None:
        adapter = getattr(args, "train_type", "lora") in ("lora", "dora", "qlora")
        lr = 1e-4 if adapter else 1e-5
    return float(lr)


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm scales get no weight decay: shrinking them toward 0 is not regularisation
    (a norm weight of 0 switches the layer off) and they are a negligible share of parameters."""
    lname = name.lower()
    return param.ndim < 2 or lname.endswith(".bias") or "norm" in lname


def trainable(model: nn.Module) -> NamedParams:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def split_decay(name: str, params: NamedParams, lr: float, weight_decay: float) -> list[dict]:
    """Two param groups (decay / no_decay) at one learning rate; empty groups are dropped."""
    groups = []
    for suffix, wd, keep in (("decay", weight_decay, False), ("no_decay", 0.0, True)):
        ps = [p for n, p in params if is_no_decay(n, p) == keep]
        if ps:
            groups.append({"name": f"{name}/{suffix}", "params": ps, "lr": lr, "weight_decay": wd})
    return groups


def adamw(groups: Iterable[dict], args: Any) -> torch.optim.AdamW:
    """AdamW over ``groups``; the fused kernel when every parameter is on CUDA (one launch per step)."""
    groups = list(groups)
    if not groups:
        raise ValueError("the model has no trainable parameters: nothing to optimize")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups,
        lr=resolve_lr(args),
        betas=(getattr(args, "adam_beta1", 0.9), getattr(args, "adam_beta2", 0.999)),
        eps=getattr(args, "adam_epsilon", 1e-8),
        fused=fused or None,
    )


@OPTIMIZERS.register("default")
def default(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """AdamW at one learning rate, no weight decay on biases and norm weights."""
    return adamw(split_decay("default", trainable(model), resolve_lr(args), getattr(args, "weight_decay", 0.0)), args)


def _embedding_param_ids(model: nn.Module) -> set[int]:
    """Parameters of the input/output embeddings (and of LoRA or modules_to_save wrappers on them)."""
    ids: set[int] = set()
    getters: list[Callable[[], Any]] = [getattr(model, "get_input_embeddings", lambda: None),
                                        getattr(model, "get_output_embeddings", lambda: None)]
    for get in getters:
        try:
            module = get()
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module):
            ids.update(id(p) for p in module.parameters())
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.split(".")[-1] in ("lm_head", "embed_tokens", "wte"):
            ids.update(id(p) for p in module.parameters())
    return ids


@OPTIMIZERS.register("multi_lr")
def multi_lr(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """AdamW with per-group learning rates.

    - LoRA ``B`` matrices at ``lr * loraplus_lr_ratio`` (16): LoRA+ (Hayou, Ghosh & Yu 2024,
      "LoRA+: Efficient Low Rank Adaptation of Large Models") shows that A and B at one rate is
      inefficient for wide models because B starts at zero; a larger rate on B speeds up
      fine-tuning at equal cost.
    - Embeddings and ``lm_head`` (trained in full or through LoRA) at ``lr * embedding_lr_ratio``
      (0.1): they touch every token and are easily damaged by a rate tuned for adapters.
    - Everything else at ``lr``. No weight decay on biases and norm weights in any group.
    """
    lr = resolve_lr(args)
    wd = getattr(args, "weight_decay", 0.0)
    b_ratio = getattr(args, "loraplus_lr_ratio", None) or 16.0
    emb_ratio = getattr(args, "embedding_lr_ratio", None) or 0.1
    emb_ids = _embedding_param_ids(model)
    # "base" first: transformers logs the first group's rate as the run's learning_rate
    buckets: dict[str, NamedParams] = {"base": [], "lora_B": [], "embedding": []}
    for n, p in trainable(model):
        if id(p) in emb_ids:
            buckets["embedding"].append((n, p))
        elif "lora_B" in n or "lora_embedding_B" in n:
            buckets["lora_B"].append((n, p))
        else:
            buckets["base"].append((n, p))
    rates = {"base": lr, "lora_B": lr * b_ratio, "embedding": lr * emb_ratio}
    groups = [g for key, params in buckets.items() for g in split_decay(key, params, rates[key], wd)]
    return adamw(groups, args)


@OPTIMIZERS.register("multimodal")
def multimodal(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """AdamW with the vision tower at ``--vit_lr`` and the aligner at ``--aligner_lr`` (each default
    ``--learning_rate``), the rest at ``--learning_rate``; the parts come from the model's family
    (``lmforge.model.vision``). Chosen by default when either rate is set."""
    from lmforge.model.vision import require_family

    family = require_family(model)
    if family is None:
        raise ValueError("--vit_lr/--aligner_lr (optimizer multimodal) need a vision-language model")
    lr = resolve_lr(args)
    rates = {"vision_tower": getattr(args, "vit_lr", None) or lr, "aligner": getattr(args, "aligner_lr", None) or lr}
    buckets: dict[str, NamedParams] = {"base": [], "vision_tower": [], "aligner": []}
    for n, p in trainable(model):
        group = family.group_of(n)
        buckets[group if group in rates else "base"].append((n, p))
    wd = getattr(args, "weight_decay", 0.0)
    groups = [g for key, params in buckets.items() for g in split_decay(key, params, rates.get(key, lr), wd)]
    return adamw(groups, args)
