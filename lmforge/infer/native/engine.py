"""The ``native`` engine: continuous batching over a paged KV cache on CUDA, in PyTorch + Triton.

Requests are encoded, validated and answered exactly as the ``hf`` engine does (it is a subclass:
templates, tool calls, stop strings, logprob entries and streaming chunks are shared); what differs
is how tokens are produced. One background thread owns the GPU and loops: schedule a step
(decodes first, then prompt chunks; :mod:`.scheduler`), run it (a CUDA graph for pure decode steps;
:mod:`.runner`), sample every row on the device (:mod:`.sampler`), append the tokens and hand them to
whoever waits for them. Asynchronously by default: step k+1 is launched before step k's tokens are read back,
and step k's bookkeeping (stop checks, callbacks, streams) runs while the GPU computes step k+1 (:meth:`_step`).
Requests from any number of threads (the server's, say) join the running batch at the next step instead of
waiting for a lock. Qwen2-VL and Qwen2.5-VL requests bring images (Qwen2-VL
ones videos too): the model's vision tower runs at their prefill and their rotary positions are 3-D (:mod:`.vision`).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

import torch

from lmforge.infer.errors import InferRequestError
from lmforge.infer.hf import HfEngine, _Job, _Row
from lmforge.infer.native import vision
from lmforge.infer.native.cache import BlockManager
from lmforge.infer.native.model import NativeModel, _decoder
from lmforge.infer.native.runner import ModelRunner
from lmforge.infer.native.sampler import sample
from lmforge.infer.native.scheduler import SamplingParams, Scheduler, Sequence, Status
from lmforge.infer.native.streams import StreamBox, stream_async, wake
from lmforge.infer.protocol import ChatCompletionStreamResponse, InferRequest, RequestConfig
from lmforge.infer.utils import StopStrings

logger = logging.getLogger(__name__)

class NoCudaError(RuntimeError):
    """The native engine was asked for where no CUDA GPU is visible."""


# Set to 1, lets the native engine run on CPU (as ``allow_cpu=True``) where it is built from flags
# (``lmforge deploy``): benchmarks/bench_serve_load.py --native_on_cpu measures the server's host work so.
ALLOW_CPU_ENV = "LMFORGE_NATIVE_ALLOW_CPU"
NO_CUDA = ("the native engine runs on NVIDIA GPUs (CUDA) and none is visible here; "
           "use --infer_backend hf, which runs on any device")


class NativeEngine(HfEngine):
    """Fast generation on CUDA; same constructor as :class:`HfEngine` plus the cache and batching knobs.

    ``gpu_memory_utilization``: fraction of the GPU's memory the engine may use (weights, activations and
    KV cache); ``max_num_seqs``: sequences decoded together; ``max_num_batched_tokens``: tokens per step
    (prompt chunks beyond it wait for the next step); ``block_size``: tokens per KV block;
    ``enforce_eager``: no CUDA graphs (debugging); ``async_scheduling``: launch step k+1 before step k's tokens
    are read back (host and device work overlap; off: one after the other); ``stream_interval``: a streamed reply
    gets a chunk every this many tokens (its first and last at once; see :mod:`.streams`).
    """

    def __init__(self, model: str | None = None, *, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, block_size: int = 16, enable_prefix_caching: bool = True,
                 enforce_eager: bool = False, num_blocks: int | None = None, device: str | None = None,
                 allow_cpu: bool = False, stream_interval: int = 1, prefill_wait_steps: int = 0,
                 async_scheduling: bool = True, **kwargs: Any):
        if os.environ.get(ALLOW_CPU_ENV) == "1":  # benchmarks of the host-side path through `lmforge deploy`
            allow_cpu = True
            if num_blocks is None and not torch.cuda.is_available():  # room for every sequence at full length
                blocks_per_seq = -(-int(kwargs.get("max_model_len") or 2048) // block_size)
                num_blocks = max_num_seqs * blocks_per_seq
        if not allow_cpu and not torch.cuda.is_available():
            raise NoCudaError(NO_CUDA)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if int(stream_interval) < 1:
            raise ValueError(f"stream_interval must be at least 1 token, got {stream_interval}")
        self.stream_interval = int(stream_interval)
        owns_model = kwargs.get("model_obj") is None
        super().__init__(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"), **kwargs)
        if self.processor is not None:
            vision.check_supported(self.model)
            vision.check_adapters(self.model)
        from lmforge.infer.native import attention

        on_cuda = self.device.type == "cuda"
        attn = attention.paged_attention if on_cuda else attention.paged_attention_reference
        self.native = NativeModel(self.model, max_model_len=self.max_model_len, attention=attn,
                                  write_kv=attention.write_kv)
        from lmforge.infer.native import kernels

        self.native.fused = kernels.available(self.native.embed)
        if self.adapters:
            self.native.set_lora(self.model, list(self.adapters))
        if owns_model:
            _release_fused_sources(self.model)
        else:
            self.native.own_weights()
        max_num_batched_tokens = max(max_num_batched_tokens or 8192, max_num_seqs)
        self.runner = ModelRunner(self.native, block_size=block_size, max_model_len=self.max_model_len,
                                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  gpu_memory_utilization=gpu_memory_utilization, num_blocks=num_blocks,
                                  enforce_eager=enforce_eager)
        self._banned = None  # image and video placeholders are never sampled (as the hf engine does)
        if self.processor is not None:
            self.runner.encode_media = vision.vision_encoder(self.model)
            self._banned = torch.tensor(sorted(self.template.vision.token_ids), device=self.device)
        self.blocks = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   prefill_wait_steps=int(prefill_wait_steps))
        self.max_num_seqs = max_num_seqs
        self.max_batch_size = max_num_seqs  # what the server may send at once
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._step_lock = threading.Lock()  # held for a whole step; update_weights takes it too
        self._closed = False
        self._counts = {"steps": 0, "tokens": 0, "prefill_tokens": 0, "overlapped_steps": 0, "timed_sequences": 0,
                        "queue_seconds": 0.0, "first_token_seconds": 0.0, "sequence_seconds": 0.0}
        self._touched: list[StreamBox] = []  # asyncio streams with new steps (engine thread only)
        self.async_scheduling = bool(async_scheduling)
        self._inflight: _Launched | None = None  # the launched step whose tokens are not read back yet
        self._thread = threading.Thread(target=self._loop, name="lmforge-native", daemon=True)
        self._thread.start()

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            self._wake.clear()  # before draining: a submit after the drain sets it again (no lost wake-up)
            while True:
                try:
                    self.scheduler.add(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if not self.scheduler.has_work() and self._inflight is None:
                self._wake.wait(0.5)
                continue
            with self._step_lock:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                    logger.exception("native engine step failed")
                    self._fail_all(e)
            self._wake_streams()
        while True:  # requests still in the inbox fail too: nothing will serve them
            try:
                self.scheduler.add(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._fail_all(RuntimeError("the native engine was closed"))
        self._wake_streams()

    def _fail_all(self, error: BaseException) -> None:
        self._inflight = None
        for seq in (*self.scheduler.running, *self.scheduler.waiting):
            self._drop_placeholder(seq)
            seq.error = error
            self._finish(seq, "abort")

    def _wake_streams(self) -> None:
        """Wake the asyncio streams this step touched: one ``call_soon_threadsafe`` per event loop."""
        if not self._touched:
            return
        touched, self._touched = self._touched, []
        by_loop: dict[Any, dict[int, StreamBox]] = {}
        for box in touched:
            by_loop.setdefault(box.loop, {})[id(box)] = box
        for loop, boxes in by_loop.items():
            try:
                loop.call_soon_threadsafe(wake, list(boxes.values()))
            except RuntimeError:  # that loop is closed: nobody is waiting there any more
                pass

    @property
    def stats(self) -> dict[str, float]:
        """Steps, sampled tokens, prompt-chunk tokens, steps launched before the previous one's tokens were
        read back (async scheduling) and CUDA-graph replays so far; and, summed over the sequences that ended
        with at least one token (``timed_sequences``), the seconds from reaching the engine to the first step
        that took them (``queue_seconds``), to their first token on the host (``first_token_seconds``) and to
        their end (``sequence_seconds``): a server's time to first token minus the engine's is what the
        requests spent outside it."""
        return {**self._counts, "graph_steps": self.runner.graph_steps}

    def _step(self) -> None:
        """Schedule and launch step k+1, then read back and hand out step k's tokens while the device runs k+1.

        With ``async_scheduling`` the host work of a step (reading tokens back, stop checks, streaming, the
        next step's inputs) overlaps the device's forward instead of alternating with it: a sequence's next
        input token is taken on the device from the tokens just sampled (its host copy is a placeholder until
        read back). A sequence that stops on a token only seen after the next step was launched costs that step
        one wasted row. A batch with a penalised sequence waits for its history first (penalties read it)."""
        sched = self.scheduler
        batch = sched.schedule()
        while sched.dropped:  # cancelled while running or waiting: their callers stop waiting now
            seq = sched.dropped.pop()
            self._drop_placeholder(seq)
            self._notify(seq)
        prev, self._inflight = self._inflight, None
        if not batch:
            if prev is not None:
                self._complete(prev)
                return
            head = sched.waiting[0] if sched.waiting and not sched.running else None
            if head is not None and -(-(len(head.token_ids) + 1) // self.blocks.block_size) >= self.blocks.num_blocks:
                head.error = RuntimeError(  # it cannot fit even alone
                    f"the KV cache ({self.blocks.num_blocks * self.blocks.block_size} tokens) cannot hold this "
                    f"request's {len(head.token_ids)} tokens")
                self._finish(head, "abort")
            return
        if prev is not None and (not self.async_scheduling
                                 or any(s.num_pending and s.params.penalised for s, _ in batch)):
            self._complete(prev)
            prev = None
            batch = [(s, n) for s, n in batch if s.status is not Status.FINISHED]  # stopped on those tokens
            if not batch:
                return
        launched = self._launch(batch, prev)
        if prev is not None:
            self._counts["overlapped_steps"] += 1
            self._complete(prev)  # the device runs the step just launched meanwhile
        for seq, n in batch:
            if seq.status is Status.FINISHED:  # stopped on the token read back just now: this row was wasted
                continue
            sched.advance(seq, n)
            if seq.images is not None:
                seq.images.release(seq.num_computed)
        if launched is not None:
            for seq in launched.seqs:
                if seq.status is not Status.FINISHED:
                    seq.token_ids.append(-1)
                    seq.num_pending = 1
            self._inflight = launched

    def _launch(self, batch: list[tuple[Sequence, int]], prev: "_Launched | None") -> "_Launched | None":
        """Queue the step's forward and sampling on the device and the copy of its tokens to the host."""
        sample_rows = [i for i, (s, n) in enumerate(batch) if s.num_computed + n == len(s.token_ids)]
        pending = None
        if prev is not None:
            row_of = {s.seq_id: i for i, s in enumerate(prev.seqs)}
            dst, src, pos = [], [], 0
            for seq, n in batch:
                pos += n
                if seq.num_pending:
                    dst.append(pos - 1)
                    src.append(row_of[seq.seq_id])
            if dst:
                pending = (dst, src, prev.tokens)
        logits = self.runner.execute(batch, sample_rows, pending, self.scheduler.table)
        self._counts["steps"] += 1
        self._counts["prefill_tokens"] += sum(n for s, n in batch if n > 1)
        if not sample_rows:
            return None
        seqs = [batch[i][0] for i in sample_rows]
        tokens, chosen, top_ids, top_lps = sample(logits, seqs, self._banned)
        host = tuple(_to_host(t) if t is not None else None for t in (tokens, chosen, top_ids, top_lps))
        event = None
        if tokens.is_cuda:
            event = torch.cuda.Event()
            event.record()
        return _Launched(seqs, tokens, host, event)

    def _complete(self, step: "_Launched") -> None:
        """Step k's tokens on the host: fill the placeholders, then check stops and notify (after every
        placeholder is filled: a request's callback reads all of its ``n`` sequences)."""
        if step.event is not None:
            step.event.synchronize()
        tokens, chosen, top_ids, top_lps = (t.tolist() if t is not None else None for t in step.host)
        now = time.perf_counter()
        live = []
        for i, (seq, tok) in enumerate(zip(step.seqs, tokens)):
            if not seq.num_pending:  # finished (cancelled, failed) after this step was launched
                continue
            seq.token_ids[-1] = tok
            seq.num_pending = 0
            seq.t_first = seq.t_first or now
            if seq.params.logprobs >= 0:
                k = seq.params.logprobs
                seq.logprobs.append((tok, chosen[i], top_ids[i][:k] if k else None, top_lps[i][:k] if k else None))
            live.append(seq)
        self._counts["tokens"] += len(live)
        for seq in live:
            tok = seq.token_ids[-1]
            reason = None
            if tok in seq.stop_ids and not seq.params.ignore_eos:
                reason = "stop"
            elif seq.stop_strings and self._stop_string_in_tail(seq):
                reason = "stop"
            elif seq.num_output >= seq.max_tokens:
                reason = "length"
            if reason is not None:
                self._finish(seq, reason)
            else:
                self._notify(seq)

    @staticmethod
    def _drop_placeholder(seq: Sequence) -> None:
        if seq.num_pending:
            seq.token_ids.pop()
            seq.num_pending = 0

    def _stop_string_in_tail(self, seq: Sequence) -> bool:
        # A stop string of L characters spans at most 4L byte-level tokens; a few more for context.
        window = 4 * seq.stop_strings.max_len + 4
        return seq.stop_strings.find(self._decode(seq.output_ids[-window:])) >= 0

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, reason)
            if seq.t_first and seq.t_arrival:
                counts = self._counts
                counts["timed_sequences"] += 1
                counts["queue_seconds"] += seq.t_admitted - seq.t_arrival
                counts["first_token_seconds"] += seq.t_first - seq.t_arrival
                counts["sequence_seconds"] += time.perf_counter() - seq.t_arrival
        self._notify(seq)

    @staticmethod
    def _notify(seq: Sequence) -> None:
        if seq.on_token is not None:
            seq.on_token(seq)

    def submit(self, seq: Sequence) -> None:
        if self._closed:
            raise RuntimeError("the native engine is closed")
        seq.t_arrival = time.perf_counter()
        self._inbox.put(seq)
        self._wake.set()

    def close(self) -> None:
        """Stop the step loop and give the KV cache and CUDA graphs back to the GPU (a closed engine
        answers nothing more), so that a second engine in the same process finds the memory free."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.runner.release()

    # ---- weights -----------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights in (transformers names), between steps; the prefix cache is dropped since
        the cached keys and values belong to the old weights. A vision tower's weights go into the
        transformers model, which runs it."""
        tower: list[tuple[str, torch.Tensor]] = []

        def decoder_part(named: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
            for name, t in named:
                if self.processor is not None and ".visual." in f".{name.replace('base_model.model.', '')}":
                    tower.append((name.replace("base_model.model.", ""), t))
                else:
                    yield name, t.to(self.native.device)

        with self._step_lock:
            n = self.native.load_weights(decoder_part(named_tensors))
            if tower:
                super().update_weights(tower)
            self.blocks.reset_prefix_cache()
        logger.debug("native engine: %d tensors updated", n)

    # ---- requests ----------------------------------------------------------------------------
    def _adapter_slot(self, name: str | None) -> int:
        name = name if name is not None else self.default_adapter
        return self.native.lora_slots[name] if name else -1

    def _request_media(self, job: _Job) -> vision.RequestMedia | None:
        """The pixels of a prompt with images or videos (the processor's, as the hf engine reads them) and its
        positions."""
        if not job.images and not job.videos:
            return None
        enc = self.template.vision
        try:
            pixels = enc.pixel_inputs(job.images, job.videos)
            return vision.RequestMedia.build(job.input_ids, pixels, enc.image_token_id,
                                             self.model.config.vision_config.spatial_merge_size, enc.video_token_id,
                                             video_time_scales=enc.time_scales(pixels))
        except ValueError as e:
            raise InferRequestError(f"images and videos: {e}", index=job.index) from e

    def _sequences(self, job: _Job, cfg: RequestConfig, on_token: Callable[[Sequence], None]) -> list[Sequence]:
        stop = StopStrings([*cfg.stop, *self.stop_words])
        images = self._request_media(job)
        seqs = []
        seed = job.request.seed if job.request.seed is not None else cfg.seed
        for k in range(cfg.n):
            gen = None
            if seed is not None and cfg.temperature > 0:
                gen = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + k)
            params = SamplingParams(
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                repetition_penalty=cfg.repetition_penalty, presence_penalty=cfg.presence_penalty,
                frequency_penalty=cfg.frequency_penalty,
                logprobs=(cfg.top_logprobs or 0) if cfg.logprobs else -1,
                ignore_eos=bool(getattr(cfg, "ignore_eos", False)), generator=gen)
            seqs.append(Sequence(token_ids=list(job.input_ids), max_tokens=job.max_tokens, params=params,
                                 adapter=self._adapter_slot(job.request.adapter),
                                 stop_ids=frozenset(self.stop_token_ids), stop_strings=stop, on_token=on_token,
                                 images=images))
        return seqs

    def _generate(self, jobs: list[_Job], cfg: RequestConfig, *, streamer: Any = None,
                  cancel: threading.Event | None = None, progress: Any = None) -> list[list[_Row]]:
        """Submit every job's sequences (a prompt's extra samples once it is cached); wait for them (or ``cancel``)."""
        done = threading.Event()
        per_job_left = [cfg.n] * len(jobs)
        lock = threading.Lock()
        counted: set[int] = set()
        job_of: dict[int, int] = {}
        all_seqs: list[list[Sequence]] = []
        lockstep = _Lockstep(streamer.queue, cfg) if streamer is not None else None

        # The n samples of a prompt share its KV blocks: the first is prefilled alone, the others are
        # submitted once its prompt is in the cache (they then prefill only the last, partial block).
        deferred: dict[int, list[Sequence]] = {}

        def on_token(seq: Sequence) -> None:
            if seq.seq_id in deferred and (seq.num_output or seq.status is Status.FINISHED):
                for other in deferred.pop(seq.seq_id):
                    self.submit(other)
            if lockstep is not None:
                lockstep.update(all_seqs[0])
            if seq.status is not Status.FINISHED:
                return
            with lock:  # the loop thread and a cancelling caller may both report a sequence
                if seq.seq_id in counted:
                    return
                counted.add(seq.seq_id)
                j = job_of[seq.seq_id]
                per_job_left[j] -= 1
                if progress is not None and per_job_left[j] == 0:
                    progress.update(1)
                if len(counted) == len(job_of):
                    done.set()

        for j, job in enumerate(jobs):
            seqs = self._sequences(job, cfg, on_token)
            for s in seqs:
                job_of[s.seq_id] = j
            all_seqs.append(seqs)
        share = self.blocks.prefix_caching and cfg.n > 1
        for seqs in all_seqs:
            if share and len(seqs[0].token_ids) > self.blocks.block_size:
                deferred[seqs[0].seq_id] = seqs[1:]
                seqs = seqs[:1]
            for s in seqs:
                self.submit(s)
        while not done.wait(0.05):
            if cancel is not None and cancel.is_set():
                for seqs in all_seqs:
                    for s in seqs:
                        s.aborted = True
                for rest in list(deferred.values()):  # never submitted: end them here
                    for s in rest:
                        s.status, s.finish_reason = Status.FINISHED, "abort"
                        on_token(s)
                deferred.clear()
                self._wake.set()
                done.wait(2.0)
                break
            if not self._thread.is_alive():
                raise RuntimeError("the native engine's loop has stopped")
        for seqs in all_seqs:
            for s in seqs:
                if s.error is not None:
                    raise s.error
        return [[self._row(s) for s in seqs] for seqs in all_seqs]

    def _row(self, seq: Sequence) -> _Row:
        """The finished sequence as the hf engine reports it: a stop token is counted, not shown."""
        gen = list(seq.output_ids)
        reason = seq.finish_reason or "abort"
        eos = reason == "stop" and gen and gen[-1] in seq.stop_ids and not seq.params.ignore_eos
        text, hit = seq.stop_strings.cut(self._decode(gen[:-1] if eos else gen))
        if hit:
            reason = "stop"
        logprobs = None
        if seq.params.logprobs >= 0:
            k = seq.params.logprobs
            toks, chosen, top_ids, top_lps = (list(x) for x in zip(*seq.logprobs)) if seq.logprobs else ([], [], [], [])
            logprobs = self._logprob_entries(toks, chosen, top_ids if k else None, top_lps if k else None)
        return _Row(gen, text, reason, logprobs)

    def infer_stream_async(self, request: InferRequest, request_config: RequestConfig | None = None
                           ) -> AsyncIterator[ChatCompletionStreamResponse]:
        """Chunks on the caller's event loop, fed once per step by the engine thread (:mod:`.streams`)."""
        return stream_async(self, request, request_config or RequestConfig())

    def infer(self, requests: list, request_config: RequestConfig | None = None, *,
              use_tqdm: bool | None = None) -> list:
        """All requests are validated first, then generated together (continuous batching)."""
        cfg = request_config or RequestConfig()
        jobs = [self._prepare(i, r, cfg) for i, r in enumerate(requests)]
        from tqdm.auto import tqdm

        show = use_tqdm if use_tqdm is not None else len(jobs) > 1
        t0 = time.perf_counter()
        with tqdm(total=len(jobs), desc="Generating", unit="req", disable=not show, dynamic_ncols=True) as bar:
            rows = self._generate(jobs, cfg, progress=bar)
        out = [self._response(job, r) for job, r in zip(jobs, rows)]
        if show:
            toks = sum(r.usage.completion_tokens for r in out)
            logger.info("native engine: %d tokens in %.2f s (%.0f tok/s)", toks, time.perf_counter() - t0,
                        toks / max(time.perf_counter() - t0, 1e-9))
        return out


