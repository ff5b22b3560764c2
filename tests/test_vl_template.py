"""Templates through a vision-language processor: token ids equal the processor's own apply_chat_template,
placeholders expand per image size and --min/--max_pixels, labels are exactly the assistant replies."""
from __future__ import annotations

import pytest
from PIL import Image

from lmforge.dataset.media import data_url, open_image
from lmforge.template import MaxLengthError, TemplateError, get_template


def _processor(min_pixels=None, max_pixels=None):
    from transformers import AutoConfig

    from lmforge.model import builtin_model_dir, get_model_tokenizer
    from lmforge.model.vision import load_processor

    folder = builtin_model_dir("builtin:tiny-vl")
    tok = get_model_tokenizer("builtin:tiny-vl", load_model=False)[1]
    return load_processor(folder, AutoConfig.from_pretrained(folder), tok, min_pixels=min_pixels,
                          max_pixels=max_pixels)


@pytest.fixture(scope="module")
def processor():
    return _processor()


def _img(w, h, colour=(200, 30, 30)):
    return data_url(Image.new("RGB", (w, h), colour))


def _parts(messages, images):
    """Canonical <image> messages as the processor takes them: image parts holding the PIL images."""
    it = iter(images)
    out = []
    for m in messages:
        pieces = m["content"].split("<image>")
        parts = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image", "image": open_image(next(it))})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


ROW = {"messages": [{"role": "user", "content": "<image>What colour is it?"},
                    {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "And this one?<image>"},
                    {"role": "assistant", "content": "blue"}],
       "images": [_img(300, 200), _img(30, 30, (0, 0, 255))]}


def test_ids_equal_the_processor_and_labels_are_the_replies(processor):
    tpl = get_template(processor.tokenizer, processor=processor)
    enc = tpl.encode(ROW)
    ref = processor.apply_chat_template(_parts(ROW["messages"], ROW["images"]), tokenize=True, return_dict=True)
    assert enc["input_ids"] == list(ref["input_ids"][0])
    pad = processor.image_token_id
    # 300x200 is scaled down to at most 112*112 pixels (4x4 merged tokens); 30x30 up to 56x56 (2x2)
    assert enc["input_ids"].count(pad) == 12 + 4 == sum(int(g.prod()) // 4 for g in ref["image_grid_thw"])
    labelled = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert processor.tokenizer.decode(labelled) == "red<|im_end|>blue<|im_end|>"
    assert enc["images"] == ROW["images"] and enc["length"] == len(enc["input_ids"])
    # infer mode: the prompt with the generation prompt, as apply_chat_template renders it
    tpl.set_mode("infer")
    prompt = {"messages": ROW["messages"][:3], "images": ROW["images"]}
    ref = processor.apply_chat_template(_parts(prompt["messages"], ROW["images"]), tokenize=True,
                                        add_generation_prompt=True, return_dict=True)
    assert tpl.encode(prompt)["input_ids"] == list(ref["input_ids"][0])


def test_max_and_min_pixels_set_the_token_count():
    small = _processor(max_pixels=56 * 56)
    big = _processor(min_pixels=112 * 112)
    # 300x200 -> 28x56 (2 tokens) under max 56*56, 30x30 -> 56x56 (4); with min 112*112 30x30 -> 112x112 (16)
    for proc, want in ((small, 2 + 4), (big, 12 + 16)):
        tpl = get_template(proc.tokenizer, processor=proc)
        enc = tpl.encode(ROW)
        assert enc["input_ids"].count(proc.image_token_id) == want
        pixels = tpl.vision.pixel_inputs(enc["images"])
        assert sum(int(g.prod()) // 4 for g in pixels["image_grid_thw"]) == want
    assert get_template(small.tokenizer, processor=small).cache_key() != \
        get_template(big.tokenizer, processor=big).cache_key()


def test_rows_without_tags_and_bad_rows(processor, tiny_tokenizer):
    tpl = get_template(processor.tokenizer, processor=processor)
    plain = {"messages": [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}],
             "images": [_img(56, 56)]}
    tagged = {**plain, "messages": [{"role": "user", "content": "<image>What colour?"}, plain["messages"][1]]}
    assert tpl.encode(plain)["input_ids"] == tpl.encode(tagged)["input_ids"]
    text_only = tpl.encode({"messages": plain["messages"]})
    assert text_only["images"] == [] and processor.image_token_id not in text_only["input_ids"]
    with pytest.raises(TemplateError, match="2 <image> tag"):
        tpl.encode({**tagged, "messages": [{"role": "user", "content": "<image><image>?"}, plain["messages"][1]]})
    with pytest.raises(TemplateError, match="not a vision-language model"):
        get_template(tiny_tokenizer).encode(plain)
    tpl.set_mode("rlhf")  # preference rows: both replies see the prompt's images (tests/test_vl_preference.py)
    pair = tpl.encode({**tagged, "rejected_response": "blue"})
    assert pair["chosen_images"] == pair["rejected_images"] == tagged["images"]
    tpl.set_mode("train")
    cut = get_template(processor.tokenizer, processor=processor, max_length=8, truncation_strategy="left")
    with pytest.raises(MaxLengthError, match="cut an image"):
        cut.encode(tagged)


def test_llava_template_collator_and_forward_through_the_same_path(tmp_path, tiny_tokenizer):
    """A tiny random LLaVA (CLIP tower, fixed-size images): ids equal LlavaProcessor's, the batch runs."""
    import json

    from transformers import (AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              Qwen2Config)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from lmforge.model.builtin import _RENDER_PARTS
    from lmforge.model.builtin.build_tokenizer import CHATML_TEMPLATE
    from lmforge.model.vision import family_of, load_processor
    from lmforge.trainers.vision_collator import VisionCollator

    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = _RENDER_PARTS.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>") + \
        CHATML_TEMPLATE.replace("message['content']", "render(message['content'])")
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1),
        image_token_id=tok.convert_tokens_to_ids("<image>")))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"patch_size": 14, "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0}))
    processor = load_processor(tmp_path, AutoConfig.from_pretrained(tmp_path), tok)
    tpl = get_template(tok, processor=processor)
    image = _img(50, 60)
    row = {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}],
           "images": [image]}
    enc = tpl.encode(row)
    ref = processor.apply_chat_template(_parts(row["messages"], [image]), tokenize=True, return_dict=True)
    assert enc["input_ids"] == list(ref["input_ids"][0])
    assert enc["input_ids"].count(processor.image_token_id) == 4  # (28 / 14) ** 2, whatever the image size
    batch = VisionCollator(tok.pad_token_id, tpl.vision, family_of(model.config))([enc, enc])
    assert batch["pixel_values"].shape == (2, 3, 28, 28) and "mm_token_type_ids" not in batch
    labels = batch.pop("labels")
    assert model(**batch).logits.shape[:2] == labels.shape
