"""A bounded admission queue: at most ``max_concurrency`` requests generate, ``max_queue`` wait.

Why not a bare ``asyncio.Semaphore``: a semaphore queues without bound (an overload turns into
unbounded memory and clients hanging until they time out), cannot say how many wait, and cannot
turn its waiters away when the server shuts down. Here a request beyond the queue gets a 429 at
once, a request that waits longer than ``queue_timeout`` gets a 503, and ``drain()`` answers every
waiter with a 503 so that shutdown only has the running requests to finish.
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Optional

from lmforge.serve.errors import APIError


class ConcurrencyLimiter:
    """FIFO slots; must be used from one event loop (the server's)."""

    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout: Optional[float] = None) -> None:
        if max_concurrency < 1:
            raise ValueError(f"--max_concurrency must be at least 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"--max_queue must be 0 or more, got {max_queue}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout if queue_timeout and queue_timeout > 0 else None
        self._running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._draining = False

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def draining(self) -> bool:
        return self._draining

    def try_acquire(self) -> bool:
        """Take a free slot now if there is one and nobody waits (no task, no wait: the common case)."""
        if self._draining or self._waiters or self._running >= self.max_concurrency:
            return False
        self._running += 1
        return True

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited. Raises APIError 429 (queue full) or 503."""
        if self._draining:
            raise self._reject("shutting_down", 503, "The server is shutting down; retry on another replica")
        if self.try_acquire():
            return 0.0
        if len(self._waiters) >= self.max_queue:
            raise self._reject(
                "queue_full", 429,
                f"Server busy: {self._running} requests are generating and {len(self._waiters)} are waiting "
                f"(--max_concurrency {self.max_concurrency}, --max_queue {self.max_queue}); retry later",
                headers={"Retry-After": "1"})
        start = time.perf_counter()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            granted = await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout)
        except BaseException as exc:
            # Timed out or cancelled (client gone). If the slot was handed over meanwhile, pass it on.
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()
            else:
                fut.cancel()
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if isinstance(exc, asyncio.TimeoutError):
                raise self._reject("queue_timeout", 503,
                                   f"Waited {self.queue_timeout:g} s for a free slot (--queue_timeout); "
                                   "the server is overloaded, retry later", headers={"Retry-After": "5"}) from None
            raise
        if not granted:
            raise self._reject("shutting_down", 503, "The server is shutting down; retry on another replica")
        return time.perf_counter() - start

    def release(self) -> None:
        """Free a slot; the oldest waiter (if any) takes it over."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot moves to the waiter: running stays the same
                return
        self._running -= 1
        if self._running < 0:  # a double release is a bug; keep the count sane and loud
            self._running = 0
            raise RuntimeError("ConcurrencyLimiter.release() called more often than acquire()")

    def drain(self) -> None:
        """Stop admitting: every waiter and every later request gets a 503."""
        self._draining = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(False)

    def _reject(self, reason: str, status: int, message: str, headers: Optional[dict] = None) -> APIError:
        return APIError(status, message, code=reason, headers=headers)


class Slot:
    """One acquired slot; ``release()`` is idempotent, so every exit path may call it."""

    def __init__(self, limiter: ConcurrencyLimiter) -> None:
        self._limiter = limiter
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._limiter.release()
