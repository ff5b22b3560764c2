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

The same cross-entropy from the last hidden states and the output embedding, without ever
holding the full ``[N, V]`` logits, is in ``lmforge.trainers.fused_ce`` (the Trainer uses it on
CUDA; ``chunked_cross_entropy`` is re-exported here under its earlier name).
"""
from __future__ import annotations

import functools
from typing import Callable

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


def __getattr__(name: str):
    """``chunked_cross_entropy`` lives in ``fused_ce`` (which imports this module): resolved on first use."""
    if name == "chunked_cross_entropy":
        from lmforge.trainers.fused_ce import chunked_cross_entropy

        return chunked_cross_entropy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
