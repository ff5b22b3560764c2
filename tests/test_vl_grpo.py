"""GRPO on image and video rows: completions are sampled with the prompt's images and videos, scored by the policy
and the reference with the same pixels (repeated for each generation of a group), and `lmforge rlhf --rlhf_type
grpo` runs on builtin:tiny-vl + builtin:shapes (and on video rows) end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lmforge.dataset.media import data_url
from lmforge.registry import REWARDS

COLOURS = ("red", "green", "blue", "yellow")  # builtin:shapes' colours


def colour_match(completions, solution, **kwargs):
    """1 when the reply names the row's colour and no other, 0 when not; None (unscored) on shape and count rows."""
    out = []
    for text, answer in zip(completions, solution):
        if answer not in COLOURS:
            out.append(None)
            continue
        named = {c for c in COLOURS if c in (text or "").lower()}
        out.append(float(named == {answer}))
    return out


if "colour_match" not in REWARDS:
    REWARDS.register("colour_match", colour_match)


@pytest.fixture(scope="module")
def vl():
    from lmforge.model import get_model_tokenizer
    from lmforge.model.vision import family_of, get_processor
    from lmforge.template import get_template

    model, tok = get_model_tokenizer("builtin:tiny-vl", device="cpu")
    processor = get_processor("builtin:tiny-vl", model.config, tok)
    template = get_template(tok, processor=processor)
    template.set_mode("infer")
    return model.eval(), template, family_of(model.config)


def _image(colour: tuple[int, int, int], size: int = 56) -> str:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    image.paste(colour, (8, 8, size - 8, size - 8))
    return data_url(image)


