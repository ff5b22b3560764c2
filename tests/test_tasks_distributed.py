"""Two processes train the same embedding model as one: the in-batch negatives of each query are the documents
of the whole global batch (gathered from the other process with their gradients), so 2 x 8 rows over gloo
log the same losses and end at the same weights as 1 x 16 rows (measured: equal to 1e-6). Slow: two launches,
about 20 s on 2 CPU cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = ["--model", "builtin:tiny", "--task_type", "embedding", "--dataset", "builtin:arith-retrieval#64",
        "--num_negatives", "1", "--train_type", "full", "--learning_rate", "1e-3", "--max_steps", "4",
        "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_steps", "4", "--report_to", "none",
        "--plot", "false", "--add_version", "false", "--seed", "0", "--data_seed", "0"]


def _sft(cwd: Path, out: str, batch: int, nproc: int | None = None) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("NPROC_PER_NODE", None)
    if nproc:
        env["NPROC_PER_NODE"] = str(nproc)  # lmforge re-launches itself under torchrun (gloo on CPU)
    cmd = [sys.executable, "-m", "lmforge.cli.main", "sft", *ARGS, "--per_device_train_batch_size", str(batch),
           "--output_dir", out]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return cwd / out


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "logging.jsonl").read_text().splitlines() if '"loss"' in x]


def test_two_processes_train_the_same_embedding_model_as_one(tmp_path):
    import torch
    from safetensors.torch import load_file

    one = _sft(tmp_path, "one", 16)
    two = _sft(tmp_path, "two", 8, nproc=2)
    a, b = _log(one), _log(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 2e-3 * max(1.0, abs(x["loss"])), (x, y)
        assert abs(x["accuracy"] - y["accuracy"]) < 1e-6
    wa, wb = load_file(str(one / "checkpoint-4" / "model.safetensors")), load_file(
        str(two / "checkpoint-4" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-3, worst
    assert torch.is_tensor(next(iter(wa.values())))
