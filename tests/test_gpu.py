"""GPU tests (``-m gpu``): run on an H100 via the device tool; CI (no GPU) skips them."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _encoded_arith(template, n: int) -> list[dict]:
    """Encoded rows without the datasets library (QLoRA runs where only bitsandbytes was carried)."""
    from lmforge.dataset.builtin import generate_arith
    from lmforge.dataset.preprocess import preprocess_row

    rows = generate_arith(seed=0, split="train")[:n]
    return [template.encode(preprocess_row(r)) for r in rows]


def test_qlora_trains_on_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lmforge import TrainArguments
    from lmforge.pipelines.sft import prepare_training, run_training

    args = TrainArguments(model="builtin:tiny", train_type="qlora", torch_dtype="bfloat16", output_dir=str(tmp_path),
                          add_version=False,
                          max_steps=30, learning_rate=3e-3, lr_scheduler_type="constant", warmup_ratio=0.0,
                          per_device_train_batch_size=32, gradient_accumulation_steps=1, logging_steps=5,
                          save_steps=30, report_to=["none"], plot=False)
    setup = prepare_training(args, "train")
    assert getattr(setup.model, "is_loaded_in_4bit", False)
    result = run_training(setup, _encoded_arith(setup.template, 960), None)
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    print("qlora losses", losses)
    assert losses[-1] < losses[0]
    assert (tmp_path / "checkpoint-30" / "adapter_model.safetensors").is_file()


def test_sft_bf16_on_gpu(tmp_path):
    pytest.importorskip("datasets")
    from lmforge import TrainArguments, sft_main

    result = sft_main(TrainArguments(model="builtin:tiny", dataset=["builtin:arith#2000"], train_type="full",
                                     output_dir=str(tmp_path), add_version=False, max_steps=40, learning_rate=2e-3,
                                     per_device_train_batch_size=32, gradient_accumulation_steps=1, packing=True,
                                     max_length=512, logging_steps=10, report_to=["none"], plot=False))
    assert next(result["trainer"].model.parameters()).is_cuda
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
    assert torch.cuda.max_memory_allocated() > 0
