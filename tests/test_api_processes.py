"""``lmforge deploy --api_server_count N``: several HTTP processes in front of one engine process.

The replica answers each API process on its own pipe (message ids ``i, i + N, ...``), a step's batch of
stream answers is split between them, an API process that goes away has its streams stopped while the others
go on, the metrics of all processes add up at any one of them, and the real CLI serves the official client
from two processes and shuts both down on SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge.infer import InferRequest, RequestConfig
from lmforge.serve.metrics import Counter, Gauge, Histogram, ServerMetrics, SharedMetrics

sys.path.insert(0, str(Path(__file__).parent))
from deploy_process import free_port, start_deploy  # noqa: E402

QUESTIONS = [f"What is {a} + {b}?" for a, b in zip(range(10, 22), range(30, 42))]


# ---- metrics of several processes -----------------------------------------------------------------------------

def test_counters_histograms_and_gauges_add_up_over_processes():
    c = Counter("c", "help", ("model",))
    c.inc(2, model="a")
    other = Counter("c", "help", ("model",))
    other.inc(3, model="a")
    other.inc(1, model="b")
    assert c.render([other.snapshot()])[2:] == ['c{model="a"} 5', 'c{model="b"} 1']
    h = Histogram("h", "help", buckets=(1, 2))
    h.observe(0.5)
    h2 = Histogram("h", "help", buckets=(1, 2))
    h2.observe(1.5)
    h2.observe(9)
    lines = h.render([h2.snapshot()])
    assert 'h_bucket{le="1"} 1' in lines and 'h_bucket{le="2"} 2' in lines and 'h_bucket{le="+Inf"} 3' in lines
    assert "h_sum 11" in lines and "h_count 3" in lines
    assert Gauge("g", "help", lambda: 2).render([3.0, 1.0])[-1] == "g 6"


def test_shared_metrics_render_the_sum_of_every_process(tmp_path):
    def metrics(running):
        return ServerMetrics(lambda: running, lambda: 0, 4, 8)

    a, b = metrics(1), metrics(2)
    sa, sb = SharedMetrics(a, tmp_path, 0), SharedMetrics(b, tmp_path, 1)
    a.record(endpoint="chat", model="m", status=200, latency=0.1, stream=True, prompt_tokens=5, completion_tokens=7)
    for _ in range(2):
        b.record(endpoint="chat", model="m", status=200, latency=0.2, stream=True, prompt_tokens=5,
                 completion_tokens=3)
    sb.publish()
    text = a.render()  # a's own live values plus b's snapshot
    assert 'lmforge_requests_total{endpoint="chat",model="m",status="200"} 3' in text
    assert 'lmforge_generation_tokens_total{model="m"} 13' in text
    assert "lmforge_requests_running 3" in text and "lmforge_max_concurrency 8" in text
    assert 'lmforge_api_process_requests_total{process="0"} 1' in text
    assert 'lmforge_api_process_requests_total{process="1"} 2' in text
    sa.publish()
    assert 'lmforge_requests_total{endpoint="chat",model="m",status="200"} 3' in b.render()
    (tmp_path / "7.json").write_text("{not json")  # a process that died mid-write is skipped, not fatal
    assert "lmforge_requests_running 3" in a.render()


def test_limits_are_split_between_the_processes():
    from lmforge.arguments import DeployArguments
    from lmforge.serve.api_processes import split_limits

    class E:
        max_num_seqs = 256

    share = split_limits(DeployArguments(model="builtin:tiny", max_queue=65), E(), 3)
    assert (share.max_concurrency, share.max_queue, share.max_connections) == (86, 22, 342)
    with pytest.raises(ValueError, match="more API processes than requests"):
        split_limits(DeployArguments(model="builtin:tiny", max_concurrency=2), E(), 3)


# ---- one replica, two fronts ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_fronts():
    """The native engine (CPU) in one replica process with pipes for two API processes; both fronts live here."""
    from lmforge.infer.data_parallel import DataParallelEngine
    from lmforge.infer.native import NativeEngine
    from lmforge.infer.native.engine import ALLOW_CPU_ENV

    kw = dict(model="builtin:tiny", torch_dtype="float32", max_num_seqs=8, num_blocks=512, stream_interval=2)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ALLOW_CPU_ENV, "1")  # read by the spawned replica
        first = DataParallelEngine("native", ["cpu"], api_server_count=2, **kw)
    second = DataParallelEngine.attach(first.api_connections(1), first.devices, "native", 1, 2)
    local = NativeEngine(allow_cpu=True, **kw)
    yield first, second, local
    second.close()
    first.close()
    local.close()


async def _collect(engine, q, cfg):
    return [c async for c in engine.infer_stream_async(InferRequest(messages=[{"role": "user", "content": q}]), cfg)]


def _text(chunks) -> str:
    return "".join(c.delta.content or "" for x in chunks for c in x.choices)


def test_two_fronts_share_one_replica_and_each_gets_its_own_answers(two_fronts):
    first, second, local = two_fronts
    cfg = RequestConfig(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True)

    async def run():
        jobs = [_collect(first if i % 2 == 0 else second, q, cfg) for i, q in enumerate(QUESTIONS)]
        return await asyncio.gather(*jobs)

    async def alone():
        return await asyncio.gather(*(_collect(local, q, cfg) for q in QUESTIONS))

    got, want = asyncio.run(run()), asyncio.run(alone())
    assert [_text(c) for c in got] == [_text(c) for c in want]
    assert all(c[-1].usage.completion_tokens == 12 for c in got)
    # ids never collide: the first front numbers its messages 0, 2, 4, ..., the second 1, 3, 5, ...
    assert next(first._ids) % 2 == 0 and next(second._ids) % 2 == 1
    assert first._replicas[0].in_flight == 0 and second._replicas[0].in_flight == 0
    # plain calls are routed back to their caller too
    req = InferRequest(messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert second.count_prompt_tokens(req) == first.count_prompt_tokens(req) > 5
    assert second.infer([req], RequestConfig(max_tokens=4, temperature=0))[0].choices[0].message.content == \
        first.infer([req], RequestConfig(max_tokens=4, temperature=0))[0].choices[0].message.content


def test_a_front_that_goes_away_has_its_streams_stopped_and_the_other_goes_on(two_fronts):
    """The second front's pipe closes with a long stream in flight (its process died): the replica stops that
    stream (its sequence is aborted, freeing the batch slot) and keeps answering the first front."""
    from lmforge.infer.data_parallel import DataParallelEngine

    _, _, local = two_fronts
    # a fresh replica with two pipes, so the shared fixture's second front stays usable
    from lmforge.infer.native.engine import ALLOW_CPU_ENV

    with pytest.MonkeyPatch.context() as env:
        env.setenv(ALLOW_CPU_ENV, "1")
        owner = DataParallelEngine("native", ["cpu"], api_server_count=2, model="builtin:tiny",
                                   torch_dtype="float32", max_num_seqs=4, num_blocks=256)
    try:
        third_conns = owner.api_connections(1)
        gone = DataParallelEngine.attach(third_conns, owner.devices, "native", 1, 2)

        async def start_then_vanish():
            agen = gone.infer_stream_async(InferRequest(messages=[{"role": "user", "content": QUESTIONS[1]}]),
                                           RequestConfig(max_tokens=4000, ignore_eos=True, temperature=1.0))
            await agen.__anext__()  # the stream is running in the replica
            await agen.__anext__()

        asyncio.run(start_then_vanish())  # the unfinished generator is left behind: no cancel message is sent
        gone._replicas[0].conn.close()  # as when its process dies
        deadline = time.monotonic() + 60
        before = owner.stats["tokens"]
        while time.monotonic() < deadline:  # wait until the engine stops sampling
            time.sleep(1.0)
            now = owner.stats["tokens"]
            if now == before:
                break
            before = now
        assert before < 4000, before  # the abandoned stream was stopped, not run to its 4,000 tokens
        cfg = RequestConfig(max_tokens=8, temperature=0)
        out = asyncio.run(_collect(owner, QUESTIONS[2], cfg))
        assert _text(out) == _text(asyncio.run(_collect(local, QUESTIONS[2], cfg)))
    finally:
        owner.close()


# ---- the CLI ------------------------------------------------------------------------------------------------

def test_deploy_with_two_api_processes_serves_the_openai_client_and_stops_on_sigterm(tmp_path):
    import concurrent.futures

    import openai

    from lmforge.infer.native.engine import ALLOW_CPU_ENV

    port = free_port()
    log = tmp_path / "requests.log"
    proc = start_deploy(["--model", "builtin:tiny", "--infer_backend", "native", "--torch_dtype", "float32",
                         "--api_server_count", "2", "--max_num_seqs", "16", "--api_key", "sk-two",
                         "--max_new_tokens", "8", "--log_file", str(log), "--served_model_name", "tiny"],
                        port, {ALLOW_CPU_ENV: "1"})
    try:
        url = f"http://127.0.0.1:{port}"

        def ask(i: int) -> str:  # one client each: its own connection, so the kernel spreads them
            with openai.OpenAI(base_url=url + "/v1", api_key="sk-two", max_retries=0) as c:
                stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[i]}],
                                                   stream=True, temperature=0)
                return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            texts = list(pool.map(ask, range(12)))
            again = list(pool.map(ask, range(12)))
        assert texts == again  # greedy: whichever process answered, the same text
        time.sleep(1.5)  # the other process's snapshot is at most a second old
        metrics = httpx.get(url + "/metrics", headers={"authorization": "Bearer sk-two"}).text
        per = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("lmforge_api_process_requests_total{")}
        assert set(per) == {"0", "1"} and all(v > 0 for v in per.values()), per  # both processes answered
        total = [line for line in metrics.splitlines()
                 if line.startswith('lmforge_requests_total{endpoint="chat"')]
        assert sum(float(line.split()[-1]) for line in total) == 24, total
        assert "lmforge_max_concurrency 16" in metrics  # the total, split 8 + 8
        engine = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("lmforge_engine_")}
        assert engine["lmforge_engine_steps_total"] > 0  # the one engine's own counters, read from its process
        assert engine["lmforge_engine_sampled_tokens_total"] >= engine["lmforge_engine_steps_total"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        output = proc.stdout.read()
        assert "Traceback" not in output, output
        assert "2 API processes" in output
        assert log.read_text().count("shutting down: 0 running") == 2  # each process drained its own
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killing_the_first_process_stops_the_others_and_the_engine(tmp_path):
    """SIGKILL of ``lmforge deploy`` (no chance to clean up): the other API process notices, drains and exits,
    and with its pipe closed the engine process ends too; nothing is left holding the port."""
    from lmforge.infer.native.engine import ALLOW_CPU_ENV

    port = free_port()
    proc = start_deploy(["--model", "builtin:tiny", "--infer_backend", "native", "--torch_dtype", "float32",
                         "--api_server_count", "2", "--max_num_seqs", "4"], port, {ALLOW_CPU_ENV: "1"})
    children: list[int] = []
    try:
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        names = {Path(f"/proc/{c}/comm").read_text().strip() for c in children}
        assert {"lmforge-api1", "lmforge-engine0"} <= names, names
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{c}").exists() and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]
                  for c in children):
            assert time.monotonic() < deadline, [Path(f"/proc/{c}/comm").read_text() for c in children
                                                 if Path(f"/proc/{c}").exists()]
            time.sleep(0.2)
        with pytest.raises(httpx.HTTPError):  # nobody serves the port any more
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in children:
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass
