"""Variable-length attention for padding-free packed batches, as a transformers attention backend.

The padding-free collator flattens a batch into one row whose ``position_ids`` restart at every
sequence. With ``attn_implementation="sdpa"`` transformers turns that into a 4D block-diagonal
mask: O(n^2) memory per step, key/value heads repeated for GQA, and no flash kernel (a masked
SDPA runs the slower memory-efficient kernel). This module registers ``lmforge_varlen`` with
``AttentionInterface`` and ``AttentionMaskInterface`` instead:

- the mask function returns no mask when a batch has no padding and no cache (training), and
  exactly what ``sdpa`` would get otherwise (padding, generation with a cache);
- the attention function reads the sequence boundaries from ``position_ids`` (or from
  ``cu_seq_lens_q`` / ``max_length_q`` when a collator passes them) and runs one variable-length
  kernel over the flattened tokens: flash-attn's ``flash_attn_varlen_func`` when installed, else
  PyTorch's ``torch.nn.attention.varlen.varlen_attn``, else its ``aten._flash_attention_forward``
  (both the flash kernel that SDPA uses, with ``cu_seqlens``), else exact causal SDPA per sequence
  (CPU, old GPUs, float32). Everything else goes to transformers' own ``sdpa_attention_forward``.

Why hand-written: transformers' flash-attention integration needs the flash-attn package (absent
from most images), its flex-attention path compiles a block mask every step, and PyTorch's
varlen API changed between releases (``is_causal`` became ``window_size``, ``enable_gqa`` was
added). Each kernel is checked once per device, dtype and head shape against the per-sequence
reference (forward and backward) before it is trusted; a kernel that fails is skipped with the
reason logged. ``use_backend`` forces one (tests and ``benchmarks/gpu_check_train.sh``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

ATTN_NAME = "lmforge_varlen"
CUDA_BACKENDS = ("flash_attn", "torch_varlen", "aten_flash", "sdpa_segments")
ALL_BACKENDS = CUDA_BACKENDS


@dataclass
class Segments:
    """Sequence boundaries of a flattened batch: ``cu`` int32 [n+1] on the device, the longest length."""

    cu: Tensor
    max_len: int
    _bounds: list[int] | None = field(default=None, repr=False)

    @property
    def bounds(self) -> list[int]:
        if self._bounds is None:
            self._bounds = [int(x) for x in self.cu.tolist()]
        return self._bounds


# ---------------------------------------------------------------- sequence boundaries

_cache: dict[str, Any] = {"key": None, "ref": None, "value": None}
stats: dict[str, int] = {"varlen_calls": 0, "no_position_ids": 0}


def segments_from_position_ids(position_ids: Tensor, batch: int, seq_len: int) -> Segments | None:
    """Boundaries where the position does not continue the previous one, and at every row start.

    Returns None when every row holds exactly one sequence (nothing is packed). The same rule as
    transformers' ``find_packed_sequence_indices``, so both paths agree on what a sequence is.
    """
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    starts[::seq_len] = True
    idx = starts.nonzero().squeeze(1)
    n = idx.numel()
    if n == batch:
        return None
    total = torch.tensor([pos.numel()], device=idx.device, dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return Segments(cu, max_len)


def _segments(position_ids: Tensor | None, batch: int, seq_len: int, kwargs: dict) -> Segments | None:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and kwargs.get("max_length_q") is not None:
        return Segments(cu.to(torch.int32), int(kwargs["max_length_q"]))
    if position_ids is None:
        stats["no_position_ids"] += 1
        return None
    # Every layer of one forward (and its recompute under checkpointing) gets the same tensor:
    # compute the boundaries once. The reference kept in the cache stops its id being reused.
    # (No version counter in the key: inference-mode tensors have none.)
    key = (id(position_ids), position_ids.data_ptr(), tuple(position_ids.shape), batch, seq_len)
    if _cache["key"] != key:
        _cache.update(key=key, ref=position_ids, value=segments_from_position_ids(position_ids, batch, seq_len))
    return _cache["value"]


# ---------------------------------------------------------------- kernels: (q, k, v [total, H, D], seg, scale) -> out

def _sdpa_segments(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float) -> Tensor:
    """Exact reference: causal SDPA on each sequence separately (any device, any dtype)."""
    gqa = q.shape[1] != k.shape[1]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))        # [1, H, total, D]
    b = seg.bounds
    outs = [F.scaled_dot_product_attention(qh[:, :, s:e], kh[:, :, s:e], vh[:, :, s:e], is_causal=True,
                                           scale=scale, enable_gqa=gqa)
            for s, e in zip(b, b[1:])]
    return torch.cat(outs, dim=2)[0].transpose(0, 1)


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, dropout_p=0.0,
                                  softmax_scale=scale, causal=True)


def _torch_varlen_kwargs(fn: Callable, gqa: bool, scale: float, head_dim: int) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {}
    if "is_causal" in params:          # torch 2.9-2.10
        kw["is_causal"] = True
    elif "window_size" in params:      # later: causal is window (-1, 0)
        kw["window_size"] = (-1, 0)
    else:
        raise RuntimeError("varlen_attn takes neither is_causal nor window_size")
    if "scale" in params:
        kw["scale"] = scale
    elif abs(scale - head_dim ** -0.5) > 1e-12:
        raise RuntimeError("varlen_attn has no scale argument and the model uses a non-default scale")
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


def _torch_varlen(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    kw = _torch_varlen_kwargs(varlen_attn, q.shape[1] != k.shape[1], scale, q.shape[-1])
    return varlen_attn(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, **kw)


def _aten_flash(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float) -> Tensor:
    # (query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask)
    return torch.ops.aten._flash_attention_forward(q, k, v, seg.cu, seg.cu, seg.max_len, seg.max_len, 0.0, True,
                                                   False, scale=scale)[0]


KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor, Segments, float], Tensor]] = {
    "flash_attn": _flash_attn, "torch_varlen": _torch_varlen, "aten_flash": _aten_flash,
    "sdpa_segments": _sdpa_segments,
}

# ---------------------------------------------------------------- choosing a kernel

_forced: str | None = None
_chosen: dict[tuple, str] = {}
rejected: dict[str, str] = {}   # kernel -> why it was skipped (last time it was tried)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force one kernel (``None``: choose automatically) inside the block."""
    global _forced
    if name is not None and name not in KERNELS:
        raise ValueError(f"unknown varlen attention kernel {name!r}; choose from {', '.join(KERNELS)}")
    old, _forced = _forced, name
    try:
        yield
    finally:
        _forced = old


