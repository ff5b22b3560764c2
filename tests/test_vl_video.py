"""Videos on builtin:tiny-vl (Qwen2-VL): our numpy patches in the video processor's layout (checked by hand,
against the image processor for one frame, and against transformers' video processor where torchvision
imports), .mp4 files decoded with PyAV, <video> tags through the template, packed rotary positions and losses,
training, generation, and the errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lmforge.dataset.media import data_url

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "yellow": (230, 210, 30)}


def moving_square(n: int = 8, size: int = 64, colour=(220, 30, 30), background=(255, 255, 255)) -> list:
    """``n`` frames of a square of ``colour`` moving left to right (deterministic)."""
    frames = []
    for k in range(n):
        im = Image.new("RGB", (size, size), background)
        x = k * (size - 20) // max(1, n - 1)
        ImageDraw.Draw(im).rectangle([x, size // 3, x + 19, size // 3 + 19], fill=colour)
        frames.append(im)
    return frames


def write_mp4(path, frames=None, fps: int = 4) -> str:
    """``frames`` (default: 8 frames of a moving red square, 64x64) written as an MPEG-4 .mp4 with PyAV."""
    import av

    frames = frames or moving_square()
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for im in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(im)))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="module")
def vl():
    from lmforge.model import get_model_tokenizer
    from lmforge.model.vision import family_of, get_processor
    from lmforge.template import get_template

    model, tok = get_model_tokenizer("builtin:tiny-vl", device="cpu")
    processor = get_processor("builtin:tiny-vl", model.config, tok)
    return model.eval(), get_template(tok, processor=processor), family_of(model.config)


# ---- pixels ---------------------------------------------------------------------------------------------


def _spec(**kw):
    from lmforge.template.video import VideoSpec

    return VideoSpec.from_sources(dict(dict(patch_size=2, merge_size=2, temporal_patch_size=2, size={
        "shortest_edge": 4, "longest_edge": 10_000}), **kw))


def test_patch_rows_invert_to_the_frames_by_hand():
    """Rows are (t, h-block, w-block, h-in-block, w-in-block), columns (channel, frame-in-patch, y, x); an odd
    frame count repeats the last frame."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(3)]
    spec = _spec(do_rescale=False, do_normalize=False)
    rows, (t, gh, gw) = spec.patches([Image.fromarray(f) for f in frames])
    assert (t, gh, gw) == (2, 4, 6) and rows.shape == (2 * 4 * 6, 3 * 2 * 2 * 2)
    video = np.stack(frames + [frames[-1]])  # [T, H, W, C]
    p, m, tp = 2, 2, 2
    r = 0
    for ti in range(t):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for mh in range(m):
                    for mw in range(m):
                        y0, x0 = (bh * m + mh) * p, (bw * m + mw) * p
                        want = [video[ti * tp + f, y0 + y, x0 + x, c]
                                for c in range(3) for f in range(tp) for y in range(p) for x in range(p)]
                        assert rows[r].tolist() == want, r
                        r += 1
    # rescaled then normalised per channel, the layout unchanged
    one = [Image.fromarray(frames[0])]
    norm = _spec(image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.2, 0.1]).patches(one)[0]
    raw = spec.patches(one)[0].reshape(-1, 3, 8)
    mean, std = np.array([0.5, 0.4, 0.3])[:, None], np.array([0.25, 0.2, 0.1])[:, None]
    assert np.allclose(norm.reshape(-1, 3, 8), (raw / 255 - mean) / std, atol=1e-5)


def test_one_frame_gives_the_image_processors_pixels(vl):
    """Qwen2-VL's image path repeats an image temporal_patch_size times: a one-frame video (padded by repeating
    it) is that image, resize included. Equal to float32 rounding: transformers 5.17 normalises in a different
    order than 5.24 (one ulp apart on the GPU machine, 2026-11-30), 5.24 gives the same bits."""
    _, template, _ = vl
    vision = template.vision
    im = moving_square(3, 90)[1].resize((90, 70))
    ours, grid = vision.video.patches([im])
    ref = vision.image_processor(images=[im], return_tensors="np")
    assert list(ref["image_grid_thw"][0]) == list(grid) == [1, 4, 6]  # 70x90 -> 56x84
    np.testing.assert_allclose(ours, ref["pixel_values"], rtol=0, atol=1e-6)


