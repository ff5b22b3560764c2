"""``--data_parallel_size N``: N copies of an engine, one per GPU, behind one engine interface.

Each replica is a separate process (spawned, so CUDA starts fresh in it) that sees one GPU through
``CUDA_VISIBLE_DEVICES`` and builds the engine it was asked for (hf or native). The front object lives
in the caller's process: a batch is cut into N contiguous parts answered at once; a single request or
stream goes to the replica with the fewest requests in flight. ``infer``, ``eval``, ``sample`` and
``deploy`` use it unchanged, so one server fronts all the GPUs. Messages are pickled over pipes (one
reader thread per replica dispatches the answers); replicas answer many requests at a time, since the
engines batch concurrent callers themselves.

With one replica (``lmforge deploy --engine_process true``) the same machinery moves the engine out of the
server's process: the HTTP work per streamed token (SSE, the socket) and the engine's loop then run on two
cores instead of sharing one GIL, which bounds a busy single-process server (benchmarks/RESULTS.md,
2026-11-30: 71 us of the server's CPU per token against the engine's own 16). Streams (``infer_stream_async``)
of a text model on the native engine come back as token ids, one message per engine step for every stream,
and the chunks are built in the front (:mod:`~lmforge.infer.token_streams`); other engines' streams go
through the engine's own asyncio streams in the replica (no thread per stream), the chunks one pass of the
replica's event loop produced crossing the pipe as one message.

Why not torch.distributed: replicas share nothing while generating, and a dead or slow replica must
not stall a collective; plain processes and pipes are the whole need.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Iterable, Iterator

from lmforge.infer.base import InferEngine
from lmforge.infer.errors import InferRequestError, PromptTooLongError
from lmforge.infer.protocol import ChatCompletionResponse, ChatCompletionStreamResponse, InferRequest, RequestConfig
from lmforge.infer.token_streams import ReplyBuilder, TokenStreams, front_stream, replies_info

logger = logging.getLogger(__name__)

# Prompts counted in the front and not streamed yet: at most this many, and this many token ids in all (the
# oldest are dropped; a stream whose ids were dropped is encoded by the engine process). Bounded because a
# request refused after its count (a bad max_tokens, a client gone) never takes its ids.
_ENCODED_KEPT, _ENCODED_KEPT_TOKENS = 4096, 1 << 20


def _error_payload(e: BaseException) -> tuple:
    """What crosses the pipe for an error: request errors keep their fields, anything else its text."""
    if isinstance(e, PromptTooLongError):
        return ("PromptTooLongError", (e.prompt_tokens, e.max_model_len), e.index)
    if isinstance(e, InferRequestError):
        return ("InferRequestError", e.reason, e.index)
    return (type(e).__name__, str(e), None)


def _raise_from(payload: tuple, replica: int, offset: int = 0) -> None:
    """Raise a replica's error in the front; a request's index is shifted to the whole batch's."""
    name, detail, index = payload
    index = None if index is None else index + offset
    if name == "PromptTooLongError":
        raise PromptTooLongError(*detail, index=index)
    if name == "InferRequestError":
        raise InferRequestError(detail, index=index)
    raise RuntimeError(f"data-parallel replica {replica}: {name}: {detail}")


class _AsyncStreams:
    """Replica side of ``astream`` messages: the engine's ``infer_stream_async`` on one event loop thread, the
    chunks of one loop pass sent as one ``batch`` message (a step's chunks of every stream, not one message each)."""

    def __init__(self, engine: Any, send: Any):
        self.engine, self.send = engine, send
        self.loop = asyncio.new_event_loop()
        self.tasks: dict[int, asyncio.Task] = {}
        self.outbox: list[tuple] = []
        threading.Thread(target=self.loop.run_forever, name="replica-streams", daemon=True).start()

    def start(self, msg_id: int, payload: tuple) -> None:  # the pipe thread
        self.loop.call_soon_threadsafe(self._start, msg_id, payload)

    def cancel(self, msg_id: int) -> None:  # the pipe thread
        self.loop.call_soon_threadsafe(self._cancel, msg_id)

    def _start(self, msg_id: int, payload: tuple) -> None:
        self.tasks[msg_id] = self.loop.create_task(self._pump(msg_id, *payload))

    def _cancel(self, msg_id: int) -> None:
        task = self.tasks.get(msg_id)
        if task is not None:
            task.cancel()

    async def _pump(self, msg_id: int, request: InferRequest, cfg: RequestConfig | None) -> None:
        stream = self.engine.infer_stream_async(request, cfg)
        try:
            async for chunk in stream:
                self._out(msg_id, "chunk", chunk)
            self._out(msg_id, "result", None)
        except asyncio.CancelledError:  # the front's consumer went away: closing the stream stops generation
            pass
        except BaseException as e:  # noqa: BLE001 - every stream gets an answer
            self._out(msg_id, "error", _error_payload(e))
        finally:
            await stream.aclose()
            self.tasks.pop(msg_id, None)

    def _out(self, msg_id: int, kind: str, payload: Any) -> None:
        if not self.outbox:  # after every callback already queued: the other streams woken by this step
            self.loop.call_soon(self._flush)
        self.outbox.append((msg_id, kind, payload))

    def _flush(self) -> None:
        batch, self.outbox = self.outbox, []
        if batch:
            self.send(None, "batch", batch)


