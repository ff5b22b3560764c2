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

Fixed work, engine-only figure beside the server's (``--requests N``, with ``--engine_baseline``):

    python benchmarks/bench_serve_load.py --model 0.5b --infer_backend native --clients 256 \
        --max_tokens 256 --requests 512 --engine_baseline

N seeded requests of token-id prompts (``--prompt_tokens`` long, or ``--workload nano``: prompt and
output lengths uniform in 100..1024), each asking for exactly its ``max_tokens`` (``ignore_eos``) at
``--temperature``, sent as streaming /v1/completions by ``--clients`` clients that share the list, spread over
``--client_procs`` processes (default clients/32): one process parsing every chunk through the openai client
would otherwise cap the figure; the busiest client process's share of a core is printed, with a warning near 1.
With ``--engine_baseline`` the same requests are first answered by the engine alone, in a child
process (built by ``lmforge deploy``'s own ``build_engine`` from the same flags; its GPU memory is
freed when it exits), all submitted at once with the same sampling. Prints both generated-token
rates and their ratio, the CPU time each process used per generated token (all threads: on a CPU
engine the server's host work is the difference), errors, lost requests (sent, never finished), TTFT
p50/p95 and latency p50/p95; a request whose usage is not exactly its max_tokens counts as an error.
``--native_on_cpu`` runs the native engine on CPU (builtin:tiny) to measure the server's own work there; with
``--model micro`` (one layer of width 64, float32) the model costs almost nothing on CPU, so the engine's and
the server's host work set the pace as they do on a GPU.

``--repeat R`` measures R times against one server (and R times with the engine alone, in one child): repetition r
uses the seed ``--seed`` + r for both, so no repetition reuses another's prompts (no prefix-cache hits between
them), and the server's and the engine's start-up is paid once. Each repetition prints its own report, then the
ratios' median and range; server runs on one machine spread by 15% or more, so one pair says little.

With the native engine, the run's mean time to first token is split by the server's clocks (/metrics): before
the HTTP handler started (client, sockets, the HTTP process's event loop), waiting for a concurrency slot, the
engine process preparing the stream, the engine from arrival to first token (of it waiting for a step), and the
rest (the pipes and the HTTP process's own work between them).
"""
from __future__ import annotations

import argparse
import asyncio
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MICRO, QWEN25_05B, QWEN25_7B, make_model_dir, model_vocab, offline_generate,  # noqa: E402
                    repo_env, token_workload)

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


def _cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system, all threads) so far of a process and each of its live descendants (engine
    processes, more API processes), by pid with the process's name (Linux /proc; empty elsewhere)."""
    def stat(p: int) -> tuple[str, list[str]]:
        text = Path(f"/proc/{p}/stat").read_text()
        return text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()

    out: dict[int, tuple[str, float]] = {}
    try:
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    children.setdefault(int(stat(int(d.name))[1][1]), []).append(int(d.name))
                except (OSError, IndexError, ValueError):
                    continue
        tick, pids = os.sysconf("SC_CLK_TCK"), [pid]
        while pids:
            p = pids.pop()
            try:
                name, fields = stat(p)
            except (OSError, IndexError, ValueError):
                continue
            out[p] = (name, (int(fields[11]) + int(fields[12])) / tick)
            pids += children.get(p, [])
    except (OSError, ValueError):
        pass
    return out


def _cpu_split(root: int, before: dict, after: dict) -> tuple[list[float], float]:
    """CPU seconds between two ``_cpu_seconds`` readings: each HTTP process's (the server itself and its
    ``lmforge-api*`` processes), and the rest together (the engine processes)."""
    http, rest = [], 0.0
    for p, (name, seconds) in after.items():
        spent = seconds - before.get(p, (name, 0.0))[1]
        if p == root or name.startswith("lmforge-api"):
            http.append(spent)
        else:
            rest += spent
    return http or [float("nan")], rest


async def _settle_metrics(args: argparse.Namespace) -> None:
    """With several API processes, the others' counts reach /metrics within a second: wait that long."""
    if args.api_server_count > 1:
        from lmforge.serve.api_processes import METRICS_INTERVAL

        await asyncio.sleep(METRICS_INTERVAL + 0.5)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def deploy_options(args: argparse.Namespace) -> dict:
    """The engine's ``lmforge deploy`` options: the server gets them as flags, the engine-only run as
    DeployArguments fields, so both build the same engine."""
    opts: dict = {"model": args.model_path, "infer_backend": args.infer_backend,
                  "max_new_tokens": args.max_tokens}
    if args.max_model_len:
        opts["max_model_len"] = args.max_model_len
    if args.torch_dtype:
        opts["torch_dtype"] = args.torch_dtype
    if args.infer_backend == "native":
        opts.update(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    gpu_memory_utilization=args.gpu_memory_utilization, stream_interval=args.stream_interval)
        if args.prefill_wait_steps:
            opts["prefill_wait_steps"] = args.prefill_wait_steps
        if args.async_scheduling == "false":
            opts["async_scheduling"] = False
        if args.max_concurrency:
            opts["max_concurrency"] = args.max_concurrency
    else:
        opts["max_concurrency"] = opts["max_batch_size"] = args.max_concurrency or 8
    if args.engine_process != "auto":  # auto: deploy's default (on for the native engine on a GPU)
        opts["engine_process"] = args.engine_process == "true"
    if args.api_server_count != 1:
        opts["api_server_count"] = args.api_server_count
    return opts


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "lmforge.cli.main", "deploy", "--host", HOST, "--port", str(port),
           "--max_queue", str(max(args.clients, 64)), "--shutdown_timeout", "5"]
    for k, v in deploy_options(args).items():
        cmd += [f"--{k}", str(v)]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=repo_env(), stdout=log, stderr=subprocess.STDOUT, cwd=repo)


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
        try:
            stream = await client.chat.completions.create(
                model=model, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"Client {k}, request {i}: what is {k} + {i}?"}])
            first, finish, usage = await read_stream(stream, t0, lambda c: c.delta.content)
        except Exception as e:  # noqa: BLE001 - counted and reported
            stats.errors.append(f"client {k} request {i}: {type(e).__name__}: {e}")
            continue
        record(stats, f"client {k} request {i}", t0, first, finish, usage)


