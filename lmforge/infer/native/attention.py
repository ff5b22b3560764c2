"""Paged attention for the native engine: one Triton kernel for prefill, chunked prefill and decode.

Why hand-written: PyTorch's SDPA and flex attention have no variable-length kernel that reads K/V
through a block table and can run inside a CUDA graph, and vLLM (which has one) is only an optional
dependency. The algorithm is the public FlashAttention online softmax; long decodes at small batch
add the flash-decoding split of the context into partitions reduced by a second kernel.

Layout
    q            [T, Hq, D]   query tokens of all sequences, concatenated (any strides, last dim contiguous)
    k/v_cache    [num_blocks, block_size, Hkv, D]; block_size a power of two; token ``p`` of sequence
                 ``b`` lives in block ``block_tables[b, p // block_size]`` at offset ``p % block_size``
    block_tables int [B, max_blocks_per_seq]
    seq_lens     int [B]    context length including the new query tokens
    query_start_loc int [B+1]  query tokens of sequence ``b`` are ``q[qsl[b]:qsl[b+1]]`` (may be empty)

Positions: query token ``i`` of a sequence with ``n = qsl[b+1] - qsl[b]`` new tokens sits at position
``seq_lens[b] - n + i`` and attends to key positions ``j <= position`` (and ``j > position - window``
with a sliding window). The new tokens' K/V must already be in the cache (``write_kv``).

GQA: the ``G = Hq // Hkv`` query heads sharing a KV head are packed into the rows of one tile
(row ``r`` = query token ``r // G``, head ``r % G`` of the group), so a program reads each K/V block
once per KV head; a decode step of one sequence is a single ``G``-row tile.

Graph capture: only ``max_query_len`` and the tensor shapes are read on the host (they fix the grid
and, for decode, the number of context partitions); everything else comes from device tensors.
Rows of a sequence with no query tokens are not written; a padding row (seq_len 1, block 0) is
computed like any other and touches nothing outside its own output row.
"""
from __future__ import annotations

import os

import torch

