"""Streams from an engine process as token ids: the replica generates, the front builds the chunks.

With ``lmforge deploy --engine_process true`` (one native replica) the replica's Python thread runs the
engine's step loop, which is host-bound by itself on a fast GPU (about 18 us of CPU per token for a 0.5B
model on an H200). Building OpenAI chunks there too (detokenising, stop strings, tool-call holding, the
reply objects, pickling them) shares that thread's interpreter lock and measured 42 us per token in all
(benchmarks/RESULTS.md, 2026-11-30 third lease). So for a text model on the native engine the replica
sends only what each step produced: once per engine step, one pipe message with the new token ids (and raw
logprob tuples when asked) of every stream the step touched, and each stream's finished sequences at its
end. The front (the HTTP process) turns them into the very chunks the engine's own
``infer_stream_async`` makes, with the same :class:`~lmforge.infer.reply_stream.ReplyStream` and the
replica engine's template, shipped once when the replica starts. Vision-language models and the hf engine
keep the chunk-building replica path (``data_parallel._AsyncStreams``).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from lmforge.infer.hf import HfEngine, _Row
from lmforge.infer.protocol import ChatCompletionStreamResponse, InferRequest, RequestConfig
from lmforge.infer.reply_stream import ReplyStream
from lmforge.infer.utils import StopStrings, TokenPieces

# What ReplyStream reads of a job: the request (tools, adapter), the token budget, the prompt (its length)
_JobView = namedtuple("_JobView", "request max_tokens input_ids")


def replies_info(engine: Any) -> dict | None:
    """What the front needs to build an engine's chunks itself, or None when it cannot (not the native engine's
    sequences, or a vision-language model, whose replies keep being built next to the pixels)."""
    if not hasattr(engine, "_sequences") or getattr(engine, "processor", None) is not None:
        return None
    return {"template": engine.template, "stop_words": list(engine.stop_words),
            "stop_token_ids": list(engine.stop_token_ids), "pad_token_id": engine.pad_token_id,
            "model_name": engine.model_name, "vocab_size": engine.vocab_size}


def _logprob_width(cfg: RequestConfig) -> int:
    return (cfg.top_logprobs or 0) if cfg.logprobs else -1


class ReplyBuilder:
    """The front's stand-in for the replica's engine where a :class:`ReplyStream` needs one: the template, the
    stop settings, decoding, logprob entries and tool-call parsing (the hf engine's own methods); and prompt
    encoding, so that the front counts and encodes a prompt once and the engine process gets its ids."""

    encode = HfEngine.encode
    _encode = HfEngine._encode
    _encode_prompt = HfEngine._encode_prompt
    _prompt_media = HfEngine._prompt_media
    _decode = HfEngine._decode
    _logprob_entries = HfEngine._logprob_entries
    _parse_tool_calls = HfEngine._parse_tool_calls
    _choice_message = HfEngine._choice_message

    def __init__(self, info: dict):
        self.template = info["template"]
        self.tokenizer = self.template.tokenizer
        self.stop_words, self.stop_token_ids = info["stop_words"], info["stop_token_ids"]
        self.pad_token_id, self.model_name = info["pad_token_id"], info["model_name"]
        self.vocab_size = info["vocab_size"]
        self._token_piece = TokenPieces(self.tokenizer)
        self.template.token_bytes()  # checked and built now, not in a first stream's chunk

    def entries(self, raw: list[tuple], width: int) -> list:
        """One step's raw logprob tuples (one per choice) -> its TokenLogprob entries."""
        toks, chosen, top_ids, top_lps = (list(x) for x in zip(*raw))
        return self._logprob_entries(toks, chosen, top_ids if width else None, top_lps if width else None)

    def row(self, gen: list[int], reason: str | None, raw: list[tuple] | None, cfg: RequestConfig) -> _Row:
        """A finished sequence as the native engine's ``_row`` reports it: a stop token counted, not shown."""
        reason = reason or "abort"
        eos = reason == "stop" and gen and gen[-1] in self.stop_token_ids and not cfg.ignore_eos
        text, hit = StopStrings([*cfg.stop, *self.stop_words]).cut(self._decode(gen[:-1] if eos else gen))
        logprobs = None
        if raw is not None:
            width = _logprob_width(cfg)
            logprobs = self.entries(raw, width) if raw else []
        return _Row(gen, text, "stop" if hit else reason, logprobs)


def _as_steps(kind: str, value: list) -> list:
    """A ``steps`` message's steps, or a ``toks`` message's token ids (one choice, no logprobs) as steps."""
    return list(value) if kind == "steps" else [((t,), None) for t in value]


async def front_stream(builder: ReplyBuilder, q: asyncio.Queue, request: InferRequest, cfg: RequestConfig,
                       raise_error: Any) -> AsyncIterator[ChatCompletionStreamResponse]:
    """The chunks of one token stream whose replica messages arrive on ``q``: ``tstart`` (token budget, prompt
    length), ``steps`` (lists of (token of each choice, raw logprobs or None)), or for one choice without
    logprobs ``toks`` (its new token ids), ``end`` (each choice's tokens,
    finish reason, raw logprobs, error). Steps that piled up while the consumer was busy become one chunk.
    ``raise_error(kind, value)`` raises a replica's error."""
    kind, value = await q.get()
    if kind != "tstart":
        raise_error(kind, value)
        raise RuntimeError(f"token stream: expected its start, got {kind!r}")
    max_tokens, prompt_len = value
    reply = ReplyStream(builder, _JobView(request, max_tokens, range(prompt_len)), cfg)
    width = _logprob_width(cfg)
    yield reply.first()
    held = None
    while True:
        kind, value = held or await q.get()
        held = None
        if kind == "steps" or kind == "toks":
            steps = _as_steps(kind, value)
            while not q.empty():  # coalesce what is already waiting
                nxt = q.get_nowait()
                if nxt[0] != "steps" and nxt[0] != "toks":
                    held = nxt
                    break
                steps += _as_steps(*nxt)
            out = reply.steps([(toks, builder.entries(raw, width) if raw is not None else None)
                               for toks, raw in steps])
            if out is not None:
                yield out
        elif kind == "end":
            for *_, error in value:
                if error is not None:
                    raise_error("error", error)
            yield reply.final([builder.row(gen, reason, raw, cfg) for gen, reason, raw, _ in value])
            return
        else:
            raise_error(kind, value)
            raise RuntimeError(f"token stream: unexpected message {kind!r}")


class _TokenBox:
    """What the engine thread keeps of a one-choice stream without logprobs (most requests): the token ids not
    sent yet. A :class:`~lmforge.infer.native.streams.StreamBox` builds a per-step tuple for every token (its
    ``n`` choices in lockstep, their logprobs); here a token costs a list append in the engine thread and an
    int in the pipe message, where that thread's time bounds a served engine's steps."""

    __slots__ = ("loop", "msg_id", "seqs", "toks", "sent", "told", "done", "deferred")
    width = -1  # no logprobs

    def __init__(self, loop: Any, msg_id: int, seqs: list):
        self.loop, self.msg_id, self.seqs = loop, msg_id, seqs
        self.toks: list[int] = []  # generated, not handed to the pipe yet
        self.sent = 0  # tokens taken from the sequence so far
        self.told = False  # whether a message with tokens has left (the first goes at once)
        self.done = False
        self.deferred: dict = {}  # (n > 1 only)

    def clear(self) -> None:
        self.toks = []


class TokenStreams:
    """Replica side of ``tstream`` messages for the native engine: each request's sequences are submitted with a
    stream box (as the engine's own asyncio streams use) whose "event loop" is this object, so the engine thread
    hands over, once per step, every box the step touched; their new steps leave in one ``batch`` message."""

    def __init__(self, engine: Any, send: Any, error_payload: Any):
        from lmforge.infer.native.streams import StreamBox

        class _Box(StreamBox):
            __slots__ = ("msg_id", "deferred")

            def clear(self) -> None:
                self.steps.clear()

        self._Box, self.engine, self.send, self.error_payload = _Box, engine, send, error_payload
        self.live: dict[int, Any] = {}
        self.starting: set[int] = set()  # prompts being encoded
        self.cancelled: set[int] = set()  # ... whose front went away meanwhile
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="replica-encode")  # prompts encoded off the pipe thread
        # merged into the engine's stats; request_transit_seconds: from the front's send to the pipe thread here
        self.counts = {"prepared_streams": 0, "prepare_seconds": 0.0, "request_transit_seconds": 0.0}

    def start(self, msg_id: int, payload: tuple) -> None:  # the pipe thread
        with self.lock:
            self.starting.add(msg_id)
        t_received = time.monotonic()
        # ids: the prompt as the front encoded it (or None); t_sent: when the front sent this message
        request, cfg, ids, t_sent = (*payload, None, None)[:4]
        self.pool.submit(self._start, msg_id, request, cfg, ids, t_received, t_sent)

    def _start(self, msg_id: int, request: InferRequest, cfg: RequestConfig | None, ids: list[int] | None,
               t_received: float, t_sent: float | None = None) -> None:
        from lmforge.infer.native.scheduler import Status

        engine, cfg = self.engine, cfg or RequestConfig()
        try:
            job = engine._prepare(None, request, cfg, ids)
            box = None
            interval = getattr(engine, "stream_interval", 1)
            if cfg.n == 1 and not cfg.logprobs:  # the common request: its steps are plain token ids
                def on_token(seq: Any) -> None:  # the engine thread, once per token: a slice and an append
                    start, end = seq.prompt_len + box.sent, len(seq.token_ids)
                    if end > start:
                        box.toks += seq.token_ids[start:end]
                        box.sent += end - start
                    box.done = seq.status is Status.FINISHED
                    if box.done or len(box.toks) >= interval or (box.toks and not box.told):
                        engine._touched.append(box)

                seqs = engine._sequences(job, cfg, on_token)
                box = _TokenBox(self, msg_id, seqs)
            else:
                def on_token(seq: Any) -> None:  # the engine thread
                    if seq.seq_id in box.deferred and (seq.num_output or seq.status is Status.FINISHED):
                        for other in box.deferred.pop(seq.seq_id):
                            engine.submit(other)
                    box.update()
                    if box.due():
                        engine._touched.append(box)

                seqs = engine._sequences(job, cfg, on_token)
                box = self._Box(self, seqs, cfg, interval)
                box.msg_id, box.deferred = msg_id, {}
        except BaseException as e:  # noqa: BLE001 - every stream gets an answer
            with self.lock:
                self.starting.discard(msg_id)
                self.cancelled.discard(msg_id)
            self.send(None, "batch", [(msg_id, "error", self.error_payload(e))])
            return
        first = seqs
        # the n samples of a prompt share its KV blocks: the others join once the first has its prompt cached
        if engine.blocks.prefix_caching and cfg.n > 1 and len(seqs[0].token_ids) > engine.blocks.block_size:
            box.deferred[seqs[0].seq_id] = seqs[1:]
            first = seqs[:1]
        with self.lock:
            self.starting.discard(msg_id)
            if msg_id in self.cancelled:  # the front went away while the prompt was encoded
                self.cancelled.discard(msg_id)
                return
            self.live[msg_id] = box
            self.counts["prepared_streams"] += 1
            self.counts["prepare_seconds"] += time.monotonic() - t_received
            if t_sent is not None:  # the front's clock: time.monotonic is one clock for every process of a host
                self.counts["request_transit_seconds"] += t_received - t_sent
            self.send(None, "batch", [(msg_id, "tstart", (job.max_tokens, len(job.input_ids)))])
        for s in first:
            engine.submit(s)

    def cancel(self, msg_id: int) -> None:  # the pipe thread: stop generating after the step in flight
        from lmforge.infer.native.scheduler import Status

        with self.lock:
            box = self.live.pop(msg_id, None)
            if box is None:  # still being encoded (else already ended: nothing to do)
                if msg_id in self.starting:
                    self.cancelled.add(msg_id)
                return
        for s in box.seqs:
            s.aborted = True
        for rest in list(box.deferred.values()):
            for s in rest:
                s.status, s.finish_reason = Status.FINISHED, "abort"
        box.deferred.clear()
        self.engine._wake.set()

    def call_soon_threadsafe(self, _wake: Any, boxes: list) -> None:
        """The engine thread, once per step: the new steps of every box it touched (and the ends), one message."""
        items = []
        with self.lock:
            for box in boxes:
                if box.msg_id not in self.live:  # cancelled
                    box.clear()
                    continue
                if type(box) is _TokenBox:
                    if box.toks:
                        items.append((box.msg_id, "toks", box.toks))
                        box.toks, box.told = [], True
                else:
                    steps = list(box.steps)
                    box.steps.clear()
                    if steps:
                        items.append((box.msg_id, "steps", steps))
                if box.done:
                    del self.live[box.msg_id]
                    items.append((box.msg_id, "end", [
                        (list(s.output_ids), s.finish_reason, list(s.logprobs) if box.width >= 0 else None,
                         None if s.error is None else self.error_payload(s.error)) for s in box.seqs]))
        if items:
            try:
                self.send(None, "batch", items)
            except OSError:  # the front has gone: the replica's pipe loop sees it and ends the process
                pass
