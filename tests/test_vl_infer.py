"""Generation with images on builtin:tiny-vl: the hf engine against transformers' own processor + generate,
batches that mix image and text prompts, the OpenAI server with base64 images (official client), the
terminal chat (the native engine on images: tests/test_native_vl.py)."""
from __future__ import annotations

import openai
import pytest
import torch
from PIL import Image

from lmforge.arguments import DeployArguments
from lmforge.dataset.media import data_url, open_image
from lmforge.infer import InferRequest, RequestConfig
from lmforge.serve import create_app
from lmforge.serve.server import ServerThread

RED = data_url(Image.new("RGB", (84, 84), (220, 30, 30)))
WIDE = data_url(Image.new("RGB", (112, 56), (30, 30, 220)))


@pytest.fixture(scope="module")
def engine():
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny-vl", device="cpu", max_batch_size=8)


def _greedy(engine, requests, tokens=6):
    return [r.choices[0].token_ids for r in engine.infer(requests, RequestConfig(max_tokens=tokens))]


def test_engine_matches_the_processor_and_generate(engine):
    msgs = [{"role": "user", "content": [{"type": "image", "image": open_image(WIDE)},
                                         {"type": "text", "text": "What colour?"}]}]
    inputs = engine.processor.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt")
    with torch.no_grad():
        ref = engine.model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                    pad_token_id=engine.pad_token_id)[0, inputs["input_ids"].shape[1]:].tolist()
    request = InferRequest(messages=[{"role": "user", "content": "<image>What colour?"}], images=[WIDE])
    assert engine.infer([request], RequestConfig(max_tokens=6, ignore_eos=True))[0].choices[0].token_ids == ref


def test_mixed_batches_equal_single_requests(engine):
    reqs = [InferRequest(messages=[{"role": "user", "content": "<image>Which colour?"}], images=[RED]),
            InferRequest(messages=[{"role": "user", "content": "Hello there, how are you today?"}]),
            InferRequest(messages=[{"role": "user", "content": [
                {"type": "text", "text": "Shape?"}, {"type": "image_url", "image_url": {"url": WIDE}}]}])]
    batched = _greedy(engine, reqs)
    assert batched == [_greedy(engine, [r])[0] for r in reqs]
    bad = InferRequest(messages=[{"role": "user", "content": "<image>?"}], images=["https://example.com/a.png"])
    with pytest.raises(ValueError, match="offline"):
        engine.infer([bad])


def test_server_takes_base64_images_from_the_openai_client(engine, tmp_path):
    path = tmp_path / "red.png"
    open_image(RED).save(path)
    message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED}},
                                            {"type": "text", "text": "Which colour?"}]}]
    want = _greedy(engine, [InferRequest(messages=[{"role": "user", "content": "<image>Which colour?"}],
                                         images=[RED])], 8)[0]
    with ServerThread(create_app(engine, DeployArguments(max_new_tokens=8))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="builtin:tiny-vl", messages=message)
        assert reply.choices[0].message.content == engine.template.decode(want)
        for url, needle in ((str(path), "allow_local_media"), ("https://example.com/a.png", "remote image")):
            bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
            with pytest.raises(openai.BadRequestError, match=needle):
                client.chat.completions.create(model="builtin:tiny-vl", messages=bad)
    with ServerThread(create_app(engine, DeployArguments(max_new_tokens=8, allow_local_media=True))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{path}"}},
                                              {"type": "text", "text": "Which colour?"}]}]
        assert client.chat.completions.create(model="builtin:tiny-vl", messages=local).choices[0].message.content \
            == reply.choices[0].message.content


def test_chat_asks_for_image_paths(engine, tmp_path):
    import io

    from lmforge.pipelines.infer import chat

    path = tmp_path / "red.png"
    open_image(RED).save(path)
    lines = iter(["<image>Which colour?", str(path), "and now?", "exit"])
    out = io.StringIO()
    history = chat(engine, RequestConfig(max_tokens=3), read_line=lambda prompt: next(lines), out=out, stream=False)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert "<image>" in out.getvalue()  # the help line says how to attach one


def test_eval_on_images_locally_and_through_a_server(engine, tmp_path):
    from lmforge.arguments import EvalArguments
    from lmforge.pipelines.eval import eval_main

    common = dict(eval_dataset=["builtin:shapes#4"], max_new_tokens=3, plot=False)
    local = eval_main(EvalArguments(model="builtin:tiny-vl", output_dir=str(tmp_path / "a"), **common), engine=engine)
    with ServerThread(create_app(engine, DeployArguments(max_new_tokens=3))) as srv:
        served = eval_main(EvalArguments(eval_url=srv.url, output_dir=str(tmp_path / "b"), **common))

    def answers(report, folder):
        import json

        path = tmp_path / folder / report["datasets"]["builtin:shapes#4"]["predictions"]
        return [json.loads(line)["response"] for line in path.read_text().splitlines()]

    assert local["datasets"]["builtin:shapes#4"]["source"] == "builtin:shapes:test#4"  # the held-out split
    assert answers(local, "a") == answers(served, "b") and all(answers(local, "a"))
