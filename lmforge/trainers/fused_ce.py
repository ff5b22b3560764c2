"""Fused linear + cross-entropy: the loss from the last hidden states, never the full logits.

With a 152k-entry vocabulary the logits of a 16k-token step are 4.6 GB in bf16 and twice that once
upcast for the loss, plus the same again for their gradient. Here the tokens are processed in
chunks: for each chunk the forward pass computes the chunk's logits, its summed loss and at once
the gradient of that loss with respect to the logits, turns it into the chunk's hidden-state
gradient and adds its share of the output-weight gradient (float32 accumulator), then drops the
logits. The backward pass only scales the stored gradients by the incoming one. Peak extra
memory is one ``[chunk, V]`` block; the matmuls are the same three as the plain path.

Why hand-written: Liger's kernel (used instead with ``--use_liger_kernel``) needs Triton and a GPU
and has no per-token weights, and lmforge needs ``loss_scale`` weights, ``ignore_index`` rows,
label smoothing and its own normalisation (``num_items_in_batch``) on every device. The
element-wise part of a chunk (log-sum-exp, softmax minus one-hot, scaling) runs as one compiled
kernel on CUDA (``lmforge.model.kernels.compile``) and as in-place eager ops elsewhere.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import Tensor

from lmforge.model.kernels.compile import CudaCompiled, compile_enabled
from lmforge.trainers.losses import IGNORE_INDEX, reduce_token_losses

logger = logging.getLogger(__name__)

LOGITS_BUDGET = 2 ** 28   # elements of one chunk's logits (512 MB in bf16)


def default_chunk_rows(vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Rows per chunk so that one chunk's logits hold about ``budget`` elements (64..8192, a multiple of 64)."""
    return max(64, min(8192, budget // max(vocab, 1) // 64 * 64))


# ---------------------------------------------------------------- one chunk: logits -> (summed loss, dloss/dlogits)

def _ce_chunk_inplace(logits: Tensor, target: Tensor, scale: Tensor, smoothing: float,
                      want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Eager form: float32 work done in place on one copy of the chunk."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, target[:, None]).squeeze(1)
    if smoothing:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - x.mean(-1))
    total = (loss * scale).sum()
    if not want_grad:
        return total, None
    g = x.sub_(lse[:, None]).exp_()                                      # softmax
    if smoothing:
        g.sub_(smoothing / x.shape[-1])
    g.scatter_add_(1, target[:, None], torch.full_like(lse[:, None], smoothing - 1.0))
    g.mul_(scale[:, None])
    return total, g.to(logits.dtype)


def _ce_chunk_pointwise(logits: Tensor, target: Tensor, scale: Tensor, smoothing: float,
                        want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """The same math without scatter or in-place ops, so inductor fuses it into two kernels."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    onehot = torch.arange(x.shape[-1], device=x.device)[None, :] == target[:, None]
    loss = lse - torch.where(onehot, x, 0.0).sum(-1)
    if smoothing:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - x.mean(-1))
    total = (loss * scale).sum()
    if not want_grad:
        return total, None
    g = torch.exp(x - lse[:, None]) - (1.0 - smoothing) * onehot.float() - smoothing / x.shape[-1]
    return total, (g * scale[:, None]).to(logits.dtype)


_ce_chunk_compiled = CudaCompiled(_ce_chunk_pointwise)


def _ce_chunk(logits: Tensor, target: Tensor, scale: Tensor, smoothing: float,
              want_grad: bool) -> tuple[Tensor, Tensor | None]:
    # A one-row chunk runs eagerly: the kernel compiled for dynamic sizes assumes at least two rows
    # (0/1 specialisation), and a recompile mid-run stalls every other rank for its second or two.
    if logits.is_cuda and compile_enabled() and _ce_chunk_compiled._failed is None and logits.shape[0] > 1:
        return _ce_chunk_compiled(logits, target, scale, smoothing, want_grad)
    return _ce_chunk_inplace(logits, target, scale, smoothing, want_grad)


def kernel_status() -> str:
    """How the chunk math ran last: compiled, eager, or eager after a compile failure."""
    return _ce_chunk_compiled.status


# ---------------------------------------------------------------- float32 accumulation of the weight gradient

@functools.lru_cache(maxsize=None)
def _addmm_out_dtype_works(device: str) -> bool:
    """Whether ``addmm(fp32, bf16, bf16, out_dtype=fp32)`` runs here (recent PyTorch, CUDA)."""
    try:
        a = torch.zeros(2, 2, device=device)
        b = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        return bool(torch.addmm(a, b, b, out_dtype=torch.float32)[0, 0] == 2)
    except Exception:  # noqa: BLE001 - missing overload or backend: use the portable form
        return False


def _accumulate(acc: Tensor, g: Tensor, h: Tensor) -> Tensor:
    """``acc + g.T @ h`` in float32 (``acc`` float32; ``g``, ``h`` in the model dtype)."""
    if g.dtype == torch.float32:
        return acc.addmm_(g.T, h)
    if acc.is_cuda and _addmm_out_dtype_works(str(acc.device)):
        return torch.addmm(acc, g.T, h, out_dtype=torch.float32)
    return acc.add_(g.T @ h)


# ---------------------------------------------------------------- the autograd function

class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed (scaled) cross-entropy of ``hidden @ weight.T``; gradients formed in the forward pass."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, target: Tensor, scale: Tensor, smoothing: float,
                chunk_rows: int, want_h: bool, want_w: bool) -> Tensor:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            h = hidden[s:e]
            loss, g = _ce_chunk(h @ weight.T, target[s:e], scale[s:e], smoothing, want_h or want_w)
            total += loss
            if want_h:
                torch.mm(g, weight, out=grad_h[s:e])
            if want_w:
                grad_w = _accumulate(grad_w, g, h)
            del g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


def _labelled_rows(hidden: Tensor, labels: Tensor, loss_scale: Tensor | None):
    if hidden.dim() != 2:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    mask = labels != IGNORE_INDEX
    scale = mask.float()
    if loss_scale is not None:
        scale = scale * loss_scale.reshape(-1).float()
    # only labelled rows matter: dropping the rest saves matmuls when prompts are masked
    idx = mask.nonzero().squeeze(1)
    if idx.numel() < labels.numel():
        hidden, labels, scale = hidden.index_select(0, idx), labels[idx], scale[idx]
    return hidden, labels, scale.detach(), mask.sum()


def linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, labels: Tensor, *, loss_scale: Tensor | None = None,
                             label_smoothing: float = 0.0, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, without the full logits.

    ``hidden`` [N, H] (or [B, T, H]) already lined up with ``labels`` (-100 = ignore), ``weight``
    [V, H] the output embedding. Returns ``(sum_loss, n_labelled)``: the float32 sum of
    (``loss_scale``-weighted) per-token losses and the count of labelled tokens, so the caller
    divides by its own normaliser. Gradients flow to ``hidden`` and ``weight`` (when they need them).
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    hidden, labels, scale, n = _labelled_rows(hidden, labels, loss_scale)
    want_h = torch.is_grad_enabled() and hidden.requires_grad
    want_w = torch.is_grad_enabled() and weight.requires_grad
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        total = _FusedLinearCrossEntropy.apply(
            hidden.to(weight.dtype), weight, labels, scale, float(label_smoothing),
            chunk_size or default_chunk_rows(weight.shape[0]), want_h, want_w)
    return total, n


def liger_linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, labels: Tensor, *,
                                   label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """The same sum with Liger's fused kernel (CUDA; no per-token weights)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, labels, _, n = _labelled_rows(hidden, labels, None)
    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                                          reduction="sum")
    out = fn(weight, hidden.to(weight.dtype), labels)
    loss = out if isinstance(out, Tensor) else out.loss
    return loss.float(), n


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, loss_scale: Tensor | None = None,
                               num_items_in_batch: int | Tensor | None = None, label_smoothing: float = 0.0,
                               chunk_size: int | None = None, use_liger: bool = False) -> Tensor:
    """The ``LOSSES`` cross-entropy computed from hidden states: summed, divided by ``num_items_in_batch``
    (or this batch's labelled tokens). ``labels`` are lined up with ``hidden`` (already shifted).

    ``use_liger`` takes Liger's kernel when ``loss_scale`` is absent or all ones.
    """
    if use_liger and (loss_scale is None or bool((loss_scale == 1).all())):
        total, n = liger_linear_cross_entropy_sum(hidden, weight, labels, label_smoothing=label_smoothing)
    else:
        total, n = linear_cross_entropy_sum(hidden, weight, labels, loss_scale=loss_scale,
                                            label_smoothing=label_smoothing, chunk_size=chunk_size)
    return reduce_token_losses(total.reshape(1), n, num_items_in_batch)


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 4096,
                          loss_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(sum_loss, n_labelled)`` of ``hidden @ weight.T``; the earlier name of :func:`linear_cross_entropy_sum`."""
    return linear_cross_entropy_sum(hidden, weight, labels, loss_scale=loss_scale, chunk_size=chunk_size)
