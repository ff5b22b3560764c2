"""What a model gets before training: attention kernel, lean or Liger layers, activation checkpointing.

``configure_for_training(model, args, on_gpu)`` runs before the tuner wraps the model and
returns one line per decision for the log; ``enable_gradient_checkpointing(model, every)`` runs
after it (QLoRA's preparation enables checkpointing itself, and the selection of layers must
come last). Each fast path checks that it computes the same thing as the plain one and falls back
with the reason logged when it cannot apply; ``true`` instead of ``auto`` turns that fallback
into an error naming the flag.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from lmforge.arguments.train import switch
from lmforge.utils.errors import SetupError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- attention

def set_attention(model: Any, name: str) -> None:
    """Switch a loaded model's attention implementation (transformers 5's ``set_attn_implementation``)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(f"could not switch the attention implementation to {name!r}")


def _probe_varlen(model: Any, original: str) -> str | None:
    """None if packed logits with varlen attention match the model's original attention, else why not."""
    from lmforge.model.kernels import varlen_attention as va

    cfg = model.config
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return f"attention_dropout={cfg.attention_dropout} (the varlen kernels here run without dropout)"
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return "the model has sliding-window attention layers"
    p = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 24), generator=g).to(p.device)
    pos = torch.tensor([list(range(9)) + list(range(15))], device=p.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            set_attention(model, original)
            ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            set_attention(model, va.ATTN_NAME)
            calls = va.stats["varlen_calls"]
            out = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            used = va.stats["varlen_calls"] - calls
    except Exception as e:  # noqa: BLE001 - whatever breaks, the model keeps its own attention
        set_attention(model, original)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        model.train(was_training)
    if used == 0:
        set_attention(model, original)
        return "the model does not pass position_ids to its attention layers"
    err = (out - ref).abs().max().item()
    tol = 1e-4 if p.dtype == torch.float32 else 5e-2
    if not err <= tol * (1.0 + ref.abs().max().item()):
        set_attention(model, original)
        return f"packed logits differ from {original} attention by {err:.3g}"
    return None


def enable_varlen_attention(model: Any, *, required: bool = False) -> str:
    """Switch ``model`` to ``lmforge_varlen`` if it gives the same packed logits; returns a log line."""
    from lmforge.model.kernels import varlen_attention as va

    original = model.config._attn_implementation or "sdpa"
    va.register()
    why = _probe_varlen(model, original)
    if why is not None:
        if required:
            raise SetupError(f"--varlen_attention true: cannot use variable-length attention: {why}")
        return f"attention: {original} with a block-diagonal mask for packed rows (varlen attention off: {why})"
    kernels = ", ".join(va.chosen_kernels()) or "chosen on first use"
    return f"attention: variable-length ({kernels}) for packed rows, {original} otherwise"


# ---------------------------------------------------------------- norms and MLPs

def apply_liger(model: Any) -> str:
    """Liger's RMSNorm, RoPE and SwiGLU kernels (its cross-entropy is used by the trainer instead)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise SetupError("--use_liger_kernel: liger-kernel is not installed (pip install 'lmforge[liger]')") from None
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger: no kernels for model type {model_type!r}; plain layers"
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return "liger: RMSNorm, RoPE and SwiGLU kernels"


def apply_lean_layers(model: Any) -> str:
    from lmforge.model.kernels.lean_layers import patch_lean_layers

    done = patch_lean_layers(model)
    if not any(done.values()):
        return "lean layers: no standard RMSNorm or SwiGLU module found; plain layers"
    return f"lean layers: {done['rms_norm']} RMSNorm and {done['swiglu']} SwiGLU modules keep fewer activations"


# ---------------------------------------------------------------- the policy

def configure_for_training(model: Any, args: Any, on_gpu: bool) -> list[str]:
    """Apply the kernels ``args`` ask for (``--use_liger_kernel``, ``--lean_layers``,
    ``--varlen_attention``) to an unwrapped model; returns one log line per decision."""
    lines = []
    if args.use_liger_kernel:
        if not on_gpu:
            raise SetupError("--use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton); drop the flag on CPU")
        lines.append(apply_liger(model))
    lean = switch(getattr(args, "lean_layers", "auto"))
    if lean or (lean is None and on_gpu and not args.use_liger_kernel):
        if args.use_liger_kernel:
            lines.append("lean layers: off (Liger's kernels replace the same modules)")
        else:
            lines.append(apply_lean_layers(model))
    varlen = switch(getattr(args, "varlen_attention", "auto"))
    attn = args.attn_impl or model.config._attn_implementation
    if args.packing and (varlen or (varlen is None and on_gpu)):
        if attn not in (None, "sdpa", "eager"):
            if varlen:
                raise SetupError(f"--varlen_attention true conflicts with --attn_impl {attn}")
            lines.append(f"attention: {attn} as asked (--attn_impl); varlen attention off")
        else:
            lines.append(enable_varlen_attention(model, required=bool(varlen)))
    elif varlen and not args.packing:
        lines.append("attention: --varlen_attention applies to padding-free batches (--packing); unused")
    return lines


def enable_gradient_checkpointing(model: Any, every: int = 1) -> str:
    """Activation checkpointing on every ``every``-th decoder layer (1: all); returns a log line.

    Done here rather than by the Trainer so the layer selection works on every transformers 5
    release (``every_n_layers`` is recent) and applies to LoRA and QLoRA models alike.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if every < 1:
        raise ValueError(f"--gradient_checkpointing_every must be >= 1, got {every}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
    on = sum(bool(layer.gradient_checkpointing) for layer in layers)
    return f"gradient checkpointing: {on} of {len(layers)} layers recompute their activations"
