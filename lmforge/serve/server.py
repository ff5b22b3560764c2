"""Running the app under uvicorn: in the foreground (``lmforge deploy``) or in a background thread.

Shutdown is graceful in a fixed order: stop accepting connections and answer queued requests with
503 at once, let running requests finish for up to ``shutdown_timeout`` seconds, then end what is
left with a 503 (a stream gets an error event and a proper end, so clients see why, and its
generation stops like a client that went away); uvicorn then closes the connections.

Connections are bounded: ``max_connections`` is uvicorn's ``limit_concurrency`` (a request arriving
while that many connections are open gets 503 at once), and a connection must deliver a request's
headers within ``header_timeout`` seconds of opening (or of its previous response), else it is
closed. uvicorn has no such deadline (a socket that connects and sends nothing, or sends headers a
byte at a time, stays open forever), so it is added to uvicorn's HTTP protocol class here; the body
has its own deadline in the app (:func:`lmforge.serve.body.read_body`).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("lmforge.serve")


class _HeaderDeadline:
    """Mixed into uvicorn's HTTP protocol: close a connection that has no request under way ``timeout`` s after
    it opened or answered its last request (a request under way has the app's body deadline instead)."""

    header_timeout: float = 30.0

    def connection_made(self, transport: Any) -> None:
        self._deadline = None
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

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


def _http_protocol(header_timeout: float) -> type:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools when installed, else h11

    return type("LmforgeHTTPProtocol", (_HeaderDeadline, AutoHTTPProtocol), {"header_timeout": header_timeout})


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains the app's admission queue before waiting for running requests."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: Optional[list] = None) -> None:
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
                **uvicorn_kwargs: Any) -> uvicorn.Server:
    """A uvicorn server for ``app`` that leaves logging to us (one line per request, no access log),
    with at most ``max_connections`` open connections and a ``header_timeout`` per request's headers."""
    # uvicorn's own grace period starts after ours and only covers sending the final events.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=5.0, lifespan="on",
                            # uvicorn counts the connection asking as one of the limit: +1 allows exactly max_connections
                            limit_concurrency=max_connections + 1 if max_connections else None,
                            http=_http_protocol(header_timeout), **uvicorn_kwargs)
    return _DrainingServer(config, app, shutdown_timeout)


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