try:  # triton is optional: CI installs lmforge without it, and the CPU path needs only torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["paged_attention", "paged_attention_reference", "write_kv"]

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors; on CPU only while TRITON_INTERPRET is set and the kernels were built under
    the interpreter (tests); plain torch otherwise."""
    if t.is_cuda:
        if triton is None:
            raise RuntimeError("paged_attention on CUDA needs triton (pip install triton); "
                               "paged_attention_reference is the slow pure-torch equivalent")
        return True
    return (triton is not None and _interpreting()
            and type(_paged_attn_kernel).__name__ == "InterpretedFunction")


# ---------------------------------------------------------------------------------------------
# Reference (test oracle and CPU fallback)
# ---------------------------------------------------------------------------------------------
def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                              max_query_len: int, scale: float, out: torch.Tensor | None = None,
                              sliding_window: int | None = None) -> torch.Tensor:
    """Plain torch, one sequence at a time, float32 math; same contract as :func:`paged_attention`."""
    _, hq, _ = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if out is None:
        out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        s, e = starts[b], starts[b + 1]
        n_q, n_ctx = e - s, lens[b]
        if n_q <= 0:
            continue
        first = max(0, n_ctx - n_q - sliding_window + 1) if sliding_window else 0  # keys older are never read
        kpos = torch.arange(first, n_ctx, device=q.device)
        blocks = block_tables[b].to(q.device).long()[kpos // block_size]
        k = k_cache[blocks, kpos % block_size].float().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = v_cache[blocks, kpos % block_size].float().repeat_interleave(group, dim=1)
        qpos = n_ctx - n_q + torch.arange(n_q, device=q.device)
        allowed = kpos[None, :] <= qpos[:, None]
        if sliding_window:
            allowed &= kpos[None, :] > qpos[:, None] - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    # The block table's row stride is the widest row of each eager (prefill) step's batch: left specialised,
    # Triton would compile a variant for each of 1, multiples of 16 and the rest inside a timed run.
    @triton.jit(do_not_specialize=["stride_bt"])
    def _paged_attn_kernel(
        Q, K, V, O, BT, SEQ, QSL, M_PART, L_PART, O_PART,
        qk_scale, window,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_ot, stride_oh, stride_bt,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CACHE_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # grid: (sequence, kv head, query tile) or, split-K decode, (sequence, kv head, partition)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        if NUM_SPLITS == 1:
            tile = tl.program_id(2)
            split = 0
        else:
            tile = 0
            split = tl.program_id(2)
        q_start = tl.load(QSL + b)
        q_len = tl.load(QSL + b + 1) - q_start
        seq_len = tl.load(SEQ + b)
        r0 = tile * BLOCK_M
        skip = r0 >= q_len * G  # tile past this sequence's query rows (q_len 0 included): write nothing
        if NUM_SPLITS > 1:
            # the sequence's own context is cut into NUM_SPLITS partitions of whole key tiles; the
            # partition size is computed here, from seq_len, so the grid stays fixed under a CUDA graph
            part = tl.cdiv(tl.cdiv(tl.maximum(seq_len, 1), NUM_SPLITS), BLOCK_N) * BLOCK_N
            skip = skip | (split * part >= seq_len)  # unused partition (the reduce does not read it)
        if skip:
            return

        rows = r0 + tl.arange(0, BLOCK_M)
        tok = rows // G
        row_ok = tok < q_len
        head = kvh * G + rows % G
        ctx0 = seq_len - q_len  # position of the sequence's first query token
        pos = ctx0 + tok
        d = tl.arange(0, D_PAD)
        d_ok = d < HEAD_DIM

        q_ptrs = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        # keys this tile can see: [lo, hi)
        hi = ctx0 + tl.minimum((r0 + BLOCK_M - 1) // G, q_len - 1) + 1
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(ctx0 + r0 // G - window + 1, 0)
        if NUM_SPLITS > 1:
            lo = tl.maximum(lo, split * part)
            hi = tl.minimum(hi, (split + 1) * part)

        # running max starts finite (not -inf) so exp2(m_old - m_new) stays NaN-free on fully masked rows
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        bt_row = BT + b.to(tl.int64) * stride_bt
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
        for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            n = start_n + tl.arange(0, BLOCK_N)
            n_ok = (n >= lo) & (n < hi)  # never load outside the visible range (freed / unused blocks)
            blk = tl.load(bt_row + n // CACHE_BLOCK, mask=n_ok, other=0).to(tl.int64)
            off = n % CACHE_BLOCK
            k = tl.load(k_base + blk[None, :] * stride_kb + off[None, :] * stride_kt + d[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [D_PAD, BLOCK_N]
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
            allowed = n_ok[None, :] & (n[None, :] <= pos[:, None])
            if USE_WINDOW:
                allowed = allowed & (n[None, :] > pos[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + blk[:, None] * stride_vb + off[:, None] * stride_vt + d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D_PAD]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            o_ptrs = O + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            # decode only (one query token): partials indexed [b, q head, split]
            idx = (b.to(tl.int64) * (tl.num_programs(1) * G) + head) * NUM_SPLITS + split
            tl.store(M_PART + idx, m_i, mask=row_ok)
            tl.store(L_PART + idx, l_i, mask=row_ok)
            tl.store(O_PART + idx[:, None] * D_PAD + d[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _reduce_splits_kernel(
        O, SEQ, QSL, M_PART, L_PART, O_PART, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        # grid: (sequence, q head); merges the used partitions' (max, sum, unnormalised output)
        b = tl.program_id(0)
        h = tl.program_id(1)
        q_start = tl.load(QSL + b)
        if tl.load(QSL + b + 1) - q_start <= 0:
            return
        seq_len = tl.load(SEQ + b)
        n_used = tl.cdiv(seq_len, tl.cdiv(tl.cdiv(tl.maximum(seq_len, 1), NUM_SPLITS), BLOCK_N) * BLOCK_N)
        base = (b.to(tl.int64) * tl.num_programs(1) + h) * NUM_SPLITS
        sp = tl.arange(0, SPLITS_PAD)
        m = tl.load(M_PART + base + sp, mask=sp < n_used, other=float("-inf"))
        m_max = tl.max(m, 0)
        d = tl.arange(0, D_PAD)
        acc = tl.zeros([D_PAD], tl.float32)
        l_sum = 0.0
        for i in range(0, n_used):
            w = tl.exp2(tl.load(M_PART + base + i) - m_max)
            l_sum += w * tl.load(L_PART + base + i)
            acc += w * tl.load(O_PART + (base + i) * D_PAD + d)
        out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)
        tl.store(O + q_start.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(O.dtype.element_ty),
                 mask=d < HEAD_DIM)

    @triton.jit
    def _write_kv_kernel(K, V, KC, VC, SLOT, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                         H: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
                         CACHE_BLOCK: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(SLOT + t).to(tl.int64)
        if slot < 0:  # padding token
            return
        blk = slot // CACHE_BLOCK
        off = slot % CACHE_BLOCK
        h = tl.arange(0, H_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        mask = (h < H) & (d < HEAD_DIM)
        t64 = t.to(tl.int64)
        k = tl.load(K + t64 * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(V + t64 * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(KC + blk * stride_kcb + off * stride_kct + h * stride_kch + d, k.to(KC.dtype.element_ty), mask=mask)
        tl.store(VC + blk * stride_vcb + off * stride_vct + h * stride_vch + d, v.to(VC.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # H100; lets the interpreter tests exercise the same choices
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _config(max_query_len: int, group: int, d_pad: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a call shape; checked for register spills on sm_90."""
    if dtype == torch.float32:  # CUDA-core (ieee) dots: narrow key tiles keep the registers in check
        block_n, max_m, stages = 16, 32 if d_pad > 128 else 64, 2
    elif d_pad > 128:
        block_n, max_m, stages = 32, 64, 2
    else:
        block_n, max_m, stages = 64, 128, 3
    if max_query_len == 1:  # decode: one G-row tile per (sequence, kv head); memory bound
        block_m = max(16, _next_pow2(group))
        if d_pad <= 64 and dtype != torch.float32:
            # wider key tiles: fewer loop trips, more bytes in flight per program. H200, 24 layers' caches (no L2
            # reuse), 256 sequences at 100..2048 tokens: 39-42 us per layer against 50-52 with 64-key tiles
            block_n = 128
    else:
        block_m = min(max_m, max(16, _next_pow2(max_query_len * group)))
    wide = d_pad > 128 or dtype == torch.float32
    num_warps = 4 if block_m <= 16 or (block_m <= 64 and not wide) else 8
    return block_m, block_n, num_warps, stages


