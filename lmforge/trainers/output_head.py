"""The output layer seen by the fused loss: which module it is, its weight, and hidden states out of it.

The fused cross-entropy needs the last hidden states and the ``lm_head`` weight instead of the
logits. Calling the backbone directly would bypass wrappers that must see the forward pass (DDP's
gradient hooks, accelerate's device hooks, peft), so the model runs as usual while its output
layer returns its input: ``outputs.logits`` is then the hidden states, computed by exactly the
same modules.

``resolve_output_head`` refuses, with the reason, where that would change the loss: an output
layer with a bias, LoRA adapters or quantised/sharded weights, and models that transform the
logits non-linearly after the output layer (soft-capping; a linear scaling is harmless, since with
the output layer bypassed it scales the hidden states instead). ``check_output_head`` then
verifies on a few tokens that ``hidden @ weight.T`` reproduces the model's own logits.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

# config fields of models that pass their logits through a non-linear function after lm_head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping")


def _return_input(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden_states


@dataclass
class OutputHead:
    module: torch.nn.Module

    @property
    def weight(self) -> Tensor:
        """The active weight (a peft ``modules_to_save`` copy when one is active)."""
        return self.module.weight

    @contextlib.contextmanager
    def returning_hidden_states(self) -> Iterator[None]:
        """Inside the block the output layer returns its input, so the model's ``logits`` are hidden states."""
        had = "forward" in self.module.__dict__
        old = self.module.__dict__.get("forward")
        self.module.forward = _return_input
        try:
            yield
        finally:
            if had:
                self.module.forward = old
            else:
                del self.module.forward


def unwrap(model: Any) -> Any:
    """The transformers model inside peft / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):   # DDP, DeepSpeed engine
        model = model.module
    if hasattr(model, "get_base_model"):                                             # peft
        model = model.get_base_model()
    return model


def resolve_output_head(model: Any) -> tuple[OutputHead | None, str]:
    """``(head, "")`` when the fused loss can replace the output layer, else ``(None, reason)``."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0, False):
            return None, f"the model soft-caps its logits after the output layer ({name}={value})"
    get = getattr(base, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None, f"{type(base).__name__} has no output embedding layer"
    inner = head
    if type(head).__name__ == "ModulesToSaveWrapper":   # peft modules_to_save: the active copy trains
        inner = head.modules_to_save[head.active_adapters[0]] if (
            not head.disable_adapters and head.active_adapters
            and head.active_adapters[0] in head.modules_to_save) else head.original_module
    if hasattr(inner, "lora_A") or hasattr(inner, "base_layer"):
        return None, "the output layer carries adapters (LoRA on lm_head)"
    if type(inner) is not torch.nn.Linear:
        return None, f"the output layer is a {type(inner).__name__}, not a plain Linear"
    if inner.bias is not None:
        return None, "the output layer has a bias"
    w = inner.weight
    if type(w) is not torch.nn.Parameter or not w.dtype.is_floating_point or w.numel() == 0 or w.dim() != 2:
        return None, "the output weight is quantised or sharded (ZeRO-3/FSDP)"
    return OutputHead(head), ""


def check_output_head(model: Any, head: OutputHead, n_tokens: int = 8) -> str:
    """"" if ``hidden @ weight.T`` equals the model's logits on a few random tokens, else why not."""
    base = unwrap(model)
    p = head.weight
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0)).to(p.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.float()
            with head.returning_hidden_states():
                hidden = model(input_ids=ids, use_cache=False).logits
    finally:
        model.train(was_training)
    if hidden.shape[-1] != p.shape[1]:
        return f"the output layer's input has {hidden.shape[-1]} features, its weight {p.shape[1]}"
    expect = (hidden.to(p.dtype) @ p.T).float()
    err = (logits - expect).abs().max().item()
    tol = 1e-4 if p.dtype == torch.float32 else 2e-2
    if not err <= tol * (1.0 + logits.abs().max().item()):
        return f"hidden @ weight.T differs from the model's logits by {err:.3g}"
    return ""