async def read_stream(stream, t0: float, text_of) -> tuple[float | None, str | None, object]:
    """(time to the first text, finish reason, usage) of one streamed response."""
    first = finish = usage = None
    async for chunk in stream:
        if chunk.choices:
            c = chunk.choices[0]
            if first is None and text_of(c):
                first = time.perf_counter() - t0
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return first, finish, usage


def record(stats: Stats, what: str, t0: float, first, finish, usage, want_tokens: int | None = None) -> None:
    """Count a finished stream: lost (no finish reason or usage), the wrong length, or ok with its timings."""
    if finish is None or usage is None:
        stats.errors.append(f"{what}: stream ended without finish_reason/usage (lost)")
        return
    if want_tokens is not None and usage.completion_tokens != want_tokens:
        stats.errors.append(f"{what}: {usage.completion_tokens} tokens, asked for exactly {want_tokens} (ignore_eos)")
        return
    stats.ok += 1
    stats.latency.append(time.perf_counter() - t0)
    if first is not None:
        stats.ttft.append(first)
    stats.tokens += usage.completion_tokens


def workloads(args: argparse.Namespace) -> list[list[tuple[list[int], int]]]:
    """The fixed requests of each repetition r (seed ``--seed`` + r): (prompt token ids, max_tokens), the same for
    the engine-only and served runs."""
    vocab = model_vocab(args.model_path)
    lengths = ((100, 1024), (100, 1024)) if args.workload == "nano" else ((args.prompt_tokens,) * 2,
                                                                          (args.max_tokens,) * 2)
    return [token_workload(args.requests, *lengths, vocab, seed=args.seed + rep) for rep in range(args.repeat)]


def engine_only(args: argparse.Namespace) -> list[dict]:
    """The engine alone on each repetition's fixed requests, all at once (runs in the child process)."""
    from lmforge.arguments import DeployArguments
    from lmforge.infer import RequestConfig
    from lmforge.pipelines.infer import build_engine

    opts = {k: v for k, v in deploy_options(args).items()
            if k not in ("max_concurrency", "engine_process", "api_server_count")}
    engine = build_engine(DeployArguments(**opts))
    try:
        cfg = RequestConfig(temperature=args.temperature, ignore_eos=True)
        works = workloads(args)
        offline_generate(engine, [(ids, 4) for ids, _ in works[0][:8]], cfg)  # warm-up, as the server gets
        from lmforge.utils.gc_heap import freeze

        freeze()  # as the server's processes do once started (lmforge/utils/gc_heap.py)
        return [_engine_run(engine, work, cfg, args.seed + rep if args.seeded_sampling else None)
                for rep, work in enumerate(works)]
    finally:
        if hasattr(engine, "close"):
            engine.close()


