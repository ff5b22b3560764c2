"""The server on the real hf engine and builtin:tiny, driven by the official openai client.

Chat, streaming, completions, the models list, LoRA adapter selection and auth; then
``lmforge deploy`` itself in a subprocess (flags, SIGTERM, exit code). Greedy decoding makes
every answer checkable against the engine called directly.
"""
from __future__ import annotations

import signal
import time

import openai
import pytest

from lmforge.arguments import DeployArguments
from lmforge.infer import InferRequest, RequestConfig
from lmforge.serve import create_app
from lmforge.serve.schemas import PromptRequest
from lmforge.serve.server import ServerThread
from test_infer_hf import make_lora_checkpoint

MSG = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from lmforge.infer.hf import HfEngine

    ckpt = make_lora_checkpoint(tmp_path_factory.mktemp("run"))
    return HfEngine("builtin:tiny", adapters={"tiny-lora": str(ckpt)}, device="cpu", max_batch_size=8)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, DeployArguments(max_new_tokens=12))) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def direct(engine, request, **cfg):
    return engine.infer([request], RequestConfig(max_tokens=12, **cfg))[0]


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["builtin:tiny", "tiny-lora"]
    assert client.models.retrieve("tiny-lora").parent == "builtin:tiny"


def test_chat_matches_engine(client, engine):
    r = client.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=12)
    want = direct(engine, InferRequest(messages=MSG))
    assert r.choices[0].message.content == want.choices[0].message.content
    assert r.usage.prompt_tokens == want.usage.prompt_tokens == engine.count_prompt_tokens(InferRequest(messages=MSG))
    assert r.usage.completion_tokens == want.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stream_adds_up_to_non_stream(client):
    full = client.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=12)
    chunks = list(client.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sampling_seed_n_logprobs(client):
    kw = dict(model="builtin:tiny", messages=MSG, max_tokens=8, temperature=1.0, seed=123)
    a, b = client.chat.completions.create(**kw, n=2), client.chat.completions.create(**kw, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    r = client.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=4, logprobs=True,
                                       top_logprobs=2)
    assert len(r.choices[0].logprobs.content) >= 1 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2


def test_adapter_selection(client, engine):
    base = client.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=12)
    lora = client.chat.completions.create(model="tiny-lora", messages=MSG, max_tokens=12)
    assert lora.model == "tiny-lora"
    assert lora.choices[0].message.content == direct(engine, InferRequest(messages=MSG, adapter="tiny-lora")
                                                     ).choices[0].message.content
    assert lora.choices[0].message.content != base.choices[0].message.content
    chunks = client.chat.completions.create(model="tiny-lora", messages=MSG, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == lora.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other-lora", messages=MSG)


def test_completions_raw_prompt(client, engine):
    prompt = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model="builtin:tiny", prompt=prompt, max_tokens=12)
    # no chat template around a raw prompt: the same text as the chat request renders to
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(prompt, add_special_tokens=False))
    assert r.choices[0].text == direct(engine, PromptRequest(prompt=prompt)).choices[0].message.content
    assert r.choices[0].text == direct(engine, InferRequest(messages=MSG)).choices[0].message.content
    chunks = list(client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=12, stream=True))
    lora = client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=12)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == lora.choices[0].text
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    assert client.completions.create(model="builtin:tiny", prompt=ids, max_tokens=12).choices[0].text == \
        r.choices[0].text


TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}},
         {"type": "function", "function": {"name": "mul", "parameters": {"type": "object"}}}]


def test_tools_reach_the_template(client):
    def prompt_tokens(**kw):
        return client.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=1, **kw
                                              ).usage.prompt_tokens

    plain, both = prompt_tokens(), prompt_tokens(tools=TOOLS)
    one = prompt_tokens(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})
    assert plain < one < both
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == plain
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model="builtin:tiny", messages=history, tools=TOOLS, max_tokens=4)
    assert r.usage.prompt_tokens > both


def test_disconnect_stops_hf_generation(client, server, engine):
    state = server.app.state.lmforge
    steps = []
    hook = engine.model.register_forward_hook(lambda *_: steps.append(1))  # one call per generated token
    try:
        stream = client.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=900, stream=True)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        stream.close()
        deadline = time.monotonic() + 5
        while state.limiter.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.limiter.running == 0
        assert client.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=4).choices
    finally:
        hook.remove()
    # the stream stopped within a few tokens of the disconnect, not after ~900
    assert len(steps) < 100, len(steps)


def test_context_limit_and_auth(engine):
    with ServerThread(create_app(engine, DeployArguments(api_key="sk-test"))) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="builtin:tiny", messages=MSG)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-test", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            good.chat.completions.create(model="builtin:tiny", messages=[{"role": "user", "content": "7 " * 2000}])
        assert e.value.body["code"] == "context_length_exceeded"
        assert str(engine.max_model_len) in e.value.body["message"]
        assert good.chat.completions.create(model="builtin:tiny", messages=MSG, max_tokens=2).choices


def test_deploy_cli_serves_and_shuts_down_on_sigterm(tmp_path):
    from deploy_process import free_port, start_deploy

    port = free_port()
    log = tmp_path / "requests.log"
    proc = start_deploy(["--model", "builtin:tiny", "--api_key", "sk-cli", "--max_new_tokens", "6", "--log_file",
                         str(log), "--served_model_name", "tiny"], port, timeout=90)
    try:
        url = f"http://127.0.0.1:{port}"
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny"]
        r = c.chat.completions.create(model="tiny", messages=MSG)
        assert r.usage.completion_tokens <= 6
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the exit status says "terminated"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        text = log.read_text()
        assert "model=tiny status=200" in text and "shutting down: 0 running" in text
        output = proc.stdout.read()
        assert "Traceback" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
