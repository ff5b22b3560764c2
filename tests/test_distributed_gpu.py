"""Two GPUs over NCCL train the same model as one GPU (the CUDA twin of tests/test_distributed.py's gloo runs).

The same launchers and data as the gloo tests, on CUDA in float32 with TF32 off, so that the only
differences left are GEMM shapes (batch 8 on one GPU against batch 4 on each of two): per-step losses agree
to 1e-5 relative and final weights to 1e-4. A missing gradient all-reduce, a loss normalised per process
instead of over the global batch, or a shard lost by FSDP shows as differences of 1e-2 and more. Needs two
GPUs (``-m gpu``; skipped otherwise).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_distributed import COMMON, FULL, LORA, _assert_same_weights, _losses, _run, _weights

pytestmark = pytest.mark.gpu

CUDA_F32 = ["--torch_dtype", "float32", "--attn_impl", "sdpa"]


def _two_gpus() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.fixture(scope="module")
def nccl_runs(tmp_path_factory) -> Path:
    if not _two_gpus():
        pytest.skip("needs two CUDA GPUs")
    import os

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # full float32 matmuls in every process
    d = tmp_path_factory.mktemp("nccl")
    sft = [sys.executable, "-m", "lmforge.cli.main", "sft", *COMMON, *CUDA_F32]
    _run([*sft, *FULL, "--per_device_train_batch_size", "8", "--output_dir", "one_full"], d)
    _run([*sft, *FULL, "--per_device_train_batch_size", "4", "--output_dir", "ddp_full"], d, nproc=2)
    _run([*sft, *FULL, "--per_device_train_batch_size", "4", "--output_dir", "fsdp_full", "--fsdp", "full_shard"], d,
         nproc=2)
    _run([*sft, *LORA, "--per_device_train_batch_size", "4", "--output_dir", "one_lora"], d)
    _run([*sft, *LORA, "--per_device_train_batch_size", "2", "--output_dir", "ddp_lora"], d, nproc=2)
    return d


@pytest.mark.parametrize("kind", ["ddp_full", "fsdp_full", "ddp_lora"])
def test_two_gpus_train_the_same_model_as_one(nccl_runs, kind):
    one = nccl_runs / ("one_full" if kind.endswith("full") else "one_lora")
    ref, got = _losses(one), _losses(nccl_runs / kind)
    assert len(ref) == len(got) == 10
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    worst = _assert_same_weights(_weights(one / "checkpoint-10"), _weights(nccl_runs / kind / "checkpoint-10"),
                                 atol=1e-4)
    print(f"NCCL {kind}: per-step loss rel. diff <= {rel:.1e}, final weights max abs diff {worst:.1e}")
    assert rel <= 1e-5
