"""Where a training step's time goes: one step under torch.profiler, summarised from its chrome trace.

``start_profiler`` / ``stop_profiler`` wrap one optimizer step (the GPU synchronised at both ends, so
the step's wall time is the host's). The summary reads the trace's events:
- GPU busy: the union of kernel, memcpy and memset intervals; idle share = 1 - busy / step wall time
  (the time the GPU waits on the host: Python per step, launch gaps, syncs);
- the top 15 CUDA kernels by total time (on a CPU-only run: the top 15 CPU ops, inclusive time);
- host syncs: cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize calls and the
  ops that read a GPU value on the host (aten::_local_scalar_dense, the work under .item(); aten::nonzero);
  the closing cudaDeviceSynchronize is the profiler's own; aten::item nests aten::_local_scalar_dense,
  which on CUDA nests a cudaStreamSynchronize, so the listing counts one read up to three times;
- ranges: ``bench::forward+loss`` (the trainer's compute_loss), ``bench::loss`` (the loss function
  alone, its forward side; Liger computes its gradient there too), ``Optimizer.step#...`` (torch's
  own mark): host time and the GPU time of the kernels launched inside them; backward and
  everything else is the remainder.
Files: ``<name>.trace.json.gz`` (open in chrome://tracing or ui.perfetto.dev), ``<name>.summary.json``
and ``<name>.summary.txt``.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_RUNTIME = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero")
RANGES = ("bench::forward+loss", "bench::loss", "Optimizer.step#", "Optimizer.zero_grad#")


def start_profiler() -> Any:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof = profile(activities=acts, record_shapes=False, with_stack=False)
    prof.start()
    prof.bench_t0 = time.perf_counter()
    return prof


def stop_profiler(prof: Any, out_dir: str, name: str) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - prof.bench_t0) * 1e6
    prof.stop()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{name}.trace.json"
    prof.export_chrome_trace(str(raw))
    events = json.loads(raw.read_text()).get("traceEvents", [])
    with raw.open("rb") as src, gzip.open(str(raw) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(raw)
    try:
        summary = summarize(events, wall_us, cuda=torch.cuda.is_available())
    except Exception as e:  # noqa: BLE001 - a trace format surprise must not lose the run; the trace is kept
        summary = dict(cuda=torch.cuda.is_available(), step_wall_ms=wall_us / 1e3, gpu_busy_ms=0.0,
                       gpu_kernel_sum_ms=0.0, gpu_idle_share=None, kernel_launches=0, top_label="(failed)", top=[],
                       syncs={}, ranges={}, error=f"summary failed: {type(e).__name__}: {e}")
    summary["name"] = name
    (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=1))
    text = format_summary(summary)
    (out / f"{name}.summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return summary


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(events: list[dict], wall_us: float, cuda: bool) -> dict:
    """The numbers above from a chrome trace's ``traceEvents`` (durations in microseconds)."""
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in xs if e.get("cat") in GPU_CATS]
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in gpu:
        if e.get("cat") == "kernel":
            kernels[e["name"]][0] += 1
            kernels[e["name"]][1] += e["dur"]
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    gpu_total = sum(e["dur"] for e in gpu)
    if cuda:
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]
        top_label = "CUDA kernels"
    else:
        ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for e in xs:
            if e.get("cat") == "cpu_op":
                ops[e["name"]][0] += 1
                ops[e["name"]][1] += e["dur"]
        top = sorted(ops.items(), key=lambda kv: -kv[1][1])[:15]
        top_label = "CPU ops (inclusive)"
    syncs: dict[str, list[float]] = {}
    for e in xs:
        if e["name"] in SYNC_RUNTIME or (e.get("cat") == "cpu_op" and e["name"] in SYNC_OPS):
            c = syncs.setdefault(e["name"], [0, 0.0])
            c[0] += 1
            c[1] += e["dur"]
    # GPU time of the kernels each host range launched: runtime launch -> kernel by correlation id
    by_corr = defaultdict(float)
    for e in gpu:
        corr = (e.get("args") or {}).get("correlation")
        if corr is not None:
            by_corr[corr] += e["dur"]
    launches = [(e["ts"], e.get("tid"), by_corr.get((e.get("args") or {}).get("correlation"), 0.0))
                for e in xs if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    ranges: dict[str, dict[str, float]] = {}
    for e in xs:
        if e.get("cat") not in ("user_annotation", "cpu_op"):
            continue
        key = next((r for r in RANGES if e["name"] == r or (r.endswith("#") and e["name"].startswith(r))), None)
        if key is None:
            continue
        r = ranges.setdefault(key.rstrip("#"), dict(calls=0, host_ms=0.0, gpu_ms=0.0))
        r["calls"] += 1
        r["host_ms"] += e["dur"] / 1e3
        t0, t1 = e["ts"], e["ts"] + e["dur"]
        r["gpu_ms"] += sum(g for ts, tid, g in launches if t0 <= ts <= t1 and tid == e.get("tid")) / 1e3
    return dict(cuda=cuda, step_wall_ms=wall_us / 1e3, gpu_busy_ms=busy / 1e3, gpu_kernel_sum_ms=gpu_total / 1e3,
                gpu_idle_share=(1 - busy / wall_us) if cuda and wall_us else None,
                kernel_launches=sum(1 for e in xs if e["name"] in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                   "cudaLaunchKernelExC", "cuLaunchKernelEx")),
                top_label=top_label, top=[dict(name=k, calls=int(v[0]), ms=v[1] / 1e3) for k, v in top],
                syncs={k: dict(calls=int(v[0]), ms=v[1] / 1e3) for k, v in sorted(syncs.items())},
                ranges=ranges)