def _engine_run(engine, work: list, cfg, seed: int | None) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, cpu0, counts0 = time.perf_counter(), time.process_time(), dict(getattr(engine, "stats", None) or {})
    rows = offline_generate(engine, work, cfg, seed=seed)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    counts1 = dict(getattr(engine, "stats", None) or {})
    tokens = sum(len(r[0].token_ids) for r in rows)
    short = sum(1 for r, (_, m) in zip(rows, work) if len(r[0].token_ids) != m)
    steps = counts1.get("steps", 0) - counts0.get("steps", 0)
    per_step = (counts1.get("tokens", 0) - counts0.get("tokens", 0)) / steps if steps else None
    graph_share = (counts1.get("graph_steps", 0) - counts0.get("graph_steps", 0)) / steps if steps else None
    return {"requests": len(work), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "wrong_length": short, "cpu_s": round(cpu, 2),
            "steps": steps, "tokens_per_step": per_step, "graph_share": graph_share}


def run_engine_child(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="lmforge-bench-")) / "engine_only.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--engine_only_json", str(out)]
    print("engine-only run (child process) ...", flush=True)
    subprocess.run(cmd, check=True, timeout=args.startup_timeout + (args.grace + 600) * args.repeat)
    return json.loads(out.read_text())


async def fixed_client(client, model: str, work: list, next_i: list[int], args: argparse.Namespace,
                       stats: Stats, seed0: int) -> None:
    """Takes the next request of the shared list until none is left; streams it and checks it."""
    while next_i[0] < len(work):
        i = next_i[0]
        next_i[0] += 1
        ids, m = work[i]
        stats.sent += 1
        t0 = time.perf_counter()
        extra = {"seed": seed0 + i} if args.seeded_sampling else {}
        try:
            stream = await client.completions.create(
                model=model, prompt=ids, max_tokens=m, temperature=args.temperature, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **extra)
            first, finish, usage = await read_stream(stream, t0, lambda c: c.text)
        except Exception as e:  # noqa: BLE001 - counted and reported
            stats.errors.append(f"request {i}: {type(e).__name__}: {e}")
            continue
        record(stats, f"request {i}", t0, first, finish, usage, want_tokens=m)


def _openai_client(url: str, clients: int, limit: float):
    import httpx
    import openai

    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=limit,
                              http_client=openai.DefaultAsyncHttpxClient(
                                  limits=httpx.Limits(max_connections=clients + 8)))


def client_process(url: str, model: str, work: list, clients: int, args: argparse.Namespace,
                   limit: float, seed0: int) -> tuple[Stats, float, int, float, float]:
    """One client process of ``--client_procs``: ``clients`` streaming clients over its share of the requests.
    Returns its stats, its CPU seconds, the requests still waiting at ``limit`` (hangs), and when (wall clock)
    its first request went out and its last one ended: the run's time excludes the processes' start-up."""
    async def go() -> tuple[Stats, float, int, float, float]:
        client, stats, next_i = _openai_client(url, clients, limit), Stats(), [0]
        cpu0, start = time.process_time(), time.time()
        tasks = [asyncio.create_task(fixed_client(client, model, work, next_i, args, stats, seed0))
                 for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=limit)
        for t in pending:
            t.cancel()
        cpu, end = time.process_time() - cpu0, time.time()
        await client.close()
        return stats, cpu, len(pending), start, end
    return asyncio.run(go())


