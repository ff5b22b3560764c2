"""What each ``lmforge export --quant_method`` costs in quality and saves in size.

For one model, every requested export is written with ``export_main`` and read back by transformers
(GGUF through ``gguf_file=``, so its weights as gguf-py dequantises them), then scored on held-out
rows of ``builtin:arith`` rendered by the model's chat template: perplexity over the assistant
tokens, mean KL(source || export) per token and top-1 agreement with the source. Random-weight
models have a perplexity near their vocabulary size, so KL and agreement carry the comparison there.

    python benchmarks/bench_export_quant.py                                   # builtin:tiny, CPU methods
    python benchmarks/bench_export_quant.py --model qwen2.5-0.5b --methods bnb4 bnb8 fp8 int8 int4 gguf-q8_0
    python benchmarks/bench_export_quant.py --model qwen2.5-0.5b --methods gptq4 awq4 gptq8   # GPU, [quant] extra

gptq/awq are calibrated on ``--quant_n_samples`` rows of builtin:arith's train split. Where transformers cannot
run an FP8 export (offline: its FP8 matmul kernel comes from the Hub), the row reads the exported weights by hand
(each block times its scale; activations unquantised) and says so.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1] / "tests"))  # export_models.fp8_dequantised

METHODS = {"gguf-f16": ("gguf", "f16", None), "gguf-q8_0": ("gguf", "q8_0", None),
           "gguf-q4_k_m": ("gguf", "q4_k_m", None), "int8": ("int8", None, None), "int4": ("int4", None, None),
           "bnb4": ("bnb", None, 4), "bnb8": ("bnb", None, 8), "fp8": ("fp8", None, None),
           "gptq4": ("gptq", None, 4), "gptq8": ("gptq", None, 8), "awq4": ("awq", None, 4)}
# gptq/awq calibrate on the train split of the data the held-out rows come from (the test split)
CALIBRATION = ["builtin:arith"]


def _rows(tok, n: int, max_len: int):
    from lmforge.dataset.builtin import generate_arith

    out = []
    for row in generate_arith(split="test")[:n]:
        prompt = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(row["messages"], tokenize=False)
        ids = tok(full)["input_ids"][:max_len]
        out.append((ids, len(tok(prompt)["input_ids"])))
    return out


def _score(model, rows, ref_logprobs=None):
    import torch

    nll = count = agree = 0.0
    kl = 0.0
    logprobs = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i, (ids, start) in enumerate(rows):
            logits = model(torch.tensor([ids], device=device)).logits[0, start - 1:-1].float()
            lp = torch.log_softmax(logits, -1).cpu()
            target = torch.tensor(ids[start:])
            nll -= lp[torch.arange(len(target)), target].sum().item()
            count += len(target)
            logprobs.append(lp)
            if ref_logprobs is not None:
                ref = ref_logprobs[i]
                kl += (ref.exp() * (ref - lp)).sum().item()
                agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
    return {"ppl": math.exp(nll / count), "kl": kl / count if ref_logprobs else 0.0,
            "top1": agree / count if ref_logprobs else 1.0}, logprobs


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:tiny", help="builtin:tiny, a folder, or qwen2.5-0.5b (random weights)")
    p.add_argument("--methods", nargs="+", default=["gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "int8", "bnb4"],
                   choices=list(METHODS))
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--quant_n_samples", type=int, default=128, help="gptq/awq calibration rows")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import QWEN25_05B, device_name, make_model_dir
    from lmforge.arguments import ExportArguments
    from lmforge.model.hub import resolve_model_dir
    from lmforge.pipelines.export import export_main

    torch.set_num_threads(max(1, torch.get_num_threads() if torch.cuda.is_available() else 1))
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    src = make_model_dir(QWEN25_05B, work / "qwen2.5-0.5b") if args.model == "qwen2.5-0.5b" else \
        resolve_model_dir(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(src)
    rows = _rows(tok, args.rows, args.max_length)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device)
    ref_stats, ref_lp = _score(base, rows)
    del base
    results = {"source": {**ref_stats, "bytes": _size(Path(src))}}
    for name in args.methods:
        method, quant_type, bits = METHODS[name]
        try:
            out = Path(export_main(ExportArguments(model=str(src), quant_method=method, quant_type=quant_type,
                                                   quant_bits=bits, output_dir=str(work / name),
                                                   **({"dataset": CALIBRATION, "quant_n_samples": args.quant_n_samples,
                                                       "max_length": args.max_length}
                                                      if method in ("gptq", "awq") else {})))["output_dir"])
        except (RuntimeError, ImportError, NotImplementedError, ValueError) as e:
            results[name] = {"error": str(e).split(";")[0]}
            continue
        try:  # reading back may need what this machine lacks (fp8's kernel from the hub, offline)
            if method == "gguf":
                gguf_file = next(out.glob("*.gguf")).name
                model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file, dtype=dtype).to(device)
            else:
                model = AutoModelForCausalLM.from_pretrained(out, device_map=device)
            stats, _ = _score(model, rows, ref_lp)
        except ValueError as e:
            if not (method == "fp8" and "offline mode" in str(e)):
                results[name] = {"error": f"reading it back: {str(e).splitlines()[0][:160]}"}
                continue
            # transformers' FP8 matmuls need a kernel from the Hub: read the exported numbers by hand instead
            from export_models import fp8_dequantised

            model = fp8_dequantised(out, device)
            stats, _ = _score(model, rows, ref_lp)
            name = "fp8 (weights dequantised by hand)"
        except (RuntimeError, ImportError, OSError) as e:
            results[name] = {"error": f"reading it back: {str(e).splitlines()[0][:160]}"}
            continue
        results[name] = {**stats, "bytes": _size(out)}
        del model

    print(f"device: {device_name()}; model: {args.model}; {len(rows)} held-out builtin:arith rows")
    print("| export | file bytes | held-out ppl | KL(source‖export)/token | top-1 agreement |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | - | - | - | {r['error']} |")
        else:
            print(f"| {name} | {r['bytes']:,} | {r['ppl']:.3f} | {r['kl']:.2e} | {r['top1']:.4f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
