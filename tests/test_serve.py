"""The OpenAI-compatible server driven by the official openai client (behaviour, on a deterministic engine).

The same client calls run against the real hf engine in test_serve_hf.py; here EchoEngine
(test_serve_support.py) makes outputs exact and lets tests hold a request open for as long as they
need (queueing, disconnects, shutdown).
"""
from __future__ import annotations

import logging
import threading
import time

import httpx
import openai
import pytest

from test_serve_support import EchoEngine, echo_reply, echo_server, encode, wait_until

MSG = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def engine():
    return EchoEngine()


@pytest.fixture(scope="module")
def server(engine):
    with echo_server(engine, max_concurrency=4, max_queue=8) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


# ---- the endpoints --------------------------------------------------------------------------------

def test_chat(client):
    r = client.chat.completions.create(model="echo-model", messages=MSG)
    assert r.object == "chat.completion" and r.model == "echo-model" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "fox brown quick the"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(encode("fox brown quick the")) + 1
    assert r.usage.prompt_tokens == len(encode("<|im_start|>user\nthe quick brown fox<|im_end|>\n"
                                               "<|im_start|>assistant\n"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client):
    chunks = list(client.chat.completions.create(model="echo-model", messages=MSG, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.model == "echo-model" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "fox brown quick the"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(encode(text)) + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_sampling_options(client):
    r = client.chat.completions.create(model="echo-model", messages=MSG, n=3, max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    r = client.chat.completions.create(model="echo-model", messages=MSG, stop=[" quick"])
    assert r.choices[0].message.content == "fox brown" and r.choices[0].finish_reason == "stop"
    a, b = (client.chat.completions.create(model="echo-model", messages=MSG, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content == echo_reply(
        MSG[0]["content"], seed=7, sampled=True)
    r = client.chat.completions.create(model="echo-model", messages=MSG, logprobs=True, top_logprobs=1)
    assert r.choices[0].logprobs.content and r.choices[0].logprobs.content[0].logprob == -0.25
    # extras beyond OpenAI's fields travel in the body
    r = client.chat.completions.create(model="echo-model", messages=MSG,
                                       extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1})
    assert r.choices[0].message.content


def test_ignore_eos_reaches_the_engine(server):
    """vLLM's ``ignore_eos`` extension (benchmarks/bench_serve_load.py sends it) is passed on, off by default."""
    from lmforge.serve.schemas import CompletionRequest

    state = server.app.state.lmforge
    for body, want in (({}, False), ({"ignore_eos": True}, True)):
        req = CompletionRequest.model_validate({"model": "echo-model", "prompt": [1, 2], **body})
        assert state.request_config(req, 2, 5, param_prompt="prompt").ignore_eos is want


def test_stream_n_choices(client):
    chunks = list(client.chat.completions.create(model="echo-model", messages=MSG, stream=True, n=2))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == {0: "fox brown quick the", 1: "fox brown quick the"}


def test_completions(client):
    r = client.completions.create(model="echo-model", prompt="one two three")
    assert r.object == "text_completion" and r.choices[0].text == "three two one"
    assert r.usage.prompt_tokens == len(encode("one two three"))
    r = client.completions.create(model="echo-model", prompt=["a b", "c d"], n=2, echo=True)
    assert [c.text for c in r.choices] == ["a bb a"] * 2 + ["c dd c"] * 2
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    r = client.completions.create(model="echo-model", prompt=encode("x y"), max_tokens=50)
    assert r.choices[0].text == "y x"
    r = client.completions.create(model="echo-model", prompt="a b c", logprobs=1)
    assert r.choices[0].logprobs.tokens and r.choices[0].logprobs.token_logprobs[0] == -0.25
    chunks = list(client.completions.create(model="echo-model", prompt="one two three", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "three two one"
    assert chunks[-1].usage.prompt_tokens == len(encode("one two three"))


def test_models_and_adapter_selection(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"echo-model", "shout"}
    assert client.models.retrieve("shout").id == "shout"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    r = client.chat.completions.create(model="shout", messages=MSG)
    assert r.model == "shout" and r.choices[0].message.content == "FOX BROWN QUICK THE"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="whisper", messages=MSG)
    assert e.value.body["param"] == "model" and "echo-model, shout" in e.value.body["message"]


def test_errors_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo-model", messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role" and "robot" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo-model", messages=MSG, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo-model", messages=MSG, max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens" and "256" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "w " * 300}])
    assert e.value.body["code"] == "context_length_exceeded" and "256" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the engine's own check: nothing to reply to
        client.chat.completions.create(model="echo-model", messages=[{"role": "assistant", "content": "hi"}])
    assert "user or tool" in e.value.body["message"]
    assert client.chat.completions.create(model="echo-model", messages=MSG).choices[0].message.content


def test_engine_failure_mid_stream(client, server):
    with pytest.raises(openai.APIError) as e:
        list(client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "fail now"}],
                                            stream=True))
    assert "asked to fail" in str(e.value)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "fail now"}])
    assert wait_until(lambda: server.app.state.lmforge.limiter.running == 0)
    assert client.chat.completions.create(model="echo-model", messages=MSG).choices[0].message.content