def visible_gpu(index: int, visible: str | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a replica the caller's ``cuda:index``: the index-th entry
    of the caller's own list when it has one (``CUDA_VISIBLE_DEVICES=2,3`` makes ``cuda:0`` GPU 2), else the
    index itself."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if not ids:
        return str(index)
    if index >= len(ids):
        raise ValueError(f"cuda:{index} is not among the {len(ids)} GPU(s) CUDA_VISIBLE_DEVICES={visible} shows")
    return ids[index]


def name_process(name: str) -> None:
    """Show ``name`` (15 characters at most) for this process in ps, top and /proc (Linux; elsewhere nothing)."""
    try:
        with open("/proc/self/comm", "w") as f:  # the main thread's name is the process's
            f.write(name[:15])
    except OSError:
        pass


class _Outbox:
    """A replica's pipe to one API process, written by a thread of its own.

    Stream answers (``batch`` items) are queued and leave together: the engine's loop hands over a step's
    answers without waiting on the pipe, and when the API process reads more slowly than the engine steps (its
    reader thread waits for its own interpreter lock), the answers of several steps go as one message instead of
    the engine stalling on a full pipe. Other messages (results, ``ready``) are written at once."""

    def __init__(self, conn: Any):
        from multiprocessing.reduction import ForkingPickler

        self.conn, self._dumps = conn, ForkingPickler.dumps
        self.items: list = []
        self.t_first = 0.0  # when the oldest item not written yet was put (time.monotonic: one clock per host)
        self.lock, self.write_lock, self.ready = threading.Lock(), threading.Lock(), threading.Event()
        threading.Thread(target=self._run, name="replica-outbox", daemon=True).start()

    def put(self, items: list) -> None:
        with self.lock:
            if not self.items:
                self.t_first = time.monotonic()
            self.items += items
        self.ready.set()

    def send(self, msg: tuple) -> None:
        with self.write_lock:
            self.conn.send(msg)

    def _run(self) -> None:
        while True:
            self.ready.wait()
            self.ready.clear()
            with self.lock:
                items, self.items, t_first = self.items, [], self.t_first
            if not items:
                continue
            # stamped so that the front can tell how long a step's answers waited here and in the pipe
            data = self._dumps((None, "batch", (items, t_first, time.monotonic())))
            try:
                with self.write_lock:
                    self.conn.send_bytes(data)
            except OSError:  # the API process has gone; the replica's loop sees its pipe close
                return


def _replica_main(rank: int, device: str, backend: str, kwargs: dict, conns: list) -> None:
    """One replica: build the engine on its device, then answer messages until told to stop.

    ``conns`` holds one pipe per API process (``lmforge deploy --api_server_count N``); process ``i`` numbers its
    messages ``i, i + N, i + 2N, ...``, so every answer goes back on the pipe ``msg_id % N``, and a step's batch of
    stream answers is split by the same rule."""
    from concurrent.futures import ThreadPoolExecutor
    from multiprocessing.connection import wait

    name_process(f"lmforge-engine{rank}")
    if device.startswith("cuda"):
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpu(int(device.partition(":")[2] or 0))
        kwargs = {**kwargs, "device": "cuda"} if backend == "hf" else kwargs
    elif backend == "hf":
        kwargs = {**kwargs, "device": "cpu"}
    n = len(conns)
    outboxes = [_Outbox(conn) for conn in conns]

    def send(msg_id: Any, kind: str, payload: Any) -> None:
        if msg_id is not None:
            outboxes[msg_id % n].send((msg_id, kind, payload))
        elif kind == "batch":
            if n == 1:
                outboxes[0].put(payload)
                return
            parts: dict[int, list] = {}
            for item in payload:
                parts.setdefault(item[0] % n, []).append(item)
            for i, items in parts.items():
                outboxes[i].put(items)
        else:  # "ready", a start-up error: to every API process
            for box in outboxes:
                box.send((msg_id, kind, payload))

    try:
        from lmforge.infer import get_engine

        engine = get_engine(backend, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the front, which raises it with the replica named
        send(None, "error", _error_payload(e))
        return
    try:  # the server's request classes: unpickling the first request would otherwise import them (and fastapi)
        import lmforge.serve.schemas  # noqa: F401 - with the interpreter lock held, 0.35 s into serving
    except ImportError:  # an install without the server's extra serves no such requests
        pass
    from lmforge.utils.gc_heap import freeze

    freeze()  # a process of its own, for the engine's life: no full collection over its start-up heap mid-step
    replies = replies_info(engine)
    send(None, "ready", {"model_name": engine.model_name, "adapters": dict(engine.adapters),
                         "max_model_len": engine.max_model_len, "max_num_seqs": getattr(engine, "max_num_seqs", None),
                         "supports_raw_prompt": getattr(engine, "supports_raw_prompt", True), "replies": replies})
    cancelled: dict[int, threading.Event] = {}
    streams = _AsyncStreams(engine, send)
    tokens = TokenStreams(engine, send, _error_payload) if replies is not None else None

    def handle(msg_id: int, kind: str, payload: Any) -> None:
        try:
            if kind == "infer":
                send(msg_id, "result", engine.infer(*payload, use_tqdm=False))
            elif kind == "stream":
                stop = cancelled.setdefault(msg_id, threading.Event())
                stream = engine.infer_stream(*payload)
                try:
                    for chunk in stream:
                        if stop.is_set():
                            break
                        send(msg_id, "chunk", chunk)
                finally:
                    stream.close()
                send(msg_id, "result", None)
            elif kind == "stats":
                send(msg_id, "result", {**(getattr(engine, "stats", None) or {}), **(tokens.counts if tokens else {})})
            elif kind == "count":
                send(msg_id, "result", engine.count_prompt_tokens(payload))
            elif kind == "weights":
                engine.update_weights(payload)
                send(msg_id, "result", None)
        except BaseException as e:  # noqa: BLE001 - every request gets an answer
            try:
                send(msg_id, "error", _error_payload(e))
            except OSError:  # its API process has gone
                pass
        finally:
            cancelled.pop(msg_id, None)

    def gone(i: int) -> None:
        """API process ``i`` closed its pipe (it exited): stop generating for its streams."""
        for msg_id in [m for m in list(streams.tasks) if m % n == i]:
            streams.cancel(msg_id)
        if tokens is not None:
            for msg_id in [m for m in list(tokens.live) + list(tokens.starting) if m % n == i]:
                tokens.cancel(msg_id)
        for msg_id, event in list(cancelled.items()):
            if msg_id % n == i:
                event.set()

    open_conns = dict(enumerate(conns))
    with ThreadPoolExecutor(max_workers=512, thread_name_prefix=f"replica{rank}") as pool:
        while open_conns:
            for conn in wait(list(open_conns.values())):
                i = next(k for k, c in open_conns.items() if c is conn)
                try:
                    msg_id, kind, payload = conn.recv()
                except (EOFError, OSError):
                    del open_conns[i]
                    gone(i)
                    continue
                if kind == "stop":
                    return
                if kind == "cancel":
                    cancelled.setdefault(payload, threading.Event()).set()
                elif kind == "acancel":
                    streams.cancel(payload)
                elif kind == "astream":
                    streams.start(msg_id, payload)
                elif kind == "tstream" and tokens is not None:
                    tokens.start(msg_id, payload)
                elif kind == "tcancel" and tokens is not None:
                    tokens.cancel(payload)
                else:
                    pool.submit(handle, msg_id, kind, payload)


class _Replica:
    """The front's handle on one replica process: send a message, get its answers on a queue."""

    def __init__(self, rank: int, process: Any, conn: Any):
        self.rank, self.process, self.conn = rank, process, conn
        self.lock = threading.Lock()
        self.pending: dict[int, queue.Queue] = {}
        self.in_flight = 0
        self.sent = 0  # messages sent, for logs and tests: how the work was spread
        self.info: dict[str, Any] = {}
        self.streams: dict[int, tuple[Any, asyncio.Queue]] = {}  # astream id -> (its event loop, its queue)
        # this process's view of the replica's answer batches (stats): how many, and the seconds each spent in the
        # replica's outbox (from its oldest answer), the pipe (with the pickling and the reader's wait for this
        # process's interpreter lock) and this process's event loop, summed
        self.transit = dict.fromkeys(("reply_batches", "reply_outbox_seconds", "reply_pipe_seconds",
                                      "reply_loop_seconds"), 0.0)

    def wait_ready(self) -> None:
        _, kind, payload = self.conn.recv()
        if kind == "error":
            _raise_from(payload, self.rank)
        self.info = payload
        threading.Thread(target=self._read, name=f"replica{self.rank}-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg_id, kind, payload = self.conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: close() here set the handle to None mid-read
                self._fail_all("the replica process exited")
                return
            except Exception:  # noqa: BLE001 - an answer that cannot be unpickled is lost: see below
                logger.exception("replica %d: an answer could not be read", self.rank)
                self._fail_all(f"an answer from replica {self.rank} could not be read")
                continue
            try:
                if kind == "batch":
                    items, t_put, t_write = payload
                    self._deliver(items, (t_put, t_write, time.monotonic()))
                    continue
                q = self.pending.get(msg_id)
                if q is not None:
                    q.put((kind, payload))
            except Exception:  # noqa: BLE001 - a dead reader would leave every stream of this replica waiting
                logger.exception("replica %d: handing an answer on failed", self.rank)
                self._fail_all(f"the server failed on an answer from replica {self.rank}")

    def _fail_all(self, reason: str) -> None:
        """End every request now waiting on this replica with ``reason``: an answer for some of them was lost, and
        which is not known. Directly onto each queue, not through ``_deliver`` (which may be what failed)."""
        error = ("error", ("RuntimeError", reason, None))
        for q in list(self.pending.values()):
            q.put(error)
        for loop, q in list(self.streams.values()):
            try:
                loop.call_soon_threadsafe(q.put_nowait, error)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def _deliver(self, items: list[tuple], stamps: tuple | None = None) -> None:
        """Reader thread: a batch of stream answers, one ``call_soon_threadsafe`` per event loop. ``stamps``: when
        the batch's oldest answer was handed to the replica's outbox, when the outbox wrote it, when it was read."""
        by_loop: dict[Any, list] = {}
        for msg_id, kind, payload in items:
            target = self.streams.get(msg_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], (kind, payload)))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._put_all, puts, stamps)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def _put_all(self, puts: list, stamps: tuple | None) -> None:
        """The event loop: hand a batch's answers to their streams, and time the batch's way here (the
        ``reply_*`` counters of ``stats``)."""
        for q, item in puts:
            q.put_nowait(item)
        if stamps is not None:
            t_put, t_write, t_read = stamps
            t = self.transit
            t["reply_batches"] += 1
            t["reply_outbox_seconds"] += t_write - t_put
            t["reply_pipe_seconds"] += t_read - t_write
            t["reply_loop_seconds"] += time.monotonic() - t_read

    def open_stream(self, msg_id: int, payload: Any, kind: str = "astream") -> asyncio.Queue:
        """Send an ``astream`` (or ``tstream``) message; its answers arrive on the returned queue of the calling
        event loop."""
        q: asyncio.Queue = asyncio.Queue()
        with self.lock:
            self.streams[msg_id] = (asyncio.get_running_loop(), q)
            self.in_flight += 1
            self.sent += 1
            self.conn.send((msg_id, kind, payload))
        return q

    def close_stream(self, msg_id: int, cancel: bool, kind: str = "acancel") -> None:
        with self.lock:
            if cancel:
                self.conn.send((None, kind, msg_id))
            if self.streams.pop(msg_id, None) is not None:
                self.in_flight -= 1

    def send(self, msg_id: int, kind: str, payload: Any) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self.lock:
            self.pending[msg_id] = q
            self.in_flight += 1
            self.sent += 1
            self.conn.send((msg_id, kind, payload))
        return q

    def done(self, msg_id: int) -> None:
        with self.lock:
            self.pending.pop(msg_id, None)
            self.in_flight -= 1

    def call(self, msg_id: int, kind: str, payload: Any, offset: int = 0) -> Any:
        q = self.send(msg_id, kind, payload)
        try:
            kind, value = q.get()
        finally:
            self.done(msg_id)
        if kind == "error":
            _raise_from(value, self.rank, offset)
        return value


