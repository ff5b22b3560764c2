"""Training batches of image rows: the collator's pixels and positions give the model's own losses, padded
or packed (Qwen2-VL's multi-axis rotary positions computed per packed row)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmforge.dataset.media import data_url


@pytest.fixture(scope="module")
def vl():
    from lmforge.model import get_model_tokenizer
    from lmforge.model.vision import family_of, get_processor
    from lmforge.template import get_template

    model, tok = get_model_tokenizer("builtin:tiny-vl", device="cpu")
    processor = get_processor("builtin:tiny-vl", model.config, tok)
    return model.eval(), get_template(tok, processor=processor), family_of(model.config)


ROWS = [
    {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"},
                  {"role": "user", "content": "And here?<image>"}, {"role": "assistant", "content": "blue"}],
     "images": [data_url(Image.new("RGB", (84, 56), (200, 0, 0))), data_url(Image.new("RGB", (112, 112), (0, 0, 200)))]},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "<image>Shape?"}, {"role": "assistant", "content": "square"}],
     "images": [data_url(Image.new("RGB", (56, 84), (0, 200, 0)))]},
]


def _collator(template, family, padding_free):
    from lmforge.trainers.vision_collator import VisionCollator

    return VisionCollator(template.tokenizer.pad_token_id, template.vision, family, padding_free=padding_free)


def _token_losses(model, batch):
    batch = dict(batch)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             reduction="none", ignore_index=-100)
    return loss[labels[:, 1:].flatten() != -100]


def test_positions_match_the_model_and_packing_matches_padding(vl):
    from lmforge.dataset.packing import concat_rows
    from lmforge.model.vision import mrope_position_ids

    model, template, family = vl
    encs = [template.encode(r) for r in ROWS]
    padded = _collator(template, family, False)(encs)
    assert padded["pixel_values"].shape[0] == sum(int(g.prod()) for g in padded["image_grid_thw"])
    assert set(padded) >= {"mm_token_type_ids", "image_grid_thw", "attention_mask"}
    # our positions for row 0 equal the model's own get_rope_index
    ref, _ = model.model.get_rope_index(padded["input_ids"][:1], padded["mm_token_type_ids"][:1],
                                        image_grid_thw=padded["image_grid_thw"][:2])
    ids = torch.tensor(encs[0]["input_ids"])
    ours = mrope_position_ids(ids, torch.arange(len(ids)), padded["image_grid_thw"][:2],
                              template.vision.image_token_id, 2)
    assert torch.equal(ours, ref[:, 0, :len(ids)])
    # the same rows packed into one sequence give the same per-token losses
    packed_row = concat_rows(encs)
    packed = _collator(template, family, True)([packed_row])
    assert packed["position_ids"].shape == (4, 1, sum(len(e["input_ids"]) for e in encs))
    a, b = _token_losses(model, padded), _token_losses(model, packed)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_a_changed_image_is_caught(vl):
    _, template, family = vl
    enc = template.encode(ROWS[2])
    enc["images"] = [data_url(Image.new("RGB", (112, 112)))]  # 16 tokens, the encoding has 4
    with pytest.raises(ValueError, match="image tokens but its 1 images give"):
        _collator(template, family, False)([enc])