def format_summary(s: dict) -> str:
    lines = [f"### step profile: {s.get('name', '')}" + (f" ({s['error']})" if s.get("error") else ""),
             f"step wall {s['step_wall_ms']:.1f} ms; GPU busy {s['gpu_busy_ms']:.1f} ms"
             + (f" (idle {100 * s['gpu_idle_share']:.1f}% = host overhead)" if s["gpu_idle_share"] is not None
                else " (no CUDA activity: CPU run)")
             + f"; {s['kernel_launches']} kernel launches",
             f"top {len(s['top'])} {s['top_label']}:", "| ms | calls | name |", "|---|---|---|"]
    lines += [f"| {t['ms']:.2f} | {t['calls']} | {t['name'][:100]} |" for t in s["top"]]
    lines.append("host syncs: " + (", ".join(f"{k} x{v['calls']} ({v['ms']:.2f} ms)" for k, v in s["syncs"].items())
                                   or "none"))
    for k, r in s["ranges"].items():
        lines.append(f"range {k}: {r['calls']} call(s), host {r['host_ms']:.2f} ms, GPU {r['gpu_ms']:.2f} ms")
    return "\n".join(lines)


def compare(a: dict, b: dict) -> str:
    """Two summaries side by side (the numbers that say where the step loses time)."""
    def row(label: str, f: Any) -> str:
        return f"| {label} | {f(a)} | {f(b)} |"

    def rng(name: str, field: str):
        return lambda s: f"{s['ranges'].get(name, {}).get(field, 0):.1f}"

    def nsync(s: dict) -> str:   # aten::item runs _local_scalar_dense, which on CUDA runs cudaStreamSynchronize
        names = SYNC_RUNTIME if s["cuda"] else ("aten::_local_scalar_dense", "aten::nonzero")
        return str(sum(v["calls"] for k, v in s["syncs"].items() if k in names))

    def idle(s: dict) -> str:
        return f"{100 * s['gpu_idle_share']:.1f}%" if s["gpu_idle_share"] is not None else "n/a"

    return "\n".join([
        f"| | {a['name']} | {b['name']} |", "|---|---|---|",
        row("step wall ms", lambda s: f"{s['step_wall_ms']:.1f}"),
        row("GPU busy ms", lambda s: f"{s['gpu_busy_ms']:.1f}"),
        row("GPU idle share", idle),
        row("kernel launches", lambda s: str(s["kernel_launches"])),
        row("host syncs (CUDA: cuda*Synchronize; CPU: scalar reads + nonzero)", nsync),
        row("forward+loss host ms", rng("bench::forward+loss", "host_ms")),
        row("forward+loss GPU ms", rng("bench::forward+loss", "gpu_ms")),
        row("loss host ms", rng("bench::loss", "host_ms")),
        row("loss GPU ms", rng("bench::loss", "gpu_ms")),
        row("optimizer host ms", rng("Optimizer.step", "host_ms")),
        row("optimizer GPU ms", rng("Optimizer.step", "gpu_ms")),
    ])
