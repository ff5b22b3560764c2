"""The native engine's fused element-wise kernels against their torch definitions (Triton interpreter)."""
from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import import_kernels, interpreter_fixture

# The tests use CPU tensors, so the kernels run under the interpreter even on a GPU machine.
K, _PREV = import_kernels("lmforge.infer.native.kernels", always=True)


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """The kernels built under the interpreter for this module only (tests/triton_interpreter.py)."""
    yield from interpreter_fixture(_PREV, lambda: K._add_rms_norm_kernel, K, always=True)


from lmforge.infer.native.model import _rotate_half, rms_norm  # noqa: E402  (after the kernels' import)


def test_add_rms_norm(interpreter):
    torch.manual_seed(0)
    x, r, w = torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)
    out, res = interpreter.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, rms_norm(x + r, w, 1e-6), rtol=1e-5, atol=1e-5)
    out, res = interpreter.add_rms_norm(x, None, w, 1e-6)
    assert res is x
    torch.testing.assert_close(out, rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_and_cache(interpreter, qk_norm):
    torch.manual_seed(0)
    T, hq, hkv, d, bs = 6, 4, 2, 16, 4
    qkv = torch.randn(T, (hq + 2 * hkv) * d)
    pos = torch.tensor([0, 1, 2, 7, 8, 3])
    ang = torch.randn(32, d // 2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    slots = torch.tensor([0, 1, 2, 9, 10, -1])
    kc, vc = torch.zeros(4, bs, hkv, d), torch.zeros(4, bs, hkv, d)
    qn, kn = (torch.randn(d), torch.randn(d)) if qk_norm else (None, None)
    q = qkv[:, :hq * d].view(T, hq, d).clone()
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d).clone()
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d).clone()
    if qk_norm:
        q, k = rms_norm(q, qn, 1e-6), rms_norm(k, kn, 1e-6)
    c, s = cos[pos][:, None], sin[pos][:, None]
    q_want, k_want = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    interpreter.rope_and_cache(qkv, pos, cos, sin, slots, kc, vc, hq, hkv, d, qn, kn, 1e-6)
    torch.testing.assert_close(qkv[:, :hq * d].view(T, hq, d), q_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d), k_want, rtol=1e-5, atol=1e-5)
    flat_k, flat_v = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
    for t in range(T - 1):
        torch.testing.assert_close(flat_k[slots[t]], k_want[t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flat_v[slots[t]], v[t])
    written = set(slots[:-1].tolist())
    assert all(flat_k[i].abs().sum() == 0 for i in range(16) if i not in written)  # slot -1 wrote nothing


def test_silu_and_mul(interpreter):
    torch.manual_seed(0)
    gu = torch.randn(3, 2 * 1100)
    g, u = gu.chunk(2, -1)
    torch.testing.assert_close(interpreter.silu_and_mul(gu), torch.nn.functional.silu(g) * u, rtol=1e-5, atol=1e-6)
