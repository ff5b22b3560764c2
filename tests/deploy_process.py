"""``lmforge deploy`` in a subprocess for the CLI tests (not a test file): a free port, start, wait for /health."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import repo_env  # noqa: E402,F401 - the benchmarks' subprocess environment; test_ui_browser imports it here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_deploy(flags: list[str], port: int, env: dict | None = None, timeout: float = 120) -> subprocess.Popen:
    """``lmforge deploy --port PORT FLAGS...`` (output on the process's stdout), once /health answers 200."""
    cmd = [sys.executable, "-m", "lmforge.cli.main", "deploy", "--port", str(port), *flags]
    env = repo_env(env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "deploy did not come up"
            time.sleep(0.2)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
