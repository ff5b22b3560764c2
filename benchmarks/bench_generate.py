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
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN25_05B, QWEN25_7B, device_name, make_model_dir  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="0.5b", help="0.5b, 7b, or a model folder")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--prompt_tokens", type=int, default=128)
    p.add_argument("--max_tokens", type=int, default=256)
    p.add_argument("--hf_requests", type=int, default=128)
    p.add_argument("--hf_batch", type=int, default=64)
    p.add_argument("--batch1_tokens", type=int, default=256)
    p.add_argument("--max_num_seqs", type=int, default=256)
    p.add_argument("--max_num_batched_tokens", type=int, default=8192)
    p.add_argument("--gpu_memory_utilization", type=float, default=0.85)
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--skip_native", action="store_true")
    p.add_argument("--cache", default="/tmp/lmforge-bench")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import torch

    from lmforge.infer import RequestConfig
    from lmforge.infer.hf import HfEngine

    if args.smoke:
        spec, name = SMOKE, "smoke"
        args.requests, args.prompt_tokens, args.max_tokens, args.hf_requests = 8, 48, 8, 8
        args.batch1_tokens, args.skip_native = 8, args.skip_native or not torch.cuda.is_available()
    elif args.model in ("0.5b", "7b"):
        spec, name = (QWEN25_05B, "qwen2.5-0.5b-arch") if args.model == "0.5b" else (QWEN25_7B, "qwen2.5-7b-arch")
    else:
        spec, name = None, Path(args.model).name
    path = str(make_model_dir(spec, Path(args.cache) / name)) if spec else args.model
    dtype = "float32" if args.smoke else "bfloat16"
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
                           gpu_memory_utilization=args.gpu_memory_utilization)
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