def test_health_metrics_and_request_log(client, server, caplog):
    caplog.set_level(logging.INFO, logger="lmforge.serve")
    client.chat.completions.create(model="echo-model", messages=MSG)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MSG)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    lines = [r.getMessage() for r in caplog.records if r.name == "lmforge.serve"]
    ok = [ln for ln in lines if "status=200" in ln and "/v1/chat/completions" in ln]
    assert ok and "model=echo-model" in ok[-1] and "completion_tokens=" in ok[-1] and "latency=" in ok[-1]
    assert ok[-1].startswith("id=chatcmpl-")
    assert any("status=404" in ln and "does not exist" in ln for ln in lines)
    text = httpx.get(server.url + "/metrics").text
    assert 'lmforge_requests_total{endpoint="chat",model="echo-model",status="200"}' in text
    assert 'lmforge_requests_total{endpoint="chat",model="",status="404"}' in text
    assert "lmforge_request_duration_seconds_bucket{" in text and "lmforge_queue_depth 0" in text
    assert 'lmforge_generation_tokens_total{model="echo-model"}' in text


def test_log_file(tmp_path):
    from lmforge.pipelines.deploy import add_log_file

    log = tmp_path / "logs" / "requests.log"
    add_log_file(str(log))
    try:
        with echo_server() as srv:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
                model="echo-model", messages=MSG)
        assert "model=echo-model status=200" in log.read_text()
    finally:
        for h in list(logging.getLogger("lmforge.serve").handlers):
            if getattr(h, "baseFilename", "") == str(log.resolve()):
                logging.getLogger("lmforge.serve").removeHandler(h)
                h.close()


# ---- auth -----------------------------------------------------------------------------------------

def test_auth(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nkey-two\n\nkey-three\n")
    with echo_server(api_key="key-one", api_key_file=str(key_file)) as srv:
        for key in ("key-one", "key-two", "key-three"):
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
            assert c.chat.completions.create(model="echo-model", messages=MSG).choices[0].message.content
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="echo-model", messages=MSG)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json")  # auth comes before parsing
        assert r.status_code == 401 and "Missing API key" in r.json()["error"]["message"]
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Basic a2V5LW9uZQ=="})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key


# ---- admission queue, disconnects, shutdown -------------------------------------------------------

def _slow(words: int = 3, delay: float = 0.05) -> list[dict]:
    return [{"role": "user", "content": f"sleep:{delay} " + " ".join(f"w{i}" for i in range(words))}]


def test_queue_full_is_429_then_recovers():
    engine = EchoEngine()
    with echo_server(engine, max_concurrency=1, max_queue=1) as srv:
        state = srv.app.state.lmforge
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=30)
        results = []

        def run():
            results.append(c.chat.completions.create(model="echo-model", messages=_slow(4, 0.1)))

        threads = [threading.Thread(target=run) for _ in range(2)]
        threads[0].start()
        assert wait_until(lambda: state.limiter.running == 1)
        threads[1].start()
        assert wait_until(lambda: state.limiter.waiting == 1)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="echo-model", messages=MSG)
        assert "max_queue 1" in e.value.body["message"] and e.value.response.headers["retry-after"]
        for t in threads:
            t.join(30)
        assert len(results) == 2 and all(r.choices[0].finish_reason == "stop" for r in results)
        assert state.limiter.running == 0 and state.limiter.waiting == 0
        assert 'lmforge_requests_rejected_total{reason="queue_full"} 1' in httpx.get(srv.url + "/metrics").text
        assert c.chat.completions.create(model="echo-model", messages=MSG).choices[0].message.content


