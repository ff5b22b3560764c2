"""The server against hostile clients: the work and memory one request can cause, clients that hang up or
stall mid-upload, the connection cap, what answers without a key, and the rollout server's admission.

Servers run on loopback; the hostile clients are raw sockets or httpx. Memory is read from
/proc/self/status (the peak reset through /proc/self/clear_refs), so the memory test runs on Linux only.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from lmforge.arguments import DeployArguments, RolloutArguments
from lmforge.serve.server import ServerThread
from test_serve_support import EchoEngine, echo_server, wait_until

GOOD = {"model": "echo-model", "messages": [{"role": "user", "content": "still alive"}]}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _metric(text: str, line_start: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS")
def test_six_concurrent_15mb_prompts_keep_memory_bounded_and_return_it():
    """Six 15 MB chat bodies at once (the probe's "ab " * 5,000,000) on the hf engine and builtin:tiny:
    each is answered 400 (too long, counted in characters, never tokenised), peak RSS stays under +1 GB
    (it was +20 GB when prompts were tokenised before admission), and RSS falls back afterwards."""
    from lmforge.infer.hf import HfEngine
    from lmforge.serve import create_app

    engine = HfEngine("builtin:tiny", device="cpu")
    body = json.dumps({"model": "builtin:tiny", "messages": [{"role": "user", "content": "ab " * 5_000_000}]}).encode()
    headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    with ServerThread(create_app(engine, DeployArguments(api_key="k"))) as srv, \
            httpx.Client(base_url=srv.url, timeout=120, headers=headers) as http:
        assert http.post("/v1/chat/completions", json={**GOOD, "model": "builtin:tiny", "max_tokens": 2}).is_success
        base = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        results: list = []

        def send() -> None:
            r = http.post("/v1/chat/completions", content=body)
            results.append((r.status_code, r.json()["error"]))

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        peak = _status_mb("VmHWM") - base
        assert len(results) == 6 and all(status in (400, 413, 429) for status, _ in results), results
        assert all(err["code"] == "context_length_exceeded" and "15,000,000 characters" in err["message"]
                   for _, err in results), results[0]
        assert peak < 1024, f"peak RSS grew by {peak:.0f} MB"
        assert wait_until(lambda: _status_mb("VmRSS") - base < 150, timeout=10), _status_mb("VmRSS") - base
        assert srv.app.state.lmforge.limiter.running == 0
        ok = http.post("/v1/chat/completions", json={**GOOD, "model": "builtin:tiny", "max_tokens": 2})
        assert ok.status_code == 200


def _half_upload(srv, body: bytes = b'{"model": "echo-model", "messages": [{"role": "user", "content": "',
                 declared: int = 100_000) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(declared).encode() + b"\r\n\r\n" + body)
    return s


def test_client_hanging_up_mid_upload_is_a_499_in_one_line(caplog):
    caplog.set_level(logging.INFO)
    with echo_server() as srv:
        for _ in range(20):
            s = _half_upload(srv)
            time.sleep(0.01)
            s.close()
        metrics = lambda: httpx.get(srv.url + "/metrics").text  # noqa: E731
        assert wait_until(lambda: _metric(metrics(), 'lmforge_requests_total{endpoint="chat",model="",status="499"}')
                          == 20, timeout=10), metrics()
        assert 'status="500"' not in metrics()
        assert httpx.post(srv.url + "/v1/chat/completions", json=GOOD).status_code == 200
    serve = [r for r in caplog.records if r.name.startswith(("lmforge", "uvicorn"))]
    assert not [r for r in serve if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in serve]
    gone = [r.getMessage() for r in serve if "status=499" in r.getMessage()]
    assert len(gone) == 20 and all("\n" not in m and "while sending the request body" in m for m in gone)


def test_a_burst_of_hang_ups_beyond_the_cap_is_all_accounted_for(caplog):
    """Every client of a burst is a 499 or a refused connection; none is a 500 or an error in the log."""
    caplog.set_level(logging.INFO)
    with echo_server(max_connections=5) as srv:
        socks = [_half_upload(srv) for _ in range(40)]
        for s in socks:
            s.close()
        text = lambda: httpx.get(srv.url + "/metrics").text  # noqa: E731

        def accounted() -> float:
            return (_metric(text(), 'lmforge_requests_total{endpoint="chat",model="",status="499"}')
                    + _metric(text(), 'lmforge_requests_rejected_total{reason="max_connections"}'))

        assert wait_until(lambda: accounted() == 40, timeout=10), text()
        assert _metric(text(), 'lmforge_requests_rejected_total{reason="max_connections"}') >= 1
        assert 'status="500"' not in text()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_body_and_header_deadlines_close_stalled_connections():
    with echo_server(body_timeout=0.5) as srv:
        s = _half_upload(srv)  # half a body, then nothing
        s.settimeout(10)
        reply = b""
        while chunk := s.recv(65536):  # the server answers, then closes (recv returns b"")
            reply += chunk
        s.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"--body_timeout" in reply
        for opening in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost:"):  # silent, then half the headers
            s = socket.create_connection((srv.host, srv.port))
            s.sendall(opening)
            s.settimeout(10)
            assert s.recv(1024) == b""  # closed by the server, with nothing sent
            s.close()
        assert httpx.post(srv.url + "/v1/chat/completions", json=GOOD).status_code == 200


def test_connection_cap_answers_503_beyond_it():
    with echo_server(max_connections=3) as srv:
        idle = [socket.create_connection((srv.host, srv.port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            for _ in range(3):  # a fourth connection, refused at once however often it tries
                r = httpx.post(srv.url + "/v1/chat/completions", json=GOOD)
                assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
                assert "--max_connections 3" in r.json()["error"]["message"] and r.headers["retry-after"]
            idle.pop().close()
            time.sleep(0.2)
            assert httpx.post(srv.url + "/v1/chat/completions", json=GOOD).status_code == 200
            metrics = httpx.get(srv.url + "/metrics").text
            assert 'lmforge_requests_rejected_total{reason="max_connections"} 3' in metrics
        finally:
            for s in idle:
                s.close()


def test_metrics_need_the_key_unless_public_and_health_stays_open():
    auth = {"Authorization": "Bearer k"}
    with echo_server(api_key="k") as srv:
        r = httpx.get(srv.url + "/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "lmforge_requests_total" in httpx.get(srv.url + "/metrics", headers=auth).text
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}  # no counts without a key
        assert httpx.get(srv.url + "/health", headers=auth).json() == {"status": "ok", "running": 0, "waiting": 0}
    with echo_server(api_key="k", metrics_public=True) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.post(srv.url + "/v1/chat/completions", json=GOOD).status_code == 401


def test_completion_prompts_are_bounded_before_tokenising():
    with echo_server(max_request_bytes=4 << 20) as srv:  # EchoEngine: max_model_len 256, 32 characters a token
        r = httpx.post(srv.url + "/v1/completions", json={"model": "echo-model", "prompt": ["short", "x" * 9000]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "8,192 characters" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"model": "echo-model", "prompt": list(range(300))})
        assert r.status_code == 400 and "300 token ids" in r.json()["error"]["message"]
        assert srv.app.state.lmforge.limiter.running == 0


def test_rollout_generate_is_admitted_like_chat():
    """/rollout/generate takes a slot of --max_concurrency, queues up to --max_queue, then 429; it is logged and
    counted like chat, and its prompts have the same character bound."""
    from lmforge.serve.rollout import create_rollout_app

    engine = EchoEngine()
    app = create_rollout_app(engine, RolloutArguments(max_concurrency=1, max_queue=0))
    slow = {"requests": [{"messages": [{"role": "user", "content": "sleep:0.1 a b c d e"}]}]}
    with ServerThread(app) as srv:
        state = srv.app.state.lmforge
        done: list = []
        holder = threading.Thread(target=lambda: done.append(httpx.post(srv.url + "/rollout/generate", json=slow,
                                                                         timeout=30)))
        holder.start()
        assert wait_until(lambda: state.limiter.running == 1)
        busy = httpx.post(srv.url + "/rollout/generate", json=slow)
        assert busy.status_code == 429 and busy.headers["retry-after"]
        # the trainer's client waits as Retry-After asks and gets its answer once the slot is free
        from lmforge.infer.protocol import InferRequest
        from lmforge.rlhf.rollout import RolloutClient

        answer = RolloutClient(srv.url, timeout=30).infer([InferRequest(messages=[{"role": "user", "content": "x y"}])])
        assert answer[0].choices[0].message.content == "y x"
        holder.join(30)
        assert done[0].status_code == 200 and done[0].json()["responses"][0]["choices"][0]["message"]["content"]
        big = {"requests": [{"messages": [{"role": "user", "content": "w " * 10_000}]}]}
        r = httpx.post(srv.url + "/rollout/generate", json=big)
        assert r.status_code == 400 and r.json()["error"]["param"] == "requests[0].messages"
        text = httpx.get(srv.url + "/metrics").text
        assert _metric(text, 'lmforge_requests_total{endpoint="rollout_generate",model="echo-model",status="200"}') == 2
        assert _metric(text, 'lmforge_requests_total{endpoint="rollout_generate",model="echo-model",status="429"}') >= 2
        assert state.limiter.running == 0 and engine.active == 0


def test_token_id_prompts_are_counted_on_the_event_loop_and_checked_there(monkeypatch):
    """A short token-id prompt on an engine that counts in-process is counted on the server's event loop (no
    tokenizer-pool thread per request); its ids are still checked (400 naming the vocabulary), a text prompt and
    a longer id prompt still go to the pool, and every reply is the engine's."""
    import lmforge.serve.app as serve_app
    from lmforge.infer.hf import HfEngine
    from lmforge.serve import create_app

    monkeypatch.setattr(serve_app, "_INLINE_COUNT_IDS", 8)
    engine = HfEngine("builtin:tiny", device="cpu")
    threads: list[str] = []
    count = engine.count_prompt_tokens

    def recording(request):
        threads.append(threading.current_thread().name)
        return count(request)
    engine.count_prompt_tokens = recording
    body = {"model": "builtin:tiny", "max_tokens": 2, "temperature": 0}
    with ServerThread(create_app(engine, DeployArguments())) as srv:
        loop_thread = srv._thread.name
        r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": [5, 9, 11, 3]}, timeout=60)
        assert r.is_success and r.json()["usage"]["prompt_tokens"] == 4
        bad = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": [5, 10 ** 6]}, timeout=60)
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
        assert threads == [loop_thread, loop_thread]
        text = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": "5 + 3 ="}, timeout=60)
        long = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": [7] * 9}, timeout=60)
        assert text.is_success and long.is_success and long.json()["usage"]["prompt_tokens"] == 9
        assert len(threads) == 4 and loop_thread not in threads[2:]
        assert srv.app.state.lmforge.limiter.running == 0
