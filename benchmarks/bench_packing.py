"""Packing on versus off: same data, same model, one epoch each; tokens/s and loss side by side.

    python benchmarks/bench_packing.py                    # GPU: Qwen2.5-0.5B architecture, bf16
    python benchmarks/bench_packing.py --model builtin:tiny --rows 200 --max_length 512   # CPU smoke run

Tokens/s counts real (non-padding) tokens over the training time of one epoch. The loss check
runs both collations over the same rows at the initial weights and compares the token-weighted
mean cross-entropy (it must agree up to kernel rounding); the final training losses are printed too.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN25_05B, device_name, make_model_dir, mixed_length_jsonl  # noqa: E402


def initial_loss(model_dir: str, data: Path, max_length: int, packed: bool, dtype: str) -> float:
    """Token-weighted cross-entropy over all rows at the initial weights, padded or packed."""
    import torch

    from lmforge.dataset import encode_dataset, load_dataset
    from lmforge.dataset.packing import pack_dataset
    from lmforge.model import get_model_tokenizer
    from lmforge.template import get_template
    from lmforge.trainers.collator import Collator

    model, tok = get_model_tokenizer(model_dir, torch_dtype=dtype)
    model.eval()
    tpl = get_template(tok, max_length=max_length)
    tpl.set_mode("train")
    ds = encode_dataset(load_dataset([str(data)], shuffle=False)[0], tpl)
    if packed:
        ds = pack_dataset(ds, max_length)
    coll = Collator(tok.pad_token_id, padding_free=packed)
    total, count = 0.0, 0
    step = 1 if packed else 4
    with torch.no_grad():
        for i in range(0, len(ds), step):
            batch = {k: v.to(model.device) for k, v in coll([ds[j] for j in range(i, min(i + step, len(ds)))]).items()}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            tgt = labels[:, 1:]
            mask = tgt != -100
            total += torch.nn.functional.cross_entropy(logits[mask], tgt[mask], reduction="sum").item()
            count += int(mask.sum())
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return total / count


def train_epoch(model_dir: str, data: Path, out: Path, args, packed: bool) -> dict:
    from lmforge import TrainArguments, sft_main

    res = sft_main(TrainArguments(
        model=model_dir, dataset=[str(data)], train_type=args.train_type, torch_dtype=args.dtype,
        max_length=args.max_length, packing=packed, num_train_epochs=1,
        per_device_train_batch_size=args.bins if packed else args.batch, gradient_accumulation_steps=1,
        learning_rate=args.lr, output_dir=str(out / ("packed" if packed else "padded")), add_version=False,
        save_steps=10**9, logging_steps=10, report_to=["none"], plot=False, save_only_model=True,
        gradient_checkpointing=args.gradient_checkpointing, attn_impl=args.attn_impl))
    final = [h for h in res["log_history"] if "train_runtime" in h and "train_loss" in h][-1]
    state = res["trainer"].state
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return {"tokens": state.num_input_tokens_seen, "seconds": final["train_runtime"],
            "tok_s": state.num_input_tokens_seen / final["train_runtime"], "train_loss": final["train_loss"],
            "steps": state.global_step, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or builtin:tiny (default: random Qwen2.5-0.5B shape)")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="rows per step without packing")
    p.add_argument("--bins", type=int, default=4, help="packed sequences per step with packing")
    p.add_argument("--train_type", default="full")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn_impl", default="sdpa")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-packing-"))
    model_dir = args.model or str(make_model_dir(QWEN25_05B, work / "qwen2.5-0.5b-random"))
    data = mixed_length_jsonl(work / "mixed.jsonl", args.rows, hi=args.max_length - 64)
    loss_pad = initial_loss(model_dir, data, args.max_length, False, args.dtype)
    loss_pack = initial_loss(model_dir, data, args.max_length, True, args.dtype)
    padded = train_epoch(model_dir, data, work, args, packed=False)
    packed = train_epoch(model_dir, data, work, args, packed=True)

    print(f"\n## packing, {device_name()}, model {model_dir}, {args.rows} rows of 64..{args.max_length} tokens, "
          f"{args.train_type}")
    print("| | steps | tokens | seconds | tokens/s | peak GiB | initial loss | final train loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r, l0 in (("padded", padded, loss_pad), ("packed", packed, loss_pack)):
        print(f"| {name} | {r['steps']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tok_s']:,.0f} | "
              f"{r['peak_gib']:.1f} | {l0:.5f} | {r['train_loss']:.4f} |")
    print(f"\npacked/padded tokens/s: {packed['tok_s'] / padded['tok_s']:.2f}x; "
          f"initial-loss relative difference: {abs(loss_pack - loss_pad) / loss_pad:.2e}")


if __name__ == "__main__":
    main()
