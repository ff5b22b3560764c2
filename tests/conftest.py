"""Test set-up: offline, a private cache, and GPU tests skipped where there is no GPU."""
from __future__ import annotations

import os
import tempfile

# No test may download anything; a hub call must fail fast at the network boundary.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engine and server tests generate from worker threads; busy-waiting OpenMP workers make that crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("LMFORGE_CACHE", tempfile.mkdtemp(prefix="lmforge-test-cache-"))

import pytest  # noqa: E402


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
