"""Test set-up: offline, a private cache, one place for CPU threads and kernels, GPU tests skipped where
there is no GPU, and the session-scoped arithmetic SFT that the learning tests share.

Reproducibility across CPUs: ATen picks its vector kernels (and MKL its GEMM kernels) by the CPU's
instruction set, so an AVX-512 machine and an AVX2 one round differently, and a chaotic training run
can end elsewhere. The tests pin both to AVX2 (any x86-64 CI machine has it) unless the caller set
them; the learning tests' bars are set from curves measured over many seeds, thread counts and two
CPU models anyway (tests/arith_sweep.py), so they do not depend on this pin.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# No test may download anything; a hub call must fail fast at the network boundary.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engine and server tests generate from worker threads; busy-waiting OpenMP workers make that crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("LMFORGE_CACHE", tempfile.mkdtemp(prefix="lmforge-test-cache-"))
# Same kernels on AVX2 and AVX-512 machines (read when torch loads, so set before any test imports it).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("MKL_CBWR", "AVX2")

import pytest  # noqa: E402


def test_threads() -> int:
    """Intra-op threads per test process: LMFORGE_TEST_THREADS, else the cores shared by the xdist workers."""
    if os.environ.get("LMFORGE_TEST_THREADS"):
        return max(1, int(os.environ["LMFORGE_TEST_THREADS"]))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


test_threads.__test__ = False  # a helper, not a test


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(test_threads())
    if not torch.cuda.is_available():
        _import_triton_for_the_interpreter()


def _import_triton_for_the_interpreter() -> None:
    """Without a GPU, triton is first imported here under ``TRITON_INTERPRET=1``: its language helpers are built
    once, at that first import, and the kernel test modules (tests/triton_interpreter.py) can run only if they
    were built for the interpreter. Otherwise the first module that imports ``torch._dynamo`` (which imports
    triton when it is installed) would decide it and those modules would skip. No kernel runs on a CPU outside
    the interpreter, so nothing else notices."""
    from tests.triton_interpreter import restore

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        restore(previous)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lmforge.model import get_model_tokenizer

    return get_model_tokenizer("builtin:tiny", load_model=False)[1]


@pytest.fixture()
def tiny_model_tokenizer():
    from lmforge.model import get_model_tokenizer

    return get_model_tokenizer("builtin:tiny", device="cpu")


@pytest.fixture(scope="session")
def arith_sft(tmp_path_factory) -> dict:
    """One SFT of ``builtin:tiny`` on ``builtin:arith`` (the README recipe), shared by every learning test
    of the session and by all xdist workers (the first trains under a file lock, the others read its
    result): ``{"final": checkpoint, "warm": half-trained copy or None, "warm_step", "history", ...}``."""
    from filelock import FileLock

    from arith_probe import train_arith_sft

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, shared by its workers (not by other runs)
    done = root / "arith_sft.json"
    with FileLock(str(root / "arith_sft.lock")):
        if not done.exists():
            done.write_text(json.dumps(train_arith_sft(root / "arith_sft")))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def arith_warm_ckpt(arith_sft) -> str:
    """A half-trained arithmetic model (held-out exact match just past ``WARM_LOW``): the start that
    GRPO and DPO have room to improve."""
    if not arith_sft["warm"]:
        pytest.fail(f"the arith SFT never reached the warm-start accuracy: probes {arith_sft['history']}")
    return arith_sft["warm"]
