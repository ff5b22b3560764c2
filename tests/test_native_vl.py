"""The native engine on a vision-language model (builtin:tiny-vl, Qwen2-VL), on the CPU in float32, against the
hf engine: image embeddings from the model's own tower, 3-D M-RoPE positions for prompt tokens and 1-D
``index + delta`` after them, prefix-cache keys that tell images apart, chunked prefill, preemption, videos (frame
lists, alone and beside images), a tiny Qwen2.5-VL, and the refusal of families it does not run (LLaVA).

builtin:tiny-vl's own random weights make every reply one repeated token, which hides position errors; the
weights are redrawn here with unit-variance activations so that replies vary, and logprobs are compared too.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lmforge.dataset.media import data_url
from lmforge.infer import InferRequest, RequestConfig

RED = data_url(Image.new("RGB", (84, 84), (220, 30, 30)))
WIDE = data_url(Image.new("RGB", (112, 56), (30, 30, 220)))
TALL = data_url(Image.radial_gradient("L").convert("RGB").resize((70, 140)))
BIG = data_url(Image.linear_gradient("L").convert("RGB").resize((168, 112)))
GREEDY = RequestConfig(max_tokens=24, ignore_eos=True, logprobs=True)


def _ask(text: str, *images: str) -> InferRequest:
    return InferRequest(messages=[{"role": "user", "content": text}], images=list(images))


def redrawn_tiny_vl(device: str = "cpu"):
    """builtin:tiny-vl with its matrices redrawn at std 1/sqrt(fan-in) (seeded), float32."""
    from lmforge.model import get_model_tokenizer

    model, tok = get_model_tokenizer("builtin:tiny-vl", device="cpu", torch_dtype="float32")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model.to(device), tok


@pytest.fixture(scope="module")
def model_tok():
    return redrawn_tiny_vl()


@pytest.fixture(scope="module")
def hf(model_tok):
    from lmforge.infer.hf import HfEngine

    return HfEngine(model_obj=model_tok[0], tokenizer=model_tok[1], device="cpu", max_batch_size=8)


def _native(model_tok, **kw):
    from lmforge.infer.native import NativeEngine

    return NativeEngine(model_obj=model_tok[0], tokenizer=model_tok[1], allow_cpu=True, device="cpu",
                        enforce_eager=True, **kw)


@pytest.fixture(scope="module")
def native(model_tok):
    engine = _native(model_tok, max_num_seqs=8, block_size=4)
    yield engine
    engine.close()


def _same(got, want, tol=1e-4):
    """Equal greedy tokens and logprobs within float32 noise."""
    for g, w in zip(got, want):
        g, w = g.choices[0], w.choices[0]
        assert g.token_ids == w.token_ids
        gap = max(abs(a.logprob - b.logprob) for a, b in zip(g.logprobs.content, w.logprobs.content))
        assert gap < tol, gap


def test_mixed_batch_of_image_sizes_and_text_matches_hf(hf, native):
    reqs = [_ask("<image>Which colour?", RED), _ask("Hello there, how are you today?"),
            _ask("Shape?<image> and then <image>, compare.", WIDE, TALL), _ask("<image>Describe.", BIG),
            _ask("Count to five.")]
    want = hf.infer(reqs, GREEDY)
    _same(native.infer(reqs, GREEDY), want)
    assert len({tuple(r.choices[0].token_ids) for r in want}) == len(reqs)  # replies differ: a real comparison
    assert native.stats["tokens"] >= 24 * len(reqs)


def test_same_prompt_other_image_is_not_served_from_the_prefix_cache(hf, native):
    a, b = _ask("<image>What is in this picture, in detail?", RED), _ask("<image>What is in this picture, in detail?",
                                                                         WIDE)
    want_a, want_b = hf.infer([a], GREEDY), hf.infer([b], GREEDY)
    assert want_a[0].choices[0].token_ids != want_b[0].choices[0].token_ids
    _same(native.infer([a], GREEDY), want_a)
    hits = native.blocks.hits
    _same(native.infer([b], GREEDY), want_b)  # same ids, other pixels: a cache hit would answer as for a
    assert native.blocks.hits == hits
    _same(native.infer([a], GREEDY), want_a)  # the same image again does reuse its blocks
    assert native.blocks.hits > hits


def test_chunked_prefill_cuts_images_across_steps(hf, model_tok):
    reqs = [_ask("<image>Which colour?", BIG), _ask("Shape?<image> and then <image>, compare.", WIDE, TALL),
            _ask("Hello there, how are you today?")]
    engine = _native(model_tok, max_num_seqs=4, max_num_batched_tokens=8, block_size=4)
    try:
        got = engine.infer(reqs, GREEDY)
        assert engine.stats["prefill_tokens"] > 0 and engine.stats["steps"] > 24 + 10  # prompts took many steps
    finally:
        engine.close()
    _same(got, hf.infer(reqs, GREEDY))


def test_preempted_image_requests_are_recomputed_with_their_images(hf, model_tok):
    reqs = [_ask("<image>Which colour?", RED), _ask("<image>Describe.", WIDE), _ask("<image>Count.", TALL)]
    engine = _native(model_tok, max_num_seqs=4, block_size=4, num_blocks=24)  # room for ~1.5 sequences
    try:
        got = engine.infer(reqs, GREEDY)
        assert engine.scheduler.num_preempted > 0
    finally:
        engine.close()
    _same(got, hf.infer(reqs, GREEDY))


def test_n_samples_share_the_image_prompt_and_image_tokens_are_never_sampled(hf, native):
    req = _ask("<image>Tell me a story.", TALL)
    cfg = RequestConfig(max_tokens=12, ignore_eos=True, n=3)
    got = native.infer([req], cfg)[0]
    want = hf.infer([req], RequestConfig(max_tokens=12, ignore_eos=True))[0].choices[0].token_ids
    assert [c.token_ids for c in got.choices] == [want] * 3
    one = RequestConfig(max_tokens=12, ignore_eos=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in native.infer_stream(req, one) if c.choices)
    assert streamed and streamed == hf.infer([req], one)[0].choices[0].message.content

    async def server_side():  # the path `deploy` streams through: asyncio, no thread per request
        return "".join([c.choices[0].delta.content or "" async for c in native.infer_stream_async(req, one)
                        if c.choices])

    import asyncio

    assert asyncio.run(server_side()) == streamed
    sampled = native.infer([req], RequestConfig(max_tokens=16, temperature=1.5, n=4, seed=0))[0]
    assert not any(t in hf.template.vision.token_ids for c in sampled.choices for t in c.token_ids)


def _video(colour: str, n: int = 4, size: int = 56) -> list[str]:
    from test_vl_video import COLOURS, moving_square

    return [data_url(f) for f in moving_square(n, size, COLOURS[colour])]


def _ask_video(text: str, videos: list, images: tuple = ()) -> InferRequest:
    return InferRequest(messages=[{"role": "user", "content": text}], images=list(images), videos=videos)


# a 12-frame video has 6 temporal patches of 2x2 merged tokens: its time axis outruns its sides, so the text after
# it sits below the prompt's largest position and decoding resumes past that (delta from the time axis)
VIDEO_REQS = [_ask_video("<video>What moves?", [_video("red")]),
              _ask_video("<image>then<video>, compare them.", [_video("blue", 6)], (WIDE,)),
              _ask_video("<video> and <image> and <video>?", [_video("green", 12), _video("yellow", 3, 84)], (RED,)),
              _ask("Hello there, how are you today?")]


def test_video_and_mixed_image_video_rows_match_hf(hf, native):
    want = hf.infer(VIDEO_REQS, GREEDY)
    assert len({tuple(r.choices[0].token_ids) for r in want}) == len(VIDEO_REQS)
    _same(native.infer(VIDEO_REQS, GREEDY), want)


def test_chunked_prefill_cuts_videos_across_steps(hf, model_tok):
    engine = _native(model_tok, max_num_seqs=4, max_num_batched_tokens=8, block_size=4)
    try:
        got = engine.infer(VIDEO_REQS, GREEDY)
        assert engine.stats["steps"] > 24 + 10
    finally:
        engine.close()
    _same(got, hf.infer(VIDEO_REQS, GREEDY))


def test_same_prompt_other_video_is_not_served_from_the_prefix_cache(hf, native):
    a, b = (_ask_video("<video>What is moving here, and where to?", [_video(c)]) for c in ("red", "blue"))
    assert native.encode(a) == native.encode(b)  # the same placeholder ids: only the pixels differ
    want_a, want_b = hf.infer([a], GREEDY), hf.infer([b], GREEDY)
    assert want_a[0].choices[0].token_ids != want_b[0].choices[0].token_ids
    _same(native.infer([a], GREEDY), want_a)
    hits = native.blocks.hits
    _same(native.infer([b], GREEDY), want_b)
    assert native.blocks.hits == hits
    _same(native.infer([a], GREEDY), want_a)
    assert native.blocks.hits > hits


def test_update_weights_reaches_the_vision_tower(model_tok):
    from lmforge.infer.hf import HfEngine
    from lmforge.model import get_model_tokenizer

    fresh, tok = get_model_tokenizer("builtin:tiny-vl", device="cpu")
    engine = _native((fresh, tok), max_num_seqs=4)
    try:
        engine.update_weights(model_tok[0].state_dict().items())
        req = [_ask("<image>Which colour?", WIDE)]
        want = HfEngine(model_obj=model_tok[0], tokenizer=tok, device="cpu").infer(req, GREEDY)
        _same(engine.infer(req, GREEDY), want)
    finally:
        engine.close()


def _tiny_qwen2_5_vl(folder):
    """A random Qwen2.5-VL (window-attention vision tower) with builtin:tiny-vl's language model shape,
    tokenizer and image processor, its matrices drawn as redrawn_tiny_vl draws them."""
    import shutil
    from pathlib import Path

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from lmforge.model import builtin_model_dir

    src = Path(builtin_model_dir("tiny-vl"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "generation_config.json"):
        shutil.copy(src / name, folder / name)
    top = json.loads((src / "config.json").read_text())
    text = {k: v for k, v in top["text_config"].items() if k != "model_type"}
    vision = dict(depth=2, hidden_size=64, num_heads=2, out_hidden_size=text["hidden_size"], intermediate_size=128,
                  fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    keep = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings",
            "eos_token_id", "pad_token_id")
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                **{k: top[k] for k in keep}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    model.save_pretrained(folder)
    return str(folder)


def tiny_qwen2_5_vl_loaded(folder, mode: str):
    """:func:`_tiny_qwen2_5_vl` written to ``folder`` and loaded: (model in eval mode, tokenizer, template in
    ``mode`` with the folder's processor)."""
    from lmforge.model import get_model_tokenizer
    from lmforge.model.vision import get_processor
    from lmforge.template import get_template

    path = _tiny_qwen2_5_vl(folder)
    model, tok = get_model_tokenizer(path, device="cpu")
    template = get_template(tok, processor=get_processor(path, model.config, tok))
    template.set_mode(mode)
    return model.eval(), tok, template


def test_qwen2_5_vl_matches_hf_with_chunked_prefill(tmp_path):
    from lmforge.infer.hf import HfEngine
    from lmforge.infer.native import NativeEngine

    folder = _tiny_qwen2_5_vl(tmp_path)
    pytest.importorskip("av")
    from test_vl_video import COLOURS, moving_square, write_mp4

    clip = write_mp4(tmp_path / "clip.mp4", moving_square(10, 56, COLOURS["green"]))  # 4 of 10 frames at 4 fps
    reqs = [_ask("<image>Which colour?", RED), _ask("Hello there, how are you today?"),
            _ask("Shape?<image> and then <image>, compare.", WIDE, TALL), _ask("<image>Describe.", BIG),
            # videos: their time axes scaled by tokens_per_second x seconds per temporal patch (a file's rate;
            # a frame list counts as 24 frames a second)
            _ask_video("<video>What moves?", [[clip]]), _ask_video("<image>then<video>?", [_video("red", 12)], (WIDE,))]
    want = HfEngine(folder, device="cpu").infer(reqs, GREEDY)
    engine = NativeEngine(folder, allow_cpu=True, device="cpu", enforce_eager=True, block_size=4, max_num_seqs=4,
                          max_num_batched_tokens=8)
    try:
        assert engine.model.config.model_type == "qwen2_5_vl"
        _same(engine.infer(reqs, GREEDY), want)
    finally:
        engine.close()


def test_language_model_adapters_apply_per_request_and_tower_adapters_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lmforge.infer.hf import HfEngine
    from lmforge.infer.native import NativeEngine
    from lmforge.infer.native.model import UnsupportedModelError
    from lmforge.model import get_model_tokenizer

    torch.manual_seed(0)
    for name, target in (("lm", r".*language_model.*\.(q_proj|v_proj|down_proj)"), ("tower", r".*visual.*\.qkv")):
        model, _ = get_model_tokenizer("builtin:tiny-vl", device="cpu")
        lora = LoraConfig(r=4, lora_alpha=16, target_modules=target, init_lora_weights=False)  # random B: it acts
        get_peft_model(model, lora).save_pretrained(tmp_path / name)
    reqs = [InferRequest(messages=[{"role": "user", "content": "<image>Which colour?"}], images=[WIDE], adapter=a)
            for a in ("lm", "", "lm")]
    hf = HfEngine("builtin:tiny-vl", adapters={"lm": str(tmp_path / "lm")}, device="cpu")
    want = [hf.infer([r], GREEDY)[0] for r in reqs]  # one adapter per hf batch; the native engine mixes them
    assert want[0].choices[0].token_ids != want[1].choices[0].token_ids
    engine = NativeEngine("builtin:tiny-vl", adapters={"lm": str(tmp_path / "lm")}, allow_cpu=True, device="cpu",
                          enforce_eager=True)
    try:
        _same(engine.infer(reqs, GREEDY), want)
    finally:
        engine.close()
    with pytest.raises(UnsupportedModelError, match="change the vision tower"):
        NativeEngine("builtin:tiny-vl", adapters={"tower": str(tmp_path / "tower")}, allow_cpu=True, device="cpu")


def test_other_vision_families_are_refused_by_name(tmp_path, tiny_tokenizer):
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
    )
    from transformers.models.llava.image_processing_pil_llava import (
        LlavaImageProcessorPil,
    )

    from lmforge.infer.native import NativeEngine
    from lmforge.model.builtin import _RENDER_PARTS
    from lmforge.model.builtin.build_tokenizer import CHATML_TEMPLATE

    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = _RENDER_PARTS.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>") + \
        CHATML_TEMPLATE.replace("message['content']", "render(message['content'])")
    LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1),
        image_token_id=tok.convert_tokens_to_ids("<image>"))).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"patch_size": 14, "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0}))
    with pytest.raises(NotImplementedError, match="family 'llava'.*--infer_backend hf"):
        NativeEngine(str(tmp_path), allow_cpu=True, device="cpu")