def prefill_query_lengths(group: int, head_dim: int, dtype: torch.dtype, longest: int) -> list[int]:
    """One query length (> 1) for every kernel configuration a prefill or mixed step can select (the tile height
    and warps follow the step's longest query), so that an engine can compile them all when it starts instead of
    stalling a server's step for a compile the first time a prompt chunk of a new size arrives."""
    d_pad = max(16, _next_pow2(head_dim))
    last = _config(max(2, longest), group, d_pad, dtype)  # the tile only grows with the query length, up to this
    seen, out = set(), []
    for q in range(2, max(2, longest) + 1):
        cfg = _config(q, group, d_pad, dtype)
        if cfg not in seen:
            seen.add(cfg)
            out.append(q)
        if cfg == last:
            break
    return out


def _num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Context partitions for a decode call: > 1 only when the (sequence, kv head) programs leave SMs idle;
    aims at about two programs per SM. Depends only on shapes (batch, heads, block-table width), so a
    captured graph keeps its choice; each sequence then splits its own length into that many parts."""
    programs = batch * num_kv_heads
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(-(-2 * sms // programs), -(-max_context // block_n), _MAX_SPLITS))


def _paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale,
                            out, sliding_window, *, block_m=None, block_n=None, num_splits=None,
                            num_warps=None, num_stages=None):
    t, hq, dim = q.shape
    _, block_size, hkv, _ = k_cache.shape
    batch = seq_lens.shape[0]
    group = hq // hkv
    d_pad = max(16, _next_pow2(dim))
    cfg = _config(max_query_len, group, d_pad, q.dtype)
    block_m = block_m or cfg[0]
    block_n = block_n or cfg[1]
    num_warps = num_warps or cfg[2]
    num_stages = num_stages or cfg[3]
    if out is None:
        out = torch.empty_like(q)
    if batch == 0 or t == 0 or max_query_len <= 0:
        return out
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = (_num_splits(batch, hkv, max_context, block_n, q.device)
                      if max_query_len == 1 and block_m >= group else 1)
    if num_splits > 1 and (max_query_len != 1 or block_m < group):
        raise ValueError("split-K is for decode-only calls (max_query_len == 1), one tile per KV-head group")
    window = int(sliding_window) if sliding_window else 0
    common = dict(G=group, HEAD_DIM=dim, D_PAD=d_pad, CACHE_BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
                  USE_WINDOW=window > 0, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  num_warps=num_warps, num_stages=num_stages)
    strides = (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
               block_tables.stride(0))
    qk_scale = float(scale) * _LOG2E
    if num_splits > 1:
        m_part = torch.empty(batch * hq * num_splits, device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        o_part = torch.empty(batch * hq * num_splits * d_pad, device=q.device, dtype=torch.float32)
        _paged_attn_kernel[(batch, hkv, num_splits)](
            q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, m_part, l_part, o_part,
            qk_scale, window, *strides, NUM_SPLITS=num_splits, **common)
        _reduce_splits_kernel[(batch, hq)](
            out, seq_lens, query_start_loc, m_part, l_part, o_part, out.stride(0), out.stride(1),
            HEAD_DIM=dim, D_PAD=d_pad, BLOCK_N=block_n, NUM_SPLITS=num_splits, SPLITS_PAD=_next_pow2(num_splits),
            num_warps=1)
    else:
        tiles = -(-max_query_len * group // block_m)
        _paged_attn_kernel[(batch, hkv, tiles)](
            q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, out, out, out,
            qk_scale, window, *strides, NUM_SPLITS=1, **common)
    return out


def _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [T, Hq, D] and caches [blocks, block_size, Hkv, D]; got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q heads {q.shape[1]} must be a multiple of kv heads {k_cache.shape[2]}, same head_dim")
    block_size = k_cache.shape[1]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"cache block size must be a power of two >= 16, got {block_size}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype:
        raise ValueError(f"q and the caches must share one of fp16/bf16/fp32; got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")
    if out is not None and (out.shape != q.shape or out.stride(2) != 1):
        raise ValueError("out must have q's shape and a contiguous last dimension")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("block_tables [B, n], seq_lens [B] and query_start_loc [B+1] disagree on B")
    if not (seq_lens.is_contiguous() and query_start_loc.is_contiguous()) or \
            (block_tables.shape[1] > 1 and block_tables.stride(1) != 1):
        raise ValueError("seq_lens, query_start_loc and the rows of block_tables must be contiguous")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                    out: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of ``q`` over a paged KV cache, for any mix of prefill and decode sequences.

    q: [T, Hq, D] query tokens of all sequences, concatenated; k_cache/v_cache: [num_blocks, block_size, Hkv, D]
    holding the new tokens' K/V already; block_tables: int [B, max_blocks_per_seq]; seq_lens: int [B] context
    lengths including the new tokens; query_start_loc: int [B+1] offsets of each sequence's tokens in q (a
    sequence may have none; rows of q that belong to no sequence are not written). ``max_query_len`` (a host
    int, >= every query length) sizes the grid; ``max_query_len == 1`` selects the decode path, split over the
    context when the batch is too small to fill the GPU. Returns ``out`` ([T, Hq, D], q's dtype unless an
    ``out`` of another float dtype is given). CUDA tensors need triton; CPU tensors run the Triton interpreter
    when TRITON_INTERPRET=1 (tests), else :func:`paged_attention_reference`.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    if not _use_triton(q):
        return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                                         scale, out=out, sliding_window=sliding_window)
    return _paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                                   scale, out, sliding_window)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store ``k``/``v`` [T, Hkv, D] into the caches at ``slot_mapping`` (int [T], block_id * block_size + offset);
    slots < 0 (padding) are skipped. The Triton path is graph-capturable; the torch path (CPU) is not."""
    t, h, dim = k.shape
    block_size = k_cache.shape[1]
    if t == 0:
        return
    if not _use_triton(k):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
        v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)
        return
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("write_kv needs a contiguous last (head_dim) dimension")
    _write_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           *k_cache.stride()[:3], *v_cache.stride()[:3], H=h, HEAD_DIM=dim, H_PAD=_next_pow2(h),
                           D_PAD=_next_pow2(dim), CACHE_BLOCK=block_size, num_warps=1 if h * dim <= 1024 else 4)