@dataclass
class _Launched:
    """A step on its way: its sampled sequences (in row order), their tokens on the device (the next step's
    inputs) and on their way to the host (pinned copies, valid once ``event`` has completed)."""

    seqs: list[Sequence]
    tokens: torch.Tensor
    host: tuple
    event: Any


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if not t.is_cuda:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class _Lockstep:
    """Feeds the hf engine's stream consumer: one item per step k holding token k of each choice."""

    def __init__(self, q: queue.Queue, cfg: RequestConfig):
        self.q, self.cfg, self.sent = q, cfg, 0

    def update(self, seqs: list[Sequence]) -> None:
        live = [s.num_output for s in seqs if s.status is not Status.FINISHED]
        ready = min(live) if live else max(s.num_output for s in seqs)
        while self.sent < ready:
            k = self.sent
            toks = [s.output_ids[k] if k < s.num_output else -1 for s in seqs]
            record = None
            if self.cfg.logprobs:
                width = self.cfg.top_logprobs or 0
                ent = [s.logprobs[k] if k < len(s.logprobs) else (-1, 0.0, [0] * width, [0.0] * width) for s in seqs]
                record = (torch.tensor([e[0] for e in ent]), torch.tensor([e[1] for e in ent]),
                          torch.tensor([e[2] for e in ent]) if width else None,
                          torch.tensor([e[3] for e in ent]) if width else None)
            self.q.put((toks, record))
            self.sent += 1


def _release_fused_sources(model: Any) -> None:
    """Free the q/k/v and gate/up weights the native model copied into fused matrices."""
    _, dec = _decoder(model)
    for layer in dec.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                    layer.mlp.up_proj):
            base = getattr(mod, "base_layer", mod)
            base.weight.data = torch.empty(0, device=base.weight.device, dtype=base.weight.dtype)
            if base.bias is not None:
                base.bias.data = torch.empty(0, device=base.bias.device, dtype=base.bias.dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
