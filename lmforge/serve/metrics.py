"""Prometheus metrics in the text exposition format (version 0.0.4), written here.

The format is a few lines per sample, so a dependency (prometheus_client) would buy little; this
keeps the server's imports small and the metrics per app instance (tests run several servers in
one process, which a process-global registry would mix up).

With several API processes (``lmforge deploy --api_server_count N``) each keeps its own metrics and
writes a snapshot of them to a shared folder every second (:class:`SharedMetrics`); a scrape, which
lands on any one process, adds the others' latest snapshots to its own live values: counters and
histograms summed, gauges summed (requests running, waiting and the limits are per process).
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def snapshot(self) -> object:
        raise NotImplementedError

    def render(self, others: Sequence = ()) -> list[str]:
        """The text lines of this metric, with other processes' snapshots of it added."""
        raise NotImplementedError


def _merged(own: dict, others: Sequence, add: Callable) -> list:
    """``own`` (key -> value) with the others' snapshots (lists of [key, value]) added, sorted by key."""
    total = dict(own)
    for snap in others:
        for key, value in snap or ():
            key = tuple(key)
            total[key] = add(total[key], value) if key in total else value
    return sorted(total.items())


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def snapshot(self) -> list:
        with self._lock:
            return [[list(k), v] for k, v in self._values.items()]

    def render(self, others: Sequence = ()) -> list[str]:
        with self._lock:
            own = dict(self._values)
        items = _merged(own, others, lambda a, b: a + b)
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped (``fn``), so it can never drift from the thing it reports."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        super().__init__(name, help)
        self._fn = fn

    def snapshot(self) -> float:
        return float(self._fn())

    def render(self, others: Sequence = ()) -> list[str]:
        return self.header() + [f"{self.name} {_num(float(self._fn()) + sum(float(o or 0) for o in others))}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._series: dict[tuple[str, ...], list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
                    break
            series[-2] += value
            series[-1] += 1

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return series[-1] if series else 0

    def snapshot(self) -> list:
        with self._lock:
            return [[list(k), list(v)] for k, v in self._series.items()]

    def render(self, others: Sequence = ()) -> list[str]:
        lines = self.header()
        with self._lock:
            own = {k: list(v) for k, v in self._series.items()}
        for key, series in _merged(own, others, lambda a, b: [x + y for x, y in zip(a, b)]):
            cumulative = 0
            for bound, n in zip(self.buckets, series):
                cumulative += n
                le = 'le="' + _num(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(series[-2])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {series[-1]}")
        return lines


class ServerMetrics:
    """The server's metrics; ``running`` and ``waiting`` are read from the concurrency limiter."""

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float],
                 max_concurrency: int, max_queue: int) -> None:
        p = "lmforge_"
        self.requests = Counter(p + "requests_total", "HTTP requests by endpoint, model and status",
                                ("endpoint", "model", "status"))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "prompt tokens processed", ("model",))
        self.completion_tokens = Counter(p + "generation_tokens_total", "tokens generated", ("model",))
        self.rejected = Counter(p + "requests_rejected_total",
                                "requests turned away before generation (queue full, shutting down, timeout)",
                                ("reason",))
        self.latency = Histogram(p + "request_duration_seconds", "time from request to the last byte",
                                 ("endpoint", "stream"))
        self.ttft = Histogram(p + "time_to_first_token_seconds", "time from request to the first streamed token",
                              ("endpoint",))
        self.queue_wait = Histogram(p + "queue_wait_seconds", "time a request waited for a free slot")
        self.prompt_len = Histogram(p + "request_prompt_tokens", "prompt tokens per request", (),
                                    TOKEN_BUCKETS)
        self.completion_len = Histogram(p + "request_generation_tokens", "generated tokens per request", (),
                                        TOKEN_BUCKETS)
        self.running = Gauge(p + "requests_running", "requests generating now", running)
        self.waiting = Gauge(p + "queue_depth", "requests waiting for a slot", waiting)
        self.capacity = Gauge(p + "max_concurrency", "requests generated at once at most",
                              lambda: max_concurrency)
        self.queue_capacity = Gauge(p + "max_queue", "requests waiting at most before 429", lambda: max_queue)
        self._all = [self.requests, self.prompt_tokens, self.completion_tokens, self.rejected, self.latency,
                     self.ttft, self.queue_wait, self.prompt_len, self.completion_len, self.running,
                     self.waiting, self.capacity, self.queue_capacity]
        self.shared: Optional["SharedMetrics"] = None  # set in each of several API processes

    def record(self, *, endpoint: str, model: str, status: int, latency: float, stream: bool,
               prompt_tokens: int = 0, completion_tokens: int = 0, ttft: Optional[float] = None) -> None:
        self.requests.inc(endpoint=endpoint, model=model, status=str(status))
        self.latency.observe(latency, endpoint=endpoint, stream=str(stream).lower())
        if ttft is not None:
            self.ttft.observe(ttft, endpoint=endpoint)
        if prompt_tokens or completion_tokens:
            self.prompt_tokens.inc(prompt_tokens, model=model)
            self.completion_tokens.inc(completion_tokens, model=model)
            self.prompt_len.observe(prompt_tokens)
            self.completion_len.observe(completion_tokens)


    def snapshot(self) -> dict:
        return {m.name: m.snapshot() for m in self._all}

    def render(self) -> str:
        others = self.shared.others() if self.shared is not None else []
        lines: list[str] = []
        for metric in self._all:
            lines += metric.render([snap.get(metric.name) for _, snap in others])
        if self.shared is not None:  # how the requests spread over the API processes
            name = "lmforge_api_process_requests_total"
            lines += [f"# HELP {name} HTTP requests answered by each API process",
                      f"# TYPE {name} counter"]
            per = sorted([(self.shared.index, self.requests.snapshot()),
                          *((index, snap.get(self.requests.name)) for index, snap in others)])
            for index, requests in per:
                lines.append(f'{name}{{process="{index}"}} {_num(sum(v for _, v in requests or ()))}')
        return "\n".join(lines) + "\n"


