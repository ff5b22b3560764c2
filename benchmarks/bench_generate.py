"""Generation throughput and latency: the ``hf`` engine and ``native`` side by side, same requests.

    python benchmarks/bench_generate.py                         # H100: 0.5B-arch, 512 x (128 prompt, 256 new)
    python benchmarks/bench_generate.py --model 7b --skip_hf    # 7B-architecture, native only
    python benchmarks/bench_generate.py --smoke                 # tiny model on CPU (hf only): checks the script

The model has random bf16 weights (no download; benchmarks/common.py) and the built-in tokenizer.
Prompts are chat requests padded with words to exactly ``--prompt_tokens`` tokens; ``ignore_eos``
makes every reply exactly ``--max_tokens`` long. The hf engine answers ``--hf_requests`` of them
(in batches of ``--hf_batch``: at ~1k tok/s all 512 would take minutes); throughputs are rates, so
they compare. Batch-1 latency is measured on one streamed request: time to first token, then the
the mean time per further token (non-streaming: with random weights the stream holds back partial
characters, which would hide the first token).

Two native-only workloads of token-id prompts (exact lengths; ``ignore_eos``, so every output has
exactly its length); they are seeded, so every run and every commit answers the same requests. Both freeze the
start-up heap before the timed run, as ``lmforge infer`` does (``--gc_freeze 0``: not), and report the garbage
collector's pauses inside it:

    python benchmarks/bench_generate.py --workload nano [--step_profile]
        256 sequences, prompt and output lengths uniform in 100..1024, temperature 0.6, all submitted
        at once. Reports output and total (prompt + output) tok/s, the mean step time of decode steps
        at the full batch and their number, and the prefill time share (time of the steps that carry
        prompt tokens / wall time). ``--step_profile`` splits the steps into host phases and device
        time (benchmarks/native_step_profile.py).
    python benchmarks/bench_generate.py --workload prefill
        256 prompts of 2048 tokens, 1 new token each: prefill model-FLOP utilisation,
        MFU = FLOPs / (seconds x 989e12) (H200 bf16 dense peak; ``--peak_tflops`` for another GPU), with
        FLOPs summed over prompts of S tokens through L layers (hidden h, query width q = heads x
        head_dim, key/value width k = kv_heads x head_dim, MLP width m, vocabulary V):
            linear layers   2 * S * L * (h*(q + 2k) + q*h + 3*h*m)
            attention       2 * L * q * S * (S + 1)       (causal: QK^T and PV over the keys up to each token)
            LM head         2 * h * V                     (the last token only: the engine's logits)
        Reported twice: over the wall time of the run and over the time of the steps alone.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (QWEN25_05B, QWEN25_7B, device_name, make_model_dir, offline_generate,  # noqa: E402
                    regular_vocab, token_workload)
from native_step_profile import StepRecorder, print_profile  # noqa: E402

SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=True)


def exact_requests(engine, n: int, prompt_tokens: int, seed: int) -> list:
    """Chat requests whose encoded prompts are exactly ``prompt_tokens`` long."""
    from lmforge.infer import InferRequest

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "number", "quick"]

    def size(ws: list[str]) -> int:
        return len(engine.encode(InferRequest(messages=[{"role": "user", "content": " ".join(ws)}])))

    out = []
    for _ in range(n):
        pool = rng.choices(words, k=prompt_tokens)
        lo, hi = 0, prompt_tokens  # most words that stay 8 tokens short; then single characters land it exactly
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(pool[:mid]) <= prompt_tokens - 8 else (lo, mid - 1)
        ws = pool[:lo]
        for _ in range(64):
            if size(ws) == prompt_tokens:
                break
            for filler in (".", ",", "a", "b", "x"):
                if size(ws + [filler]) <= prompt_tokens:
                    ws.append(filler)
                    break
            else:
                raise SystemExit(f"could not build a prompt of exactly {prompt_tokens} tokens")
        if size(ws) != prompt_tokens:
            raise SystemExit(f"could not build a prompt of exactly {prompt_tokens} tokens")
        out.append(InferRequest(messages=[{"role": "user", "content": " ".join(ws)}]))
    return out


def throughput(engine, requests, cfg) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    responses = engine.infer(requests, cfg, use_tqdm=False)
    seconds = time.perf_counter() - t0
    gen = sum(r.usage.completion_tokens for r in responses)
    return {"requests": len(requests), "generated": gen, "seconds": round(seconds, 2),
            "tokens_per_s": round(gen / seconds, 1)}


def latency(engine, request, cfg) -> dict:
    """Batch-1 latency without streaming's text hold-back (random weights emit partial UTF-8 the stream
    holds back): time to first token = a 1-token request; per-token = the rest of a full one."""
    from lmforge.infer import RequestConfig

    one = RequestConfig(max_tokens=1, ignore_eos=True)
    engine.infer([request], one, use_tqdm=False)
    t0 = time.perf_counter()
    engine.infer([request], one, use_tqdm=False)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = engine.infer([request], cfg, use_tqdm=False)[0].usage.completion_tokens
    total = time.perf_counter() - t0
    return {"ttft_ms": round(ttft * 1000, 1), "per_token_ms": round((total - ttft) / max(n - 1, 1) * 1000, 2),
            "tokens_per_s": round(n / total, 1), "tokens": n}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GcPauses:
    """The interpreter's garbage collections while it is entered: per generation, how many and their seconds (a
    full collection walks every tracked object, a few hundred thousand once torch and transformers are loaded)."""

    def __init__(self):
        self.pauses: dict[int, list] = {}
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            n, s = self.pauses.get(info["generation"], (0, 0.0))
            self.pauses[info["generation"]] = [n + 1, round(s + time.perf_counter() - self._t0, 4)]

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


def timed_run(nat, work: list[tuple[list[int], int]], cfg, *, profile: bool, seed: int | None) -> tuple[float, dict]:
    """Answer ``work`` at once under a step recorder; check every output has its exact length."""
    rec = StepRecorder(nat, phases=profile)
    with rec, GcPauses() as pauses:
        _sync()
        t0 = time.perf_counter()
        rows = offline_generate(nat, work, cfg, seed=seed)
        _sync()
        seconds = time.perf_counter() - t0
    got = [len(r[0].token_ids) for r in rows]
    wrong = [(i, g, m) for i, (g, (_, m)) in enumerate(zip(got, work)) if g != m]
    if wrong:
        raise SystemExit(f"outputs of the wrong length (request, got, asked): {wrong[:5]}; ignore_eos should make "
                         "every output exactly max_tokens long")
    return seconds, {**rec.summary(), "gc_pauses": pauses.pauses}


def prefill_flops(config, prompt_len: int) -> float:
    """FLOPs of one prompt's prefill, by the formula in this file's docstring."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, L, m, V = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    d = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, k = c.num_attention_heads * d, c.num_key_value_heads * d
    S = prompt_len
    return 2 * S * L * (h * (q + 2 * k) + q * h + 3 * h * m) + 2 * L * q * S * (S + 1) + 2 * h * V