def test_grpo_logps_on_image_rows_are_the_models_with_those_pixels(vl):
    """Two image prompts of different lengths (so one is left-padded), two completions each: the log-probs GRPO
    computes are those of a plain unpadded forward pass with the same pixels, and other images change them."""
    from lmforge.rlhf.grpo import selective_log_softmax
    from lmforge.rlhf.grpo_batch import completion_logits, rollout_pixels
    from lmforge.rlhf.scoring import prompt_completion_batch

    model, template, family = vl
    tok = template.tokenizer
    rows = [{"messages": [{"role": "user", "content": "<image>What colour is it?"}], "images": [_image((200, 0, 0))]},
            {"messages": [{"role": "user", "content": "Look closely.<image>Which colour do you see, in one word?"}],
             "images": [_image((0, 0, 200), size=84)]}]
    prompts = [template.encode(r)["input_ids"] for r in rows]
    completions = [tok.encode(t, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
                   for t in ("red", "a deep blue", "blue", "green")]
    prompt_of = [0, 0, 1, 1]  # G = 2 generations per prompt
    seqs = [(prompts[p], c, [1] * len(c)) for p, c in zip(prompt_of, completions)]

    def grpo_logps(images):
        batch = prompt_completion_batch(seqs, tok.pad_token_id, "cpu")
        batch.update(rollout_pixels(template.vision, family, batch["input_ids"], images, prompt_of))
        assert batch["image_grid_thw"].shape[0] == 4  # each prompt's image once per generation
        with torch.no_grad():
            # what GRPOTrainer._completion_logps computes
            return selective_log_softmax(completion_logits(model, batch), batch["completion_ids"]), batch

    got, batch = grpo_logps([r["images"] for r in rows])
    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt is left-padded
    for i, (p, c) in enumerate(zip(prompt_of, completions)):
        ids = torch.tensor([prompts[p] + c])
        pixels = template.vision.pixel_inputs(rows[p]["images"])
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=template.vision.token_type_ids(ids), **pixels,
                           use_cache=False).logits[0]
        want = logits[len(prompts[p]) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(got[i, :len(c)], want, atol=1e-5, rtol=0)
    other, _ = grpo_logps([[_image((0, 200, 0))], [_image((230, 230, 0), size=84)]])
    mask = batch["completion_mask"] > 0
    assert (other[mask] - got[mask]).abs().max() > 1e-3  # the pixels reach the model


def test_hf_engine_samples_a_raw_prompt_with_its_images_and_never_an_image_token(vl):
    """GRPO sends its own prompt ids with the row's images; the engine needs the images to match the ids'
    image tokens, and never samples an image placeholder (a reply holding one could not be scored)."""
    from lmforge.infer.errors import InferRequestError
    from lmforge.infer.hf import HfEngine
    from lmforge.infer.protocol import RequestConfig
    from lmforge.serve.schemas import PromptRequest

    model, template, _ = vl
    engine = HfEngine(model_obj=model, tokenizer=template.tokenizer, template=template)
    row = {"messages": [{"role": "user", "content": "<image>What colour is it?"}], "images": [_image((200, 0, 0))]}
    ids = template.encode(row)["input_ids"]
    cfg = RequestConfig(max_tokens=12, temperature=1.0, n=4, seed=3)
    by_ids = engine.infer([PromptRequest(prompt=ids, images=row["images"])], cfg)[0]
    by_messages = engine.infer([{"messages": row["messages"], "images": row["images"]}], cfg)[0]
    assert [c.token_ids for c in by_ids.choices] == [c.token_ids for c in by_messages.choices]
    banned = template.vision.token_ids
    assert not any(t in banned for c in by_ids.choices for t in c.token_ids)
    with pytest.raises(InferRequestError, match="image tokens"):
        engine.infer([PromptRequest(prompt=ids, images=row["images"] * 2)], cfg)


def _grpo_cli(tmp_path: Path, *flags: str) -> int:
    from lmforge.cli.main import main

    return main(["rlhf", "--rlhf_type", "grpo", "--model", "builtin:tiny-vl", "--train_type", "full",
                 "--output_dir", str(tmp_path), "--add_version", "false", "--report_to", "none", "--plot", "false",
                 *flags])


def test_grpo_cli_on_shapes_runs_end_to_end(tmp_path):
    """`lmforge rlhf --rlhf_type grpo` on 16 builtin:shapes rows (3 of them colour questions): rollouts with the
    images, rewards, a KL to the frozen reference scored with the same pixels, a finite loss and a checkpoint."""
    code = _grpo_cli(tmp_path, "--dataset", "builtin:shapes#16", "--reward_funcs", "colour_match", "accuracy",
                     "--num_generations", "4", "--max_completion_length", "4", "--per_device_train_batch_size", "2",
                     "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--beta", "0.04",
                     "--temperature", "1.0", "--log_completions", "true", "--save_steps", "1000")
    assert code == 0
    logs = [json.loads(line) for line in next(tmp_path.rglob("logging.jsonl")).read_text().splitlines()]
    steps = [h for h in logs if "loss" in h and "reward" in h]
    assert len(steps) == 2
    for h in steps:
        assert torch.isfinite(torch.tensor(h["loss"])) and "kl" in h and h["completions/mean_length"] >= 1
    assert any("rewards/colour_match/mean" in h for h in steps)  # the colour rows were scored
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
    row = json.loads((tmp_path / "completions.jsonl").read_text().splitlines()[0])
    assert "<image>" in row["prompt"][0]["content"] and len(row["completions"]) == 4


def _frames(colour: tuple[int, int, int], n: int = 2, size: int = 56) -> list[str]:
    """``n`` frames of a ``colour`` square moving right: a video as a list of frame data URLs."""
    frames = []
    for k in range(n):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        image.paste(colour, (4 + 8 * k, 16, 28 + 8 * k, 40))
        frames.append(data_url(image))
    return frames


def test_rollout_pixels_repeat_each_prompts_images_and_videos_in_sequence_order(vl):
    """A video prompt, an image prompt and a text prompt, G = 2: every pixel key equals the concatenation of each
    sequence's own ``pixel_inputs``, and the token check counts video tokens too."""
    from lmforge.rlhf.grpo_batch import rollout_pixels
    from lmforge.rlhf.scoring import prompt_completion_batch

    model, template, family = vl
    tok = template.tokenizer
    rows = [{"messages": [{"role": "user", "content": "<video>What moves?"}], "videos": [_frames((200, 0, 0), 4)]},
            {"messages": [{"role": "user", "content": "<image>What colour is it?"}], "images": [_image((0, 0, 200))]},
            {"messages": [{"role": "user", "content": "Name a colour."}]}]
    prompts = [template.encode(r)["input_ids"] for r in rows]
    prompt_of = [0, 0, 1, 1, 2, 2]
    done = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = [(prompts[p], [tok.encode("red", add_special_tokens=False)[0], done], [1, 1]) for p in prompt_of]
    batch = prompt_completion_batch(seqs, tok.pad_token_id, "cpu")
    images, videos = [r.get("images") or [] for r in rows], [r.get("videos") or [] for r in rows]
    got = rollout_pixels(template.vision, family, batch["input_ids"], images, prompt_of, videos)
    own = [template.vision.pixel_inputs(images[p], videos[p]) for p in prompt_of]
    assert set(got) == {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                        "mm_token_type_ids"}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        torch.testing.assert_close(got[key], torch.cat([o[key] for o in own if key in o]), atol=0, rtol=0)
    assert got["video_grid_thw"].shape[0] == 2 and got["image_grid_thw"].shape[0] == 2
    assert torch.equal(got["mm_token_type_ids"], template.vision.token_type_ids(batch["input_ids"]))
    with pytest.raises(ValueError, match="video tokens"):  # a prompt's ids and its videos disagree
        rollout_pixels(template.vision, family, batch["input_ids"], images, prompt_of,
                       [[_frames((200, 0, 0), 8)], [], []])
    with torch.no_grad():  # the model takes the mixed batch whole
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **got, use_cache=False)


