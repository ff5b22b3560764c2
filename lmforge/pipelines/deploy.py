"""``lmforge deploy``: load a model (and LoRA adapters) into an engine and serve it over HTTP.

``deploy_main(DeployArguments(model="builtin:tiny", adapters=["mine=out/checkpoint-50"]))`` does
what ``lmforge deploy --model builtin:tiny --adapters mine=out/checkpoint-50`` does: any OpenAI
client can then use ``http://127.0.0.1:8000/v1`` with ``model="builtin:tiny"`` or ``model="mine"``.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Any

from lmforge.arguments import DeployArguments

logger = logging.getLogger("lmforge.serve")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_file(log_file: str) -> None:
    """Every ``lmforge.serve`` line (the request log included) also goes to ``log_file``, with times."""
    from pathlib import Path

    path = Path(log_file).resolve()
    serve_logger = logging.getLogger("lmforge.serve")
    if any(getattr(h, "baseFilename", None) == str(path) for h in serve_logger.handlers):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    serve_logger.addHandler(handler)
    if serve_logger.getEffectiveLevel() > logging.INFO:
        serve_logger.setLevel(logging.INFO)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_port(host: str, port: int, *, reuse_port: bool = False) -> Any:
    """A TCP socket bound to ``host:port`` as uvicorn binds (``SO_REUSEADDR``; ``SO_REUSEPORT`` when asked); a port
    that cannot be had fails with an error that says why and what to pass instead."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            why = "is already in use (another server?); stop it or pass another --port"
        elif e.errno == errno.EACCES:
            why = "needs privileges this user lacks (ports below 1024); pass --port 1024 or higher"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = f"cannot be listened on: --host {host} is not an address of this machine"
        else:
            why = f"cannot be listened on ({e.strerror})"
        raise OSError(f"--port {port}: {host}:{port} {why}") from None
    return sock


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will and let go: a busy port fails here, before the model loads."""
    if port == 0:
        return
    bind_port(host, port).close()


def _passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise).

    A server runs generation in many threads (one per request in flight, even when the engine
    generates one batch at a time); each gets its own OpenMP team, and spinning teams starve the
    one that works. Measured on a shared 2-core machine with the hf engine and builtin:tiny: 8
    concurrent streams took 3.6 s per request with spinning threads, 0.04 s with PASSIVE. OpenMP
    reads this once, when torch loads, so it must be set before the engine imports torch.
    """
    import os
    import sys

    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        logger.debug("torch was imported before deploy_main; OMP_WAIT_POLICY=PASSIVE may not take effect")


def deploy_main(args: DeployArguments) -> None:
    """Build the engine, then serve until SIGINT/SIGTERM (graceful: see :mod:`lmforge.serve.server`)."""
    from lmforge.utils.log import setup_logging

    setup_logging()
    if args.log_file:
        add_log_file(args.log_file)
    _passive_openmp()
    from lmforge.pipelines.infer import build_engine
    from lmforge.serve import create_app
    from lmforge.serve.auth import load_api_keys
    from lmforge.serve.server import make_server

    keys = load_api_keys(args.api_key, args.api_key_file)  # a bad key file fails before the model loads
    check_port(args.host, args.port)  # so does a busy port
    from lmforge.utils.log import mask_secret

    for key in keys:
        mask_secret(key)
    if not keys and not _is_loopback(args.host):
        logger.warning("listening on %s without --api_key: anyone who can reach this port can use the model",
                       args.host)
    if args.external_plugins:  # they may register templates the engine is about to look up
        from lmforge.registry import load_plugins

        load_plugins(args.external_plugins)
    if args.api_server_count < 1:
        raise ValueError(f"--api_server_count {args.api_server_count}: at least 1")
    if args.api_server_count > 1:
        if args.engine_process is False:
            raise ValueError("--api_server_count > 1 needs the engine in its own process; drop --engine_process false")
        args.engine_process = True
    elif args.engine_process is None:
        args.engine_process = engine_process_default(args)
    engine = build_engine(args)  # --adapters name=dir is parsed there (lmforge.infer.checkpoint.parse_adapters)
    if args.api_server_count > 1:
        return _serve_from_processes(args, engine)
    app = create_app(engine, args)
    logger.info("OpenAI-compatible server on http://%s:%d/v1 (model %r)", args.host, args.port,
                app.state.lmforge.base_name)
    make_server(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout,
                max_connections=args.max_connections, header_timeout=args.body_timeout).run()


def _serve_from_processes(args: DeployArguments, engine: Any) -> None:
    """``--api_server_count N``: this process and N - 1 more serve the port (:mod:`lmforge.serve.api_processes`)."""
    import shutil
    import socket
    import tempfile

    from lmforge.infer.data_parallel import DataParallelEngine
    from lmforge.serve import create_app
    from lmforge.serve.api_processes import ApiProcesses, listen_socket, split_limits
    from lmforge.serve.metrics import SharedMetrics
    from lmforge.serve.server import make_server

    count = args.api_server_count
    if not isinstance(engine, DataParallelEngine):
        raise ValueError(f"--api_server_count {count}: this model runs on a {type(engine).__name__}, which serves "
                         "from one process; use --api_server_count 1")
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    procs = shared = None
    metrics_dir = tempfile.mkdtemp(prefix="lmforge-metrics-")
    try:
        share = split_limits(args, engine, count)
        sock = listen_socket(args.host, args.port, reuse_port)
        share.port = sock.getsockname()[1]  # --port 0: the others bind the port this one got
        app = create_app(engine, share)
        shared = SharedMetrics(app.state.lmforge.metrics, metrics_dir, 0).start()
        procs = ApiProcesses(share, engine, count, sock, metrics_dir, reuse_port)
        logger.info("OpenAI-compatible server on http://%s:%d/v1 (model %r), %d API processes", args.host,
                    share.port, app.state.lmforge.base_name, count)
        make_server(app, args.host, share.port, shutdown_timeout=args.shutdown_timeout,
                    max_connections=args.max_connections, header_timeout=args.body_timeout,
                    on_shutdown=procs.signal_stop).run(sockets=[sock])
    finally:
        if procs is not None:
            procs.stop(args.shutdown_timeout)
        if shared is not None:
            shared.stop()
        engine.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def engine_process_default(args: DeployArguments) -> bool:
    """``--engine_process`` when not given: on for the native engine on a GPU, where the engine's own loop is
    host-bound and the server's streaming work halved what it could make (256 streams on an H200: 0.27 of the
    engine alone in one process, 0.56 with the engine in its own; benchmarks/RESULTS.md, 2026-11-30)."""
    import torch

    return args.infer_backend == "native" and torch.cuda.is_available()
