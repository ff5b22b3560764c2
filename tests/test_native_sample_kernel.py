"""The one-pass sampling kernel: greedy rows equal ``torch.argmax``, sampled rows follow ``softmax(logits / T)``.

Without a GPU the kernel runs under the Triton interpreter on CPU tensors (small shapes); with one, compiled on
CUDA. Skipped where triton is not installed (the torch sampler is then the only path: ``test_native_engine.py``).
"""
import pytest
import torch

from lmforge.infer.native.scheduler import SamplingParams
from tests.triton_interpreter import import_kernels, interpreter_fixture

K, _PREV_INTERPRET = import_kernels("lmforge.infer.native.sample_kernel")
from lmforge.infer.native import sampler as S  # noqa: E402  (after the kernel module: it imports it)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """Keep TRITON_INTERPRET for this module only (tests/triton_interpreter.py)."""
    yield from interpreter_fixture(_PREV_INTERPRET, lambda: K._gumbel_argmax_kernel, K)


def test_greedy_rows_equal_argmax_with_ties_and_splits():
    torch.manual_seed(0)
    logits = torch.randn(6, 300, device=DEV).to(torch.bfloat16)  # bf16: many exact ties
    logits[2, 10] = logits[2, 250] = 9.0          # a tie across splits: the lower id wins, as torch.argmax
    got = K.gumbel_argmax(logits, torch.zeros(6, device=DEV), block=16)  # 300 / 16: several splits per row
    assert torch.equal(got.cpu(), logits.float().argmax(-1).cpu())
    assert got[2].item() == 10


def test_sampled_rows_follow_softmax_over_temperature():
    """2,000 rows with the same 8 logits are 2,000 independent draws: a chi-square test against
    softmax(logits / T) (seeded, so the statistic is fixed; the bound is the 0.999 quantile for 7 degrees)."""
    torch.manual_seed(1)
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    temp = 0.7
    rows = 2000
    logits = base.repeat(rows, 1).to(DEV)
    got = K.gumbel_argmax(logits, torch.full((rows,), 1 / temp, device=DEV), block=16).cpu()
    counts = torch.bincount(got, minlength=8).double()
    expected = torch.softmax(base.double() / temp, -1) * rows
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3, (counts.tolist(), expected.tolist(), chi2)


def test_repeatable_under_manual_seed_and_different_across_calls():
    logits = torch.zeros(64, 50, device=DEV)
    inv = torch.ones(64, device=DEV)
    torch.manual_seed(5)
    a = K.gumbel_argmax(logits, inv, block=16)
    b = K.gumbel_argmax(logits, inv, block=16)
    torch.manual_seed(5)
    assert torch.equal(a, K.gumbel_argmax(logits, inv, block=16))
    assert not torch.equal(a, b)


def test_sampler_routes_plain_rows_to_the_kernel_and_others_to_torch(monkeypatch):
    """Mixed greedy and temperature rows take the kernel; a top-p or logprobs row sends the batch to torch."""

    class Seq:
        def __init__(self, **kw):
            self.params = SamplingParams(**kw)

    calls = []
    real = K.gumbel_argmax
    monkeypatch.setattr(K, "gumbel_argmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = torch.randn(3, 40, device=DEV).to(torch.bfloat16)
    plain = [Seq(temperature=0.0), Seq(temperature=0.8), Seq(temperature=0.0)]
    tokens, *rest = S.sample(logits, plain)
    assert calls and rest == [None, None, None]
    assert tokens[0].item() == logits[0].float().argmax().item() and tokens[2].item() == logits[2].float().argmax().item()
    calls.clear()
    for other in (Seq(temperature=0.8, top_p=0.9), Seq(temperature=0.0, logprobs=0)):
        S.sample(logits[:2], [plain[0], other])
        assert not calls
