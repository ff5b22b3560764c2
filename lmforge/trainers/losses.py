"""Token-level losses for causal LM training (the ``LOSSES`` registry, ``--loss_type``).

Every entry has one signature, which the Trainer calls with labels it has already shifted:

    loss_fn(logits [B,T,V], labels [B,T], *, loss_scale [B,T] | None, num_items_in_batch) -> scalar

``labels[b, t]`` is the target of ``logits[b, t]``; ``-100`` marks a token that carries no loss.
The result is the (``loss_scale``-weighted) sum of per-token losses divided by
``num_items_in_batch`` when the Trainer gives it (the labelled tokens of the whole accumulated
batch, so that gradient accumulation equals one large batch exactly), else by this batch's
labelled tokens. Losses are computed in float32 whatever the model's dtype.

Add one with a plugin file::

    from lmforge.registry import LOSSES
    from lmforge.trainers.losses import token_loss

    @LOSSES.register("my_loss")
    @token_loss
    def my_loss(logits, targets):          # [N, V] float32 labelled rows, [N] targets
        return per_token_loss              # [N]

``chunked_cross_entropy`` computes the same cross-entropy from the last hidden states and the
output embedding without ever holding the full ``[N, V]`` logits, for large vocabularies.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.registry import LOSSES

IGNORE_INDEX = -100

# per-token loss over labelled rows: (logits [N, V] float32, targets [N]) -> losses [N]
TokenLossFn = Callable[[Tensor, Tensor], Tensor]


def reduce_token_losses(per_token: Tensor, n_labelled: int | Tensor,
                        num_items_in_batch: int | Tensor | None) -> Tensor:
    """Sum of per-token losses over ``num_items_in_batch`` (if given) or the labelled tokens here."""
    total = per_token.sum()
    denom = num_items_in_batch if num_items_in_batch is not None else n_labelled
    # a batch with no labelled token gives 0 (with a graph), not 0/0 = NaN
    if isinstance(denom, Tensor):
        return total / denom.to(device=total.device, dtype=total.dtype).clamp(min=1.0)
    return total / max(float(denom), 1.0)


def token_loss(per_token_fn: TokenLossFn) -> Callable[..., Tensor]:
    """Turn a per-token loss on labelled rows into a full ``LOSSES`` entry.

    The wrapper selects the labelled positions first (so only those rows are upcast to float32),
    applies ``loss_scale`` and divides as described in the module docstring.
    """

    @functools.wraps(per_token_fn)
    def loss_fn(logits: Tensor, labels: Tensor, *, loss_scale: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None) -> Tensor:
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: "
                             "the loss expects labels already shifted to line up with logits")
        mask = labels != IGNORE_INDEX
        picked = logits[mask].float()                       # [N, V]
        targets = labels[mask]
        per_token = per_token_fn(picked, targets)           # [N]; N may be 0, the graph stays connected
        if loss_scale is not None:
            per_token = per_token * loss_scale[mask].to(per_token.dtype)
        return reduce_token_losses(per_token, targets.numel(), num_items_in_batch)

    del loss_fn.__wrapped__  # callers should see the LOSSES signature, not the per-token one
    return loss_fn


@LOSSES.register("cross_entropy")
@token_loss
def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross-entropy (negative log-likelihood of the target token): the default."""
    return F.cross_entropy(logits, targets, reduction="none")


@LOSSES.register("label_smoothing_ce")
@token_loss
def label_smoothing_ce(logits: Tensor, targets: Tensor, eps: float = 0.1) -> Tensor:
    """Cross-entropy against a target mixed with the uniform distribution (weight ``eps``).

    Keeps the model from growing over-confident logits on small SFT sets (Szegedy et al. 2016,
    "Rethinking the Inception Architecture for Computer Vision", section 7).
    """
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=eps)


@LOSSES.register("focal")
@token_loss
def focal(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss ``-(1 - p)^gamma * log p``: down-weights tokens the model already gets right,
    so training concentrates on the hard ones (Lin et al. 2017, "Focal Loss for Dense Object
    Detection").
    """
    logp = -F.cross_entropy(logits, targets, reduction="none")
    return -((1.0 - logp.exp()) ** gamma) * logp


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T`` computed ``chunk_size`` rows at a time.

    The forward pass keeps only each row's log-sum-exp; the backward pass recomputes one chunk of
    logits at a time to form ``softmax - onehot``. Peak extra memory is one ``[chunk, V]`` float32
    block instead of ``[N, V]`` (same idea as the fused linear cross-entropy of Liger kernels,
    written here with plain matmuls).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, scale: Tensor, chunk_size: int) -> Tensor:
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        safe = labels.clamp(min=0)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = (hidden[s:e] @ weight.T).float()
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe[s:e, None]).squeeze(1)
            total += ((lse[s:e] - target_logit) * scale[s:e]).sum()
        ctx.save_for_backward(hidden, weight, safe, scale, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, safe, scale, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulate the weight gradient in float32 across chunks, cast once at the end
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        cs = ctx.chunk_size
        for s in range(0, hidden.shape[0], cs):
            e = min(s + cs, hidden.shape[0])
            logits = (hidden[s:e] @ weight.T).float()
            g = torch.exp(logits - lse[s:e, None])                     # softmax
            g.scatter_add_(1, safe[s:e, None], torch.full_like(g[:, :1], -1.0))
            g *= (scale[s:e] * grad_out)[:, None]                      # rows with scale 0 vanish
            if need_h:
                grad_h[s:e] = g.to(hidden.dtype) @ weight
            if need_w:
                grad_w += g.T @ hidden[s:e].float()
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 4096,
                          loss_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, without the full logits.

    ``hidden`` [N, H] (already lined up with ``labels`` [N], -100 = ignore), ``weight`` [V, H] the
    output embedding. Returns ``(sum_loss, n_tokens)``: the float32 sum of (``loss_scale``-
    weighted) per-token losses and the number of labelled tokens, so the caller divides by its own
    normaliser (e.g. ``num_items_in_batch``). Gradients flow to ``hidden`` and ``weight``.
    """
    if hidden.dim() != 2:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = labels != IGNORE_INDEX
    scale = mask.float()
    if loss_scale is not None:
        scale = scale * loss_scale.reshape(-1).float()
    # only labelled rows matter: dropping the rest saves matmuls when prompts are masked
    idx = mask.nonzero().squeeze(1)
    if idx.numel() < labels.numel():
        hidden, labels, scale = hidden.index_select(0, idx), labels[idx], scale[idx]
    total = _ChunkedCrossEntropy.apply(hidden, weight, labels, scale.detach(), chunk_size)
    return total, mask.sum()
