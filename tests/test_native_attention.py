"""Native paged attention: the Triton kernel against a float32 torch reference and SDPA on unpaged K/V.

Without a GPU the kernel runs under the Triton interpreter on CPU tensors (tiny shapes; fp32 and fp16:
the interpreter's bf16 dot is broken). With a GPU the same tests run the compiled kernel on CUDA, and
the ``gpu`` tests add bf16 model-sized shapes and CUDA-graph capture.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import import_kernels, interpreter_fixture

A, _PREV_INTERPRET = import_kernels("lmforge.infer.native.attention")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """Keep TRITON_INTERPRET for this module only (tests/triton_interpreter.py)."""
    yield from interpreter_fixture(_PREV_INTERPRET, lambda: A._paged_attn_kernel, A)


class Case:
    """Random sequences: K/V written with write_kv into shuffled blocks of a NaN-filled cache, so any read
    of an unused slot, a freed block or the scratch block shows up as NaN in the output."""

    def __init__(self, q_lens, ctx_lens, hq=4, hkv=2, d=32, *, block_size=16, dtype=torch.float32, seed=0,
                 window=None, free_outside_window=False, pad=0, extra_tokens=0):
        assert all(0 <= q <= c for q, c in zip(q_lens, ctx_lens))
        g = torch.Generator().manual_seed(seed)
        self.q_lens, self.ctx_lens, self.window, self.hq, self.hkv = list(q_lens), list(ctx_lens), window, hq, hkv
        nblk = [-(-c // block_size) for c in ctx_lens]
        num_blocks = 1 + sum(nblk) + 2  # block 0: scratch; two never used
        ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
        bt = torch.zeros(len(q_lens) + pad, max(nblk + [1]) + 1, dtype=torch.int32)  # unused entries -> block 0
        for b, n in enumerate(nblk):
            bt[b, :n] = torch.tensor(ids[:n], dtype=torch.int32)
            ids = ids[n:]
        self.k = [torch.randn(c, hkv, d, generator=g).to(dtype) for c in ctx_lens]
        self.v = [torch.randn(c, hkv, d, generator=g).to(dtype) for c in ctx_lens]
        kc = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
        vc = kc.clone()
        slots = [bt[b, torch.arange(c) // block_size].long() * block_size + torch.arange(c) % block_size
                 for b, c in enumerate(ctx_lens)]
        none = [torch.zeros(0, hkv, d, dtype=dtype)]
        k_all, v_all = torch.cat(self.k + none), torch.cat(self.v + none)
        s_all = torch.cat(slots + [torch.zeros(0, dtype=torch.long)])
        junk = torch.full((3, hkv, d), 1e4, dtype=dtype)  # padding tokens (slot -1) must be skipped
        k_all, v_all = torch.cat([junk, k_all]), torch.cat([junk, v_all])
        s_all = torch.cat([torch.full((3,), -1, dtype=torch.long), s_all])
        self.kc, self.vc = kc.to(DEV), vc.to(DEV)
        A.write_kv(k_all.to(DEV), v_all.to(DEV), self.kc, self.vc, s_all.to(DEV))
        if window and free_outside_window:  # blocks wholly before every query's window may be reused
            for b, (q, c) in enumerate(zip(q_lens, ctx_lens)):
                first = max(0, c - q - window + 1)
                bt[b, :first // block_size] = 0
        lens = self.q_lens + [1] * pad  # padding rows: one query token, seq_len 1, block 0
        self.bt = bt.to(DEV)
        self.seq_lens = torch.tensor(self.ctx_lens + [1] * pad, dtype=torch.int32, device=DEV)
        self.qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        self.q = torch.randn(sum(lens) + extra_tokens, hq, d, generator=g).to(dtype).to(DEV)
        self.max_q = max(lens + [0])
        self.scale = 1 / math.sqrt(d)
        self.real_rows = sum(q_lens)

    def args(self):
        return (self.q, self.kc, self.vc, self.bt, self.seq_lens, self.qsl, self.max_q, self.scale)

    def kernel(self, **kw):
        if kw:
            return A._paged_attention_triton(*self.args(), None, self.window, **kw)
        return A.paged_attention(*self.args(), sliding_window=self.window)

    def reference(self):
        return A.paged_attention_reference(*self.args(), sliding_window=self.window)

    def sdpa(self):
        """Per sequence, contiguous K/V, an explicit causal (and window) mask, float32."""
        outs, start = [], 0
        for q_len, ctx, k, v in zip(self.q_lens, self.ctx_lens, self.k, self.v):
            q = self.q[start:start + q_len].float().cpu().transpose(0, 1)  # [Hq, q, D]
            start += q_len
            if q_len == 0:
                continue
            g = self.hq // self.hkv
            kk = k.float().repeat_interleave(g, dim=1).transpose(0, 1)
            vv = v.float().repeat_interleave(g, dim=1).transpose(0, 1)
            qpos = torch.arange(ctx - q_len, ctx)[:, None]
            kpos = torch.arange(ctx)[None, :]
            mask = kpos <= qpos
            if self.window:
                mask &= kpos > qpos - self.window
            outs.append(F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=self.scale).transpose(0, 1))
        return torch.cat(outs)


def check(case, out, tol=None):
    tol = tol or TOL[case.q.dtype]
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    got = out[:case.real_rows].float().cpu()
    ref = case.reference()[:case.real_rows].float().cpu()
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    if case.real_rows:
        torch.testing.assert_close(got, case.sdpa(), atol=tol, rtol=tol)


# ---- prefill ---------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 32), (4, 2, 64), (14, 2, 32), (4, 1, 80)],
                         ids=["mha", "gqa2-d64", "gqa7", "d80"])
def test_prefill_varlen(hq, hkv, d):
    case = Case([1, 7, 16, 37], [1, 7, 16, 37], hq, hkv, d, seed=1)
    assert A._use_triton(case.q)  # the kernel (interpreted on CPU), not the reference fallback
    check(case, case.kernel())


def test_chunked_prefill_with_cached_prefix():
    case = Case([5, 16, 9, 3], [21, 48, 9, 40], 4, 2, 32, seed=2)
    check(case, case.kernel())
    check(case, case.kernel(block_m=16, block_n=32))  # several query tiles and key tiles per sequence


# ---- decode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_splits", [1, None, 3], ids=["single", "auto", "split3"])
def test_decode_batch(num_splits):
    case = Case([1] * 5, [1, 15, 16, 17, 90], 14, 2, 64, seed=3)
    check(case, case.kernel(num_splits=num_splits) if num_splits else case.kernel())


def test_auto_split_choice():
    cpu = torch.device("cpu")  # counts as an H100 (132 SMs)
    assert A._num_splits(1, 2, 4096, 64, cpu) == 64  # batch 1: fill the GPU
    assert A._num_splits(8, 4, 4096, 64, cpu) == 9
    assert A._num_splits(1, 2, 64, 64, cpu) == 1  # one key tile: nothing to split
    assert A._num_splits(64, 4, 4096, 64, cpu) == 1  # enough programs already


# ---- mixed, padding, empty rows -----------------------------------------------------------------
def test_mixed_prefill_and_decode():
    case = Case([1, 12, 0, 1, 7], [30, 12, 20, 64, 50], 4, 2, 32, seed=4)
    check(case, case.kernel())


@pytest.mark.parametrize("q_lens,ctx_lens,num_splits", [([1, 0, 1], [40, 25, 3], 1), ([1, 0, 1], [40, 25, 3], 4),
                                                         ([6, 0, 1], [20, 25, 33], 1)],
                         ids=["decode", "decode-split", "prefill"])
def test_padding_and_empty_rows_write_nothing_else(q_lens, ctx_lens, num_splits):
    case = Case(q_lens, ctx_lens, 4, 2, 32, seed=5, pad=2, extra_tokens=3)
    case.kc[0].zero_()  # the engine's scratch block holds finite values
    case.vc[0].zero_()
    out = torch.full_like(case.q, 7.0)
    A._paged_attention_triton(*case.args(), out, None, num_splits=num_splits)
    check(case, out)
    n = case.real_rows
    assert torch.isfinite(out[n:n + 2]).all()  # padding rows: harmless, finite
    assert (out[n + 2:] == 7.0).all()  # tokens of no sequence: untouched


def test_q_len_zero_only_and_empty_batch():
    case = Case([0, 0], [5, 9], seed=6, extra_tokens=2)
    out = torch.full_like(case.q, 7.0)
    A.paged_attention(*case.args()[:6], 1, case.scale, out=out)
    assert (out == 7.0).all()
    empty = Case([], [], seed=6)
    assert A.paged_attention(*empty.args()).shape == (0, 4, 32)


# ---- sliding window ------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [8, 20])
def test_sliding_window_prefill_with_freed_blocks(window):
    case = Case([5, 33, 1], [70, 40, 64], 4, 2, 32, seed=7, window=window, free_outside_window=True)
    check(case, case.kernel())
    check(case, case.kernel(block_m=16, block_n=64))  # key tiles wider than a block reach into freed ones


@pytest.mark.parametrize("num_splits", [1, None])
def test_sliding_window_decode(num_splits):
    case = Case([1, 1, 1], [70, 5, 49], 4, 2, 32, seed=8, window=17, free_outside_window=True)
    check(case, case.kernel(num_splits=num_splits, block_n=64) if num_splits else case.kernel())


# ---- tiles, block sizes, dtypes ------------------------------------------------------------------
@pytest.mark.parametrize("block_size,block_n", [(16, 64), (32, 32), (64, 16)], ids=["bn>bs", "bn=bs", "bn<bs"])
def test_cache_block_sizes(block_size, block_n):
    case = Case([1, 9, 20], [50, 9, 83], 4, 2, 32, block_size=block_size, seed=9)
    check(case, case.kernel(block_n=block_n))


def test_fp16_mixed_batch():
    case = Case([1, 10, 1], [33, 25, 70], 4, 2, 64, dtype=torch.float16, seed=10)
    check(case, case.kernel())
    check(case, case.kernel(block_m=32, block_n=32))
    decode = Case([1, 1], [33, 70], 4, 2, 64, dtype=torch.float16, seed=10)
    check(decode, decode.kernel(num_splits=3))


def test_noncontiguous_q_and_out():
    case = Case([3, 1], [10, 20], 4, 2, 32, seed=11)
    qkv = torch.randn(case.q.shape[0], 8, 32, device=DEV)  # q as a view of a fused projection
    qkv[:, :4] = case.q
    case.q = qkv[:, :4]
    out = torch.zeros(case.q.shape[0], 6, 32, device=DEV)[:, 1:5]
    A.paged_attention(*case.args(), out=out)
    check(case, out)


# ---- write_kv, dispatch, errors ------------------------------------------------------------------
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_write_kv_skips_negative_slots(path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(A, "_use_triton", lambda t: False)
    kc = torch.zeros(4, 16, 2, 24, device=DEV)
    vc = torch.zeros_like(kc)
    k = torch.randn(5, 2, 24, device=DEV)
    v = torch.randn(5, 2, 24, device=DEV)
    slots = torch.tensor([17, -1, 63, 0, -1], device=DEV)
    A.write_kv(k, v, kc, vc, slots)
    for t, s in [(0, 17), (2, 63), (3, 0)]:
        assert torch.equal(kc[s // 16, s % 16], k[t]) and torch.equal(vc[s // 16, s % 16], v[t])
    assert int((kc != 0).any(-1).any(-1).sum()) == 3  # nothing else written


@pytest.mark.skipif(DEV == "cuda", reason="CPU dispatch")
def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    case = Case([2, 1], [9, 17], seed=12)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.testing.assert_close(A.paged_attention(*case.args()), case.reference(), atol=0, rtol=0)


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(A, "triton", None)

    class FakeCuda:
        is_cuda = True

    with pytest.raises(RuntimeError, match="needs triton"):
        A._use_triton(FakeCuda())


def test_bad_arguments():
    case = Case([1], [5], seed=13)
    q, kc, vc, bt, sl, qsl, mq, sc = case.args()
    with pytest.raises(ValueError, match="multiple"):
        A.paged_attention(q[:, :3], kc, vc, bt, sl, qsl, mq, sc)
    with pytest.raises(ValueError, match="share"):
        A.paged_attention(q.double(), kc, vc, bt, sl, qsl, mq, sc)
    with pytest.raises(ValueError, match="disagree"):
        A.paged_attention(q, kc, vc, bt, sl, qsl[:1], mq, sc)


# ---- GPU: model-sized bf16 shapes, long split-K decode, CUDA graphs ----------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (28, 4, 128), (8, 8, 256)], ids=["qwen-0.5b", "qwen-7b", "d256"])
def test_gpu_bf16_model_shapes(hq, hkv, d):
    prefill = Case([300, 129, 1], [812, 129, 1000], hq, hkv, d, dtype=torch.bfloat16, seed=20)
    check(prefill, prefill.kernel())
    decode = Case([1] * 8, [1, 17, 255, 256, 1023, 2000, 64, 3000], hq, hkv, d, dtype=torch.bfloat16, seed=21)
    check(decode, decode.kernel())
    check(decode, decode.kernel(num_splits=1))
    windowed = Case([1, 40, 1], [3000, 600, 100], hq, hkv, d, dtype=torch.bfloat16, seed=22, window=512,
                    free_outside_window=True)
    check(windowed, windowed.kernel())


@pytest.mark.gpu
def test_gpu_block_table_width_compiles_once():
    """An eager step's block table is as wide as its widest row, so its row stride takes any value; the kernel
    must not compile a variant per stride class (1, multiples of 16, the rest) inside a serving run."""
    kernel_cache = A._paged_attn_kernel.device_caches[torch.cuda.current_device()][0]
    sizes = []
    for ctx in (16, 15 * 16, 16 * 16, 40 * 16 + 3):  # table widths 2, 16, 17, 42 (Case adds one column)
        case = Case([8, 3], [ctx, 12], 14, 2, 64, dtype=torch.bfloat16, seed=ctx)
        check(case, case.kernel())
        sizes.append(len(kernel_cache))
    assert sizes[-1] == sizes[0], f"compiled variants after each width: {sizes}"


@pytest.mark.gpu
def test_gpu_long_decode_split():
    case = Case([1], [4096], 14, 2, 64, dtype=torch.bfloat16, seed=23)
    assert A._num_splits(1, 2, case.bt.shape[1] * 16, 64, case.q.device) > 1
    check(case, case.kernel())
    torch.testing.assert_close(case.kernel().float(), case.kernel(num_splits=1).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("max_q", [1, 4])
def test_gpu_cuda_graph_replay(max_q):
    case = Case([max_q] * 4, [300, 40, 90, 1000], 14, 2, 64, dtype=torch.bfloat16, seed=24)
    k_new = torch.randn(case.q.shape[0], 2, 64, device=DEV, dtype=torch.bfloat16)
    slots = torch.full((case.q.shape[0],), -1, device=DEV)
    out = torch.empty_like(case.q)

    def step():
        A.write_kv(k_new, k_new, case.kc, case.vc, slots)
        A.paged_attention(*case.args(), out=out)

    step()  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # new inputs in place (shorter contexts, fresh queries): the replay must follow them
    case.ctx_lens = [200, max_q, 90, 500]
    case.seq_lens.copy_(torch.tensor(case.ctx_lens, dtype=torch.int32))
    case.k = [k[:c] for k, c in zip(case.k, case.ctx_lens)]
    case.v = [v[:c] for v, c in zip(case.v, case.ctx_lens)]
    case.q.copy_(torch.randn_like(case.q))
    graph.replay()
    torch.cuda.synchronize()
    check(case, out)


@pytest.mark.parametrize("group,head_dim,dtype", [(7, 64, torch.bfloat16), (1, 64, torch.float16),
                                                  (4, 128, torch.bfloat16), (8, 256, torch.bfloat16),
                                                  (7, 64, torch.float32)])
def test_prefill_query_lengths_cover_every_kernel_config(group, head_dim, dtype):
    """The engine compiles the prefill kernel at start for these lengths; any other chunk length must select one
    of their configurations (else a server's step would stall on a compile)."""
    from lmforge.infer.native.attention import _config, _next_pow2, prefill_query_lengths

    d_pad = max(16, _next_pow2(head_dim))
    lengths = prefill_query_lengths(group, head_dim, dtype, 8192)
    warmed = {_config(q, group, d_pad, dtype) for q in lengths}
    assert len(warmed) == len(lengths) > 1
    assert {_config(q, group, d_pad, dtype) for q in range(2, 8193)} == warmed
    assert prefill_query_lengths(group, head_dim, dtype, 3) == [q for q in lengths if q <= 3]