def test_smart_resize_is_qwen2_vls():
    """Our frame size rule against the one transformers' image processor uses (importable without torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    from lmforge.template.video import smart_resize

    for h in (20, 56, 64, 90, 333, 1080):
        for w in (28, 57, 64, 120, 640, 1920):
            for lo, hi in ((56 * 56, 112 * 112), (128 * 28 * 28, 768 * 28 * 28)):
                assert smart_resize(h, w, 28, lo, hi) == theirs(h, w, 28, lo, hi), (h, w, lo, hi)


def test_frames_are_sampled_like_qwen2_vl():
    spec = _spec()
    assert spec.sample(8, 4.0) == [0, 2, 4, 6]  # 2 s at 2 fps = 4 frames (also Qwen2-VL's minimum)
    assert spec.sample(100, 25.0) == [0, 12, 25, 37, 50, 62, 75, 87]  # 4 s -> 8 frames
    assert spec.sample(6, 30.0) == [0, 1, 3, 4]  # at least 4, a multiple of temporal_patch_size
    assert spec.sample(1, 30.0) == [0]  # fewer frames than one temporal patch: all (padding repeats it)
    from lmforge.template.video import VideoSpec

    assert len(VideoSpec.from_sources(max_frames=16).sample(3000, 30.0)) == 16  # the cap
    assert _spec().sample(5, None) == [0, 1, 2, 3, 4]  # a list of frames: every frame


@pytest.mark.skipif(not __import__("transformers").utils.is_torchvision_available(),
                    reason="transformers' video processor needs torchvision, which has no CPU build for this torch")
def test_matches_transformers_video_processor():
    """Our pixels and grids against Qwen2VLVideoProcessor: exact layout for frames already at the target size;
    after resizing (torchvision's bicubic vs PIL's) the same grid and pixels within a few grey levels."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    from lmforge.template.video import VideoSpec

    theirs = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    spec = VideoSpec.from_sources(theirs)
    kw = dict(do_sample_frames=False, return_tensors="pt")
    if "cap_pixels_per_frame" in theirs.valid_kwargs.__annotations__:  # newer transformers: the per-video budget off
        kw["cap_pixels_per_frame"] = False
    for frames, atol in ((moving_square(5, 56), 1e-5), (moving_square(4, 64) + moving_square(1, 64), 0.15)):
        ref = theirs(videos=[np.stack([np.asarray(f) for f in frames])], **kw)
        ours = spec.pixel_inputs([frames])
        assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
        diff = (ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs()
        assert diff.max() < atol, diff.max()
        assert spec.pixel_inputs([frames], theirs)["pixel_values_videos"].equal(ref["pixel_values_videos"])
    for total, fps in ((8, 4.0), (100, 25.0), (6, 30.0), (3000, 30.0)):
        want = theirs.sample_frames(VideoMetadata(total_num_frames=total, fps=fps), fps=2.0, max_frames=64)
        assert spec.sample(total, fps) == want.tolist(), (total, fps)


# ---- files ---------------------------------------------------------------------------------------------


def test_an_mp4_round_trips_through_pyav(tmp_path):
    pytest.importorskip("av")
    from lmforge.dataset.media import read_video, video_info

    colours = [(30 * k, 255 - 30 * k, 128) for k in range(8)]
    path = write_mp4(tmp_path / "c.mp4", [Image.new("RGB", (64, 64), c) for c in colours])
    assert video_info(path) == (8, 4.0, 64, 64)
    frames = read_video(path, [0, 3, 7])
    got = [np.asarray(f)[32, 32].astype(int) for f in frames]
    for g, want in zip(got, (colours[0], colours[3], colours[7])):
        assert np.abs(g - np.array(want)).max() <= 6, (g, want)


def test_file_errors_name_the_file_and_line(tmp_path, monkeypatch):
    from lmforge.dataset import DatasetError, preprocess_row

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    row = {"messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "x"}]}
    pytest.importorskip("av")
    with pytest.raises(DatasetError, match=r"d\.jsonl:4: field 'videos\[0\]': cannot decode video '.*broken\.mp4'"):
        preprocess_row({**row, "videos": [str(bad)]}, source="d.jsonl:4")
    good = write_mp4(tmp_path / "ok.mp4")
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # PyAV not installed
    from lmforge.dataset.media import video_info

    video_info.cache_clear()
    with pytest.raises(DatasetError, match=r"pip install av .*or give the video as a list of frame images"):
        preprocess_row({**row, "videos": [good]}, source="d.jsonl:5")
    with pytest.raises(DatasetError, match=r"2 <video> tag\(s\) but the row has 1 videos"):
        preprocess_row({**row, "messages": [{"role": "user", "content": "<video><video>?"}, row["messages"][1]],
                        "videos": [[data_url(f) for f in moving_square(2)]]})


def test_large_frames_are_resized_as_decoded_and_served_urls_are_not_cached(vl, tmp_path):
    """A video file's frames are resized to the model's frame size while they are decoded (the same pixels as
    resizing afterwards, without holding full-size frames), frames over Pillow's pixel limit are refused, and a
    data: URL (a served request's video, up to the body limit) never enters the media caches."""
    pytest.importorskip("av")
    import base64

    from lmforge.dataset.media import MediaError, image_size, video_info

    vision = vl[1].vision
    big = [f.resize((320, 256)) for f in moving_square(6, 64)]
    path = write_mp4(tmp_path / "big.mp4", big)
    h, w = vision.video.frame_size(256, 320)
    assert (h, w) != (256, 320)  # the budget shrinks them
    decoded = vision.frames([path])
    assert {f.size for f in decoded} == {(w, h)}
    from lmforge.dataset.media import read_video

    full = read_video(path, vision._video_shape((path,))[0])
    ours = vision.video.pixel_inputs([decoded])["pixel_values_videos"]
    assert np.array_equal(ours.numpy(), vision.video.pixel_inputs([full])["pixel_values_videos"].numpy())

    url = "data:video/mp4;base64," + base64.b64encode(open(path, "rb").read()).decode()
    before = video_info.cache_info().currsize, image_size.cache_info().currsize
    assert video_info(url)[2:] == (256, 320)
    assert image_size(data_url(big[0])) == (256, 320)
    vision.num_video_tokens([url])
    assert (video_info.cache_info().currsize, image_size.cache_info().currsize) == before

    import PIL.Image

    limit = PIL.Image.MAX_IMAGE_PIXELS
    try:
        PIL.Image.MAX_IMAGE_PIXELS = 256 * 320 - 1
        with pytest.raises(MediaError, match="exceed the 81,919-pixel limit"):
            video_info(url)
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = limit


# ---- template ------------------------------------------------------------------------------------------


def _frames(colour="red", n=4, size=64):
    return [data_url(f) for f in moving_square(n, size, COLOURS[colour])]


def test_template_expands_videos_and_images_in_tag_order(vl):
    """Ids equal the chat template's rendering with each placeholder repeated grid.prod() / merge**2 times, from
    the processors' own grids; video and image tokens are never labels."""
    _, template, _ = vl
    template.set_mode("train")
    vision = template.vision
    image = data_url(Image.new("RGB", (84, 56), (0, 200, 0)))
    videos = [_frames("red", 5, 64), _frames("blue", 2, 90)]
    row = {"messages": [{"role": "user", "content": "<video>then<image>and<video>?"},
                        {"role": "assistant", "content": "red, then blue"}], "images": [image], "videos": videos}
    enc = template.encode(row)
    pixels = vision.pixel_inputs(enc["images"], enc["videos"])
    assert pixels["video_grid_thw"].tolist() == [[3, 4, 4], [1, 6, 6]]
    parts = [{"type": "video"}, {"type": "text", "text": "then"}, {"type": "image"}, {"type": "text", "text": "and"},
             {"type": "video"}, {"type": "text", "text": "?"}]
    text = template.tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}, {"role": "assistant", "content": "red, then blue"}], tokenize=False)
    counts = iter([12, int(pixels["image_grid_thw"][0].prod()) // 4, 9])
    want = "".join(piece if piece not in ("<|video_pad|>", "<|image_pad|>") else piece * next(counts)
                   for piece in __import__("re").split(r"(<\|video_pad\|>|<\|image_pad\|>)", text))
    assert enc["input_ids"] == template.tokenizer(want, add_special_tokens=False)["input_ids"]
    labelled = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert template.tokenizer.decode(labelled) == "red, then blue<|im_end|>"
    # no tags: the videos open the first user message
    untagged = template.encode({**row, "messages": [{"role": "user", "content": "What moves?"}, row["messages"][1]],
                                "images": None, "videos": [videos[0]]})
    assert template.tokenizer.decode(untagged["input_ids"]).startswith(
        "<|im_start|>user\n<|vision_start|>" + "<|video_pad|>" * 12 + "<|vision_end|>What moves?")
    from lmforge.template import TemplateError

    with pytest.raises(TemplateError, match=r"1 <video> tag\(s\) but the row has 2 videos"):
        template.encode({**row, "messages": [{"role": "user", "content": "<video>?<image>"}, row["messages"][1]]})


def test_qwen2_5_vl_videos_get_the_models_time_scaled_positions(tmp_path):
    """Qwen2.5-VL spaces a video's temporal patches by tokens_per_second x its seconds per patch: the batch carries
    ``second_per_grid_ts`` (a file's sampled rate; a frame list at 24 frames a second, as transformers takes it),
    packed rows get the model's own positions, and packed and padded losses agree."""
    pytest.importorskip("av")
    from test_native_vl import tiny_qwen2_5_vl_loaded

    from lmforge.dataset.packing import concat_rows
    from lmforge.model.vision import family_of, mrope_position_ids

    model, tok, template = tiny_qwen2_5_vl_loaded(tmp_path, "train")
    family = family_of(model.config)
    assert template.vision.tokens_per_second == model.config.vision_config.tokens_per_second
    clip = write_mp4(tmp_path / "clip.mp4", moving_square(10, 64, COLOURS["green"]))  # 4 of 10 frames at 4 fps
    rows = [{"messages": [{"role": "user", "content": "<image>and<video>: which moves?"},
                          {"role": "assistant", "content": "red"}],
             "images": [data_url(Image.new("RGB", (56, 84), (0, 0, 200)))], "videos": [_frames("red", 12, 64)]},
            {"messages": [{"role": "user", "content": "<video>Colour?"}, {"role": "assistant", "content": "green"}],
             "videos": [[clip]]}]
    encs = [template.encode(r) for r in rows]
    padded = _collator(template, family, False)(encs)
    # 12 listed frames at 24/s: 2/24 s a patch; 4 of the file's 10 frames at 4/s = 1.6/s: 2/1.6 s a patch
    assert padded["second_per_grid_ts"].tolist() == pytest.approx([2 / 24, 1.25])
    ref, _ = model.model.get_rope_index(padded["input_ids"], padded["mm_token_type_ids"],
                                        image_grid_thw=padded["image_grid_thw"], video_grid_thw=padded["video_grid_thw"],
                                        attention_mask=padded["attention_mask"],
                                        second_per_grid_ts=padded["second_per_grid_ts"])
    scales = template.vision.time_scales(padded)
    for k, enc in enumerate(encs):
        ids = torch.tensor(enc["input_ids"])
        ours = mrope_position_ids(ids, torch.arange(len(ids)), padded["image_grid_thw"] if k == 0 else None,
                                  template.vision.image_token_id, 2, video_grid_thw=padded["video_grid_thw"][k:k + 1],
                                  video_token_id=template.vision.video_token_id, video_time_scales=scales[k:k + 1])
        assert torch.equal(ours, ref[:, k, :len(ids)]), k
    times = ref[0, 1][padded["input_ids"][1] == template.vision.video_token_id].unique()
    assert (times[1:] - times[:-1]).tolist() == [5]  # the file's 2 patches: 4 tokens/s x 1.25 s apart
    packed = _collator(template, family, True)([concat_rows(encs)])
    a, b = _token_losses(model, padded), _token_losses(model, packed)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


# ---- batches and training ------------------------------------------------------------------------------


from test_vl_training import _collator, _token_losses  # noqa: E402  (the image tests' helpers)


def test_packed_video_rows_get_the_models_positions_and_losses(vl, tmp_path):
    pytest.importorskip("av")
    from lmforge.dataset.packing import concat_rows
    from lmforge.model.vision import mrope_position_ids

    model, template, family = vl
    template.set_mode("train")
    clip = write_mp4(tmp_path / "clip.mp4", moving_square(10, 64, COLOURS["green"]))
    rows = [{"messages": [{"role": "user", "content": "<image>and<video>: which moves?"},
                          {"role": "assistant", "content": "red"}],
             "images": [data_url(Image.new("RGB", (56, 84), (0, 0, 200)))], "videos": [_frames("red", 6, 64)]},
            {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "<video>Colour?"}, {"role": "assistant", "content": "green"}],
             "videos": [[clip]]}]
    encs = [template.encode(r) for r in rows]
    padded = _collator(template, family, False)(encs)
    assert padded["video_grid_thw"].tolist() == [[3, 4, 4], [2, 4, 4]]  # the file: 10 frames at 4 fps -> 4 used
    assert padded["pixel_values_videos"].shape[0] == int(padded["video_grid_thw"].prod(-1).sum())
    ref, _ = model.model.get_rope_index(padded["input_ids"], padded["mm_token_type_ids"],
                                        image_grid_thw=padded["image_grid_thw"], video_grid_thw=padded["video_grid_thw"],
                                        attention_mask=padded["attention_mask"])
    video_grids = iter(padded["video_grid_thw"])
    for k, enc in enumerate(encs):
        ids = torch.tensor(enc["input_ids"])
        n_video = len(enc["videos"])
        grids = torch.stack([next(video_grids) for _ in range(n_video)]) if n_video else None
        ours = mrope_position_ids(ids, torch.arange(len(ids)), padded["image_grid_thw"] if k == 0 else None,
                                  template.vision.image_token_id, 2, video_grid_thw=grids,
                                  video_token_id=template.vision.video_token_id)
        assert torch.equal(ours, ref[:, k, :len(ids)]), k  # right padding: the row's tokens come first
    packed = _collator(template, family, True)([concat_rows(encs)])
    a, b = _token_losses(model, padded), _token_losses(model, packed)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    changed = dict(encs[2], videos=[_frames("red", 2, 64)])  # 1 temporal patch, the encoding has 2
    with pytest.raises(ValueError, match="video tokens but its 1 videos give"):
        _collator(template, family, False)([changed])


