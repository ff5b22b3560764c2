"""Load test of ``lmforge deploy``: N concurrent streaming chat clients for a fixed time.

    python benchmarks/bench_serve_load.py                  # 64 clients, 60 s, builtin:tiny on CPU
    python benchmarks/bench_serve_load.py --duration 20 --clients 64 --max_tokens 16

Starts ``lmforge deploy`` as a subprocess on 127.0.0.1 on a free port (loopback only: there is no
flag to point it elsewhere), runs the official ``openai`` async client in N tasks that each send
streaming requests back to back until the time is up, then checks that nothing was lost: every
request sent ended with a finish_reason and a usage chunk, and the server's own request counter
(/metrics) agrees with the client's count. Prints p50/p90/p99 latency and time to first token,
requests/s and generated tokens/s; exits 1 on any error or lost request. The whole run is bounded:
in-flight requests get ``--grace`` seconds after ``--duration``, and the server is stopped in any case.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


@dataclass
class Stats:
    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "lmforge.cli.main", "deploy", "--model", args.model, "--host", HOST,
           "--port", str(port), "--max_concurrency", str(args.max_concurrency),
           "--max_queue", str(max(args.clients, 64)), "--max_new_tokens", str(args.max_tokens),
           "--max_batch_size", str(args.max_concurrency), "--shutdown_timeout", "5",
           "--infer_backend", args.infer_backend]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=repo)


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
            try:
                if (await http.get(url + "/health", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {timeout} s")
            await asyncio.sleep(0.2)


async def client_loop(client, model: str, k: int, stop_at: float, max_tokens: int, stats: Stats) -> None:
    i = 0
    while time.monotonic() < stop_at:
        i += 1
        stats.sent += 1
        t0 = time.perf_counter()
        first = None
        finish = usage = None
        try:
            stream = await client.chat.completions.create(
                model=model, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"Client {k}, request {i}: what is {k} + {i}?"}])
            async for chunk in stream:
                if chunk.choices:
                    c = chunk.choices[0]
                    if first is None and c.delta.content:
                        first = time.perf_counter() - t0
                    finish = c.finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage
        except Exception as e:  # noqa: BLE001 - counted and reported
            stats.errors.append(f"client {k} request {i}: {type(e).__name__}: {e}")
            continue
        if finish is None or usage is None:
            stats.errors.append(f"client {k} request {i}: stream ended without finish_reason/usage (lost)")
            continue
        stats.ok += 1
        stats.latency.append(time.perf_counter() - t0)
        if first is not None:
            stats.ttft.append(first)
        stats.tokens += usage.completion_tokens


async def run(args: argparse.Namespace) -> int:
    import httpx
    import openai

    port = _free_port()
    url = f"http://{HOST}:{port}"
    log_path = Path(tempfile.mkdtemp(prefix="lmforge-bench-")) / "server.log"
    proc = start_server(args, port, log_path)
    try:
        t_start = time.monotonic()
        await wait_ready(url, proc, args.startup_timeout)
        print(f"server ready on {url} in {time.monotonic() - t_start:.1f} s (log: {log_path})", flush=True)
        async with httpx.AsyncClient() as http:
            model = (await http.get(url + "/v1/models")).json()["data"][0]["id"]
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0,
                                    timeout=args.duration + args.grace,
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        limits=httpx.Limits(max_connections=args.clients + 8)))
        stats = Stats()
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        tasks = [asyncio.create_task(client_loop(client, model, k, stop_at, args.max_tokens, stats))
                 for k in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        for t in pending:
            t.cancel()
        elapsed = time.monotonic() - t0
        lost = stats.sent - stats.ok - len(stats.errors)
        if pending:
            stats.errors.append(f"{len(pending)} clients still waiting {args.grace} s after the end (hang)")
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(url + "/metrics")).text
        server_ok = sum(float(v) for v in re.findall(
            r'lmforge_requests_total\{endpoint="chat",model="[^"]*",status="200"\} (\S+)', metrics))
        await client.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    print(f"\n{args.clients} streaming clients x {args.duration:g} s, max_tokens {args.max_tokens}, "
          f"--max_concurrency {args.max_concurrency}, model {args.model}, backend {args.infer_backend}")
    print(f"requests: sent {stats.sent}, completed {stats.ok}, errors {len(stats.errors)}, lost {lost}; "
          f"server counted {server_ok:.0f} completed")
    if stats.latency:
        print(f"latency   p50 {_pct(stats.latency, 50):.3f} s   p90 {_pct(stats.latency, 90):.3f} s   "
              f"p99 {_pct(stats.latency, 99):.3f} s   max {max(stats.latency):.3f} s   "
              f"mean {statistics.fmean(stats.latency):.3f} s")
    if stats.ttft:
        print(f"ttft      p50 {_pct(stats.ttft, 50):.3f} s   p99 {_pct(stats.ttft, 99):.3f} s")
    print(f"throughput {stats.ok / elapsed:.2f} req/s, {stats.tokens / elapsed:.1f} generated tok/s "
          f"over {elapsed:.1f} s")
    for e in stats.errors[:10]:
        print("  error:", e)
    failed = bool(stats.errors) or lost != 0 or server_ok != stats.ok or stats.ok == 0
    print("RESULT:", "FAIL" if failed else "OK (no error, no lost request)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which clients send requests")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--max_tokens", type=int, default=16, help="max_tokens of each request")
    p.add_argument("--max_concurrency", type=int, default=8, help="the server's --max_concurrency")
    p.add_argument("--model", default="builtin:tiny", help="model for lmforge deploy")
    p.add_argument("--infer_backend", default="hf", choices=["hf", "native"], help="the server's engine")
    p.add_argument("--grace", type=float, default=120.0, help="seconds in-flight requests get after --duration")
    p.add_argument("--startup_timeout", type=float, default=180.0, help="seconds to wait for the server")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.clients < 1:
        p.error("--duration must be > 0 and --clients >= 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