def test_qwen2_5_vl_rollout_log_probs_use_each_videos_seconds_per_patch(tmp_path):
    """Qwen2.5-VL: a rollout batch of a video file's prompt and a frame list's (other seconds per temporal patch),
    G = 2, carries ``second_per_grid_ts`` per sequence in order, and its log-probs (left-padded) equal a plain
    forward pass of each sequence with its own pixels."""
    pytest.importorskip("av")
    from test_native_vl import tiny_qwen2_5_vl_loaded
    from test_vl_video import moving_square, write_mp4

    from lmforge.model.vision import family_of
    from lmforge.rlhf.grpo import selective_log_softmax
    from lmforge.rlhf.grpo_batch import completion_logits, rollout_pixels
    from lmforge.rlhf.scoring import prompt_completion_batch

    model, tok, template = tiny_qwen2_5_vl_loaded(tmp_path, "infer")
    clip = write_mp4(tmp_path / "clip.mp4", moving_square(10, 64, (30, 170, 30)))
    rows = [{"messages": [{"role": "user", "content": "<video>Colour?"}], "videos": [[clip]]},
            {"messages": [{"role": "user", "content": "Which one moves?<video>"}], "videos": [_frames((200, 0, 0), 4)]}]
    prompts = [template.encode(r)["input_ids"] for r in rows]
    done = tok.convert_tokens_to_ids("<|im_end|>")
    completions = [tok.encode(t, add_special_tokens=False) + [done] for t in ("green", "a red one", "red", "blue")]
    prompt_of = [0, 0, 1, 1]
    batch = prompt_completion_batch([(prompts[p], c, [1] * len(c)) for p, c in zip(prompt_of, completions)],
                                    tok.pad_token_id, "cpu")
    batch.update(rollout_pixels(template.vision, family_of(model.config), batch["input_ids"], [[], []], prompt_of,
                                [r["videos"] for r in rows]))
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([1.25, 1.25, 2 / 24, 2 / 24])
    with torch.no_grad():
        got = selective_log_softmax(completion_logits(model, batch), batch["completion_ids"])
    for i, (p, c) in enumerate(zip(prompt_of, completions)):
        ids = torch.tensor([prompts[p] + c])
        pixels = template.vision.pixel_inputs([], rows[p]["videos"])
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=template.vision.token_type_ids(ids), **pixels,
                           use_cache=False).logits[0]
        want = logits[len(prompts[p]) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(got[i, :len(c)], want, atol=1e-5, rtol=0)
    with torch.no_grad():  # the time scale reaches the positions: another one changes the log-probs
        other = selective_log_softmax(completion_logits(model, {**batch, "second_per_grid_ts": torch.ones(4)}),
                                      batch["completion_ids"])
    mask = batch["completion_mask"] > 0
    assert (other[mask] - got[mask]).abs().max() > 1e-4


def test_engines_sample_a_raw_prompt_with_its_videos_as_its_messages(vl):
    """GRPO sends its own prompt ids with the row's videos (and images): the hf engine samples them as it samples
    the row's messages and never a video placeholder; a rollout server (--rollout_url) and the native engine (CPU
    reference path) sample as the hf engine does."""
    from lmforge.infer.hf import HfEngine
    from lmforge.infer.native import NativeEngine
    from lmforge.infer.protocol import RequestConfig
    from lmforge.serve.schemas import PromptRequest

    model, template, _ = vl
    row = {"messages": [{"role": "user", "content": "<image>and<video>: which colour moves?"}],
           "images": [_image((0, 200, 0))], "videos": [_frames((200, 0, 0), 4)]}
    ids = template.encode(row)["input_ids"]
    raw = PromptRequest(prompt=ids, images=row["images"], videos=row["videos"])
    hf = HfEngine(model_obj=model, tokenizer=template.tokenizer, template=template)
    cfg = RequestConfig(max_tokens=6, temperature=1.0, n=3, seed=5)
    by_ids = [c.token_ids for c in hf.infer([raw], cfg)[0].choices]
    assert by_ids == [c.token_ids for c in hf.infer([row], cfg)[0].choices]
    assert not any(t in template.vision.token_ids for c in by_ids for t in c)
    from lmforge.rlhf.rollout import RolloutClient
    from lmforge.serve.rollout import create_rollout_app
    from lmforge.serve.server import ServerThread

    with ServerThread(create_rollout_app(hf)) as srv:
        assert [c.token_ids for c in RolloutClient(srv.url).infer([raw], cfg)[0].choices] == by_ids
    greedy = RequestConfig(max_tokens=6, ignore_eos=True)
    native = NativeEngine(model_obj=model, tokenizer=template.tokenizer, allow_cpu=True, device="cpu",
                          enforce_eager=True, num_blocks=64)
    try:
        assert native.infer([raw], greedy)[0].choices[0].token_ids == hf.infer([raw], greedy)[0].choices[0].token_ids
    finally:
        native.close()


def test_grpo_on_video_rows_scores_the_engines_samples_as_it_sampled_them(tmp_path):
    """`rlhf --rlhf_type grpo` on frame-list video rows (one also with an image) trains; then the log-probs the
    trainer computes for a rollout (padded batch, each prompt's videos repeated per generation) equal the hf
    engine's own log-probs of the tokens it sampled from the raw prompt ids and videos."""
    from lmforge.arguments import RlhfArguments
    from lmforge.infer.errors import InferRequestError
    from lmforge.infer.protocol import RequestConfig
    from lmforge.pipelines.rlhf import rlhf_main
    from lmforge.rlhf.grpo import selective_log_softmax
    from lmforge.rlhf.grpo_batch import completion_logits
    from lmforge.rlhf.rollout import run_rollouts
    from lmforge.serve.schemas import PromptRequest

    colours = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200), "yellow": (230, 230, 0)}
    rows = [{"messages": [{"role": "user", "content": "<video>Which colour moves?"}],
             "videos": [_frames(rgb, n=2 + k % 2)], "solution": name} for k, (name, rgb) in enumerate(colours.items())]
    rows[1] = {**rows[1], "messages": [{"role": "user", "content": "<image>Here it stands;<video>which colour moves?"}],
               "images": [_image((0, 200, 0))]}
    data = tmp_path / "videos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = rlhf_main(RlhfArguments(
        rlhf_type="grpo", model="builtin:tiny-vl", dataset=[str(data)], reward_funcs=["colour_match"],
        train_type="full", num_generations=2, max_completion_length=4, per_device_train_batch_size=2,
        max_steps=2, logging_steps=1, learning_rate=1e-3, beta=0.04, temperature=1.0,
        output_dir=str(tmp_path / "out"), add_version=False, report_to=["none"], plot=False, save_steps=1000))
    logs = [json.loads(line) for line in next(tmp_path.rglob("logging.jsonl")).read_text().splitlines()]
    steps = [h for h in logs if "loss" in h and "reward" in h]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor([h["loss"], h["kl"]])).all() for h in steps)

    trainer = result["trainer"]
    trainer.model.eval()
    engine = trainer._get_engine()
    prompts = trainer._prepared_prompts([trainer.train_dataset[i] for i in range(len(rows))])
    assert [len(p.videos) for p in prompts] == [1] * 4 and sum(len(p.images) for p in prompts) == 1
    episodes = run_rollouts(engine, prompts, trainer._request_config(logprobs=True), num_generations=2,
                            seeds=trainer._rollout_seeds(prompts))
    batch = trainer._tensorize(prompts, episodes)
    assert batch["video_grid_thw"].shape[0] == 8 and batch["image_grid_thw"].shape[0] == 2
    with torch.no_grad():
        logps = selective_log_softmax(completion_logits(trainer.model, batch), batch["completion_ids"])
    mask = batch["completion_mask"] > 0
    torch.testing.assert_close(logps[mask], batch["sampling_logps"][mask], atol=1e-4, rtol=0)
    with pytest.raises(InferRequestError, match="video tokens"):  # raw ids with other videos than they hold
        engine.infer([PromptRequest(prompt=prompts[0].prompt_ids, videos=prompts[0].videos * 2)],
                     RequestConfig(max_tokens=2))