def test_sft_on_video_rows_lowers_the_loss(tmp_path):
    """builtin:tiny-vl, full fine-tuning on 8 rows (frame lists and .mp4 files) for 16 steps."""
    pytest.importorskip("av")
    from lmforge import sft_main
    from lmforge.arguments import TrainArguments

    data = tmp_path / "videos.jsonl"
    with data.open("w") as fh:
        for k, name in enumerate(list(COLOURS) * 2):
            frames = moving_square(4 + k % 3, 56, COLOURS[name])
            video = write_mp4(tmp_path / f"v{k}.mp4", frames) if k % 2 else [data_url(f) for f in frames]
            fh.write(json.dumps({"messages": [{"role": "user", "content": "<video>Which colour moves?"},
                                              {"role": "assistant", "content": name}], "videos": [video]}) + "\n")
    out = tmp_path / "run"
    sft_main(TrainArguments(model="builtin:tiny-vl", dataset=[str(data)], train_type="full", max_steps=16,
                            per_device_train_batch_size=4, learning_rate=2e-3, lr_scheduler_type="constant",
                            warmup_ratio=0.0, logging_steps=4, save_steps=10_000, output_dir=str(out),
                            report_to=["none"], plot=False, add_version=False, video_fps=4.0))
    logs = [json.loads(x) for x in next(out.rglob("logging.jsonl")).read_text().splitlines()]
    losses = [x["loss"] for x in logs if "loss" in x]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses


# ---- generation ----------------------------------------------------------------------------------------


def test_hf_and_native_engines_answer_a_video_row_alike(vl, tmp_path):
    pytest.importorskip("av")
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine
    from lmforge.pipelines.infer import row_to_request

    model, template, _ = vl
    engine = HfEngine(model_obj=model, tokenizer=template.tokenizer, device="cpu")
    clip = write_mp4(tmp_path / "clip.mp4")
    cfg = RequestConfig(max_tokens=5, ignore_eos=True)
    request, _ = row_to_request({"messages": [{"role": "user", "content": "<video>What moves?"},
                                              {"role": "assistant", "content": "red"}], "videos": [[clip]]})
    got = engine.infer([request], cfg)[0].choices[0].token_ids
    # the same prompt through transformers' generate with our pixels
    job = engine._prepare(0, request, cfg)
    assert job.input_ids.count(template.vision.video_token_id) == 8  # 2 s at 2 fps: 4 frames of 2x2 tokens
    ids = torch.tensor([job.input_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              **template.vision.pixel_inputs([], job.videos), "mm_token_type_ids": template.vision.token_type_ids(ids)}
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None,
                             pad_token_id=engine.pad_token_id)[0, ids.shape[1]:].tolist()
    assert got == ref
    # an OpenAI-style video_url part with the file as a data URL, and frames as a video part, answer too
    from lmforge.dataset.media import openai_messages

    parts = openai_messages([{"role": "user", "content": "<video>What moves?<video>"}], [], [[clip], _frames()])
    assert [p["type"] for p in parts[0]["content"]] == ["video_url", "text", "video"]
    both = engine.infer([InferRequest(messages=parts)], cfg)[0].choices[0].token_ids
    assert len(both) == 5

    from lmforge.infer.native import NativeEngine

    native = NativeEngine(model_obj=model, tokenizer=template.tokenizer, allow_cpu=True, device="cpu",
                          enforce_eager=True, num_blocks=64)
    try:  # the .mp4 row and the OpenAI-parts row, in one batch (token-for-token: tests/test_native_vl.py)
        assert [r.choices[0].token_ids for r in native.infer([request, InferRequest(messages=parts)], cfg)] \
            == [got, both]
    finally:
        native.close()
