"""``--data_parallel_size``: two engine replicas (CPU processes here, one GPU each elsewhere) answer exactly
what one engine answers, in order, through infer, streams, eval and one server in front."""
from __future__ import annotations

import pytest

from lmforge.infer import InferRequest, RequestConfig
from lmforge.infer.errors import InferRequestError, PromptTooLongError

QUESTIONS = [f"What is {a} + {b}?" for a, b in zip(range(10, 20), range(30, 40))]


@pytest.fixture(scope="module")
def dp_engine():
    from lmforge.infer.data_parallel import DataParallelEngine

    engine = DataParallelEngine("hf", ["cpu", "cpu"], model="builtin:tiny", max_batch_size=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def single():
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny", device="cpu", max_batch_size=8)


def _texts(outs) -> list[str]:
    return [o.choices[0].message.content for o in outs]


def test_replicas_answer_what_one_engine_answers_in_order(dp_engine, single):
    reqs = [InferRequest(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    cfg = RequestConfig(max_tokens=6, temperature=0)
    before = [r.sent for r in dp_engine._replicas]
    assert _texts(dp_engine.infer(reqs, cfg)) == _texts(single.infer(reqs, cfg))
    assert all(r.sent > b for r, b in zip(dp_engine._replicas, before))  # both replicas took part
    assert dp_engine.model_name == single.model_name and dp_engine.max_model_len == single.max_model_len
    assert dp_engine.max_num_seqs == 16  # what the server admits: both replicas' batches


def test_a_bad_request_is_named_by_its_place_in_the_whole_batch(dp_engine):
    reqs = [InferRequest(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    reqs[7] = InferRequest(messages=[{"role": "user", "content": "word " * 5000}])  # over max_model_len
    with pytest.raises(PromptTooLongError) as e:
        dp_engine.infer(reqs, RequestConfig(max_tokens=4))
    assert e.value.index == 7 and isinstance(e.value, InferRequestError)


def test_a_stream_matches_the_whole_answer(dp_engine):
    req = InferRequest(messages=[{"role": "user", "content": "What is 12 + 30?"}])
    cfg = RequestConfig(max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in dp_engine.infer_stream(req, cfg) if c.choices)
    assert streamed == _texts(dp_engine.infer([req], cfg))[0]
    assert dp_engine.count_prompt_tokens(req) > 5


def test_one_server_in_front_of_the_replicas(dp_engine, single):
    import concurrent.futures

    import openai

    from lmforge.arguments import DeployArguments
    from lmforge.serve import create_app
    from lmforge.serve.server import ServerThread

    want = _texts(single.infer([InferRequest(messages=[{"role": "user", "content": q}]) for q in QUESTIONS],
                               RequestConfig(max_tokens=6, temperature=0)))
    before = [r.sent for r in dp_engine._replicas]
    with ServerThread(create_app(dp_engine, DeployArguments(served_model_name="tiny"))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(q: str) -> str:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                               max_tokens=6, temperature=0)
            return r.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, QUESTIONS))
    assert got == want
    assert all(r.sent > b for r, b in zip(dp_engine._replicas, before))


def test_cli_flag_builds_replicas_and_checks_the_gpu_count(monkeypatch):
    import torch

    from lmforge.pipelines.infer import replica_devices

    with monkeypatch.context() as m:  # no GPU: CPU replicas (on a GPU machine too)
        m.setattr(torch.cuda, "is_available", lambda: False)
        assert replica_devices(3) == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert replica_devices(2) == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="only 2 GPU"):
        replica_devices(4)


# ---- one replica: the engine in a process of its own (lmforge deploy --engine_process true) ------------------


@pytest.fixture(scope="module")
def engine_process():
    """The native engine (on the CPU) in one replica process, and the same engine in this process."""
    import os

    from lmforge.infer.data_parallel import DataParallelEngine
    from lmforge.infer.native import NativeEngine
    from lmforge.infer.native.engine import ALLOW_CPU_ENV

    kw = dict(model="builtin:tiny", torch_dtype="float32", max_num_seqs=8, num_blocks=512, stream_interval=2)
    old = os.environ.get(ALLOW_CPU_ENV)
    os.environ[ALLOW_CPU_ENV] = "1"  # read by the spawned replica
    try:
        remote = DataParallelEngine("native", ["cpu"], **kw)
    finally:
        if old is None:
            os.environ.pop(ALLOW_CPU_ENV)
        else:
            os.environ[ALLOW_CPU_ENV] = old
    local = NativeEngine(allow_cpu=True, **kw)
    yield remote, local
    remote.close()
    local.close()


def _streams(engine, prompts, cfg):
    import asyncio

    async def one(p):
        return [c async for c in engine.infer_stream_async(InferRequest(messages=[{"role": "user", "content": p}]),
                                                            cfg)]

    async def all_():
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(all_())


def _streamed_text(chunks) -> str:
    return "".join(c.delta.content or "" for x in chunks for c in x.choices)


def test_engine_process_streams_what_the_engine_streams_in_process(engine_process):
    remote, local = engine_process
    cfg = RequestConfig(max_tokens=12, temperature=0, logprobs=True, ignore_eos=True)
    got, want = _streams(remote, QUESTIONS[:6], cfg), _streams(local, QUESTIONS[:6], cfg)
    assert [_streamed_text(c) for c in got] == [_streamed_text(c) for c in want]
    assert all(len(_streamed_text(c)) > 0 for c in got)
    assert [c[-1].usage.model_dump() for c in got] == [c[-1].usage.model_dump() for c in want]
    tokens = [[e.token for x in c for ch in x.choices if ch.logprobs for e in ch.logprobs.content] for c in got]
    assert tokens == [[e.token for x in c for ch in x.choices if ch.logprobs for e in ch.logprobs.content]
                      for c in want]
    assert remote._replicas[0].in_flight == 0 and not remote._replicas[0].streams


def test_engine_process_builds_the_chunks_from_token_ids_as_the_engine_does(engine_process):
    """A text model on the native engine: the replica sends token ids per step and the front builds the chunks
    (lmforge/infer/token_streams.py). n = 2 choices, top logprobs, a stop string, and tools offered (the
    tool-call hold) give the same text, finish reasons, logprob tables and usage as the engine's own streams;
    the replica's stream interval (2) still sets the chunk size. One choice without logprobs travels as plain
    token ids (``toks``), the others as per-step tuples (``steps``)."""
    remote, local = engine_process
    assert remote._replies is not None  # the token path is the one taken
    replica, seen = remote._replicas[0], []
    deliver = replica._deliver

    def recording(items, stamps=None):  # the front's reader thread: what each batch message carried
        seen.extend((msg_id, kind, len(payload)) for msg_id, kind, payload in items if kind in ("toks", "steps"))
        deliver(items, stamps)
    replica._deliver = recording
    stopped = 0
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    cases = [(RequestConfig(max_tokens=10, temperature=0.8, seed=7, n=2, logprobs=True, top_logprobs=3), None),
             (RequestConfig(max_tokens=16, temperature=1.0, stop=["e"]), None),
             (RequestConfig(max_tokens=12, temperature=1.0, ignore_eos=True), tools)]
    for cfg, tool_list in cases:
        def req(q):  # a seed per request: both engines sample the same tokens (the random model's greedy text is
            # one repeated newline, which would let a stop string or a decoding slip pass unseen)
            return InferRequest(messages=[{"role": "user", "content": q}], tools=tool_list, seed=QUESTIONS.index(q))

        async def run(engine):
            import asyncio

            async def one(q):
                return [c async for c in engine.infer_stream_async(req(q), cfg)]
            return await asyncio.gather(*(one(q) for q in QUESTIONS[:4]))

        import asyncio
        got, want = asyncio.run(run(remote)), asyncio.run(run(local))
        for g, w in zip(got, want):
            for k in range(cfg.n):
                def text(chunks, k=k):
                    return "".join(c.delta.content or "" for x in chunks for c in x.choices if c.index == k)

                def finish(chunks, k=k):
                    return [c.finish_reason for x in chunks for c in x.choices if c.index == k and c.finish_reason]

                def table(chunks, k=k):
                    return [(e.token, round(e.logprob, 4), [(t.token, round(t.logprob, 4)) for t in e.top_logprobs])
                            for x in chunks for c in x.choices if c.index == k and c.logprobs
                            for e in c.logprobs.content]
                assert (text(g), finish(g), table(g)) == (text(w), finish(w), table(w))
            assert g[-1].usage.model_dump() == w[-1].usage.model_dump()
            if cfg.stop:
                assert "e" not in text(g) and finish(g) in (["stop"], ["length"])
                stopped += finish(g) == ["stop"]
        if cfg.logprobs:
            sizes = [len(c.logprobs.content) for x in got[0] for c in x.choices if c.logprobs and c.index == 0]
            sizes = [n for n in sizes if n]
            assert sizes and all(n >= 2 for n in sizes[1:-1]), sizes  # the first at once, then >= the interval
        kinds = {kind for _, kind, _ in seen}
        assert kinds == ({"steps"} if cfg.n > 1 or cfg.logprobs else {"toks"}), kinds
        for msg_id in {m for m, _, _ in seen}:  # token messages: the first at once, then >= the interval
            sizes = [n for m, _, n in seen if m == msg_id]
            assert sizes[0] >= 1 and all(n >= 2 for n in sizes[1:-1]), sizes
        seen.clear()
    assert stopped >= 2  # the stop string did end replies
    assert remote._replicas[0].in_flight == 0 and not remote._replicas[0].streams


def test_the_front_counts_and_encodes_a_text_prompt_once(engine_process, monkeypatch):
    """With token streams the front counts a prompt itself (no round trip through the engine process) and the
    stream takes the ids it encoded: the same counts and errors as the engine's own, the same replies, and the
    engine process generates from the front's ids (a swapped encoding shows in the reply)."""
    import asyncio

    from lmforge.serve.schemas import PromptRequest

    remote, local = engine_process
    chat = InferRequest(messages=[{"role": "user", "content": QUESTIONS[0]}])
    raw = PromptRequest(prompt=[5, 9, 11, 3])
    assert [remote.count_prompt_tokens(r) for r in (chat, raw)] == [local.count_prompt_tokens(r) for r in (chat, raw)]
    for bad, why in ((PromptRequest(prompt=[1, 10 ** 7]), "outside the vocabulary"),
                     (InferRequest(messages=[{"role": "assistant", "content": "x"}]), "replies to a user")):
        with pytest.raises(InferRequestError, match=why):
            remote.count_prompt_tokens(bad)
    assert len(remote._encoded) == 2  # the two counted above, kept for streams that never came
    remote._encoded.clear()
    sent = remote._replicas[0].sent
    cfg = RequestConfig(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)  # greedy text is one newline

    async def counted_then_streamed(engine, request):
        engine.count_prompt_tokens(request)
        return [c async for c in engine.infer_stream_async(request, cfg)]

    async def counted_then_streamed_no_count(engine, request):
        return [c async for c in engine.infer_stream_async(request, cfg)]

    before = remote.stats
    prepared = before["prepared_streams"]
    requests = [InferRequest(messages=[{"role": "user", "content": q}]) for q in QUESTIONS[:3]]
    with_ids = [asyncio.run(counted_then_streamed(remote, r)) for r in requests]
    assert remote._replicas[0].sent == sent + 1 + 3  # one stats call and the three streams: no count messages
    assert not remote._encoded  # every kept encoding went with its stream
    after = remote.stats
    assert after["prepared_streams"] == prepared + 3
    # where a stream's time goes between the processes: its message to the engine process, each answer message's
    # wait in the outbox, the pipe and the event loop (one clock for both processes: never negative, never minutes)
    batches = after["reply_batches"] - before.get("reply_batches", 0)
    assert batches >= 3 * 2  # each stream's start, and its tokens with its end at the least
    for key, count in (("request_transit_seconds", 3), ("reply_outbox_seconds", batches),
                       ("reply_pipe_seconds", batches), ("reply_loop_seconds", batches)):
        spent = after[key] - before.get(key, 0.0)
        assert 0.0 <= spent < 5.0 * count, (key, spent)
    assert after["request_transit_seconds"] > before.get("request_transit_seconds", 0.0)
    want = [asyncio.run(counted_then_streamed(local, r)) for r in requests]
    assert [_streamed_text(c) for c in with_ids] == [_streamed_text(c) for c in want]
    assert [c[-1].usage.prompt_tokens for c in with_ids] == [local.count_prompt_tokens(r) for r in requests]
    swapped = requests[0].model_copy()  # its kept ids replaced by a longer prompt's
    other = InferRequest(messages=[{"role": "user", "content": "Tell me about the sea, the wind and the rain."}])
    remote.count_prompt_tokens(swapped)
    remote._encoded[id(swapped)] = (swapped, local.encode(other))
    got = asyncio.run(counted_then_streamed_no_count(remote, swapped))
    assert got[-1].usage.prompt_tokens == local.count_prompt_tokens(other) > local.count_prompt_tokens(swapped)
    assert _streamed_text(got) == _streamed_text(asyncio.run(counted_then_streamed_no_count(local, other)))
    from lmforge.infer import data_parallel

    remote._encoded.clear()
    remote._encoded_tokens = 0
    for i in range(5000):  # counted and never streamed (refused, abandoned): the kept encodings stay bounded
        remote.count_prompt_tokens(PromptRequest(prompt=[3, 4, i % 50]))
    assert len(remote._encoded) == data_parallel._ENCODED_KEPT and remote._encoded_tokens == 3 * len(remote._encoded)
    long = [PromptRequest(prompt=[7] * 1000) for _ in range(3)]
    monkeypatch.setattr(data_parallel, "_ENCODED_KEPT_TOKENS", 2500)
    for r in long:  # ... in token ids too
        remote.count_prompt_tokens(r)
    assert remote._encoded_tokens <= 2500 and list(remote._encoded) == [id(long[1]), id(long[2])]
    assert remote._take_encoded(long[0]) is None and remote._take_encoded(long[2]) == [7] * 1000
    assert remote._encoded_tokens == 1000
    remote._encoded.clear()
    remote._encoded_tokens = 0


def test_engine_process_stream_errors_and_cancellation(engine_process):
    import asyncio
    import time

    remote, _ = engine_process
    bad = InferRequest(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}])

    async def failing():
        return [c async for c in remote.infer_stream_async(bad, RequestConfig(max_tokens=4))]

    with pytest.raises(InferRequestError, match="the model replies to a user or tool message"):
        asyncio.run(failing())

    async def walk_away():
        stream = remote.infer_stream_async(InferRequest(messages=[{"role": "user", "content": "go on"}]),
                                           RequestConfig(max_tokens=1000, ignore_eos=True))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()

    before = remote.stats["tokens"]
    asyncio.run(walk_away())
    time.sleep(0.5)  # the replica drops the sequence at its next step
    stopped = remote.stats["tokens"]
    time.sleep(0.5)
    assert remote.stats["tokens"] == stopped < before + 200  # generation stopped long before its 1,000 tokens
    assert remote._replicas[0].in_flight == 0 and not remote._replicas[0].streams
    out = remote.infer([InferRequest(messages=[{"role": "user", "content": "still there?"}])],
                       RequestConfig(max_tokens=4))
    assert out[0].usage.completion_tokens > 0


