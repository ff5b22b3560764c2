"""Tuners choose what trains; patterns and errors."""
from __future__ import annotations

import pytest

from lmforge.arguments import TrainArguments
from lmforge.tuners import prepare_model


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train_type", ["lora", "dora"])
def test_lora_family_trains_only_adapters(tiny_model_tokenizer, train_type):
    model, _ = tiny_model_tokenizer
    model = prepare_model(model, TrainArguments(model="builtin:tiny", train_type=train_type, lora_rank=4))
    names = _trainable(model)
    assert names and all("lora_" in n for n in names)
    if train_type == "dora":
        assert any("lora_magnitude_vector" in n for n in names)


def test_lora_target_names_and_modules_to_save(tiny_model_tokenizer):
    model, _ = tiny_model_tokenizer
    args = TrainArguments(model="builtin:tiny", target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    names = _trainable(prepare_model(model, args))
    assert any(".q_proj.lora_A" in n for n in names) and not any("o_proj" in n for n in names)


def test_full_and_freeze(tiny_model_tokenizer):
    model, _ = tiny_model_tokenizer
    total = {n for n, _ in model.named_parameters()}
    args = TrainArguments(model="builtin:tiny", train_type="freeze",
                          freeze_parameters=["model.embed_tokens", r"model\.layers\.[0-2]\."],
                          trainable_parameters=["model.layers.0.self_attn.q_proj"])
    names = _trainable(prepare_model(model, args))
    assert not any(n.startswith("model.layers.1.") for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.3.mlp.up_proj.weight" in names
    assert _trainable(prepare_model(model, TrainArguments(model="x", train_type="full"))) == total


def test_freeze_needs_patterns(tiny_model_tokenizer):
    model, _ = tiny_model_tokenizer
    with pytest.raises(ValueError, match="--freeze_parameters"):
        prepare_model(model, TrainArguments(model="x", train_type="freeze"))


def test_qlora_on_cpu_says_why():
    from lmforge.tuners.prepare import qlora_quantization_config

    with pytest.raises(RuntimeError, match="CUDA GPU"):
        qlora_quantization_config(TrainArguments(model="x", train_type="qlora"))
