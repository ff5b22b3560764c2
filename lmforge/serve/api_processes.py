"""``lmforge deploy --api_server_count N``: N HTTP processes in front of the engine process(es).

With the engine in a process of its own, the HTTP process still does every streamed token's work (its
chunk, the JSON, the SSE frame, the socket write) on one core, and on a fast GPU that core is the bound:
256 streams of a 0.5B model on an H200 kept the HTTP process at 0.95 of a core while the engine's loop
idled a third of the time (benchmarks/RESULTS.md, 2026-11-30 fourth lease). More HTTP processes split that
work. Each binds the same port with ``SO_REUSEPORT`` (the kernel spreads new connections evenly over them;
where the option is missing they share the first process's listening socket) and has its own pipe to every
engine replica (:meth:`~lmforge.infer.data_parallel.DataParallelEngine.attach`).

The first process is ``lmforge deploy`` itself: it starts the engine, the other API processes, and serves
too. ``--max_concurrency``, ``--max_queue`` and ``--max_connections`` stay totals, split evenly over the processes; ``/metrics``
(any process) reports the sum of all of them (:class:`~lmforge.serve.metrics.SharedMetrics`). On SIGTERM or
Ctrl-C each process drains its own requests; the first one tells the others and waits for them before the
engine stops.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import signal
import socket
import threading
import time
from typing import Any, Optional

logger = logging.getLogger("lmforge.serve")

METRICS_INTERVAL = 1.0  # seconds between an API process's metric snapshots


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one), with ``SO_REUSEPORT`` when asked."""
    from lmforge.pipelines.deploy import bind_port

    sock = bind_port(host, port, reuse_port=reuse_port)
    sock.listen(2048)
    return sock


def split_limits(args: Any, engine: Any, count: int) -> Any:
    """A copy of ``args`` whose ``max_concurrency``, ``max_queue`` and ``max_connections`` are one process's share of
    the totals."""
    total = args.max_concurrency or getattr(engine, "max_num_seqs", None) or 8
    if count > total:
        raise ValueError(f"--api_server_count {count}: more API processes than requests generated at once "
                         f"(--max_concurrency {total})")
    share = copy.copy(args)
    share.max_concurrency = math.ceil(total / count)
    share.max_queue = math.ceil(args.max_queue / count)
    if args.max_connections:
        share.max_connections = math.ceil(args.max_connections / count)
    return share


def _api_main(index: int, count: int, args: Any, conns: list, devices: list[str], backend: str,
              sock: Optional[socket.socket], metrics_dir: str, ready: Any) -> None:
    """API process ``index``: attach to the replicas, build the app, serve on the shared port until signalled."""
    from lmforge.infer.data_parallel import DataParallelEngine, name_process
    from lmforge.pipelines.deploy import add_log_file
    from lmforge.serve import create_app
    from lmforge.serve.metrics import SharedMetrics
    from lmforge.serve.server import make_server
    from lmforge.utils.log import mask_secret, setup_logging

    name_process(f"lmforge-api{index}")
    setup_logging()
    if args.log_file:
        add_log_file(args.log_file)
    if args.api_key:
        mask_secret(args.api_key)
    try:
        if args.external_plugins:
            from lmforge.registry import load_plugins

            load_plugins(args.external_plugins)
        engine = DataParallelEngine.attach(conns, devices, backend, index, count)
        app = create_app(engine, args)
        shared = SharedMetrics(app.state.lmforge.metrics, metrics_dir, index, METRICS_INTERVAL).start()
        if sock is None:
            sock = listen_socket(args.host, args.port, reuse_port=True)
    except BaseException as e:  # noqa: BLE001 - the first process reports it and stops
        ready.send(f"{type(e).__name__}: {e}")
        raise
    ready.send(None)
    ready.close()
    _stop_with_parent()
    try:
        make_server(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout,
                    max_connections=args.max_connections, header_timeout=args.body_timeout).run(sockets=[sock])
    finally:
        shared.stop()
        engine.close()


def _stop_with_parent() -> None:
    """Shut this API process down (gracefully, as SIGTERM does) when the first one dies without stopping it, even
    by SIGKILL: it must not go on holding the port and the engine."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        logger.warning("the first API process (pid %s) has exited: shutting down", parent.pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lmforge-parent-watch", daemon=True).start()


class ApiProcesses:
    """The API processes after the first: started next to an engine the first process owns, stopped with it."""

    def __init__(self, args: Any, engine: Any, count: int, sock: socket.socket, metrics_dir: str,
                 reuse_port: bool, start_timeout: float = 300.0):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self._stopping = False
        readies = []
        for index in range(1, count):
            mine, theirs = ctx.Pipe(duplex=False)
            conns = engine.api_connections(index)
            proc = ctx.Process(target=_api_main, name=f"lmforge-api{index}", daemon=False,
                               args=(index, count, args, conns, engine.devices, engine.backend,
                                     None if reuse_port else sock, metrics_dir, theirs))
            proc.start()
            theirs.close()
            for conn in conns:  # the child holds its own copies now; ours would hide its exit from the replicas
                conn.close()
            self.procs.append(proc)
            readies.append(mine)
        deadline = time.monotonic() + start_timeout
        for index, (proc, mine) in enumerate(zip(self.procs, readies), start=1):
            while not mine.poll(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    self.stop(0)
                    why = "exited" if not proc.is_alive() else f"did not start within {start_timeout:g} s"
                    raise RuntimeError(f"API process {index} {why} (see its log lines above)")
            try:
                error = mine.recv()
            except EOFError:
                error = "exited before it was ready"
            if error is not None:
                self.stop(0)
                raise RuntimeError(f"API process {index}: {error}")
        threading.Thread(target=self._watch, name="lmforge-api-watch", daemon=True).start()
        logger.info("%d API processes serve the port (pids %s and this one)", count,
                    ", ".join(str(p.pid) for p in self.procs))

    def _watch(self) -> None:
        """Say so when an API process dies while serving: the others keep the port, with fewer cores."""
        from multiprocessing.connection import wait

        alive = {p.sentinel: p for p in self.procs}
        while alive:
            for sentinel in wait(list(alive)):
                proc = alive.pop(sentinel)
                if not self._stopping:
                    logger.error("API process %s (pid %s) exited with status %s; the other processes go on serving",
                                 proc.name, proc.pid, proc.exitcode)

    def signal_stop(self) -> None:
        """Ask each API process to shut down gracefully (it drains its own requests)."""
        self._stopping = True
        for p in self.procs:
            if p.is_alive() and p.pid:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to ``timeout`` s (+5 for the last events), then kill what is left."""
        self.signal_stop()
        deadline = time.monotonic() + timeout + 5.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                logger.warning("API process %s did not stop in time; killing it", p.name)
                p.kill()
                p.join(5)
