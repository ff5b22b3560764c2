"""A LoRA forward that computes the adapter path in the activations' dtype and folds its add into one GEMM.

Why hand-written: peft keeps LoRA weights in float32 when the base is bf16 (``autocast_adapter_dtype``, for
the optimizer's precision) and casts each layer's *input* to the adapter's dtype before ``lora_A``. On a bf16
model under autocast that is, per adapted linear layer and step, a float32 copy of the input, a bf16 copy back
(autocast), a bf16 copy that the ``lora_A`` matmul keeps for backward, a ``* scaling`` pass over the output and
an add of two outputs, each mirrored in backward. On a 7B model with LoRA on every linear layer those
element-wise passes took a quarter of the GPU's step time (benchmarks/RESULTS.md, 2026-12-01) and the saved
copies several GiB.

Here the small adapter *weights* are cast instead (``A`` and ``scaling * B``, a few hundred KB), the input goes
to ``lora_A`` as it is (the tensor the base layer already keeps, so nothing new is saved), and the adapter's
output is added by the second GEMM itself: ``torch.addmm(base_out, h, (scaling * B)^T)``. The float32 weights
still receive float32 gradients through the casts, as with autocast. In float32 the result equals peft's up to
the summation order; in bf16 it differs by bf16 rounding (one rounding less: the add happens in the GEMM's
float32 accumulator). With LoRA dropout, peft keeps each adapter's dropped copy of the input for backward; here
``_DroppedLoraA`` keeps the input and a 1-byte mask and recomputes the dropped input in backward.

Only the plain case is replaced: one active adapter, not merged or disabled, no DoRA or other variant, no LoRA
bias, no per-call ``adapter_names``, adapters as ``nn.Linear``, weights not partitioned by DeepSpeed ZeRO-3
(which gathers them in the submodules' own forward). Everything else runs peft's forward unchanged.
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _plain_adapter(layer: Any) -> str | None:
    """The one active adapter's name if this call can take the lean path, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    a, b = layer.lora_A[name], layer.lora_B[name]
    if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)) or a.bias is not None \
            or b.bias is not None or hasattr(a.weight, "ds_id"):
        return None
    return name


class _DroppedLoraA(torch.autograd.Function):
    """``dropout(x) @ a.T`` keeping ``x`` (which the layer keeps anyway) and a 1-byte mask, not the dropped copy.

    The mask comes from ``aten.native_dropout``, the kernel ``nn.Dropout`` runs, so the same seed draws the
    same mask as peft's dropout; backward recomputes the dropped input (one element-wise pass)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, p: float) -> Tensor:
        dropped, mask = torch.ops.aten.native_dropout(x, p, True)
        mask = mask.bool()   # the CPU kernel returns it in x's dtype
        ctx.save_for_backward(x, a, mask)
        ctx.scale = 1.0 / (1.0 - p)
        return F.linear(dropped, a)

    @staticmethod
    def backward(ctx: Any, gh: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, a, mask = ctx.saved_tensors   # under autocast h (and gh) may be bf16 beside float32 x and a
        gx = ga = None
        if ctx.needs_input_grad[0]:
            gx = torch.where(mask, (gh @ a.to(gh.dtype)) * ctx.scale, 0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(mask, x * ctx.scale, 0).to(gh.dtype)
            ga = (gh.reshape(-1, gh.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])).to(a.dtype)
        return gx, ga, None


def _lora_a(dropout: Any, x: Tensor, a: Tensor) -> Tensor:
    if isinstance(dropout, torch.nn.Dropout) and dropout.training and 0.0 < dropout.p < 1.0 and torch.is_grad_enabled():
        return _DroppedLoraA.apply(x, a, dropout.p)
    return F.linear(dropout(x), a)


def _lean_lora_forward(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    name = None if (args or kwargs) else _plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    a = self.lora_A[name].weight                                    # [r, in]
    h = _lora_a(self.lora_dropout[name], x, a.to(x.dtype))          # [..., r]
    b = self.lora_B[name].weight.to(result.dtype) * self.scaling[name]  # [out, r], scaled while it is small
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype), b.t())
    return out.view(result.shape)


def is_lora_layer(module: Any) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer) and hasattr(module, "base_layer") and hasattr(module, "lora_A")


def patch_lean_lora(model: torch.nn.Module) -> int:
    """Give every peft LoRA layer with linear adapters the lean forward; returns how many were patched.

    Layers with embedding or convolution adapters keep peft's forward; the lean one falls back to peft's
    per call whenever the call is not the plain case (see the module docstring)."""
    n = 0
    for module in model.modules():
        if getattr(module, "_lmforge_lean_lora", False) or not is_lora_layer(module):
            continue
        if not all(isinstance(m, torch.nn.Linear) for m in module.lora_A.values()):
            continue
        module.forward = types.MethodType(_lean_lora_forward, module)
        module._lmforge_lean_lora = True
        n += 1
    return n
