"""Multi-GPU scaling: tokens/s at 1 and N processes, and peak memory per GPU for each sharding mode.

    python benchmarks/bench_scaling.py                          # 0.5B shape, full FT: 1 vs 2 GPUs, DDP
    python benchmarks/bench_scaling.py --nprocs 1 2 4 8
    python benchmarks/bench_scaling.py --memory                 # 7B-shape LoRA and 1.5B-shape full: DDP vs FSDP
    python benchmarks/bench_scaling.py --tiny                   # CPU smoke run over gloo (a 1M-parameter model)
    python benchmarks/bench_scaling.py --profile prof           # also one step of each run under torch.profiler

Both rows of each world size run from this one command, on the same data:

- ``lmforge``: ``NPROC_PER_NODE=n lmforge sft`` (torchrun, DDP or ``--fsdp full_shard``), packed
  mixed-length rows, its CUDA defaults (fused loss, varlen attention, lean layers or Liger);
- ``plain``: plain torch DDP with transformers' model and Liger kernels when installed, on dense rows of
  ``--max_length`` tokens per GPU (the recipe a user would assemble; same tokens per GPU per step).

Reported: tokens/s (real tokens, all GPUs), the speed-up over 1 process, the scaling efficiency,
and ``torch.cuda.max_memory_allocated`` per GPU. Each run is its own torchrun launch. lmforge logs
every ``--warmup`` steps (its default logging reads the loss on the host, as any user's run does);
the timed window runs from the log at step ``warmup`` to the one at ``warmup + steps``.
``--profile DIR``: one extra step after the timed window runs under torch.profiler on every rank
(``step_profile.py``; lmforge through ``profile_plugin.py``), trace and summary per rank in DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN25_05B, QWEN25_7B, device_name, make_model_dir, mixed_length_jsonl  # noqa: E402

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=True)

PLAIN = r'''
import json, os, sys, time, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
cfg = json.loads(sys.argv[1])
on_gpu = torch.cuda.is_available()
dist.init_process_group("nccl" if on_gpu else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
if on_gpu:
    torch.cuda.set_device(dev)
try:
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    apply_liger_kernel_to_qwen2() if on_gpu else None
except ImportError:
    pass
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.bfloat16 if on_gpu else torch.float32).to(dev)
model.gradient_checkpointing_enable() if cfg["ckpt"] else None
ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if on_gpu else None)
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)
g = torch.Generator().manual_seed(rank)
T, B = cfg["max_length"], cfg["batch"]
tokens = 0
prof = None
for step in range(cfg["warmup"] + cfg["steps"] + (1 if cfg["profile"] else 0)):
    if step == cfg["warmup"] + cfg["steps"]:   # after the timed window: one step under the profiler
        torch.cuda.synchronize() if on_gpu else None
        dt = time.perf_counter() - t0
        sys.path.insert(0, cfg["bench_dir"])
        from step_profile import start_profiler, stop_profiler
        prof = start_profiler()
    if step == cfg["warmup"]:
        torch.cuda.synchronize() if on_gpu else None
        t0, tokens = time.perf_counter(), 0
        torch.cuda.reset_peak_memory_stats() if on_gpu else None
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(dev)
    loss = ddp(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    tokens += B * T * world if prof is None else 0
torch.cuda.synchronize() if on_gpu else None
if prof is not None:
    stop_profiler(prof, cfg["profile"], f"plain-{world}p-rank{rank}")
else:
    dt = time.perf_counter() - t0
peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0
if rank == 0:
    print("RESULT " + json.dumps({"tok_s": tokens / dt, "peak_gib": peak}))
dist.destroy_process_group()
'''


def _env(nproc: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(NPROC_PER_NODE=str(nproc), PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0",
               TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    return env


def run_lmforge(model: Path, rows: Path, nproc: int, a: argparse.Namespace, work: Path, extra: list[str],
                batch: int = 1) -> dict:
    """``batch`` packed bins of ``--max_length`` per GPU per step (the plain recipe's dense rows per GPU)."""
    out = work / f"lmforge-{nproc}-{'-'.join(extra) or 'ddp'}".replace(" ", "_")
    env = _env(nproc)
    profiled = 0
    if a.profile:
        profiled = 1
        extra = [*extra, "--external_plugins", str(Path(__file__).with_name("profile_plugin.py")),
                 "--callbacks", "step_profile"]
        env.update(LMFORGE_PROFILE_DIR=str(Path(a.profile).resolve()), LMFORGE_PROFILE_NAME=f"lmforge-{nproc}p",
                   LMFORGE_PROFILE_STEP=str(a.warmup + a.steps + 1), TORCH_LOGS="recompiles")
    cmd = [sys.executable, "-m", "lmforge.cli.main", "sft", "--model", str(model), "--dataset", str(rows),
           "--train_type", a.train_type, "--packing", "true", "--max_length", str(a.max_length),
           "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
           "--max_steps", str(a.warmup + a.steps + profiled), "--logging_steps", str(a.warmup), "--save_steps", "1000000",
           "--report_to", "none", "--plot", "false", "--add_version", "false", "--output_dir", str(out),
           "--learning_rate", "1e-5", *extra]
    quiet = None if a.verbose else subprocess.PIPE
    p = subprocess.run(cmd, env=env, stdout=quiet, stderr=quiet, text=True)
    if p.returncode:
        raise RuntimeError(f"lmforge sft on {nproc} process(es) failed:\n{(p.stderr or '')[-3000:]}")
    if p.stdout and a.profile:
        print("\n".join(x for x in p.stdout.splitlines() if not x.startswith(("{", "[", "INFO"))), flush=True)
        lines = (p.stderr or "").splitlines()
        recompiles = [i for i, x in enumerate(lines) if "Recompiling" in x]
        print(f"torch.compile recompilations (all ranks): {len(recompiles)}", flush=True)
        for i in recompiles[:4]:   # the function and the guard that failed
            print("\n".join(lines[i:i + 3]), flush=True)
    logs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    at = {x["step"]: x for x in logs if "loss" in x and "num_input_tokens_seen" in x}
    first = at[a.warmup] if a.warmup else {"num_input_tokens_seen": 0, "train_runtime": 0.0}
    last = at[a.warmup + a.steps]
    tok = last["num_input_tokens_seen"] - first["num_input_tokens_seen"]  # all ranks' real tokens
    seconds = last["train_runtime"] - first["train_runtime"]
    return {"tok_s": tok / seconds if seconds else float("nan"), "peak_gib": last.get("peak_memory_gib", 0.0)}


def run_plain(model: Path, nproc: int, a: argparse.Namespace, work: Path) -> dict:
    cfg = dict(model=str(model), max_length=a.max_length, batch=a.plain_batch, steps=a.steps, warmup=a.warmup,
               ckpt=False, profile=str(Path(a.profile).resolve()) if a.profile else "",
               bench_dir=str(Path(__file__).resolve().parent))
    script = work / "plain_ddp.py"
    script.write_text(PLAIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           json.dumps(cfg)]
    p = subprocess.run(cmd, env=_env(nproc), check=True, capture_output=True, text=True)
    if a.profile:
        print("\n".join(x for x in p.stdout.splitlines() if not x.startswith("RESULT ")), flush=True)
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run over gloo")
    p.add_argument("--memory", action="store_true", help="peak memory per GPU: DDP vs FSDP on 7B LoRA and 1.5B full")
    p.add_argument("--train_type", default="full")
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--plain_batch", type=int, default=8, help="dense rows per GPU for the plain recipe")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10, help="steps before the clock starts (compiles on any rank stall all)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--profile", default=None, metavar="DIR", help="profile one extra step of every run into DIR")
    a = p.parse_args()
    if a.tiny:
        a.max_length, a.plain_batch, a.rows, a.steps, a.warmup = 256, 4, 400, 4, 2
    if a.steps % a.warmup:
        p.error("--steps must be a multiple of --warmup (lmforge logs every --warmup steps)")
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    rows = mixed_length_jsonl(work / "rows.jsonl", a.rows, hi=a.max_length)
    print(f"device: {device_name()}; work folder {work}")
    if a.memory:
        print("| model | mode | GPUs | tokens/s | peak GiB per GPU |\n|---|---|---|---|---|")
        for name, spec, tt in (("7B LoRA", QWEN25_7B, "lora"), ("1.5B full", QWEN25_15B, "full")):
            model = make_model_dir(spec, work / name.replace(" ", "_"))
            a.train_type = tt
            for mode, extra in (("DDP", []), ("FSDP full_shard", ["--fsdp", "full_shard"])):
                n = max(a.nprocs)
                r = run_lmforge(model, rows, n, a, work, extra)
                print(f"| {name} | {mode} | {n} | {r['tok_s']:,.0f} | {r['peak_gib']:.1f} |", flush=True)
        return
    model = make_model_dir(TINY if a.tiny else QWEN25_05B, work / "model", dtype="float32" if a.tiny else "bfloat16")
    print("| recipe | GPUs | tokens/s | speed-up | efficiency | peak GiB per GPU |\n|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    for n in a.nprocs:
        for name, fn in (("plain DDP + Liger, dense rows", lambda: run_plain(model, n, a, work)),
                         ("lmforge DDP, packed", lambda: run_lmforge(model, rows, n, a, work, [], a.plain_batch))):
            r = fn()
            base.setdefault(name, r["tok_s"] / n if n else r["tok_s"])
            first = base[name] * min(a.nprocs)
            print(f"| {name} | {n} | {r['tok_s']:,.0f} | {r['tok_s'] / first:.2f}x | "
                  f"{r['tok_s'] / (base[name] * n):.0%} | {r['peak_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
