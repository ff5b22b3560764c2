"""Rollout throughput of one GRPO step: ``--infer_backend hf`` vs ``native`` on the same prompts.

    python benchmarks/bench_grpo_rollout.py                        # GPU: Qwen2.5-0.5B shape, random bf16 weights
    python benchmarks/bench_grpo_rollout.py --prompts 64 --num_generations 16 --max_tokens 512
    python benchmarks/bench_grpo_rollout.py --tiny                 # a tiny model on CPU: checks the script runs

One rollout is what a GRPO trainer does at the start of a step: ``--prompts`` chat prompts (arithmetic
questions of ``builtin:arith-rl``, rendered by the built-in tokenizer's template and sent as token
ids), ``--num_generations`` samples each at temperature 1, through
:func:`lmforge.rlhf.rollout.run_rollouts`, with each engine built as the trainer builds it:

- ``hf``: :class:`~lmforge.infer.hf.HfEngine` on the policy itself (colocated, no weight copy);
- ``native``: :class:`~lmforge.infer.native.NativeEngine` built from the policy, its weights refreshed
  with ``update_weights`` (the trainer does this after every optimizer step; its time is reported
  apart as ``sync_s``).

Random weights almost never emit the end-of-turn token, so every sample runs to ``--max_tokens``
and both engines generate the same number of tokens. Each engine gets one small warm-up rollout
first. Prints a line per engine, the native/hf ratio, and a JSON summary. Without CUDA the native
engine is skipped (``--native_on_cpu`` runs its CPU reference path instead, to check the plumbing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=True)


def load_policy(args: argparse.Namespace, device: str):
    import torch

    from common import QWEN25_05B, make_model_dir
    from lmforge.model import get_model_tokenizer

    spec = TINY if args.tiny else QWEN25_05B
    folder = make_model_dir(spec, Path(args.workdir) / ("tiny" if args.tiny else "qwen2.5-0.5b"),
                            dtype="float32" if args.tiny else "bfloat16")
    model, tok = get_model_tokenizer(str(folder), device=device, torch_dtype=args.dtype or "auto",
                                     attn_impl=args.attn_impl)
    if args.tiny and spec["vocab_size"] < len(tok):
        model.resize_token_embeddings(len(tok))
    torch.manual_seed(args.seed)
    return model, tok


def make_prompts(template, n: int):
    from lmforge.rlhf.data import arith_rl_rows
    from lmforge.rlhf.rollout import RolloutPrompt

    rows = arith_rl_rows()[:n]
    return [RolloutPrompt(r["messages"], None, template.encode({"messages": r["messages"]})["input_ids"], r)
            for r in rows]


def run(engine, prompts, args, sync=None) -> dict:
    import torch

    from lmforge.infer.protocol import RequestConfig
    from lmforge.rlhf.rollout import run_rollouts

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    cfg = RequestConfig(max_tokens=args.max_tokens, temperature=1.0)
    run_rollouts(engine, prompts[:2], cfg.model_copy(update={"max_tokens": 4}), num_generations=2)  # warm-up
    out = {}
    if sync is not None:
        synchronize()
        t = time.perf_counter()
        sync()
        synchronize()
        out["sync_s"] = round(time.perf_counter() - t, 3)
    synchronize()
    t = time.perf_counter()
    episodes = run_rollouts(engine, prompts, cfg, num_generations=args.num_generations)
    synchronize()
    seconds = time.perf_counter() - t
    tokens = sum(e.generated_tokens for e in episodes)
    out.update(samples=len(episodes), generated_tokens=tokens, seconds=round(seconds, 3),
               tokens_per_s=round(tokens / seconds, 1))
    if torch.cuda.is_available():
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=32, help="prompts per rollout (per_device_train_batch_size)")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=256, help="max_completion_length")
    p.add_argument("--backends", nargs="+", default=["hf", "native"], choices=["hf", "native"])
    p.add_argument("--dtype", default=None, help="default: bf16 on GPU, float32 on CPU")
    p.add_argument("--attn_impl", default="sdpa")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.3,
                   help="native: the share of the GPU it may take beside training (as --rollout_gpu_memory_utilization)")
    p.add_argument("--workdir", default="/tmp/lmforge-bench-grpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, 4 prompts x 4 samples x 16 tokens (CPU)")
    p.add_argument("--native_on_cpu", action="store_true", help="without CUDA, run native's CPU reference path")
    args = p.parse_args()

    import torch

    from lmforge.template import get_template

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.tiny:
        args.prompts, args.num_generations, args.max_tokens = min(args.prompts, 4), min(args.num_generations, 4), 16
    policy, tok = load_policy(args, device)
    template = get_template(tok)
    template.set_mode("infer")
    prompts = make_prompts(template, args.prompts)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"policy: Qwen2 {n_params / 1e6:.1f}M params, {next(policy.parameters()).dtype}, on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}; one rollout = {args.prompts} prompts x "
          f"{args.num_generations} samples x {args.max_tokens} tokens")
    results: dict[str, dict] = {}
    for backend in args.backends:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if backend == "hf":
            from lmforge.infer.hf import HfEngine

            engine = HfEngine(model_obj=policy, tokenizer=tok, template=template,
                              max_batch_size=args.prompts * args.num_generations)
            results["hf"] = run(engine, prompts, args)
        else:
            if not cuda and not args.native_on_cpu:
                print("native: skipped (no CUDA; --native_on_cpu runs its CPU reference path)")
                continue
            from lmforge.infer import get_engine
            from lmforge.rlhf.rollout import policy_named_weights

            kw = dict(allow_cpu=True) if not cuda else {}
            try:
                engine = get_engine("native", model_obj=policy, tokenizer=tok, template=template,
                                    max_num_seqs=args.prompts * args.num_generations,
                                    gpu_memory_utilization=args.gpu_memory_utilization, **kw)
            except (ImportError, RuntimeError, TypeError) as e:
                print(f"native: skipped ({type(e).__name__}: {e})")
                continue
            results["native"] = run(engine, prompts, args,
                                    sync=lambda: engine.update_weights(policy_named_weights(policy)))
            getattr(engine, "close", lambda: None)()
        r = results[backend]
        print(f"{backend:>6}: {r['samples']} samples, {r['generated_tokens']} tokens in {r['seconds']} s -> "
              f"{r['tokens_per_s']:.0f} tokens/s" + (f" (weight sync {r['sync_s']} s)" if "sync_s" in r else "")
              + (f", peak {r['peak_gib']} GiB" if "peak_gib" in r else ""))
    ratio = None
    if "hf" in results and "native" in results:
        ratio = round(results["native"]["tokens_per_s"] / results["hf"]["tokens_per_s"], 2)
        print(f"native / hf rollout tokens/s: {ratio}x")
    print(json.dumps({"benchmark": "grpo_rollout", "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "prompts": args.prompts, "num_generations": args.num_generations, "max_tokens": args.max_tokens,
                      "results": results, "native_over_hf": ratio}))


if __name__ == "__main__":
    main()