def run_nano(nat, args) -> dict:
    from lmforge.infer import RequestConfig

    lo, hi = args.min_len, args.max_len
    work = token_workload(args.requests, (lo, hi), (lo, hi), regular_vocab(nat), seed=args.seed)
    cfg = RequestConfig(temperature=args.temperature, ignore_eos=True)
    seed = args.seed if args.seeded_sampling else None
    # Warm-up over the same spread of prompt lengths (Triton compiles one attention variant per tile size).
    warm = token_workload(min(16, args.requests), (lo, hi), (4, 4), regular_vocab(nat), seed=args.seed + 1)
    offline_generate(nat, warm, cfg)
    steps_before, preempted = dict(nat.stats), nat.scheduler.num_preempted
    seconds, prof = timed_run(nat, work, cfg, profile=args.step_profile, seed=seed)
    prompt = sum(len(ids) for ids, _ in work)
    out = sum(m for _, m in work)
    full, prefill = prof["full_batch_decode"], prof["with_prefill"]
    res = {"requests": len(work), "prompt_tokens": prompt, "output_tokens": out, "seconds": round(seconds, 2),
           "output_tok_s": round(out / seconds, 1), "total_tok_s": round((prompt + out) / seconds, 1),
           "steps": prof["steps"], "full_batch_rows": full.get("rows", 0), "full_batch_steps": full["steps"],
           "full_batch_step_ms": full.get("mean_step_ms"), "decode_only_steps": prof["decode_only"]["steps"],
           "decode_only_step_ms": prof["decode_only"].get("mean_step_ms"),
           "prefill_steps": prefill["steps"], "prefill_time_share": round(prefill.get("seconds", 0) / seconds, 3),
           "loop_between_steps_s": prof["between_steps_seconds"], "gc_pauses": prof["gc_pauses"],
           "preempted": nat.scheduler.num_preempted - preempted,
           "graph_steps": nat.stats["graph_steps"] - steps_before["graph_steps"],
           "overlapped_steps": nat.stats["overlapped_steps"] - steps_before["overlapped_steps"],
           "async_scheduling": nat.async_scheduling,
           "temperature": args.temperature, "seeded_sampling": args.seeded_sampling}
    if args.step_profile:
        res["profile"] = prof
    return res


