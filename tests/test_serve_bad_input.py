"""Malformed and hostile requests: each gets a 4xx in OpenAI's error shape that names the problem,
and the server still answers a good request right after it."""
from __future__ import annotations

import json

import httpx
import pytest

from test_serve_support import echo_server

GOOD = {"model": "echo-model", "messages": [{"role": "user", "content": "still alive"}]}
MSGS = GOOD["messages"]


def chat(**fields):
    return ("/v1/chat/completions", json.dumps({**GOOD, **fields}).encode())


def chat_without(field):
    return ("/v1/chat/completions", json.dumps({k: v for k, v in GOOD.items() if k != field}).encode())


def raw(body: bytes, path: str = "/v1/chat/completions"):
    return (path, body)


def completion(**fields):
    return ("/v1/completions", json.dumps({"model": "echo-model", **fields}).encode())


# (id, (path, body), expected status, substring of the message, expected param or None)
CASES = [
    ("malformed-json", raw(b'{"model": "echo-model", "messages": ['), 400, "Malformed JSON", None),
    ("invalid-utf8", raw(b'{"model": "echo-model", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
     400, "not valid UTF-8", None),
    ("empty-body", raw(b""), 400, "Empty request body", None),
    ("array-body", raw(b"[1, 2, 3]"), 400, "must be a JSON object", None),
    ("nan-literal", raw(b'{"model": "echo-model", "messages": [], "temperature": NaN}'), 400, "NaN", None),
    ("deep-nesting", raw(b"[" * 100_000 + b"]" * 100_000), 400, "nested too deeply", None),
    ("5000-digit-number", raw(b'{"model": "echo-model", "max_tokens": ' + b"9" * 5000 + b"}"), 400,
     "Malformed JSON", None),
    ("lone-surrogate", raw(b'{"model": "echo-model", "messages": [{"role": "user", "content": "\\ud800"}]}'),
     400, "surrogate", "messages[0].content"),
    ("missing-messages", chat_without("messages"), 400, "Field required", "messages"),
    ("missing-model", chat_without("model"), 400, "Field required", "model"),
    ("empty-messages", chat(messages=[]), 400, "at least 1 item", "messages"),
    ("messages-not-a-list", chat(messages="hello"), 400, "valid list", "messages"),
    ("invalid-role", chat(messages=[{"role": "robot", "content": "hi"}]), 400, "'robot'", "messages[0].role"),
    ("content-wrong-type", chat(messages=[{"role": "user", "content": 5}]), 400, "valid string",
     "messages[0].content"),
    ("user-content-null", chat(messages=[{"role": "user", "content": None}]), 400, "needs 'content'", "messages[0]"),
    ("image-part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "allow_local_media", "messages[0].content[0]"),
    ("audio-part", chat(messages=[{"role": "user", "content": [{"type": "input_audio", "text": "x"}]}]),
     400, "not supported", "messages[0].content[0]"),
    ("negative-max-tokens", chat(max_tokens=-5), 400, "greater than or equal to 1", "max_tokens"),
    ("max-tokens-string", chat(max_tokens="10"), 400, "valid integer", "max_tokens"),
    ("max-tokens-huge", chat(max_tokens=10 ** 30), 400, "at most", "max_tokens"),
    ("max-tokens-float", chat(max_tokens=1.5), 400, "valid integer", "max_tokens"),
    ("temperature-huge", chat(temperature=1e308), 400, "less than or equal to 2", "temperature"),
    ("temperature-string", chat(temperature="hot"), 400, "valid number", "temperature"),
    ("n-zero", chat(n=0), 400, "greater than or equal to 1", "n"),
    ("n-huge", chat(n=10 ** 6), 400, "less than or equal to 16", "n"),
    ("seed-too-big", chat(seed=2 ** 70), 400, "less than or equal to", "seed"),
    ("stream-not-bool", chat(stream="yes"), 400, "valid boolean", "stream"),
    ("stream-options-without-stream", chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("too-many-stops", chat(stop=[f"s{i}" for i in range(100)]), 400, "at most 16 stop", "stop"),
    ("top-logprobs-without-logprobs", chat(top_logprobs=3), 400, "needs logprobs", None),
    ("logit-bias", chat(logit_bias={"42": 10}), 400, "not supported", "logit_bias"),
    ("tool-choice-unknown-function", chat(tools=[{"type": "function", "function": {"name": "add"}}],
                                          tool_choice={"type": "function", "function": {"name": "mul"}}),
     400, "'mul'", None),
    ("1mb-prompt", chat(messages=[{"role": "user", "content": "word " * 200_000}]), 400,
     "maximum context length is 256", "messages"),
    ("body-over-limit", chat(messages=[{"role": "user", "content": "x" * (3 << 20)}]), 413, "limit", None),
    ("unknown-model", chat(model="gpt-17"), 404, "does not exist", "model"),
    ("unknown-adapter", chat(model="echo-model-lora-nope"), 404, "served models: echo-model, shout", "model"),
    ("last-message-from-assistant", chat(messages=[{"role": "assistant", "content": "hi"}]), 400, "user or tool",
     "messages"),
    ("completion-missing-prompt", completion(), 400, "Field required", "prompt"),
    ("completion-empty-prompt-list", completion(prompt=[]), 400, "must not be an empty list", "prompt"),
    ("completion-token-out-of-vocab", completion(prompt=[-1, 10 ** 9]), 400, "outside the vocabulary", None),
    ("completion-mixed-prompt", completion(prompt=["a", 1]), 400, "prompt", "prompt"),
    ("completion-empty-prompt", completion(prompt=""), 400, "empty", None),
    ("completion-suffix", completion(prompt="a", suffix="b"), 400, "not supported", "suffix"),
    ("unknown-path", raw(b"{}", "/v1/embeddingz"), 404, "Unknown path", None),
]


@pytest.fixture(scope="module")
def server():
    with echo_server(max_request_bytes=2 << 20) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_enough_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("path_body,status,needle,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_clear_4xx_and_server_survives(http, path_body, status, needle, param):
    path, body = path_body
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert r.headers["x-request-id"]
    good = http.post("/v1/chat/completions", json=GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "alive still"


def test_wrong_method(http):
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]


def test_slow_loris_free_server_still_answers(http, server):
    """Half a request held open does not block others (each connection is its own task)."""
    import socket

    s = socket.create_connection((server.host, server.port))
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        assert http.post("/v1/chat/completions", json=GOOD).status_code == 200
    finally:
        s.close()