ENGINE_COUNTERS = {  # engine.stats key -> (metric name, help)
    "steps": ("lmforge_engine_steps_total", "engine steps (one forward pass over the running batch each)"),
    "tokens": ("lmforge_engine_sampled_tokens_total", "tokens the engine sampled (all requests, every choice)"),
    "prefill_tokens": ("lmforge_engine_prefill_tokens_total", "prompt tokens the engine computed"),
    "graph_steps": ("lmforge_engine_graph_steps_total", "engine steps replayed from a CUDA graph"),
    "overlapped_steps": ("lmforge_engine_overlapped_steps_total",
                         "engine steps launched before the previous step's tokens were read back (async scheduling)"),
    "timed_sequences": ("lmforge_engine_timed_sequences_total",
                        "sequences that ended with at least one token (the count behind the engine's seconds below)"),
    "queue_seconds": ("lmforge_engine_queue_seconds_total",
                      "seconds from reaching the engine to the first step that took each sequence, summed"),
    "first_token_seconds": ("lmforge_engine_first_token_seconds_total",
                            "seconds from reaching the engine to each sequence's first token on the host, summed"),
    "sequence_seconds": ("lmforge_engine_sequence_seconds_total",
                         "seconds from reaching the engine to each sequence's end, summed"),
    "prepared_streams": ("lmforge_engine_prepared_streams_total",
                         "streams an engine process encoded before submitting them (--engine_process)"),
    "prepare_seconds": ("lmforge_engine_prepare_seconds_total",
                        "seconds from a stream's message reaching the engine process to its submission, summed"),
    "request_transit_seconds": ("lmforge_engine_request_transit_seconds_total",
                                "seconds from an HTTP process sending a stream's message to the engine process "
                                "reading it, summed over the prepared streams"),
    "reply_batches": ("lmforge_engine_reply_batches_total",
                      "messages of stream answers (one or more engine steps' tokens) this HTTP process read"),
    "reply_outbox_seconds": ("lmforge_engine_reply_outbox_seconds_total",
                             "seconds each answer message waited in the engine process before it was written "
                             "(from its oldest answer), summed"),
    "reply_pipe_seconds": ("lmforge_engine_reply_pipe_seconds_total",
                           "seconds from the engine process writing each answer message to this HTTP process "
                           "reading it (pickling, the pipe, the reader's wait for the interpreter lock), summed"),
    "reply_loop_seconds": ("lmforge_engine_reply_loop_seconds_total",
                           "seconds from reading each answer message to this process's event loop handing it "
                           "to its streams, summed"),
}


def engine_lines(stats: Optional[dict]) -> list[str]:
    """The engine's own counters (the native engine's ``stats``; summed over its replicas), one process's view of
    the one engine: tokens per step is the batch the engine really ran."""
    lines: list[str] = []
    for key, (name, help) in ENGINE_COUNTERS.items():
        if stats and key in stats:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {_num(float(stats[key]))}"]
    return lines


class SharedMetrics:
    """One API process's part in metrics shared through ``directory``: its snapshot written there every
    ``interval`` seconds (a temporary file renamed over ``<index>.json``, so a reader never sees half of one),
    the other processes' latest snapshots read back at a scrape. The others' figures are up to ``interval`` old."""

    def __init__(self, metrics: ServerMetrics, directory: str | os.PathLike, index: int, interval: float = 1.0):
        self.metrics, self.dir, self.index, self.interval = metrics, Path(directory), index, interval
        self._stop = threading.Event()
        metrics.shared = self

    def publish(self) -> None:
        tmp = self.dir / f".{self.index}.json.tmp"
        tmp.write_text(json.dumps(self.metrics.snapshot()), encoding="utf-8")
        os.replace(tmp, self.dir / f"{self.index}.json")

    def others(self) -> list[tuple[int, dict]]:
        out = []
        for path in self.dir.glob("*.json"):
            if path.stem.isdigit() and int(path.stem) != self.index:
                try:
                    out.append((int(path.stem), json.loads(path.read_text(encoding="utf-8"))))
                except (OSError, ValueError):  # being replaced right now, or its process died mid-write
                    continue
        return out

    def start(self) -> "SharedMetrics":
        self.publish()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.publish()
                except OSError:  # the folder went away at shutdown
                    return

        threading.Thread(target=loop, name="lmforge-metrics-share", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self.publish()  # the final counts
        except OSError:
            pass