def run_prefill(nat, args) -> dict:
    from lmforge.infer import RequestConfig

    vocab = regular_vocab(nat)
    work = token_workload(args.requests, (args.prompt_tokens, args.prompt_tokens), (1, 1), vocab, seed=args.seed)
    cfg = RequestConfig(temperature=0.0, ignore_eos=True)
    offline_generate(nat, token_workload(4, (args.prompt_tokens,) * 2, (1, 1), vocab, seed=args.seed + 1), cfg)
    seconds, prof = timed_run(nat, work, cfg, profile=args.step_profile, seed=None)
    flops = sum(prefill_flops(nat.model.config, len(ids)) for ids, _ in work)
    peak = args.peak_tflops * 1e12
    step_s = prof["step_seconds"]
    res = {"requests": len(work), "prompt_tokens": sum(len(ids) for ids, _ in work), "seconds": round(seconds, 3),
           "prefill_tok_s": round(sum(len(ids) for ids, _ in work) / seconds, 1), "steps": prof["steps"],
           "tflops": float(f"{flops / 1e12:.4g}"), "achieved_tflop_s": float(f"{flops / seconds / 1e12:.4g}"),
           "mfu": round(flops / seconds / peak, 4),
           "mfu_steps_only": round(flops / step_s / peak, 4) if step_s else None,
           "peak_tflops": args.peak_tflops, "gc_pauses": prof["gc_pauses"]}
    if args.step_profile:
        res["profile"] = prof
    return res