def _self_test(name: str, device: torch.device, dtype: torch.dtype, hq: int, hkv: int, d: int) -> str | None:
    """None if kernel ``name`` matches the per-sequence reference forward and backward, else why not.

    Runs with gradients on and autocast off whatever the caller's mode (a first forward under
    ``no_grad`` or autocast must still test the backward in the kernel's own dtype).
    """
    with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
        return _run_self_test(name, device, dtype, hq, hkv, d)


def _run_self_test(name: str, device: torch.device, dtype: torch.dtype, hq: int, hkv: int, d: int) -> str | None:
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = [5, 11, 3]
    total = sum(lens)
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32, device=device)
    seg = Segments(cu, max(lens))
    q, k, v = (torch.randn(total, h, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
               for h in (hq, hkv, hkv))
    scale = d ** -0.5
    try:
        out = KERNELS[name](q, k, v, seg, scale)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is skipped, with the reason
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _sdpa_segments(qf, kf, vf, seg, scale)
    ref_grads = torch.autograd.grad(ref.square().sum(), (qf, kf, vf))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b, what in [(out, ref, "output")] + [(x, y, "gradient") for x, y in zip(grads, ref_grads)]:
        err = (a.float() - b).abs().max().item()
        if not err <= tol * (1 + b.abs().max().item()):
            return f"{what} differs from the per-sequence reference by {err:.3g}"
    return None


def kernel_for(device: torch.device, dtype: torch.dtype, hq: int, hkv: int, d: int) -> str:
    """The kernel used for these tensors: the first of ``CUDA_BACKENDS`` that passes its self-test."""
    if _forced is not None:
        return _forced
    key = (device.type, device.index, dtype, hq, hkv, d)
    if key not in _chosen:
        choice = "sdpa_segments"
        if device.type == "cuda":
            for name in CUDA_BACKENDS[:-1]:
                why = _self_test(name, device, dtype, hq, hkv, d)
                if why is None:
                    choice = name
                    break
                rejected[name] = why
                logger.info("varlen attention: kernel %s not used (%s)", name, why)
        _chosen[key] = choice
        logger.info("varlen attention: %s kernel for %s %s, %d query / %d key-value heads of %d",
                    choice, device, str(dtype).replace("torch.", ""), hq, hkv, d)
    return _chosen[key]


def chosen_kernels() -> list[str]:
    """Kernels chosen so far (for logs and benchmark reports)."""
    return sorted(set(_chosen.values()) | ({_forced} if _forced else set()))


# ---------------------------------------------------------------- the transformers hooks

def varlen_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, position_ids: Tensor | None = None,
                             **kwargs: Any) -> tuple[Tensor, None]:
    """``AttentionInterface`` entry: query [B, Hq, T, D], key/value [B, Hkv, S, D] -> ([B, T, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, t, d = query.shape
    causal = kwargs.pop("is_causal", None)
    plain = (attention_mask is not None or key.shape[2] != t or t == 1 or causal is False
             or not getattr(module, "is_causal", True))
    if plain:  # padding, a cache or bidirectional attention: exactly what the sdpa backend does
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)
    if sliding_window is not None or dropout:
        raise RuntimeError(f"{ATTN_NAME}: sliding-window and attention dropout are not supported; "
                           "train this model with --varlen_attention false")
    seg = _segments(position_ids, b, t, kwargs)
    if seg is None:  # one sequence per row, no padding: causal SDPA picks the flash kernel itself
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, **kwargs)
    stats["varlen_calls"] += 1
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, hkv, d)
    v = value.transpose(1, 2).reshape(b * t, hkv, value.shape[-1])
    scale = scaling if scaling is not None else d ** -0.5
    out = KERNELS[kernel_for(q.device, q.dtype, hq, hkv, d)](q, k, v, seg, scale)
    return out.reshape(b, t, hq, -1), None


def _is_zero(x: Any) -> bool:
    return x is None or (int(x) == 0 if not isinstance(x, Tensor) else bool((x == 0).all()))


def varlen_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """``AttentionMaskInterface`` entry: no mask for unpadded, uncached batches, else ``sdpa_mask``."""
    from transformers.masking_utils import sdpa_mask

    names = ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset")
    got = {**dict(zip(names, args)), **kwargs}
    mask = got.get("attention_mask")
    cache_position = got.get("cache_position")
    starts_at_zero = _is_zero(got.get("q_offset")) and _is_zero(got.get("kv_offset")) and (
        cache_position is None or _is_zero(cache_position[:1]))
    no_padding = mask is None or bool(mask.all())
    if no_padding and starts_at_zero and got.get("q_length") == got.get("kv_length", got.get("q_length")):
        return None
    return sdpa_mask(*args, **kwargs)


def _skip_packed_check(preprocess: Callable) -> Callable:
    """transformers' mask preparation with its packed-sequence check left out for ``lmforge_varlen``.

    For a batch without a mask and without a cache, transformers looks for restarting position ids
    (``find_packed_sequence_indices``) and tests the result with a Python ``if`` on a GPU tensor: the host
    waits for every queued kernel before each forward. This attention finds the boundaries itself
    (from the collator, or from the position ids) and ``varlen_mask`` returns no mask there, so the check
    only costs the wait; it is skipped by handing the preparation no position ids. Other backends are
    untouched.
    """
    sig = inspect.signature(preprocess)

    @functools.wraps(preprocess)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return preprocess(*args, **kwargs)
        got = bound.arguments
        config = got.get("config")
        if (getattr(config, "_attn_implementation", None) == ATTN_NAME and got.get("attention_mask") is None
                and got.get("cache", got.get("past_key_values")) is None and got.get("position_ids") is not None):
            got["position_ids"] = None
        return preprocess(*bound.args, **bound.kwargs)

    wrapper.lmforge_skips_packed_check = True  # type: ignore[attr-defined]
    return wrapper


def register() -> str:
    """Register ``lmforge_varlen`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers import masking_utils
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, varlen_mask)
    pre = getattr(masking_utils, "_preprocess_mask_arguments", None)
    if pre is not None and not getattr(pre, "lmforge_skips_packed_check", False):
        params = inspect.signature(pre).parameters
        if {"config", "attention_mask", "position_ids"} <= set(params) and ({"cache", "past_key_values"} & set(params)):
            masking_utils._preprocess_mask_arguments = _skip_packed_check(pre)
    return ATTN_NAME