def _stream_end(kind: str, value: Any, rank: int) -> None:
    """A stream's last answer: ``result`` ends it, ``error`` is raised."""
    if kind == "error":
        _raise_from(value, rank)


class DataParallelEngine(InferEngine):
    """N replicas of ``backend`` on ``devices`` (``cuda:0``, ``cuda:1``, ... or ``cpu``).

    ``api_server_count`` > 1 gives every replica that many pipes: this object uses the first, and
    :meth:`attach` builds the same front in each other API process from :meth:`api_connections` ``(i)``."""

    def __init__(self, backend: str, devices: list[str], *, api_server_count: int = 1, **engine_kwargs: Any):
        import multiprocessing as mp

        if not devices:
            raise ValueError("an engine in other processes needs at least one device")
        if api_server_count < 1:
            raise ValueError(f"api_server_count {api_server_count}: at least 1")
        ctx = mp.get_context("spawn")
        replicas, self._spare = [], []
        for rank, device in enumerate(devices):
            pipes = [ctx.Pipe() for _ in range(api_server_count)]
            proc = ctx.Process(target=_replica_main, args=(rank, device, backend, engine_kwargs,
                                                           [back for _, back in pipes]),
                               daemon=True, name=f"lmforge-replica{rank}")
            proc.start()
            for _, back in pipes:
                back.close()
            replicas.append(_Replica(rank, proc, pipes[0][0]))
            self._spare.append([front for front, _ in pipes[1:]])  # the other API processes' ends
        self._setup(replicas, devices, backend, 0, api_server_count)

    @classmethod
    def attach(cls, conns: list, devices: list[str], backend: str, index: int, count: int) -> "DataParallelEngine":
        """The front of API process ``index`` of ``count`` over replicas another process started; ``conns`` (one per
        replica) come from that process's :meth:`api_connections`. :meth:`close` then only lets go of the pipes."""
        self = cls.__new__(cls)
        self._spare = []
        self._setup([_Replica(rank, None, conn) for rank, conn in enumerate(conns)], devices, backend, index, count)
        return self

    def api_connections(self, index: int) -> list:
        """API process ``index``'s pipe to each replica (1 <= index < api_server_count), to pass to that process."""
        return [spare[index - 1] for spare in self._spare]

    def _setup(self, replicas: list[_Replica], devices: list[str], backend: str, index: int, count: int) -> None:
        self._ids = itertools.count(index, count)  # the replicas route answers by msg_id % count
        self._replicas = replicas
        self._owner = index == 0
        try:
            for r in self._replicas:
                r.wait_ready()
        except BaseException:
            self.close()
            raise
        info = self._replicas[0].info
        # a text model on the native engine: streams come back as token ids, their chunks are built here, and
        # prompts are encoded here as they are counted (their ids go with the stream)
        self._replies = ReplyBuilder(info["replies"]) if info.get("replies") is not None else None
        self._encoded: OrderedDict[int, tuple[InferRequest, list[int]]] = OrderedDict()
        self._encoded_lock, self._encoded_tokens = threading.Lock(), 0
        self.model_name, self.adapters = info["model_name"], info["adapters"]
        self.max_model_len, self.supports_raw_prompt = info["max_model_len"], info["supports_raw_prompt"]
        per = [r.info["max_num_seqs"] or 8 for r in self._replicas]
        self.max_num_seqs = sum(per)  # the server admits as many requests as all replicas batch
        self.devices, self.backend = list(devices), backend
        if self._owner:
            logger.info("%s: %d %s replica(s) on %s%s", "data parallel" if len(devices) > 1 else "engine process",
                        len(devices), backend, ", ".join(devices),
                        f", {count} API processes" if count > 1 else "")

    # ---------------------------------------------------------------------------------------------- routing

    def _least_busy(self) -> _Replica:
        return min(self._replicas, key=lambda r: r.in_flight)

    def infer(self, requests: list[InferRequest], request_config: RequestConfig | None = None, *,
              use_tqdm: bool | None = None) -> list[ChatCompletionResponse]:
        if len(requests) <= 1:
            return self._least_busy().call(next(self._ids), "infer", (requests, request_config)) if requests else []
        n = len(self._replicas)
        bounds = [len(requests) * i // n for i in range(n + 1)]
        waits = []
        for r, lo, hi in zip(self._replicas, bounds, bounds[1:]):
            if hi > lo:
                msg_id = next(self._ids)
                waits.append((r, msg_id, lo, r.send(msg_id, "infer", (requests[lo:hi], request_config))))
        out: list[ChatCompletionResponse] = []
        error = None
        for r, msg_id, lo, q in waits:  # collect every part (no replica is left answering into the void)
            try:
                kind, value = q.get()
            finally:
                r.done(msg_id)
            if kind == "error":
                error = error or (value, r.rank, lo)
            else:
                out.extend(value)
        if error is not None:
            _raise_from(*error)
        return out

    def infer_stream(self, request: InferRequest, request_config: RequestConfig | None = None
                     ) -> Iterator[ChatCompletionStreamResponse]:
        r, msg_id = self._least_busy(), next(self._ids)
        q = r.send(msg_id, "stream", (request, request_config))
        finished = False
        try:
            while True:
                kind, value = q.get()
                if kind != "chunk":
                    finished = True
                    _stream_end(kind, value, r.rank)
                    return
                yield value
        finally:
            if not finished:  # the consumer went away: the replica stops generating
                with r.lock:
                    r.conn.send((None, "cancel", msg_id))
            r.done(msg_id)

    async def infer_stream_async(self, request: InferRequest, request_config: RequestConfig | None = None
                                 ) -> AsyncIterator[ChatCompletionStreamResponse]:
        """The replica's own asyncio stream (see the module docstring), or for a text model on the native engine its
        token ids with the chunks built here (:mod:`~lmforge.infer.token_streams`); closing this one stops
        generation there."""
        r, msg_id = self._least_busy(), next(self._ids)
        if self._replies is not None:
            q = r.open_stream(msg_id, (request, request_config, self._take_encoded(request), time.monotonic()),
                              "tstream")
            finished = False
            try:
                async for chunk in front_stream(self._replies, q, request, request_config or RequestConfig(),
                                                lambda kind, value: _stream_end(kind, value, r.rank)):
                    yield chunk
                finished = True
            finally:
                r.close_stream(msg_id, cancel=not finished, kind="tcancel")
            return
        q = r.open_stream(msg_id, (request, request_config))
        finished = False
        try:
            while True:
                kind, value = await q.get()
                if kind != "chunk":
                    finished = True
                    _stream_end(kind, value, r.rank)
                    return
                yield value
        finally:
            r.close_stream(msg_id, cancel=not finished)

    @property
    def stats(self) -> dict[str, int]:
        """The replicas' engine counters (steps, tokens, ...) summed; empty for engines that keep none. With answer
        batches come this process's timings of them (``reply_*``: see ``_Replica.transit``)."""
        out: dict[str, int] = {}
        for r in self._replicas:
            transit = r.transit.items() if r.transit["reply_batches"] else ()
            for k, v in [*r.call(next(self._ids), "stats", None).items(), *transit]:
                out[k] = out.get(k, 0) + v
        return out

    @property
    def counts_locally(self) -> bool:  # type: ignore[override]
        return self._replies is not None

    def count_prompt_tokens(self, request: InferRequest) -> int:
        """Counted here for a text model on the native engine (no round trip through a busy engine process, whose
        interpreter lock the step loop holds most of the time), the ids kept for the request's stream; by a
        replica otherwise."""
        if self._replies is None:
            return self._least_busy().call(next(self._ids), "count", request)
        ids = self._replies.encode(request)
        with self._encoded_lock:
            old = self._encoded.pop(id(request), None)
            self._encoded_tokens += len(ids) - (len(old[1]) if old is not None else 0)
            self._encoded[id(request)] = (request, ids)
            while len(self._encoded) > _ENCODED_KEPT or self._encoded_tokens > _ENCODED_KEPT_TOKENS:
                self._encoded_tokens -= len(self._encoded.popitem(last=False)[1][1])
        return len(ids)

    def _take_encoded(self, request: InferRequest) -> list[int] | None:
        """The ids :meth:`count_prompt_tokens` encoded for this very request object, if any."""
        with self._encoded_lock:
            kept = self._encoded.pop(id(request), None)
            if kept is not None:
                self._encoded_tokens -= len(kept[1])
        return kept[1] if kept is not None and kept[0] is request else None

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        weights = [(name, t.detach().cpu()) for name, t in named_tensors]
        for r in self._replicas:
            r.call(next(self._ids), "weights", weights)

    def close(self) -> None:
        if not self._owner:  # an attached API process: the replicas belong to the process that started them
            for r in self._replicas:
                r.conn.close()
            return
        for r in self._replicas:
            try:
                with r.lock:
                    r.conn.send((None, "stop", None))
            except (OSError, BrokenPipeError):
                pass
        for r in self._replicas:
            r.process.join(timeout=10)
            if r.process.is_alive():
                r.process.kill()
        for spare in self._spare:
            for conn in spare:
                conn.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
