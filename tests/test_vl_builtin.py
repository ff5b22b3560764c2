"""The Qwen2-VL config builder behind builtin:tiny-vl and the VL benchmark: the benchmark's spec is
Qwen2-VL-2B-Instruct's architecture (its published parameter count), and bad shapes fail with the field named."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_spec_is_qwen2_vl_2b():
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from lmforge.model.builtin import qwen2_vl_config, vl_tokenizer

    s = _bench_common().QWEN2_VL_2B
    tok = vl_tokenizer()
    cfg = qwen2_vl_config(tok, s["text"], s["vision"], rope_theta=s["rope_theta"], vocab_size=s["vocab_size"],
                          mrope_section=s["mrope_section"])
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    assert sum(p.numel() for p in model.parameters()) == 2_208_985_600  # Qwen2-VL-2B-Instruct's count
    assert sum(p.numel() for p in model.model.visual.parameters()) == 665_271_296
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    for name in ("<|image_pad|>", "<|vision_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(name) < cfg.text_config.vocab_size
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")


def test_bad_shapes_name_the_field():
    from lmforge.model.builtin import MODEL_SPECS, qwen2_vl_config, vl_tokenizer

    tok = vl_tokenizer()
    spec = {k: v for k, v in MODEL_SPECS["tiny-vl"].items()
            if k not in ("seed", "vision", "rope_theta", "min_pixels", "max_pixels")}
    vision = MODEL_SPECS["tiny-vl"]["vision"]
    with pytest.raises(ValueError, match="vocab_size 100 does not cover"):
        qwen2_vl_config(tok, spec, vision, rope_theta=1e4, vocab_size=100)
    with pytest.raises(ValueError, match="mrope_section"):
        qwen2_vl_config(tok, spec, vision, rope_theta=1e4, mrope_section=[4, 4, 4])
    assert qwen2_vl_config(tok, spec, vision, rope_theta=1e4).text_config.vocab_size == len(tok)
