"""Throughput of the hf engine on a Qwen2.5-0.5B-shaped model with random bf16 weights (no download).

    python benchmarks/bench_hf_infer.py                       # GPU: batch sizes 1, 16, 64; 256 new tokens
    python benchmarks/bench_hf_infer.py --num_requests 512 --batch_sizes 64 128 --max_tokens 512
    python benchmarks/bench_hf_infer.py --smoke               # a tiny model on CPU: checks the script runs

Prompts are chat conversations of random length (``--prompt_tokens MIN MAX``) rendered by the
built-in tokenizer's chat template; random weights almost never emit the end-of-turn token, so
every reply runs to ``--max_tokens`` and the token counts are the same on every run. Reports, per
batch size, generated tokens per second (and prompt tokens per second) over the whole request
list, plus the latency of one streamed reply (time to first chunk, tokens per second after it).
"""
from __future__ import annotations

import argparse
import json
import random
import time

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=32768, rms_norm_eps=1e-6)
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=2048,
             rms_norm_eps=1e-6)


def build_model(shape: dict, dtype, device: str, attn_impl: str, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lmforge.model import builtin_model_dir, load_tokenizer

    tokenizer = load_tokenizer(builtin_model_dir("builtin:tiny"))
    config = Qwen2Config(**shape, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config._attn_implementation = attn_impl
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(dtype).eval()
    return model, tokenizer


def make_requests(n: int, lo: int, hi: int, seed: int) -> list:
    from lmforge.infer import InferRequest

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "number", "quick"]
    # Each word plus its space is about one token with the built-in tokenizer.
    return [InferRequest(messages=[{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(lo, hi)))}])
            for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_requests", type=int, default=256, help="most requests per batch size")
    parser.add_argument("--batches_per_size", type=int, default=4,
                        help="each batch size answers min(num_requests, batch_size * this) requests")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--prompt_tokens", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; >0 samples (seeded)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--attn_impl", default="sdpa")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few requests (checks the script)")
    args = parser.parse_args()

    import torch

    from lmforge.infer import RequestConfig
    from lmforge.infer.hf import HfEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        shape, args.num_requests, args.max_tokens, args.prompt_tokens = SMOKE, 8, 8, [4, 16]
        args.batch_sizes, args.dtype = [1, 4], "float32"
    else:
        shape = QWEN25_05B
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, tokenizer = build_model(shape, dtype, device, args.attn_impl, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen2 {n_params / 1e6:.0f}M params, {args.dtype}, {args.attn_impl}, on {device} "
          f"({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), built in "
          f"{time.perf_counter() - t0:.1f} s")

    requests = make_requests(args.num_requests, *args.prompt_tokens, seed=args.seed)
    config = RequestConfig(max_tokens=args.max_tokens, temperature=args.temperature,
                           seed=args.seed if args.temperature > 0 else None)
    results = []
    for bs in args.batch_sizes:
        engine = HfEngine(model_obj=model, tokenizer=tokenizer, max_batch_size=bs, max_model_len=4096,
                          model_name="qwen2.5-0.5b-random")
        engine.infer(requests[:bs], RequestConfig(max_tokens=4), use_tqdm=False)  # warm-up (kernels, allocator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        batch_requests = requests[:min(len(requests), bs * args.batches_per_size)]
        start = time.perf_counter()
        responses = engine.infer(batch_requests, config, use_tqdm=False)
        seconds = time.perf_counter() - start
        prompt = sum(r.usage.prompt_tokens for r in responses)
        generated = sum(r.usage.completion_tokens for r in responses)
        row = {"batch_size": bs, "requests": len(batch_requests), "seconds": round(seconds, 2),
               "generated_tokens": generated, "tokens_per_s": round(generated / seconds, 1),
               "prompt_tokens_per_s": round(prompt / seconds, 1)}
        if device.startswith("cuda"):
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results.append(row)
        print(f"batch {bs:>4}: {len(batch_requests)} requests, {generated} tokens in {seconds:.1f} s -> "
              f"{row['tokens_per_s']:.0f} tokens/s ({row['prompt_tokens_per_s']:.0f} prompt tokens/s)"
              + (f", peak {row['peak_gib']} GiB" if "peak_gib" in row else ""))

    engine = HfEngine(model_obj=model, tokenizer=tokenizer, max_model_len=4096, model_name="qwen2.5-0.5b-random")
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in engine.infer_stream(requests[0], config):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    stream = {"ttft_s": round(first or total, 3), "tokens": tokens,
              "tokens_per_s": round(tokens / max(total - (first or 0), 1e-9), 1)}
    print(f"stream (one request): first chunk after {stream['ttft_s']} s, {tokens} tokens, "
          f"{stream['tokens_per_s']} tokens/s")
    print(json.dumps({"benchmark": "hf_infer", "device": device, "dtype": args.dtype, "max_tokens": args.max_tokens,
                      "prompt_tokens": args.prompt_tokens, "temperature": args.temperature, "batches": results,
                      "stream": stream}))


if __name__ == "__main__":
    main()
