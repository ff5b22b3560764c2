"""Running the app under uvicorn: in the foreground (``lmforge deploy``) or in a background thread.

Shutdown is graceful in a fixed order: stop accepting connections and answer queued requests with
503 at once, let running requests finish for up to ``shutdown_timeout`` seconds, then end what is
left with a 503 (a stream gets an error event and a proper end, so clients see why, and its
generation stops like a client that went away); uvicorn then closes the connections.

Connections are bounded where they are made, in a small mixin on uvicorn's HTTP protocol class:
a connection beyond ``max_connections`` open ones is answered 503 (OpenAI's error shape, counted
as ``lmforge_requests_rejected_total{reason="max_connections"}``) and closed before anything is
read, and a connection must deliver a request's headers within ``header_timeout`` seconds of
opening (or of its previous response), else it is closed. uvicorn has neither: its
``limit_concurrency`` answers 503 only once a request's headers have arrived (a socket that
connects and sends nothing, or sends headers a byte at a time, stays open forever). The body has
its own deadline in the app (:func:`lmforge.serve.body.read_body`).
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any, Callable, Optional

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("lmforge.serve")


def _refusal(max_connections: int) -> bytes:
    body = json.dumps({"error": {"message": f"Too many open connections (--max_connections {max_connections}); "
                                            "retry later", "type": "server_error", "param": None,
                                 "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _ConnectionGuard:
    """Mixed into uvicorn's HTTP protocol: refuse a connection beyond ``max_connections`` (503, then close), and
    close one that has no request under way ``header_timeout`` s after it opened or answered its last request
    (a request under way has the app's body deadline instead)."""

    header_timeout: float = 30.0
    max_connections: Optional[int] = None
    on_refused: Optional[Callable[[], None]] = None

    def connection_made(self, transport: Any) -> None:
        self._deadline, self._refused = None, False
        super().connection_made(transport)  # type: ignore[misc]
        cap = self.max_connections
        if cap and len(self.connections) > cap:  # type: ignore[attr-defined]
            # Answer, stop sending, and read (and drop) what the client sends for a second before closing:
            # closing with its request unread would reset the connection and lose the answer.
            self._refused = True
            self.connections.discard(self)  # type: ignore[attr-defined]  # a refused one does not count
            if self.on_refused is not None:
                self.on_refused()
            try:
                transport.write(_refusal(cap))
                if transport.can_write_eof():
                    transport.write_eof()
            except OSError:  # the client has already gone
                transport.close()
                return
            self._deadline = self.loop.call_later(1.0, transport.close)  # type: ignore[attr-defined]
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self.header_timeout and self.header_timeout > 0:
            self._deadline = self.loop.call_later(self.header_timeout, self._expire)  # type: ignore[attr-defined]

    def _expire(self) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]


def _http_protocol(header_timeout: float, max_connections: Optional[int], app: FastAPI) -> type:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools when installed, else h11

    state = getattr(app.state, "lmforge", None)

    def refused() -> None:
        if state is not None:
            state.metrics.rejected.inc(reason="max_connections")
        logger.debug("refused a connection beyond --max_connections %s", max_connections)

    return type("LmforgeHTTPProtocol", (_ConnectionGuard, AutoHTTPProtocol),
                {"header_timeout": header_timeout, "max_connections": max_connections,
                 "on_refused": staticmethod(refused)})


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains the app's admission queue before waiting for running requests."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float,
                 on_shutdown: Optional[Callable[[], None]] = None) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: Optional[list] = None) -> None:
        if self._on_shutdown is not None:  # the other API processes drain at the same time as this one
            self._on_shutdown()
        state = getattr(self._app.state, "lmforge", None)
        if state is not None:
            for server in self.servers:  # no new connections while running requests finish
                server.close()
            logger.info("shutting down: %d running (given %.3g s to finish), %d queued (answered 503)",
                        state.limiter.running, self._shutdown_timeout, state.limiter.waiting)
            await state.shutdown(self._shutdown_timeout)
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 30.0,
                log_level: str = "info", max_connections: Optional[int] = 1024, header_timeout: float = 30.0,
                on_shutdown: Optional[Callable[[], None]] = None, **uvicorn_kwargs: Any) -> uvicorn.Server:
    """A uvicorn server for ``app`` that leaves logging to us (one line per request, no access log),
    with at most ``max_connections`` open connections and a ``header_timeout`` per request's headers."""
    # uvicorn's own grace period starts after ours and only covers sending the final events.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=5.0, lifespan="on",
                            http=_http_protocol(header_timeout, max_connections, app), **uvicorn_kwargs)
    return _DrainingServer(config, app, shutdown_timeout, on_shutdown)


class ServerThread:
    """The app served on a free loopback port in a background thread (tests, benchmarks, in-process eval).

    Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``. ``stop()`` shuts down gracefully.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 5.0,
                 log_level: str = "warning", **server_kwargs: Any) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        server_kwargs.setdefault("timeout_keep_alive", 30)
        self.server = make_server(app, self.host, self.port, shutdown_timeout=shutdown_timeout,
                                  log_level=log_level, **server_kwargs)
        self._thread = threading.Thread(target=self._run, name=f"lmforge-server-{self.port}", daemon=True)
        self._error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as e:  # noqa: BLE001 - surfaced by start()
            self._error = e

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
