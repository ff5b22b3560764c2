"""One-pass next-token choice for the common rows: greedy, or plain temperature sampling.

A row qualifies when it asks for no top-k, top-p, min-p, penalties, seed or log-probabilities (what
most chat traffic and benchmarks send). For those rows the token is ``argmax(logits / T + g)`` with
``g`` standard Gumbel noise, which is an exact draw from ``softmax(logits / T)`` (the Gumbel-max
trick; greedy rows take ``argmax(logits)``).

Why hand-written: in torch the same choice is six passes over a float32 [rows, vocab] tensor (the
upcast of the logits, the division by the temperature, softmax, the exponential noise, the
division by it, argmax): 0.64 ms of a 3.2 ms decode step at 256 rows of a 152k vocabulary on an
H200. This Triton kernel reads the model-dtype logits once and draws the noise in registers with
Triton's counter-based Philox generator, four uniforms per call: 0.16 ms for the same rows, launch
included (``benchmarks/RESULTS.md``). Batches where every row is greedy skip it: one ``argmax`` of
the model-dtype logits is cheaper (its ids equal the float32 argmax's: the upcast is exact). The key is drawn
from torch's CPU generator on every call, so ``torch.manual_seed`` makes runs repeatable and no
device value is read on the host. Rows are split over the vocabulary when there are too few of
them to fill the GPU; a second, tiny reduction picks each row's winner (ties: the lowest id, as
``torch.argmax``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lmforge.infer.native.attention import _interpreting, _sm_count  # one SM-count cache, one switch

try:  # optional, as for the attention kernels: CPU installs run the torch sampler
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["available", "fast_rows", "gumbel_argmax"]

_BLOCK = 2048


def available(logits: torch.Tensor) -> bool:
    """Whether the kernel runs for this tensor: CUDA with triton, or CPU under the Triton interpreter (tests)."""
    if triton is None:
        return False
    if logits.is_cuda:
        return True
    return _interpreting() and type(_gumbel_argmax_kernel).__name__ == "InterpretedFunction"


def fast_rows(params: Sequence) -> bool:
    """True when every row is greedy or plain temperature sampling (see the module docstring)."""
    return all(p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0 and not p.penalised and p.logprobs < 0
               and (p.generator is None or p.temperature == 0.0) for p in params)


if triton is not None:

    @triton.jit
    def _take_better(x_row, col, hi, u, inv_t, best_v, best_i):
        """Score one quarter-block (``x / T + Gumbel(u)``, or ``x`` for a greedy row) into the running best."""
        ok = col < hi
        x = tl.load(x_row + col, mask=ok, other=float("-inf")).to(tl.float32)
        u = tl.minimum(tl.maximum(u, 1.0e-30), 0.99999994)  # keep -log(-log(u)) finite
        score = tl.where(inv_t > 0, x * inv_t - tl.log(-tl.log(u)), x)
        score = tl.where(ok, score, float("-inf"))
        better = score > best_v  # strict: an earlier (lower) id keeps a tie within a lane
        return tl.where(better, score, best_v), tl.where(better, col, best_i)

    # The integer arguments are not specialised (Triton would otherwise compile a variant whenever the seed
    # happens to be a multiple of 16, or the split length changes with the batch): one compile per dtype.
    @triton.jit(do_not_specialize=["seed", "V", "stride_x", "SPLIT_LEN"])
    def _gumbel_argmax_kernel(X, INV_T, OUT_V, OUT_I, seed, V, stride_x, SPLIT_LEN, BLOCK: tl.constexpr):
        # grid: (row, vocabulary split); writes the split's best score and its id. One Philox call gives
        # four uniforms (tl.rand4x), one for each quarter of the block: a quarter of the generator's work.
        row = tl.program_id(0)
        sp = tl.program_id(1)
        splits = tl.num_programs(1)
        inv_t = tl.load(INV_T + row)  # 0: greedy row (no noise)
        lo = sp * SPLIT_LEN
        hi = tl.minimum(lo + SPLIT_LEN, V)
        Q: tl.constexpr = BLOCK // 4
        offs = tl.arange(0, Q)
        best_v = tl.full([Q], float("-inf"), tl.float32)
        best_i = tl.full([Q], 2147483647, tl.int32)
        x_row = X + row.to(tl.int64) * stride_x
        for start in range(lo, hi, BLOCK):
            u0, u1, u2, u3 = tl.rand4x(seed, row * V + start + offs)
            best_v, best_i = _take_better(x_row, start + offs, hi, u0, inv_t, best_v, best_i)
            best_v, best_i = _take_better(x_row, start + Q + offs, hi, u1, inv_t, best_v, best_i)
            best_v, best_i = _take_better(x_row, start + 2 * Q + offs, hi, u2, inv_t, best_v, best_i)
            best_v, best_i = _take_better(x_row, start + 3 * Q + offs, hi, u3, inv_t, best_v, best_i)
        m = tl.max(best_v, 0)
        idx = tl.min(tl.where(best_v == m, best_i, 2147483647), 0)
        tl.store(OUT_V + row * splits + sp, m)
        tl.store(OUT_I + row * splits + sp, idx)


def gumbel_argmax(logits: torch.Tensor, inv_temperature: torch.Tensor, block: int = _BLOCK) -> torch.Tensor:
    """Token ids [B] (int64): ``argmax(logits)`` where ``inv_temperature`` is 0, else a draw from
    ``softmax(logits * inv_temperature)``. ``logits`` [B, V] in any float dtype, last dim contiguous;
    ``inv_temperature`` float32 [B] on the same device."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with a contiguous last dim, got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    # enough programs to fill the GPU about twice, each at least a few blocks long
    splits = max(1, min(-(-2 * _sm_count(logits.device) // rows), -(-vocab // (4 * block))))
    split_len = -(-vocab // splits // block) * block
    splits = -(-vocab // split_len)
    vals = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())  # CPU generator: no device read
    _gumbel_argmax_kernel[(rows, splits)](logits, inv_temperature.to(torch.float32).contiguous(), vals, ids, seed,
                                          vocab, logits.stride(0), split_len, BLOCK=block,
                                          num_warps=8 if block >= 2048 else 4)
    if splits == 1:
        return ids[:, 0].long()
    return ids.gather(1, vals.argmax(1, keepdim=True)).squeeze(1).long()