async def fixed_clients(url: str, model: str, work: list, args: argparse.Namespace, limit: float, seed0: int
                        ) -> tuple[Stats, list[float], int, float]:
    """The fixed requests over ``args.clients`` clients in ``args.client_procs`` processes (request i goes to
    process i mod P): one Python process parsing every stream's chunks through the openai client tops out
    near 10k chunks/s, which a fast server outruns; the benchmark must not measure its own client."""
    import concurrent.futures
    import multiprocessing

    procs = args.client_procs
    shares = [args.clients // procs + (j < args.clients % procs) for j in range(procs)]
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = await asyncio.gather(*(loop.run_in_executor(pool, client_process, url, model, work[j::procs],
                                                            shares[j], args, limit, seed0) for j in range(procs)))
    total = Stats()
    for stats, *_ in parts:
        total.sent += stats.sent
        total.ok += stats.ok
        total.tokens += stats.tokens
        total.errors += stats.errors
        total.latency += stats.latency
        total.ttft += stats.ttft
    seconds = max(p[4] for p in parts) - min(p[3] for p in parts)
    return total, [p[1] for p in parts], sum(p[2] for p in parts), seconds


def _server_completed(metrics: str, endpoint: str) -> float:
    return sum(float(v) for v in re.findall(
        rf'lmforge_requests_total\{{endpoint="{endpoint}",model="[^"]*",status="200"\}} (\S+)', metrics))


def _engine_counts(metrics: str) -> dict[str, float]:
    """The native engine's counters from /metrics (``lmforge_engine_<key>_total``; NaN without them): steps,
    sampled tokens, CUDA-graph steps and the per-sequence seconds (queue, first token, the engine process's
    stream preparation)."""
    def one(key: str) -> float:
        m = re.search(rf"^lmforge_engine_{key}_total (\S+)$", metrics, re.M)
        return float(m.group(1)) if m else float("nan")

    def hist(name: str, part: str) -> float:  # a server histogram's _sum or _count, over its label sets
        return sum(float(v) for v in re.findall(rf"^lmforge_{name}_{part}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))

    out = {k: one(k) for k in ("steps", "sampled_tokens", "graph_steps", "timed_sequences", "queue_seconds",
                               "first_token_seconds", "prepared_streams", "prepare_seconds", "request_transit_seconds",
                               "reply_batches", "reply_outbox_seconds", "reply_pipe_seconds", "reply_loop_seconds")}
    for name in ("time_to_first_token_seconds", "queue_wait_seconds"):
        out[name] = hist(name, "sum")
        out[name + "_n"] = hist(name, "count")
    return out


def _time_split(e0: dict, e1: dict, ttft: list[float]) -> str | None:
    """Where a request's time to first token went (means over the run), from the client's clock, the HTTP
    process's (request handler to first streamed token; of it, waiting for a concurrency slot) and the engine
    process's (stream preparation; reaching the engine to the first token, of it waiting for a step)."""
    n = e1["timed_sequences"] - e0["timed_sequences"]
    if not ttft or not n > 0:
        return None

    def mean(key: str, count: str, scale: float = 1000.0) -> float:
        k = e1[count] - e0[count]
        return scale * (e1[key] - e0[key]) / k if k > 0 else 0.0

    queue, first = mean("queue_seconds", "timed_sequences"), mean("first_token_seconds", "timed_sequences")
    prep = mean("prepare_seconds", "prepared_streams")
    server, slot = (mean("time_to_first_token_seconds", "time_to_first_token_seconds_n"),
                    mean("queue_wait_seconds", "queue_wait_seconds_n"))
    client = 1000 * statistics.fmean(ttft)
    text = (f"ttft mean {client:.1f} ms: before the HTTP handler (client, sockets, the HTTP process's event loop) "
            f"{client - server:.1f}; handler to first token {server:.1f} = waiting for a slot {slot:.1f} + engine "
            f"process preparing {prep:.1f} + engine to first token {first:.1f} (of it waiting for a step "
            f"{queue:.1f}) + the rest (pipes, the HTTP process) {server - slot - prep - first:.1f}")
    transit = mean("request_transit_seconds", "prepared_streams")
    if transit == transit and e1["reply_batches"] == e1["reply_batches"]:  # not NaN: an engine process's counters
        text += (f"\n  of the rest: the request's message to the engine process {transit:.1f}; each answer message "
                 f"(mean over {e1['reply_batches'] - e0['reply_batches']:.0f}, this HTTP process's) in the engine "
                 f"process's outbox {mean('reply_outbox_seconds', 'reply_batches'):.2f}, pickling and the pipe "
                 f"{mean('reply_pipe_seconds', 'reply_batches'):.2f}, reaching the streams on the event loop "
                 f"{mean('reply_loop_seconds', 'reply_batches'):.2f}")
    return text


async def measure(args: argparse.Namespace, url: str, model: str, client, work: list, proc: subprocess.Popen,
                  limit: float, endpoint: str, seed0: int) -> dict:
    """One load run against the running server: the client's stats and the server's counters around it."""
    import httpx

    fixed = bool(work)
    stats = Stats()
    await _settle_metrics(args)
    async with httpx.AsyncClient() as http:
        text = (await http.get(url + "/metrics")).text
        before, engine0 = _server_completed(text, endpoint), _engine_counts(text)
    t0, cpu0, client_cpu0 = time.monotonic(), _cpu_seconds(proc.pid), time.process_time()
    hung, seconds = 0, None
    if fixed and args.client_procs > 1:
        stats, client_cpus, hung, seconds = await fixed_clients(url, model, work, args, limit, seed0)
    else:
        if fixed:
            next_i = [0]
            tasks = [asyncio.create_task(fixed_client(client, model, work, next_i, args, stats, seed0))
                     for _ in range(args.clients)]
        else:
            stop_at = t0 + args.duration
            tasks = [asyncio.create_task(client_loop(client, model, k, stop_at, args.max_tokens, stats))
                     for k in range(args.clients)]
        _, pending = await asyncio.wait(tasks, timeout=limit)
        for t in pending:
            t.cancel()
        hung, client_cpus = len(pending), [time.process_time() - client_cpu0]
    http_cpus, child_cpu = _cpu_split(proc.pid, cpu0, _cpu_seconds(proc.pid))
    elapsed = seconds or time.monotonic() - t0
    if hung:
        stats.errors.append(f"{hung} clients still waiting after {limit:g} s (hang)")
    await _settle_metrics(args)
    async with httpx.AsyncClient() as http:
        text = (await http.get(url + "/metrics")).text
        server_ok, engine1 = _server_completed(text, endpoint) - before, _engine_counts(text)
    return {"stats": stats, "work": work, "elapsed": elapsed, "http_cpus": http_cpus, "child_cpu": child_cpu,
            "client_cpus": client_cpus, "server_ok": server_ok, "engine0": engine0, "engine1": engine1}


async def run(args: argparse.Namespace, baselines: list[dict] | None) -> int:
    import httpx

    fixed = args.requests > 0
    limit = args.duration + args.grace  # fixed work: the whole run's bound; timed: the last request's
    port = _free_port()
    url = f"http://{HOST}:{port}"
    log_path = Path(tempfile.mkdtemp(prefix="lmforge-bench-")) / "server.log"
    endpoint = "completions" if fixed else "chat"
    proc = start_server(args, port, log_path)
    runs = []
    try:
        t_start = time.monotonic()
        await wait_ready(url, proc, args.startup_timeout)
        print(f"server ready on {url} in {time.monotonic() - t_start:.1f} s (log: {log_path})", flush=True)
        async with httpx.AsyncClient() as http:
            model = (await http.get(url + "/v1/models")).json()["data"][0]["id"]
        client = _openai_client(url, args.clients, limit)
        works = workloads(args) if fixed else [[]]  # timed chat: one repetition, no fixed requests
        if fixed:  # warm-up as the engine-only run had: 8 short requests, not counted
            await asyncio.gather(*(fixed_client(client, model, [(ids, 4)], [0], args, Stats(), args.seed)
                                   for ids, _ in works[0][:8]))
        for rep, work in enumerate(works):
            runs.append(await measure(args, url, model, client, work, proc, limit, endpoint, args.seed + rep))
            if args.repeat > 1:
                print(f"repetition {rep + 1} of {args.repeat} done", flush=True)
        await client.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    results, failed = [], False
    for rep, m in enumerate(runs):
        if args.repeat > 1:
            print(f"\n=== repetition {rep + 1} of {args.repeat} (seed {args.seed + rep})")
        result, bad = report(args, m, baselines[rep] if baselines else None)
        results.append(result)
        failed = failed or bad
    if len(results) > 1 and baselines:
        ratios = sorted(r["ratio"] for r in results)
        engine = sorted(b["tokens_per_s"] for b in baselines)
        server = sorted(r["server_tok_s"] for r in results)
        print(f"\nover {len(results)} repetitions: server / engine-only median {statistics.median(ratios):.3f} "
              f"(range {ratios[0]:.3f}..{ratios[-1]:.3f}); server tok/s median {statistics.median(server):.1f} "
              f"({server[0]:.1f}..{server[-1]:.1f}); engine alone median {statistics.median(engine):.1f} "
              f"({engine[0]:.1f}..{engine[-1]:.1f})")
    print("RESULT:", "FAIL" if failed else "OK (no error, no lost request)")
    out = results[0] if len(results) == 1 else {"runs": results, "ratio_median": (
        statistics.median(r["ratio"] for r in results) if baselines else None)}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 1 if failed else 0


def report(args: argparse.Namespace, m: dict, baseline: dict | None) -> tuple[dict, bool]:
    """Print one load run's figures (beside the engine alone's on the same requests); its result and whether it
    failed (an error, a lost request, a count that disagrees with the server's)."""
    stats, work, elapsed, server_ok = m["stats"], m["work"], m["elapsed"], m["server_ok"]
    http_cpus, child_cpu, client_cpus = m["http_cpus"], m["child_cpu"], m["client_cpus"]
    engine0, engine1 = m["engine0"], m["engine1"]
    fixed = bool(work)
    server_cpu = sum(http_cpus) + child_cpu
    lost = (len(work) if fixed else stats.sent) - stats.ok - len(stats.errors)
    conc = deploy_options(args).get("max_concurrency", f"max_num_seqs {args.max_num_seqs}")
    if fixed:
        shape = ("nano lengths (100..1024)" if args.workload == "nano"
                 else f"{args.prompt_tokens} prompt + {args.max_tokens} new tokens")
        print(f"\n{args.requests} requests ({shape}, temperature {args.temperature}, ignore_eos) over "
              f"{args.clients} streaming clients, --max_concurrency {conc}, model {args.model}, "
              f"backend {args.infer_backend}")
    else:
        print(f"\n{args.clients} streaming clients x {args.duration:g} s, max_tokens {args.max_tokens}, "
              f"--max_concurrency {conc}, model {args.model}, backend {args.infer_backend}")
    print(f"requests: sent {stats.sent}, completed {stats.ok}, errors {len(stats.errors)}, lost {lost}; "
          f"server counted {server_ok:.0f} completed")
    if stats.latency:
        print(f"latency   p50 {_pct(stats.latency, 50):.3f} s   p95 {_pct(stats.latency, 95):.3f} s   "
              f"p99 {_pct(stats.latency, 99):.3f} s   max {max(stats.latency):.3f} s   "
              f"mean {statistics.fmean(stats.latency):.3f} s")
    if stats.ttft:
        print(f"ttft      p50 {_pct(stats.ttft, 50) * 1000:.1f} ms   p95 {_pct(stats.ttft, 95) * 1000:.1f} ms   "
              f"p99 {_pct(stats.ttft, 99) * 1000:.1f} ms")
    server_tps = stats.tokens / elapsed
    busiest = max(client_cpus) / elapsed
    print(f"client CPU: {len(client_cpus)} process(es), busiest at {busiest:.0%} of a core"
          + ("  WARNING: a saturated client process bounds this figure (raise --client_procs)"
             if busiest > 0.85 else ""))
    http_core = max(http_cpus) / elapsed  # an HTTP process: one GIL, so about one core at most
    print(f"server CPU: {len(http_cpus)} HTTP process(es), busiest at {http_core:.0%} of a core "
          f"(all: {' '.join(f'{c / elapsed:.0%}' for c in http_cpus)}), engine process(es) {child_cpu / elapsed:.0%}"
          + ("  (an HTTP process is near a whole core: it bounds this figure; try --api_server_count)"
             if http_core > 0.85 else ""))
    print(f"throughput {stats.ok / elapsed:.2f} req/s, {server_tps:.1f} generated tok/s over {elapsed:.1f} s")
    steps = engine1["steps"] - engine0["steps"]
    batch = ((engine1["sampled_tokens"] - engine0["sampled_tokens"]) / steps if steps > 0
             else float("nan"))  # NaN: an engine without counters
    if steps > 0:
        graphs = (engine1["graph_steps"] - engine0["graph_steps"]) / steps
        print(f"engine: {steps:.0f} steps ({graphs:.0%} from CUDA graphs), {batch:.1f} sampled tokens per step, "
              f"{1000 * elapsed / steps:.2f} ms per step"
              + (f" (engine alone: {baseline['steps']} steps, {baseline['tokens_per_step']:.1f} tokens per step, "
                 f"{1000 * baseline['seconds'] / baseline['steps']:.2f} ms per step, "
                 f"{baseline.get('graph_share') or 0:.0%} from CUDA graphs)"
                 if baseline and baseline.get("steps") else ""))
    split = _time_split(engine0, engine1, stats.ttft)
    if split:
        print(split)
    result = {"requests": len(work) or stats.sent, "completed": stats.ok, "errors": len(stats.errors), "lost": lost,
              "server_counted": server_ok, "server_tok_s": round(server_tps, 1), "seconds": round(elapsed, 2),
              "server_cpu_s": round(server_cpu, 2), "server_engine_cpu_s": round(child_cpu, 2),
              "client_procs": len(client_cpus), "client_busiest_core": round(busiest, 2),
              "http_process_core": round(http_core, 2), "http_processes": len(http_cpus),
              "engine_steps": steps, "engine_tokens_per_step": round(batch, 1),
              "ttft_p50_ms": round(_pct(stats.ttft, 50) * 1000, 1),
              "ttft_p95_ms": round(_pct(stats.ttft, 95) * 1000, 1),
              "latency_p50_s": round(_pct(stats.latency, 50), 3), "latency_p95_s": round(_pct(stats.latency, 95), 3)}
    bad_baseline = False
    if baseline is not None:
        ratio = server_tps / baseline["tokens_per_s"]
        result.update(engine_only=baseline, ratio=round(ratio, 3))
        print(f"\n{'':14}{'tok/s':>12}{'tokens':>10}{'seconds':>10}")
        b = baseline
        print(f"{'engine only':14}{b['tokens_per_s']:>12.1f}{b['tokens']:>10}{b['seconds']:>10.2f}")
        print(f"{'server':14}{server_tps:>12.1f}{stats.tokens:>10}{elapsed:>10.2f}")
        print(f"server / engine-only = {ratio:.3f}")
        if b.get("cpu_s") and stats.tokens:  # all threads of each process: the server's host work shows here
            print(f"CPU ms per generated token: engine only {1000 * b['cpu_s'] / b['tokens']:.3f}, "
                  f"server {1000 * server_cpu / stats.tokens:.3f} (of it in engine processes: "
                  f"{1000 * child_cpu / stats.tokens:.3f})")
        if baseline["wrong_length"]:
            bad_baseline = True
            print(f"  error: the engine-only run gave {baseline['wrong_length']} outputs of the wrong length")
    for e in stats.errors[:10]:
        print("  error:", e)
    failed = bool(stats.errors) or lost != 0 or server_ok != stats.ok or stats.ok == 0 or bad_baseline
    return result, failed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds during which clients send requests (with --requests: the run's bound, + --grace)")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--max_tokens", type=int, default=16, help="max_tokens of each request")
    p.add_argument("--max_concurrency", type=int, default=None,
                   help="the server's --max_concurrency (default: 8 for hf, the server's own for native)")
    p.add_argument("--model", default="builtin:tiny", help="model for lmforge deploy (0.5b, 7b, micro: random weights)")
    p.add_argument("--infer_backend", default="hf", choices=["hf", "native"], help="the server's engine")
    p.add_argument("--grace", type=float, default=120.0, help="seconds in-flight requests get after --duration")
    p.add_argument("--startup_timeout", type=float, default=180.0, help="seconds to wait for the server")
    p.add_argument("--requests", type=int, default=0,
                   help="fixed work: this many seeded token-id requests shared by the clients (0: timed chat)")
    p.add_argument("--workload", default="fixed", choices=["fixed", "nano"],
                   help="with --requests: fixed (--prompt_tokens, --max_tokens) or nano (both uniform in 100..1024)")
    p.add_argument("--prompt_tokens", type=int, default=128, help="with --requests: prompt length")
    p.add_argument("--temperature", type=float, default=0.6, help="with --requests: sampling temperature")
    p.add_argument("--seeded_sampling", action="store_true", help="with --requests: request i sends seed + i")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed requests")
    p.add_argument("--client_procs", type=int, default=None,
                   help="with --requests: client processes (default: clients/32, at most the CPU count - 2)")
    p.add_argument("--engine_baseline", action="store_true",
                   help="with --requests: first answer the same requests with the engine alone (child process)")
    p.add_argument("--max_model_len", type=int, default=None, help="the engine's (default: prompt + output + 16)")
    p.add_argument("--torch_dtype", default=None, help="the engine's weights dtype (default: the server's)")
    p.add_argument("--max_num_seqs", type=int, default=256, help="native: sequences decoded together")
    p.add_argument("--stream_interval", type=int, default=1, help="native: tokens per streamed chunk (the server's)")
    p.add_argument("--engine_process", default="auto", choices=["auto", "true", "false"],
                   help="the server's engine in a process of its own (auto: deploy's default, on for native on a GPU)")
    p.add_argument("--api_server_count", type=int, default=1, help="the server's HTTP processes")
    p.add_argument("--prefill_wait_steps", type=int, default=0, help="native: steps new prompts may wait")
    p.add_argument("--async_scheduling", default="true", choices=["true", "false"],
                   help="native: launch each step before the previous one's tokens are read back")
    p.add_argument("--max_num_batched_tokens", type=int, default=8192, help="native: tokens per step")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.85, help="native: share of GPU memory")
    p.add_argument("--native_on_cpu", action="store_true",
                   help="native: run the engine on CPU (LMFORGE_NATIVE_ALLOW_CPU=1) to measure the server's host work")
    p.add_argument("--cache", default="/tmp/lmforge-bench", help="where --model 0.5b/7b is written")
    p.add_argument("--repeat", type=int, default=1,
                   help="with --requests: measure this many times against one server (and the engine alone), "
                        "repetition r with seed --seed + r; prints each and the ratios' median")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--engine_only_json", default=None, help=argparse.SUPPRESS)  # the child's output
    args = p.parse_args(argv)
    if args.native_on_cpu:  # read by NativeEngine, in the engine-only child and the server alike
        os.environ["LMFORGE_NATIVE_ALLOW_CPU"] = "1"
    if args.duration <= 0 or args.clients < 1 or args.requests < 0:
        p.error("--duration must be > 0, --clients >= 1 and --requests >= 0")
    if args.client_procs is None:
        args.client_procs = max(1, min(args.clients // 32, (os.cpu_count() or 1) - 2)) if args.requests else 1
    if args.client_procs < 1 or args.client_procs > args.clients or (args.client_procs > 1 and not args.requests):
        p.error("--client_procs must be between 1 and --clients, and above 1 only with --requests")
    if args.repeat < 1 or (args.repeat > 1 and not args.requests):
        p.error("--repeat must be >= 1, and above 1 only with --requests")
    if args.engine_baseline and not args.requests:
        p.error("--engine_baseline needs --requests N (the same fixed requests for both runs)")
    if args.model in ("0.5b", "7b", "micro"):
        spec, name = {"0.5b": (QWEN25_05B, "qwen2.5-0.5b-arch"), "7b": (QWEN25_7B, "qwen2.5-7b-arch"),
                      "micro": (MICRO, "micro")}[args.model]
        # decodable: every streamed token carries text, as a trained model's do (see make_model_dir)
        args.model_path = str(make_model_dir(spec, Path(args.cache) / f"{name}-decodable", decodable=True,
                                             dtype="float32" if args.model == "micro" else "bfloat16"))
    else:
        args.model_path = args.model
    if args.requests and args.max_model_len is None:
        args.max_model_len = (2048 if args.workload == "nano" else args.prompt_tokens + args.max_tokens) + 16
    if args.engine_only_json:
        Path(args.engine_only_json).write_text(json.dumps(engine_only(args)))
        return 0
    baselines = run_engine_child(args, argv) if args.engine_baseline else None
    for b in baselines or []:
        print(f"engine only: {b}", flush=True)
    return asyncio.run(run(args, baselines))


if __name__ == "__main__":
    sys.exit(main())