def test_a_server_in_front_of_the_engine_process_streams_to_the_openai_client(engine_process, monkeypatch):
    import concurrent.futures

    import openai

    from lmforge.arguments import DeployArguments
    from lmforge.serve import create_app
    from lmforge.serve.server import ServerThread

    remote, local = engine_process
    cfg = RequestConfig(max_tokens=10, temperature=0, ignore_eos=True)
    want = [_streamed_text(c) for c in _streams(local, QUESTIONS, cfg)]
    with ServerThread(create_app(remote, DeployArguments(served_model_name="tiny"))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(q: str) -> str:
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                    max_tokens=10, temperature=0, stream=True,
                                                    extra_body={"ignore_eos": True})
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, QUESTIONS))
    assert got == want

    # the flag: one replica on this machine's device (its first GPU, else its CPU), whatever --data_parallel_size says
    import torch

    import lmforge.infer.data_parallel as dp
    from lmforge.pipelines.infer import build_engine

    built = {}
    monkeypatch.setattr(dp, "DataParallelEngine", lambda backend, devices, **kw: built.update(devices=devices) or "E")
    assert build_engine(DeployArguments(model="builtin:tiny", engine_process=True)) == "E"
    assert built["devices"] == (["cuda:0"] if torch.cuda.is_available() else ["cpu"])


def test_a_replica_sees_the_callers_gpu_not_the_machines_gpu_of_that_index():
    """``CUDA_VISIBLE_DEVICES=1 lmforge deploy --engine_process true`` must put the engine on GPU 1: the
    replica's ``cuda:0`` is the first entry of the caller's list (it had landed on GPU 0, next to whatever
    ran there: seen on a two-GPU host, where the second of two servers then failed to start)."""
    from lmforge.infer.data_parallel import visible_gpu

    assert visible_gpu(0, "1") == "1"
    assert visible_gpu(1, "2, 3") == "3"
    assert visible_gpu(0, "GPU-8f1c,GPU-77aa") == "GPU-8f1c"
    assert visible_gpu(1, "") == "1"  # no list: the index is the machine's
    with pytest.raises(ValueError, match="cuda:2 is not among the 2 GPU"):
        visible_gpu(2, "0,1")


def test_deploy_puts_the_native_engine_in_its_own_process_on_a_gpu_by_default(monkeypatch):
    import torch

    from lmforge.arguments import DeployArguments
    from lmforge.pipelines.deploy import engine_process_default

    assert DeployArguments(model="builtin:tiny").engine_process is None  # not given: deploy decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_process_default(DeployArguments(model="builtin:tiny", infer_backend="native"))
    assert not engine_process_default(DeployArguments(model="builtin:tiny", infer_backend="hf"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not engine_process_default(DeployArguments(model="builtin:tiny", infer_backend="native"))


def test_a_front_that_fails_on_an_answer_ends_the_replicas_requests_and_keeps_reading(monkeypatch, caplog):
    """An exception in the front's reader thread (a bug, an answer it cannot read) used to kill the thread, and every
    stream and call of that replica then waited forever; now they end with an error and later requests are answered."""
    import asyncio
    import multiprocessing as mp
    import time

    from lmforge.infer import data_parallel as dp

    front, replica_end = mp.Pipe()
    replica_end.send((None, "ready", {}))
    rep = dp._Replica(0, None, front)
    rep.wait_ready()
    broken = {"on": True}
    real_deliver = dp._Replica._deliver

    def deliver(self, items, stamps=None):   # runs on the reader thread
        if broken["on"]:
            raise ValueError("a bug in the front")
        real_deliver(self, items, stamps)

    monkeypatch.setattr(dp._Replica, "_deliver", deliver)

    async def one_stream(msg_id: int):
        q = rep.open_stream(msg_id, "hello")
        pending = rep.send(msg_id + 100, "call", None)   # a plain call waiting on the same replica
        assert [replica_end.recv()[0] for _ in range(2)] == [msg_id, msg_id + 100]
        replica_end.send((None, "batch", ([(msg_id, "chunk", "tok")], time.monotonic(), time.monotonic())))
        kind, value = await asyncio.wait_for(q.get(), timeout=10)
        rep.close_stream(msg_id, cancel=False)
        return kind, value, pending

    kind, value, pending = asyncio.run(one_stream(1))
    assert kind == "error" and "failed on an answer from replica 0" in value[1]
    assert pending.get(timeout=10)[0] == "error"
    assert "handing an answer on failed" in caplog.text
    broken["on"] = False   # the reader is alive: the next stream gets its answer
    kind, value, _ = asyncio.run(one_stream(2))
    assert (kind, value) == ("chunk", "tok")
    replica_end.close()