def test_grpo_with_the_native_engine_on_image_rows(tmp_path, monkeypatch):
    """--infer_backend native on builtin:tiny-vl (CPU reference path): rollouts carry the images, the trainer
    pushes its weights, and the engine then answers an image prompt as the policy does."""
    import lmforge.infer
    from lmforge.arguments import RlhfArguments
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine
    from lmforge.pipelines.rlhf import rlhf_main
    from lmforge.rlhf.rollout import policy_named_weights

    real = lmforge.infer.get_engine
    monkeypatch.setattr(lmforge.infer, "get_engine", lambda backend, **kw: real(
        backend, **({**kw, "allow_cpu": True, "enforce_eager": True} if backend == "native" else kw)))
    result = rlhf_main(RlhfArguments(
        rlhf_type="grpo", model="builtin:tiny-vl", dataset=["builtin:shapes#8"], reward_funcs=["colour_match"],
        train_type="full", num_generations=4, max_completion_length=4, per_device_train_batch_size=4,
        max_steps=2, logging_steps=1, learning_rate=1e-3, temperature=1.0, infer_backend="native",
        output_dir=str(tmp_path), add_version=False, report_to=["none"], plot=False, save_steps=1000))
    trainer = result["trainer"]
    engine = trainer._engine
    try:
        assert type(engine).__name__ == "NativeEngine" and engine.stats["prefill_tokens"] > 0
        engine.update_weights(policy_named_weights(trainer.model))
        req = [InferRequest(messages=[{"role": "user", "content": "<image>What colour is it?"}],
                            images=[_image((200, 0, 0))])]
        cfg = RequestConfig(max_tokens=8, ignore_eos=True)
        want = HfEngine(model_obj=trainer.model, tokenizer=trainer.template.tokenizer, template=trainer.template
                        ).infer(req, cfg)[0].choices[0].token_ids
        assert engine.infer(req, cfg)[0].choices[0].token_ids == want
    finally:
        engine.close()
