"""Prometheus metrics in the text exposition format (version 0.0.4), written here.

The format is a few lines per sample, so a dependency (prometheus_client) would buy little; this
keeps the server's imports small and the metrics per app instance (tests run several servers in
one process, which a process-global registry would mix up).
"""
from __future__ import annotations

import math
import threading
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

    def render(self) -> list[str]:
        raise NotImplementedError


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

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped (``fn``), so it can never drift from the thing it reports."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        super().__init__(name, help)
        self._fn = fn

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(float(self._fn()))}"]


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

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
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

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._all:
            lines += metric.render()
        return "\n".join(lines) + "\n"