def native_workload(args, path: str, name: str, dtype: str) -> None:
    """--workload nano or prefill: the native engine alone; prints a summary line and the JSON."""
    import torch

    from lmforge.infer.native import NativeEngine

    if args.workload == "nano":
        if not 1 <= args.min_len <= args.max_len:
            raise SystemExit(f"--min_len {args.min_len} / --max_len {args.max_len}: need 1 <= min_len <= max_len")
        max_len = 2 * args.max_len + 16
        what = (f"{args.requests} sequences, prompt and output lengths uniform in {args.min_len}..{args.max_len} "
                f"(seed {args.seed}), temperature {args.temperature}, ignore_eos")
    else:
        max_len = args.prompt_tokens + 16
        what = f"{args.requests} prompts x {args.prompt_tokens} tokens, 1 new token"
    print(f"{name} on {device_name()}: {args.workload} workload, {what}", flush=True)
    on_cuda = torch.cuda.is_available()
    kw = {} if on_cuda else {"allow_cpu": True,  # smoke on CPU: a cache that holds every sequence at once
                             "num_blocks": args.requests * -(-max_len // 16) + 2}
    t0 = time.perf_counter()
    nat = NativeEngine(path, torch_dtype=dtype, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       async_scheduling=args.async_scheduling == "true", **kw)
    results: dict = {"model": name, "device": device_name(), "workload": args.workload,
                     "native_startup_s": round(time.perf_counter() - t0, 1), "max_num_seqs": args.max_num_seqs,
                     "max_num_batched_tokens": args.max_num_batched_tokens, "kv_blocks": nat.runner.num_blocks}
    try:
        if args.gc_freeze:
            from lmforge.utils.gc_heap import freeze

            freeze()
        if args.workload == "nano":
            r = run_nano(nat, args)
            print(f"nano: {r['output_tok_s']:.0f} output tok/s, {r['total_tok_s']:.0f} total tok/s in "
                  f"{r['seconds']} s; "
                  f"{r['steps']} steps; decode at the full batch ({r['full_batch_rows']} rows): "
                  f"{r['full_batch_step_ms']} ms/step over {r['full_batch_steps']} steps; all decode-only steps "
                  f"{r['decode_only_step_ms']} ms over {r['decode_only_steps']}; prefill time share "
                  f"{100 * r['prefill_time_share']:.1f}% ({r['prefill_steps']} steps); preempted {r['preempted']}; "
                  f"GC (generation: count, s) {r['gc_pauses']}",
                  flush=True)
        else:
            r = run_prefill(nat, args)
            print(f"prefill: {r['prefill_tok_s']:.0f} prompt tok/s in {r['seconds']} s over {r['steps']} steps; "
                  f"{r['achieved_tflop_s']} TFLOP/s = MFU {100 * r['mfu']:.1f}% of {args.peak_tflops:g} "
                  f"(steps only: {100 * (r['mfu_steps_only'] or 0):.1f}%); GC (generation: count, s) {r['gc_pauses']}",
                  flush=True)
        results[args.workload] = r
        if args.step_profile:
            print_profile(r["profile"], "full_batch_decode" if args.workload == "nano" else "with_prefill")
        if on_cuda:
            results["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finally:
        nat.close()
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="0.5b", help="0.5b, 7b, or a model folder")
    p.add_argument("--workload", default="chat", choices=["chat", "nano", "prefill"],
                   help="chat: hf vs native on chat prompts; nano: random lengths (native); prefill: MFU (native)")
    p.add_argument("--requests", type=int, default=None, help="default: 512 (chat), 256 (nano, prefill)")
    p.add_argument("--prompt_tokens", type=int, default=None, help="default: 128 (chat), 2048 (prefill)")
    p.add_argument("--min_len", type=int, default=100, help="nano: shortest prompt and output")
    p.add_argument("--max_len", type=int, default=1024, help="nano: longest prompt and output")
    p.add_argument("--temperature", type=float, default=0.6, help="nano's sampling temperature")
    p.add_argument("--seeded_sampling", action="store_true",
                   help="nano: each request samples with its own seed (the sampler's per-row generator path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the nano and prefill workloads")
    p.add_argument("--gc_freeze", type=int, default=1, choices=[0, 1],
                   help="nano/prefill: 1 (default): freeze the start-up heap before the timed run, as lmforge infer "
                        "and deploy do (lmforge/utils/gc_heap.py); 0: leave the collector as it is")
    p.add_argument("--step_profile", action="store_true",
                   help="nano/prefill: per-step host phases vs device time (benchmarks/native_step_profile.py)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="prefill: the GPU's bf16 dense peak")
    p.add_argument("--max_tokens", type=int, default=256)
    p.add_argument("--hf_requests", type=int, default=128)
    p.add_argument("--hf_batch", type=int, default=64)
    p.add_argument("--batch1_tokens", type=int, default=256)
    p.add_argument("--max_num_seqs", type=int, default=256)
    p.add_argument("--max_num_batched_tokens", type=int, default=8192)
    p.add_argument("--gpu_memory_utilization", type=float, default=0.85)
    p.add_argument("--async_scheduling", default="true", choices=["true", "false"],
                   help="native: launch each step before the previous one's tokens are read back")
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--skip_native", action="store_true")
    p.add_argument("--cache", default="/tmp/lmforge-bench")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import torch

    from lmforge.infer import RequestConfig
    from lmforge.infer.hf import HfEngine

    if args.requests is None:
        args.requests = 512 if args.workload == "chat" else 256
    if args.prompt_tokens is None:
        args.prompt_tokens = 2048 if args.workload == "prefill" else 128
    if args.smoke:
        spec, name = SMOKE, "smoke"
        if args.workload == "chat":
            args.requests, args.prompt_tokens, args.max_tokens, args.hf_requests = 8, 48, 8, 8
            args.batch1_tokens, args.skip_native = 8, args.skip_native or not torch.cuda.is_available()
        else:  # the native engine itself, on the CPU when there is no GPU (allow_cpu: its test mode)
            args.requests, args.min_len, args.max_len, args.prompt_tokens = 8, 10, 40, 64
    elif args.model in ("0.5b", "7b"):
        spec, name = (QWEN25_05B, "qwen2.5-0.5b-arch") if args.model == "0.5b" else (QWEN25_7B, "qwen2.5-7b-arch")
    else:
        spec, name = None, Path(args.model).name
    path = str(make_model_dir(spec, Path(args.cache) / name)) if spec else args.model
    dtype = "float32" if args.smoke else "bfloat16"
    if args.workload != "chat":
        return native_workload(args, path, name, dtype)
    max_len = args.prompt_tokens + max(args.max_tokens, args.batch1_tokens) + 16
    cfg = RequestConfig(max_tokens=args.max_tokens, ignore_eos=True)
    cfg1 = RequestConfig(max_tokens=args.batch1_tokens, ignore_eos=True)
    print(f"{name} on {device_name()}: {args.requests} requests x ({args.prompt_tokens} prompt, {args.max_tokens} "
          f"new tokens), greedy, ignore_eos", flush=True)
    results: dict = {"model": name, "device": device_name()}

    if not args.skip_hf:
        hf = HfEngine(path, torch_dtype=dtype, max_batch_size=args.hf_batch, max_model_len=max_len)
        reqs = exact_requests(hf, args.requests, args.prompt_tokens, seed=0)
        hf.infer(reqs[:2], RequestConfig(max_tokens=4), use_tqdm=False)  # warm-up
        results["hf"] = throughput(hf, reqs[:args.hf_requests], cfg)
        print(f"hf      : {results['hf']}", flush=True)
        results["hf_batch1"] = latency(hf, reqs[0], cfg1)
        print(f"hf b=1  : {results['hf_batch1']}", flush=True)
        del hf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if not args.skip_native:
        from lmforge.infer.native import NativeEngine

        t0 = time.perf_counter()
        nat = NativeEngine(path, torch_dtype=dtype, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           gpu_memory_utilization=args.gpu_memory_utilization,
                           async_scheduling=args.async_scheduling == "true")
        results["native_startup_s"] = round(time.perf_counter() - t0, 1)
        reqs = exact_requests(nat, args.requests, args.prompt_tokens, seed=0)
        nat.infer(reqs[:4], RequestConfig(max_tokens=4), use_tqdm=False)  # warm-up (Triton compiles)
        results["native"] = throughput(nat, reqs, cfg)
        results["native"]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"native  : {results['native']}", flush=True)
        results["native_batch1"] = latency(nat, reqs[0], cfg1)
        print(f"nat b=1 : {results['native_batch1']}", flush=True)
        print(f"native stats: {nat.stats}, preempted {nat.scheduler.num_preempted}, "
              f"graphs {len(nat.runner.graphs)}, KV blocks {nat.runner.num_blocks}", flush=True)
        nat.close()

    if "hf" in results and "native" in results:
        r = results["native"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        r1 = results["native_batch1"]["tokens_per_s"] / results["hf_batch1"]["tokens_per_s"]
        results["ratio_throughput"], results["ratio_batch1"] = round(r, 1), round(r1, 1)
        print(f"\n{'':10}{'hf':>12}{'native':>12}{'ratio':>8}")
        print(f"{'tok/s':10}{results['hf']['tokens_per_s']:>12.0f}{results['native']['tokens_per_s']:>12.0f}{r:>8.1f}x")
        print(f"{'b=1 tok/s':10}{results['hf_batch1']['tokens_per_s']:>12.1f}"
              f"{results['native_batch1']['tokens_per_s']:>12.1f}{r1:>8.1f}x")
        print(f"{'TTFT ms':10}{results['hf_batch1']['ttft_ms']:>12.1f}{results['native_batch1']['ttft_ms']:>12.1f}")
        print(f"{'ms/token':10}{results['hf_batch1']['per_token_ms']:>12.2f}"
              f"{results['native_batch1']['per_token_ms']:>12.2f}")
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
