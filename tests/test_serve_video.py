"""Videos through `lmforge deploy` on builtin:tiny-vl (weights redrawn so replies vary), CPU: the official openai
client sends an .mp4 as a base64 ``video_url`` part (vLLM's shape) or frames as a ``video`` part and gets the hf
engine's own greedy reply, streamed too; the media policy (local files only with --allow_local_media, no remote
URLs), a video that does not decode and a model that takes no videos are 400s naming the part;
--video_max_frames reaches the served engine."""
from __future__ import annotations

import base64

import httpx
import openai
import pytest

from lmforge.arguments import DeployArguments
from lmforge.infer import InferRequest, RequestConfig
from lmforge.serve import create_app
from lmforge.serve.server import ServerThread
from test_native_vl import redrawn_tiny_vl
from test_vl_video import _frames, write_mp4

pytest.importorskip("av")
NAME = "tiny-vl"


@pytest.fixture(scope="module")
def engine():
    from lmforge.infer.hf import HfEngine

    model, tok = redrawn_tiny_vl()
    return HfEngine(model_obj=model, tokenizer=tok, device="cpu", max_batch_size=4)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4")


def _mp4_url(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(open(path, "rb").read()).decode("ascii")


def _reply(engine, text: str, videos: list) -> str:
    request = InferRequest(messages=[{"role": "user", "content": text}], videos=videos)
    return engine.infer([request], RequestConfig(max_tokens=8))[0].choices[0].message.content


def _serve(engine, **kw):
    return ServerThread(create_app(engine, DeployArguments(served_model_name=NAME, max_new_tokens=8, **kw)))


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _ask(part: dict, text: str = "What moves?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, part]}]


def test_openai_client_sends_an_mp4_and_frames_and_gets_the_engines_reply(engine, clip):
    want_file = _reply(engine, "What moves?<video>", [[clip]])
    frames = _frames("blue", 6)
    want_frames = _reply(engine, "What moves?<video>", [frames])
    assert want_file and want_file != want_frames  # the pixels matter: a real comparison
    mp4 = {"type": "video_url", "video_url": {"url": _mp4_url(clip)}}
    with _serve(engine) as srv:
        client = _client(srv)
        reply = client.chat.completions.create(model=NAME, messages=_ask(mp4))
        assert reply.choices[0].message.content == want_file
        streamed = client.chat.completions.create(model=NAME, messages=_ask(mp4), stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want_file
        reply = client.chat.completions.create(model=NAME, messages=_ask({"type": "video", "video": frames}))
        assert reply.choices[0].message.content == want_frames


def test_local_videos_only_with_allow_local_media(engine, clip, tmp_path):
    want = _reply(engine, "What moves?<video>", [[clip]])
    local = {"type": "video_url", "video_url": {"url": clip}}
    with _serve(engine) as srv:
        client = _client(srv)
        for part, needle in ((local, "local video files are not accepted"),
                             ({"type": "video_url", "video_url": {"url": "file://" + clip}}, "--allow_local_media"),
                             ({"type": "video", "video": [str(tmp_path / "f.png")]}, "--allow_local_media"),
                             ({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}},
                              "remote video URLs are not fetched")):
            with pytest.raises(openai.BadRequestError, match=needle) as err:
                client.chat.completions.create(model=NAME, messages=_ask(part))
            assert err.value.body["param"] == "messages[0].content[1]" and err.value.body["code"] == "invalid_video"
    with _serve(engine, allow_local_media=True) as srv:
        assert _client(srv).chat.completions.create(model=NAME, messages=_ask(local)).choices[0].message.content \
            == want


def test_a_video_that_does_not_decode_is_a_400_naming_its_part(engine, clip):
    good = {"type": "video_url", "video_url": {"url": _mp4_url(clip)}}
    bad_bytes = "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42 not really a video").decode()
    cases = [({"type": "video_url", "video_url": {"url": bad_bytes}}, "the video does not decode"),
             ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@@"}}, "does not decode"),
             ({"type": "video_url", "video_url": {"url": _frames()[0]}}, "data:video/"),  # an image, not a video
             ({"type": "video", "video": [_frames()[0], _frames(size=84)[0]]}, "differ in size")]
    with _serve(engine) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for part, needle in cases:
            body = {"model": NAME, "messages": [{"role": "user", "content": [good, part, {"type": "text", "text": "?"}]}]}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert needle in err["message"] and err["param"] == "messages[0].content[1]", err
        for part in ({"type": "video_url"}, {"type": "video", "video": []}):  # malformed parts: schema errors
            r = http.post("/v1/chat/completions", json={"model": NAME, "messages": _ask(part)})
            assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages[0].content[1]"), r.text
        assert http.post("/v1/chat/completions", json={"model": NAME, "messages": _ask(good)}).status_code == 200


def test_a_model_without_videos_refuses_them_by_name(clip):
    from lmforge.infer.hf import HfEngine

    text_only = HfEngine("builtin:tiny", device="cpu")
    with _serve(text_only) as srv:
        with pytest.raises(openai.BadRequestError, match="takes no videos: it is a text-only model") as err:
            _client(srv).chat.completions.create(model=NAME, messages=_ask(
                {"type": "video_url", "video_url": {"url": _mp4_url(clip)}}))
        assert err.value.body["param"] == "messages[0].content[1]"


def test_video_max_frames_reaches_deploy(engine):
    """``lmforge deploy --video_max_frames 4``: a 12-frame list is thinned to 4 frames (2 temporal patches)."""
    from lmforge.pipelines.infer import build_engine

    served = build_engine(DeployArguments(model="builtin:tiny-vl", video_max_frames=4, served_model_name=NAME))
    assert served.template.vision.video.max_frames == 4
    with _serve(served) as srv:
        client = _client(srv)
        usage = [client.chat.completions.create(model=NAME, messages=_ask({"type": "video", "video": _frames(n=n)}),
                                                max_tokens=1).usage.prompt_tokens for n in (4, 12)]
    assert usage[0] == usage[1]
    assert engine.count_prompt_tokens(InferRequest(messages=_ask({"type": "video", "video": _frames(n=12)}))) \
        > usage[1]  # the default cap (64) keeps all 12