def test_disconnect_mid_stream_frees_slot_and_stops_generation(caplog):
    caplog.set_level(logging.INFO, logger="lmforge.serve")
    engine = EchoEngine(max_model_len=1024)
    with echo_server(engine, max_concurrency=1, max_queue=0) as srv:
        state = srv.app.state.lmforge
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=30)
        stream = c.chat.completions.create(model="echo-model", messages=_slow(200, 0.05), stream=True)
        got = [next(iter(stream)) for _ in range(3)]
        assert got[-1].choices[0].delta.content
        assert state.limiter.running == 1 and engine.active == 1
        stream.close()  # the client goes away with ~200 tokens to go (10 s of generation)
        assert wait_until(lambda: state.limiter.running == 0, timeout=3)
        assert wait_until(lambda: engine.active == 0, timeout=3)
        # the freed slot serves the next request at once (max_queue=0: it would be a 429 otherwise)
        assert c.chat.completions.create(model="echo-model", messages=MSG).choices[0].message.content
    assert any("status=499" in r.getMessage() for r in caplog.records)


def test_disconnect_while_queued_frees_queue_place():
    engine = EchoEngine()
    with echo_server(engine, max_concurrency=1, max_queue=1) as srv:
        state = srv.app.state.lmforge
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=30)
        done = []
        holder = threading.Thread(target=lambda: done.append(
            c.chat.completions.create(model="echo-model", messages=_slow(10, 0.1))))
        holder.start()
        assert wait_until(lambda: state.limiter.running == 1)
        with pytest.raises(openai.APITimeoutError):  # waits in the queue, gives up after 0.3 s
            c.with_options(timeout=0.3).chat.completions.create(model="echo-model", messages=MSG)
        assert wait_until(lambda: state.limiter.waiting == 0, timeout=3)
        holder.join(30)
        assert done and engine.started == 1  # the abandoned request was never generated


def test_graceful_shutdown_finishes_running_and_refuses_queued():
    engine = EchoEngine()
    srv = echo_server(engine, max_concurrency=1, max_queue=4, shutdown_timeout=10)
    with srv as s:
        state = s.app.state.lmforge
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0, timeout=30)
        stream = c.chat.completions.create(model="echo-model", messages=_slow(8, 0.05), stream=True)
        first = next(iter(stream))
        queued: list = []
        waiter = threading.Thread(target=lambda: queued.append(_try(lambda: c.chat.completions.create(
            model="echo-model", messages=MSG))))
        waiter.start()
        assert wait_until(lambda: state.limiter.waiting == 1)
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        rest = list(stream)  # the running stream is finished, not cut
        text = "".join(ch.choices[0].delta.content or "" for ch in [first, *rest] if ch.choices)
        assert text == echo_reply(_slow(8)[0]["content"])
        waiter.join(10)
        stopper.join(10)
        assert isinstance(queued[0], openai.InternalServerError) and queued[0].status_code == 503
        assert "shutting down" in queued[0].body["message"]
        assert engine.active == 0 and state.limiter.running == 0


def test_shutdown_timeout_cancels_running_stream_cleanly():
    engine = EchoEngine(max_model_len=2048)
    with echo_server(engine, max_concurrency=2, shutdown_timeout=0.5) as s:
        state = s.app.state.lmforge
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0, timeout=30)
        stream = c.chat.completions.create(model="echo-model", messages=_slow(300, 0.05), stream=True)
        next(iter(stream))
        t0 = time.monotonic()
        s.stop()
        assert time.monotonic() - t0 < 5
        with pytest.raises(openai.APIError) as e:
            list(stream)  # ended with an error event that says why
        assert "shut down" in str(e.value)
        assert wait_until(lambda: engine.active == 0, timeout=3) and state.limiter.running == 0


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
