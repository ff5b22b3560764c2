"""Fused element-wise kernels for the native engine's decode path (Triton; torch fallbacks).

Why: a decode step at small batch is bound by kernel launches, not by math. In plain PyTorch an
RMSNorm is ~7 kernels, RoPE on q and k plus the cache write ~12, and SiLU-and-multiply 3; here each
is one. With the GEMMs and attention that makes ~10 kernels per layer. The arithmetic runs in
float32 and rounds once, where the transformers modules round after every bf16 op, so outputs agree
to bf16 rounding (the engines' greedy paths can part only at near-ties).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(X, R, W, OUT, R_OUT, H, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(X + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x = x + tl.load(R + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(R_OUT.dtype.element_ty)  # the residual stream is kept in the model dtype, as transformers does
            tl.store(R_OUT + row * H + cols, x, mask=mask)
            x = x.to(tl.float32)
        var = tl.sum(x * x, 0) / H
        y = (x * (1.0 / tl.sqrt(var + eps))).to(OUT.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * H + cols, (w * y).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, POS, SLOT, QN, KN, KC, VC, stride_t, NQ, NKV, eps,
                           D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, QK_NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        pos = tl.load(POS + t).to(tl.int64)
        slot = tl.load(SLOT + t).to(tl.int64)
        base = QKV + t * stride_t + h * D
        offs = tl.arange(0, BLOCK_H)
        m = offs < HALF
        if h < NQ + NKV:  # q or k head: (qk-norm) then rotate
            x1 = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(base + HALF + offs, mask=m, other=0.0).to(tl.float32)
            if QK_NORM:
                var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, 0)) / D
                r = (1.0 / tl.sqrt(var + eps))
                is_q = h < NQ
                w1 = tl.where(is_q, tl.load(QN + offs, mask=m, other=0.0), tl.load(KN + offs, mask=m, other=0.0))
                w2 = tl.where(is_q, tl.load(QN + HALF + offs, mask=m, other=0.0),
                              tl.load(KN + HALF + offs, mask=m, other=0.0))
                w1 = w1.to(tl.float32)
                w2 = w2.to(tl.float32)
                x1 = (x1 * r).to(QKV.dtype.element_ty).to(tl.float32) * w1
                x2 = (x2 * r).to(QKV.dtype.element_ty).to(tl.float32) * w2
                x1 = x1.to(QKV.dtype.element_ty).to(tl.float32)
                x2 = x2.to(QKV.dtype.element_ty).to(tl.float32)
            c1 = tl.load(COS + pos * D + offs, mask=m, other=0.0).to(tl.float32)
            c2 = tl.load(COS + pos * D + HALF + offs, mask=m, other=0.0).to(tl.float32)
            s1 = tl.load(SIN + pos * D + offs, mask=m, other=0.0).to(tl.float32)
            s2 = tl.load(SIN + pos * D + HALF + offs, mask=m, other=0.0).to(tl.float32)
            y1 = (x1 * c1 - x2 * s1).to(QKV.dtype.element_ty)
            y2 = (x2 * c2 + x1 * s2).to(QKV.dtype.element_ty)
            tl.store(base + offs, y1, mask=m)
            tl.store(base + HALF + offs, y2, mask=m)
            if h >= NQ:
                kh = h - NQ
                dst = KC + slot * NKV * D + kh * D
                ok = m & (slot >= 0)
                tl.store(dst + offs, y1, mask=ok)
                tl.store(dst + HALF + offs, y2, mask=ok)
        else:  # v head: into the cache as it is
            vh = h - NQ - NKV
            dst = VC + slot * NKV * D + vh * D
            ok = m & (slot >= 0)
            tl.store(dst + offs, tl.load(base + offs, mask=m), mask=ok)
            tl.store(dst + HALF + offs, tl.load(base + HALF + offs, mask=m), mask=ok)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, I, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(GU + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + row * I + cols, (a * u).to(OUT.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); with no residual, (norm(x) * weight, x)."""
    T, H = x.shape
    out = torch.empty_like(x)
    new_res = torch.empty_like(x) if residual is not None else x
    _add_rms_norm_kernel[(T,)](x, residual if residual is not None else x, weight, out, new_res, H, eps,
                               HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(H), num_warps=4)
    return out, new_res


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None = None,
                   k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> None:
    """In place on ``qkv`` [T, (Hq + 2 Hkv) D]: (qk-norm,) RoPE on q and k; k and v into the cache.

    ``cos``/``sin`` are [max_len, D] tables (halves duplicated, as transformers builds them)."""
    T = qkv.shape[0]
    if T == 0:
        return
    half = head_dim // 2
    _rope_cache_kernel[(T, num_heads + 2 * num_kv_heads)](
        qkv, cos, sin, positions, slot_mapping, q_norm if q_norm is not None else qkv,
        k_norm if k_norm is not None else qkv, k_cache, v_cache, qkv.stride(0), num_heads, num_kv_heads, eps,
        D=head_dim, HALF=half, BLOCK_H=triton.next_power_of_2(half), QK_NORM=q_norm is not None, num_warps=1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    T, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(T, inter, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(T, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block, num_warps=4)
    return out
