"""The rollout server end to end on CPU: generate (token ids in and out), weight updates, auth, and a GRPO
run that samples from it and pushes its weights to it (--rollout_url)."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.infer.protocol import InferRequest, RequestConfig


@pytest.fixture(scope="module")
def served():
    from lmforge.infer.hf import HfEngine
    from lmforge.serve.rollout import create_rollout_app
    from lmforge.serve.server import ServerThread

    engine = HfEngine("builtin:tiny", device="cpu", max_batch_size=32)
    with ServerThread(create_rollout_app(engine)) as srv:
        yield engine, srv


def test_info_and_generate_match_the_engine(served):
    from lmforge.rlhf.rollout import RolloutClient
    from lmforge.serve.schemas import PromptRequest

    engine, srv = served
    client = RolloutClient(srv.url)
    assert client.model_name == "tiny-v0.1.0" or client.model_name
    assert client.max_model_len == engine.max_model_len
    chat = InferRequest(messages=[{"role": "user", "content": "What is 2 + 3?"}])
    ids = engine.encode(chat)
    cfg = RequestConfig(max_tokens=6, temperature=1.0, seed=3, n=3)
    remote = client.infer([chat, PromptRequest(prompt=ids)], cfg)
    local = engine.infer([chat], cfg)[0]
    # seeded sampling: the same samples whichever way the prompt travels (messages or token ids)
    assert [c.token_ids for c in remote[0].choices] == [c.token_ids for c in local.choices]
    assert [c.token_ids for c in remote[1].choices] == [c.token_ids for c in local.choices]
    assert remote[0].choices[0].message.content == local.choices[0].message.content
    # a prompt the engine refuses is reported with its index (the trainer drops just that one)
    from lmforge.infer.errors import InferRequestError

    with pytest.raises(InferRequestError) as e:
        client.infer([chat, PromptRequest(prompt=[10 ** 9])], cfg)
    assert e.value.index == 1 and "vocabulary" in str(e.value)


def test_update_weights_over_http(served):
    import urllib.request

    from lmforge.rlhf.rollout import RolloutClient, RolloutError

    engine, srv = served
    client = RolloutClient(srv.url, chunk_bytes=64 * 1024)  # several chunks
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    new = {n: p + 0.01 for n, p in before.items()}
    client.update_weights(new.items())
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, new[n]), n
    info = json.loads(urllib.request.urlopen(srv.url + "/rollout/info").read())
    assert info["weight_updates"] > 1  # chunked
    with pytest.raises(RolloutError, match="not parameters"):
        client.update_weights([("model.nope.weight", torch.zeros(2))])
    with pytest.raises(RolloutError, match="not safetensors"):
        client._call("/rollout/update_weights", b"garbage", "application/octet-stream")
    client.update_weights(before.items())  # leave the module's engine as it was


def test_auth_and_bad_url():
    from lmforge.arguments import RolloutArguments
    from lmforge.rlhf.rollout import RolloutClient, RolloutError
    from lmforge.serve.rollout import create_rollout_app
    from lmforge.serve.server import ServerThread
    from test_grpo_support import ScriptedEngine

    from lmforge.model import get_model_tokenizer

    tok = get_model_tokenizer("builtin:tiny", load_model=False)[1]
    app = create_rollout_app(ScriptedEngine(tok, lambda e, r, k: "hi"), RolloutArguments(api_key="sekret"))
    with ServerThread(app) as srv:
        with pytest.raises(RolloutError, match="HTTP 401"):
            RolloutClient(srv.url)
        client = RolloutClient(srv.url, api_key="sekret")
        out = client.infer([InferRequest(messages=[{"role": "user", "content": "x"}])], RequestConfig(n=2))
        assert [c.message.content for c in out[0].choices] == ["hi", "hi"]
    with pytest.raises(RolloutError, match="is `lmforge rollout` running"):
        RolloutClient("http://127.0.0.1:9")


def test_grpo_with_rollout_url(tmp_path, served):
    """The trainer pushes its weights before sampling and after each step; the server ends with the policy's."""
    from lmforge.arguments import RlhfArguments
    from lmforge.pipelines.rlhf import rlhf_main

    engine, srv = served
    args = RlhfArguments(rlhf_type="grpo", model="builtin:tiny", dataset=["builtin:arith-rl#16"],
                         reward_funcs=["repetition", "length"], rollout_url=srv.url, train_type="full",
                         num_generations=4, max_completion_length=8, per_device_train_batch_size=2,
                         gradient_accumulation_steps=1, max_steps=2, logging_steps=1, learning_rate=1e-2, beta=0.0,
                         output_dir=str(tmp_path), add_version=False, report_to=["none"], plot=False, save_steps=1000)
    original = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    result = rlhf_main(args)
    logs = [h for h in result["log_history"] if "loss" in h]
    assert all("rollout/sync_seconds" in h and "reward" in h for h in logs)
    policy = result["trainer"].model
    # the server holds the policy as it was before its last rollout (step 1); the policy moved once more since
    try:
        from lmforge.rlhf.rollout import policy_named_weights

        result["trainer"]._sync_weights(result["trainer"]._engine)
        for n, p in policy_named_weights(policy):
            assert torch.equal(dict(engine.model.named_parameters())[n], p), n
    finally:
        with torch.no_grad():
            for n, p in engine.model.named_parameters():
                p.copy_(original[n])


def test_generate_applies_the_chat_routes_media_policy(served):
    """Images and videos on /rollout/generate (fields or content parts): remote URLs and (without
    --allow_local_media) local files are refused with a 400 naming the reference, as on /v1/chat/completions."""
    import httpx

    _, srv = served
    prompt = {"messages": [{"role": "user", "content": "<image>What colour?"}]}
    for ref, why in (("https://example.com/a.png", "remote image URLs are not fetched"),
                     ("/etc/passwd", "local image files are not accepted")):
        r = httpx.post(srv.url + "/rollout/generate", json={"requests": [dict(prompt, images=[ref])]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert why in err["message"] and err["param"] == "requests[0].images[0]" and err["code"] == "invalid_image"
    video = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "/tmp/a.mp4"}}]}]}
    for req, param in ((dict(prompt, videos=[["data:image/png;base64,AA==", "/tmp/a.png"]]), "requests[0].videos[0]"),
                       (dict(prompt, videos=["/tmp/a.mp4"]), "requests[0].videos[0]"),
                       (video, "requests[0].messages[0].content[0]")):
        r = httpx.post(srv.url + "/rollout/generate", json={"requests": [req]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "local video files are not accepted" in err["message"] and err["param"] == param, err
        assert err["code"] == "invalid_video"
