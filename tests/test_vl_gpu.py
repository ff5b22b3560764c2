"""Vision-language generation on a GPU: the native engine as it runs there (CUDA graphs for decode steps, the Triton
paged attention) against the hf engine on image rows, frame-list video rows and rows mixing both, and a server on
the native engine answering the official openai client's image and video parts with the hf engine's own greedy
reply. builtin:tiny-vl with its weights redrawn so that replies vary (test_native_vl), float32. The CPU tests
(test_native_vl, test_serve_video) run the same engines with ``allow_cpu`` and eager steps.
"""
from __future__ import annotations

import openai
import pytest

from lmforge.arguments import DeployArguments
from lmforge.infer import InferRequest, RequestConfig
from lmforge.serve import create_app
from lmforge.serve.server import ServerThread
from test_native_vl import BIG, GREEDY, RED, TALL, VIDEO_REQS, WIDE, _ask, redrawn_tiny_vl
from test_vl_video import _frames

pytestmark = pytest.mark.gpu
REQS = [_ask("<image>What is this?", RED), _ask("<image>and<image>: compare them.", WIDE, TALL),
        _ask("Describe <image> in a few words.", BIG), *VIDEO_REQS]


@pytest.fixture(scope="module")
def engines():
    from lmforge.infer.hf import HfEngine
    from lmforge.infer.native import NativeEngine

    model, tok = redrawn_tiny_vl("cuda")
    hf = HfEngine(model_obj=model, tokenizer=tok, device="cuda", max_batch_size=8)
    native = NativeEngine(model_obj=model, tokenizer=tok, device="cuda", max_num_seqs=8, gpu_memory_utilization=0.2)
    yield hf, native
    native.close()


def test_native_engine_on_the_gpu_matches_hf_on_images_and_videos(engines):
    hf, native = engines
    want = hf.infer(REQS, GREEDY)
    assert len({tuple(r.choices[0].token_ids) for r in want}) == len(REQS)  # replies differ: a real comparison
    got = native.infer(REQS, GREEDY)
    for g, w in zip(got, want):
        g, w = g.choices[0], w.choices[0]
        assert g.token_ids == w.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(g.logprobs.content, w.logprobs.content)) < 1e-3
    assert native.stats["steps"] > 0


def test_server_on_the_native_engine_answers_image_and_video_parts(engines):
    hf, native = engines
    frames = _frames("blue", 6)
    cfg = RequestConfig(max_tokens=8)
    ask = [{"role": "user", "content": "What moves?<video>"}]
    want_video = hf.infer([InferRequest(messages=ask, videos=[frames])], cfg)[0].choices[0].message.content
    ask = [{"role": "user", "content": "What is this?<image>"}]
    want_image = hf.infer([InferRequest(messages=ask, images=[RED])], cfg)[0].choices[0].message.content
    assert want_video and want_image and want_video != want_image
    with ServerThread(create_app(native, DeployArguments(served_model_name="tiny-vl", max_new_tokens=8))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        video = [{"role": "user", "content": [{"type": "text", "text": "What moves?"},
                                              {"type": "video", "video": frames}]}]
        assert client.chat.completions.create(model="tiny-vl", messages=video).choices[0].message.content \
            == want_video
        image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                              {"type": "image_url", "image_url": {"url": RED}}]}]
        streamed = client.chat.completions.create(model="tiny-vl", messages=image, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want_image
