"""One family description drives freezing, per-part learning rates and LoRA targets for Qwen2-VL, Qwen2.5-VL
and LLaVA alike (tiny random models of the real architectures)."""
from __future__ import annotations

import pytest
import torch

from lmforge.arguments import TrainArguments
from lmforge.model.vision import family_of
from lmforge.tuners import prepare_model

TEXT = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, bos_token_id=None, eos_token_id=1, pad_token_id=0)
VISION = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
        vision_config=dict(VISION, depth=2, embed_dim=16, num_heads=2, hidden_size=32, mlp_ratio=2),
        image_token_id=290, video_token_id=291, vision_start_token_id=292))


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
        vision_config=dict(VISION, depth=2, hidden_size=16, num_heads=2, out_hidden_size=32, intermediate_size=32,
                           fullatt_block_indexes=[1], window_size=56),
        image_token_id=290, video_token_id=291, vision_start_token_id=292))


def _llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=Qwen2Config(**TEXT), image_token_id=290))


MODELS = {"qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "llava": _llava}


def _trainable_groups(model, family) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for name, p in model.named_parameters():
        g = family.group_of(name)
        out[g] = out.get(g, False) or p.requires_grad
    return out


@pytest.mark.parametrize("kind", list(MODELS))
def test_freezing_follows_the_family(kind):
    torch.manual_seed(0)
    model = MODELS[kind]()
    family = family_of(model.config)
    assert family is not None and family.name == kind
    assert all(family.group_of(n) is not None for n, _ in model.named_parameters())  # every weight has a part
    cases = [({}, {"vision_tower": False, "aligner": False, "language_model": True}),
             ({"freeze_vit": False}, {"vision_tower": True, "aligner": False, "language_model": True}),
             ({"freeze_aligner": False, "freeze_llm": True}, {"vision_tower": False, "aligner": True,
                                                             "language_model": False})]
    for flags, want in cases:
        m = MODELS[kind]()
        prepare_model(m, TrainArguments(train_type="full", **flags))
        assert _trainable_groups(m, family) == want, flags


@pytest.mark.parametrize("kind", list(MODELS))
def test_lora_targets_the_language_model_unless_asked(kind):
    model = MODELS[kind]()
    family = family_of(model.config)
    peft_model = prepare_model(model, TrainArguments(train_type="lora", lora_rank=2))
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n and family.group_of(n) == "language_model" for n in lora)
    assert not any("lm_head" in n for n in lora)
    both = prepare_model(MODELS[kind](), TrainArguments(train_type="lora", lora_rank=2, freeze_vit=False,
                                                          target_modules=["q_proj", "qkv", "fc1"]))
    groups = {family.group_of(n) for n, p in both.named_parameters() if p.requires_grad}
    assert groups == {"vision_tower", "language_model"}
    assert all(n.split(".lora_")[0].endswith(("q_proj", "qkv", "fc1")) for n, p in both.named_parameters()
               if p.requires_grad)


def test_vit_and_aligner_learning_rates():
    from lmforge.registry import OPTIMIZERS

    model = prepare_model(_qwen2_vl(), TrainArguments(train_type="full", freeze_vit=False, freeze_aligner=False))
    args = TrainArguments(learning_rate=1e-4, vit_lr=1e-5, aligner_lr=2e-5, weight_decay=0.0)
    opt = OPTIMIZERS.get("multimodal")(model, args)
    rates = {g["name"].split("/")[0]: g["lr"] for g in opt.param_groups}
    assert rates == {"base": 1e-4, "vision_tower": 1e-5, "aligner": 2e-5}
    counted = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters())


def test_an_unregistered_vision_model_is_refused():
    model = _llava()
    model.config.model_type = "my_vlm"
    with pytest.raises(ValueError, match="no registered family"):
        prepare_model(model, TrainArguments(train_type="full"))
