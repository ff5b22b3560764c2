"""Hostile clients against ``lmforge deploy`` (builtin:tiny, CPU): what they cost the server, in numbers.

    python benchmarks/bench_serve_hostile.py
    python benchmarks/bench_serve_hostile.py --body_timeout 5 --max_connections 256 --half_uploads 1000

Starts ``lmforge deploy --api_key ...`` as a subprocess on a free loopback port and reads its memory
from /proc (Linux only; the peak is reset through /proc/PID/clear_refs before each scene). Scenes:

1. six concurrent 15 MB chat bodies (``"ab " * 5,000,000``): statuses, seconds each, peak and
   settled RSS growth;
2. ``--half_uploads`` clients that send half a body and hang up (in bursts of 100): the 499 and
   500 counters of /metrics, connections refused beyond ``--max_connections``, the statuses of the
   request log's lines and the bytes it grew by;
3. ``--held`` connections that each hold half a body: RSS growth while held, how many got 503 at
   once (beyond ``--max_connections``), how many are still open ``--body_timeout`` + 3 s later.
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import repo_env  # noqa: E402

HOST = "127.0.0.1"
KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _metric(url: str, status: str) -> int:
    """Chat requests answered ``status``; ``refused``: connections refused beyond --max_connections."""
    import httpx

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    if status == "refused":
        pattern = re.compile(r'^lmforge_requests_rejected_total\{reason="max_connections"\} (\S+)$', re.M)
    else:
        pattern = re.compile(r'^lmforge_requests_total\{endpoint="chat",model="[^"]*",status="' + status
                             + r'"\} (\S+)$', re.M)
    return int(sum(float(v) for v in pattern.findall(text)))


def _half_upload(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100000\r\n\r\n"
              b'{"model": "builtin:tiny", "messages": [{"role": "user", "content": "')
    return s


def scene_big_bodies(url: str, pid: int) -> dict:
    import httpx

    body = json.dumps({"model": "builtin:tiny", "messages": [{"role": "user", "content": "ab " * 5_000_000}]}).encode()
    base = _status(pid, "VmRSS")
    _reset_peak(pid)
    results: list = []

    def send() -> None:
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", content=body, timeout=300,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        results.append((r.status_code, round(time.perf_counter() - t0, 2)))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = _status(pid, "VmHWM") - base
    time.sleep(3)
    return {"statuses_seconds": sorted(results), "rss_base_mb": round(base), "peak_growth_mb": round(peak),
            "growth_after_3s_mb": round(_status(pid, "VmRSS") - base)}


def scene_half_uploads(url: str, port: int, n: int, log: Path) -> dict:
    before = (_metric(url, "499"), _metric(url, "500"), log.stat().st_size, _metric(url, "refused"))
    for start in range(0, n, 100):
        socks = [_half_upload(port) for _ in range(min(100, n - start))]
        time.sleep(0.05)
        for s in socks:
            s.close()
    time.sleep(2)
    statuses: dict = {}
    with open(log, "rb") as f:
        f.seek(before[2])
        added = f.read().decode("utf-8", "replace")
    for line in added.splitlines():
        m = re.search(r" status=(\d+) ", line)
        if m:
            statuses[m.group(1)] = statuses.get(m.group(1), 0) + 1
    return {"clients": n, "logged_statuses": statuses, "counted_499": _metric(url, "499") - before[0], "counted_500": _metric(url, "500") - before[1],
            "refused_max_connections": _metric(url, "refused") - before[3], "log_bytes": log.stat().st_size - before[2]}


def scene_held(url: str, port: int, pid: int, held: int, body_timeout: float) -> dict:
    base = _status(pid, "VmRSS")
    socks = [_half_upload(port) for _ in range(held)]
    time.sleep(1)
    grown = _status(pid, "VmRSS") - base
    refused = 0
    for s in socks:  # a request beyond --max_connections is answered 503 at once
        s.settimeout(0.01)
        try:
            refused += s.recv(64).startswith(b"HTTP/1.1 503")
        except OSError:
            pass
    time.sleep(body_timeout + 3)
    still_open = 0
    for s in socks:
        s.settimeout(0.5)
        try:
            while s.recv(65536):  # read the 408 (or 503) up to the server's close
                pass
        except socket.timeout:
            still_open += 1
        except OSError:
            pass
        s.close()
    return {"held": held, "rss_growth_mb": round(grown, 1), "kb_per_connection": round(grown * 1024 / held, 1),
            "answered_503": refused, f"open_after_{body_timeout + 3:g}s": still_open}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--body_timeout", type=float, default=5.0)
    p.add_argument("--max_connections", type=int, default=256)
    p.add_argument("--half_uploads", type=int, default=1000)
    p.add_argument("--held", type=int, default=500)
    p.add_argument("--scenes", nargs="+", default=["big", "half", "held"], choices=["big", "half", "held"])
    args = p.parse_args()
    port = _free_port()
    url = f"http://{HOST}:{port}"
    repo = Path(__file__).resolve().parents[1]
    log = Path(tempfile.mkdtemp(prefix="lmforge-hostile-")) / "requests.log"
    cmd = [sys.executable, "-m", "lmforge.cli.main", "deploy", "--model", "builtin:tiny", "--port", str(port),
           "--api_key", KEY, "--log_file", str(log), "--body_timeout", str(args.body_timeout),
           "--max_connections", str(args.max_connections)]
    server = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=repo_env())
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.3)
        httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "builtin:tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        out = {}
        if "big" in args.scenes:
            out["six_15mb_bodies"] = scene_big_bodies(url, server.pid)
        if "half" in args.scenes:
            out["half_uploads"] = scene_half_uploads(url, port, args.half_uploads, log)
        if "held" in args.scenes:
            out["held_half_bodies"] = scene_held(url, port, server.pid, args.held, args.body_timeout)
        print(json.dumps(out, indent=1))
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
