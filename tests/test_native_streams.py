"""The native engine's asyncio streams (lmforge/infer/native/streams.py), on the CPU.

The server streams through ``infer_stream_async``: no thread per request, steps coalesced per request
when the loop falls behind. These check that it sends what the blocking stream and the non-streaming
reply send (text, logprobs, usage, n choices, stop strings), that a consumer that goes away frees its
sequences, and that many streams on one loop share the engine's steps.
"""
from __future__ import annotations

import asyncio

import pytest

from lmforge.infer.protocol import InferRequest, RequestConfig

PROMPTS = ["What is 12+7?", "Tell me a story about a robot who learns to paint.", "hi",
           "List three colours and explain why each one is nice to look at."]


def _req(prompt: str) -> InferRequest:
    return InferRequest(messages=[{"role": "user", "content": prompt}])


@pytest.fixture(scope="module")
def native():
    from lmforge.infer.native import NativeEngine

    eng = NativeEngine("builtin:tiny", allow_cpu=True, torch_dtype="float32", block_size=16, max_num_seqs=8,
                       num_blocks=256)
    yield eng
    eng.close()


def _collect(engine, req, cfg):
    async def go():
        return [c async for c in engine.infer_stream_async(req, cfg)]

    return asyncio.run(go())


def _text(chunks, index=0):
    return "".join(c.delta.content or "" for x in chunks for c in x.choices if c.index == index)


def test_async_stream_matches_blocking_stream_and_reply_with_n_and_logprobs(native):
    cfg = RequestConfig(max_tokens=24, n=2, temperature=0, logprobs=True, top_logprobs=2)
    want = native.infer([_req(PROMPTS[1])], cfg)[0]
    chunks = _collect(native, _req(PROMPTS[1]), cfg)
    blocking = list(native.infer_stream(_req(PROMPTS[1]), cfg))
    assert chunks[0].choices[0].delta.role == "assistant"
    for r, choice in enumerate(want.choices):
        assert _text(chunks, r) == _text(blocking, r) == choice.message.content
        streamed = [e for x in chunks for c in x.choices if c.index == r and c.logprobs for e in c.logprobs.content]
        assert [e.token for e in streamed] == [e.token for e in choice.logprobs.content]
        # float32 sums differ a little with the batch a step runs in
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in choice.logprobs.content], abs=1e-4)
        assert all(len(e.top_logprobs) == 2 for e in streamed)
    assert [c.finish_reason for c in chunks[-1].choices] == [c.finish_reason for c in want.choices]
    assert chunks[-1].usage.model_dump() == want.usage.model_dump()


def test_async_stream_ends_at_a_stop_string(native):
    full = native.infer([_req(PROMPTS[3])], RequestConfig(max_tokens=40, ignore_eos=True))[0].choices[0].message.content
    cfg = RequestConfig(max_tokens=40, stop=[full[12:15]])
    want = native.infer([_req(PROMPTS[3])], cfg)[0].choices[0]
    chunks = _collect(native, _req(PROMPTS[3]), cfg)
    assert want.finish_reason == "stop" and chunks[-1].choices[0].finish_reason == "stop"
    assert _text(chunks) == want.message.content == full[:full.index(full[12:15])]


def test_closing_an_async_stream_frees_its_sequence(native):
    async def go():
        stream = native.infer_stream_async(_req(PROMPTS[0]), RequestConfig(max_tokens=500, ignore_eos=True))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()
        for _ in range(100):  # the engine drops it at its next step
            if not native.scheduler.running and not native.scheduler.waiting:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(go())
    assert native.blocks.num_available == native.blocks.num_blocks - 1  # all blocks back (block 0 is scratch)


def test_many_streams_on_one_loop_share_steps(native):
    cfg = RequestConfig(max_tokens=16, ignore_eos=True, temperature=0)
    want = [r.choices[0].message.content for r in native.infer([_req(p) for p in PROMPTS], cfg)]
    steps = native.stats["steps"]

    async def go():
        async def one(p):
            return [c async for c in native.infer_stream_async(_req(p), cfg)]

        return await asyncio.gather(*(one(p) for p in PROMPTS * 2))

    got = asyncio.run(go())
    assert [_text(c) for c in got] == want * 2
    assert all(c[-1].usage.completion_tokens == 16 for c in got)
    assert native.stats["steps"] - steps < 8 * 16 // 2  # batched together, not one after another


def test_stream_interval_groups_tokens_and_changes_nothing_else(native):
    """``stream_interval`` 4: the same text, logprobs and usage as a chunk per token; the first token comes at
    once, and every later chunk but the last carries at least 4 tokens (so the server's per-chunk work is paid
    once per 4 tokens)."""
    cfg = RequestConfig(max_tokens=21, n=2, temperature=0, logprobs=True, ignore_eos=True)
    want = native.infer([_req(PROMPTS[1])], cfg)[0]
    native.stream_interval = 4
    try:
        chunks = _collect(native, _req(PROMPTS[1]), cfg)
    finally:
        native.stream_interval = 1
    for r, choice in enumerate(want.choices):
        assert _text(chunks, r) == choice.message.content
        sizes = [len(c.logprobs.content) for x in chunks for c in x.choices if c.index == r and c.logprobs]
        sizes = [k for k in sizes if k]  # the final chunk (finish reason, usage) may carry no token
        assert sum(sizes) == 21
        assert all(k >= 4 for k in sizes[1:-1]), sizes  # the last one carries what was left at the end
    body = [x for x in chunks[1:-1] if x.choices]  # the role chunk and the final one aside
    assert len(body) <= 1 + 21 // 4
    assert chunks[-1].usage.model_dump() == want.usage.model_dump()


def test_stream_interval_must_be_positive():
    from lmforge.infer.native import NativeEngine

    with pytest.raises(ValueError, match="stream_interval must be at least 1"):
        NativeEngine("builtin:tiny", allow_cpu=True, stream_interval=0)


def test_stream_interval_is_refused_where_it_cannot_act():
    from lmforge.arguments import InferArguments
    from lmforge.pipelines.infer import build_engine

    with pytest.raises(ValueError, match="only the native engine groups streamed tokens"):
        build_engine(InferArguments(model="builtin:tiny", infer_backend="hf", stream_interval=4))
