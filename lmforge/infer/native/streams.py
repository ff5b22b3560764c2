"""Streaming from the native engine to asyncio without a thread per request.

The engine thread appends each step's tokens of a streamed request to that request's :class:`StreamBox`
(a deque) and, once per step, wakes every box it touched with one ``call_soon_threadsafe`` per event
loop, not one per token or per request. The request's coroutine then takes all the steps that piled
up since it last ran and turns them into one chunk (:class:`~lmforge.infer.reply_stream.ReplyStream`):
when the server falls behind, each request's deltas are coalesced instead of queued token by token.

With the engine's ``stream_interval`` k > 1, a box is woken only once k steps are waiting (its first step
and its end at once): a chunk then carries k tokens, and the server's host work per chunk (the HTTP layers,
the socket write, the JSON) is paid once per k tokens. Under many concurrent streams that work, not the
GPU, bounds a single-process server (benchmarks/RESULTS.md, 2026-11-30).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, AsyncIterator

from lmforge.infer.native.scheduler import Sequence, Status
from lmforge.infer.protocol import ChatCompletionStreamResponse, InferRequest, RequestConfig
from lmforge.infer.reply_stream import ReplyStream


class StreamBox:
    """What the engine thread hands one streamed request: steps (lockstep over its ``n`` choices) and the end."""

    __slots__ = ("loop", "event", "steps", "sent", "done", "seqs", "width", "interval")

    def __init__(self, loop: asyncio.AbstractEventLoop, seqs: list[Sequence], cfg: RequestConfig, interval: int = 1):
        self.loop, self.seqs, self.interval = loop, seqs, interval
        self.event = asyncio.Event()
        self.steps: deque = deque()  # (tokens of each choice, raw logprob tuples of each choice or None)
        self.sent = 0  # steps appended so far
        self.done = False  # set after the last steps were appended
        self.width = (cfg.top_logprobs or 0) if cfg.logprobs else -1

    def update(self) -> None:
        """Engine thread: append step k for every k that all live choices have reached."""
        seqs = self.seqs
        live = [s.num_output for s in seqs if s.status is not Status.FINISHED]
        ready = min(live) if live else max(s.num_output for s in seqs)
        width = self.width
        while self.sent < ready:
            k = self.sent
            toks = [s.token_ids[s.prompt_len + k] if k < s.num_output else -1 for s in seqs]
            raw = None
            if width >= 0:
                raw = [s.logprobs[k] if k < len(s.logprobs) else (-1, 0.0, [0] * width, [0.0] * width) for s in seqs]
            self.steps.append((toks, raw))
            self.sent += 1
        if not live:
            self.done = True

    def due(self) -> bool:
        """Engine thread: whether the consumer should be woken now (its first step, its end, or ``interval``
        steps waiting)."""
        return self.done or len(self.steps) >= self.interval or (self.sent == len(self.steps) > 0)


def wake(boxes: list[StreamBox]) -> None:
    """Event loop: one call per step wakes every request the step touched."""
    for box in boxes:
        box.event.set()


async def stream_async(engine: Any, request: InferRequest, cfg: RequestConfig
                       ) -> AsyncIterator[ChatCompletionStreamResponse]:
    """The native engine's ``infer_stream_async``: the same chunks as ``infer_stream``, no per-request thread."""
    loop = asyncio.get_running_loop()
    job = await asyncio.to_thread(engine._prepare, None, request, cfg)  # a long prompt's encoding stays off the loop
    reply = ReplyStream(engine, job, cfg)
    deferred: dict[int, list[Sequence]] = {}
    box: StreamBox | None = None

    def on_token(seq: Sequence) -> None:  # engine thread
        if seq.seq_id in deferred and (seq.num_output or seq.status is Status.FINISHED):
            for other in deferred.pop(seq.seq_id):
                engine.submit(other)
        box.update()
        if box.due():
            engine._touched.append(box)

    seqs = engine._sequences(job, cfg, on_token)
    box = StreamBox(loop, seqs, cfg, getattr(engine, "stream_interval", 1))
    # The n samples of a prompt share its KV blocks: the others join once the first has its prompt cached.
    first = seqs
    if engine.blocks.prefix_caching and cfg.n > 1 and len(seqs[0].token_ids) > engine.blocks.block_size:
        deferred[seqs[0].seq_id] = seqs[1:]
        first = seqs[:1]
    for s in first:
        engine.submit(s)
    try:
        yield reply.first()
        while True:
            await box.event.wait()
            box.event.clear()
            done = box.done  # read before draining: every step of a finished request is already queued
            if not done and box.sent > len(box.steps) and len(box.steps) < box.interval:
                continue  # a late wake-up (its steps taken already): wait for the interval's worth
            steps = []
            while box.steps:
                toks, raw = box.steps.popleft()
                steps.append((toks, _entries(engine, raw, box.width) if raw is not None else None))
            if steps:
                out = reply.steps(steps)
                if out is not None:
                    yield out
            if done:
                break
        for s in seqs:
            if s.error is not None:
                raise s.error
        yield reply.final([engine._row(s) for s in seqs])
    finally:
        if not box.done:  # the consumer went away: stop generating after the step in flight
            for s in seqs:
                s.aborted = True
            for rest in list(deferred.values()):
                for s in rest:
                    s.status, s.finish_reason = Status.FINISHED, "abort"
            deferred.clear()
            engine._wake.set()


def _entries(engine: Any, raw: list[tuple], width: int) -> list:
    """Raw logprob tuples of one step (one per choice) -> the TokenLogprob entries the hf engine reports."""
    toks, chosen, top_ids, top_lps = (list(x) for x in zip(*raw))
    return engine._logprob_entries(toks, chosen, top_ids if width else None, top_lps if width else None)
