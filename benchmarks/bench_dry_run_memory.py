"""The dry run's peak-memory estimate against the peak of real training steps, same GPU, same flags.

    python benchmarks/bench_dry_run_memory.py                 # H100/H200: 0.5B full and 7B LoRA (the issue's bar)
    python benchmarks/bench_dry_run_memory.py --cases 0.5b-full-ckpt 7b-lora-ckpt2
    python benchmarks/bench_dry_run_memory.py --tiny          # CPU smoke run: the plumbing, no memory figures

For each case a random-weight Qwen2.5 checkpoint of that shape is written once (``common.make_model_dir``)
and a mixed-length chat JSONL made; ``lmforge sft ... --dry_run`` gives the estimate, then the same flags
with ``--max_steps`` run real steps in a fresh process whose ``torch.cuda.max_memory_allocated`` is the
measured peak (the process holds nothing else). Printed per case: estimate, measured, ratio
estimate/measured (the issue asks for 0.75..1.25), and the estimate's parts. ``--json FILE`` saves it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN25_05B, QWEN25_7B, device_name, make_model_dir, mixed_length_jsonl  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=True)
# case -> (model shape, flags); packing fills every micro-batch to max_length, so the peak step is every step
CASES = {
    "0.5b-full": ("0.5b", ["--train_type", "full", "--max_length", "2048", "--packing", "true",
                           "--per_device_train_batch_size", "8"]),
    "0.5b-full-ckpt": ("0.5b", ["--train_type", "full", "--max_length", "2048", "--packing", "true",
                                "--per_device_train_batch_size", "8", "--gradient_checkpointing", "true"]),
    "0.5b-full-padded": ("0.5b", ["--train_type", "full", "--max_length", "2048", "--per_device_train_batch_size", "8",
                                  "--gradient_checkpointing", "true"]),
    "7b-lora": ("7b", ["--train_type", "lora", "--lora_rank", "16", "--max_length", "4096", "--packing", "true",
                       "--per_device_train_batch_size", "1"]),
    "7b-lora-ckpt2": ("7b", ["--train_type", "lora", "--lora_rank", "16", "--max_length", "4096", "--packing", "true",
                             "--per_device_train_batch_size", "2", "--gradient_checkpointing", "true",
                             "--gradient_checkpointing_every", "2"]),
    "tiny-full": ("tiny", ["--train_type", "full", "--max_length", "256", "--packing", "true",
                           "--per_device_train_batch_size", "4"]),
    "tiny-lora": ("tiny", ["--train_type", "lora", "--max_length", "256", "--per_device_train_batch_size", "4"]),
}
SPECS = {"0.5b": QWEN25_05B, "7b": QWEN25_7B, "tiny": TINY}
COMMON = ["--learning_rate", "1e-5", "--save_steps", "100000", "--report_to", "none", "--plot", "false",
          "--logging_steps", "1", "--gradient_accumulation_steps", "1", "--warmup_ratio", "0"]

MEASURE = r"""
import json, sys, torch
from lmforge.arguments import TrainArguments, parse_args
from lmforge.pipelines.sft import sft_main
args = parse_args(TrainArguments, sys.argv[1:])
sft_main(args)
print("PEAK " + json.dumps({"allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                            "reserved": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None}))
"""


def estimate(flags: list[str]) -> dict:
    from lmforge.arguments import TrainArguments, parse_args
    from lmforge.toolkit.dry_run import dry_run

    return dry_run(parse_args(TrainArguments, flags), "sft")


def measure(flags: list[str], steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *flags, "--max_steps", str(steps)], capture_output=True,
                         text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("PEAK ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"training failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[5:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=None, choices=sorted(CASES))
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a 1M-parameter model")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cases = a.cases or (["tiny-full", "tiny-lora"] if a.tiny else ["0.5b-full", "0.5b-full-ckpt", "7b-lora",
                                                                   "7b-lora-ckpt2"])
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-dry-run-"))
    work.mkdir(parents=True, exist_ok=True)
    data = mixed_length_jsonl(work / "rows.jsonl", a.rows, lo=64, hi=1800)
    print(f"device: {device_name()}")
    results = []
    for case in cases:
        shape, flags = CASES[case]
        model = make_model_dir(SPECS[shape], work / f"model-{shape}")
        flags = ["--model", str(model), "--dataset", str(data), "--output_dir", str(work / f"out-{case}"),
                 *COMMON, *flags]
        est = estimate(flags)["memory"]
        got = measure(flags, a.steps)
        ratio = est["peak"] / got["allocated"] if got["allocated"] else None
        row = {"case": case, "estimate_gib": est["peak"] / 2 ** 30,
               "measured_gib": got["allocated"] / 2 ** 30 if got["allocated"] else None,
               "reserved_gib": got["reserved"] / 2 ** 30 if got["reserved"] else None, "ratio": ratio,
               "parts_gib": {k: est[k] / 2 ** 30 for k in ("weights", "gradients", "optimizer", "activations",
                                                            "recompute", "loss")}}
        results.append(row)
        shown = "n/a (no GPU)" if ratio is None else f"{row['measured_gib']:.2f} GiB (reserved {row['reserved_gib']:.2f})"
        verdict = "" if ratio is None else ("  within 25%" if 0.75 <= ratio <= 1.25 else "  OUTSIDE 25%")
        print(f"{case:<18} estimate {row['estimate_gib']:.2f} GiB  measured {shown}  "
              f"ratio {'-' if ratio is None else f'{ratio:.3f}'}{verdict}", flush=True)
        print("    parts: " + ", ".join(f"{k} {v:.2f}" for k, v in row["parts_gib"].items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device_name(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
