"""Training speed and memory: lmforge against the strongest transformers recipe, same GPU, model and data.

Rows (each configuration runs in its own process: clean peak-memory counters, no patch leaking):
- padfree: the strong baseline (``train_recipes.run_padfree``): ``transformers.Trainer`` + Liger's Qwen2
  kernels (fused linear CE, RMSNorm, RoPE, SwiGLU; "no Liger" when liger_kernel does not import or on
  CPU) + ``DataCollatorWithFlattening`` (position_ids restart per sequence; ``attn_implementation="sdpa"``,
  which transformers 5 turns into a block-diagonal causal mask: the only exact varlen path it has
  without the flash-attn package; ``flex_attention`` recompiles for each new length, see
  train_recipes), the rows in file order grouped into steps of at most ``--pack_tokens`` real tokens,
  fused AdamW, bf16, no checkpointing (``--padfree_ckpt`` turns it on). Plain Trainer, not a hand loop:
  lmforge's trainer is a Trainer subclass, so both carry the same loop overhead.
- lmforge: ``lmforge.pipelines.sft.run_training`` with its CUDA defaults: packing (bins of
  ``--max_length``, ``--pack_tokens`` tokens per step), varlen attention, fused linear CE, lean
  RMSNorm/SwiGLU (or Liger's), and the cheapest checkpointing (``--ckpt``: off, every 4th, 2nd, every
  layer) whose peak stays under the bar: ``--mem_bar`` x padfree's peak (default 1.0), and ``--mem_bar_gib``.
- padfree @ lmforge peak (``--match_runs`` > 0, GPU only): the same baseline with the largest token
  budget per step whose peak stays within lmforge's peak (a few runs, searched on the measured
  peaks); both peaks are printed.
- padded (weak baseline): the Trainer as usually set up: padded batches of ``--batch`` rows, SDPA,
  the model's own loss over full float32 logits, gradient checkpointing (``--no_padded`` skips it).

Every row counts the same real (non-padding) tokens and the same model FLOPs per step
= k * N * tokens + 6 * L * d_attn * sum(s^2) over the step's sequences (N: matmul parameters, all but
the input embedding; k = 6 full, 4 + 6 * N_trainable / N LoRA; s each sequence's real length;
recomputation not counted). MFU = FLOPs / time / 989 TFLOP/s (H100/H200 SXM dense bf16). Peak memory:
``torch.cuda.max_memory_allocated``. Printed: lmforge/padfree tokens/s ratio (and vs the others).

``--profile DIR``: one training step after ``--warmup`` of padfree and of lmforge under
torch.profiler (CPU+CUDA activities; CPU only on a CPU run): ``DIR/<row>.trace.json.gz`` and a
summary (top 15 kernels, GPU busy vs step wall = host-overhead share, host syncs, loss and optimizer
time; see step_profile.py), then both side by side. ``--loss_curve N``: both lmforge and padded over
the same rows per step, loss curves compared.

On the H200 (no network; carry .whl/ so liger-kernel installs), each under ~4 minutes of GPU time:

    . benchmarks/gpu_env.sh      # prints "liger_kernel 0.8.5"; without it the padfree row says "no Liger"
    # (a) 0.5B full, rows 64..4096 tokens, 16,384 tokens per step: padded, padfree, lmforge, padfree @ lmforge peak
    python3 benchmarks/bench_train.py --model 0.5b --train_type full --workdir /tmp/bt05 --out $OUT/bench_05b.json
    # (b) 7B LoRA r16, rows 64..4096 (4,096-token bins), 8,192 tokens per step, lmforge also under 40 GiB
    python3 benchmarks/bench_train.py --model 7b --match_runs 1 --workdir /tmp/bt7 --out $OUT/bench_7b.json
    # (c) 7B QLoRA (bitsandbytes carried): padfree = Trainer + peft's k-bit preparation + Liger + flattening
    python3 benchmarks/bench_train.py --model 7b --train_type qlora --no_padded --workdir /tmp/bt7q
    # (d) one profiled step each of padfree and lmforge (0.5B full): traces, summaries, side-by-side table
    python3 benchmarks/bench_train.py --model 0.5b --train_type full --profile $OUT/profile --workdir /tmp/btp

Shorter if time runs low: ``--no_padded``, ``--match_runs 0``, ``--steps 10``.

On a CPU: ``python benchmarks/bench_train.py --tiny`` (a 1M-parameter model; every row, no Liger) and
``--tiny --profile /tmp/p``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, mixed_length_jsonl, run_child, step_timer
from train_recipes import (
    SPECS,
    CountingCollator,
    build_model,
    finish,
    liger_usable,
    load_rows,
    marked_loss,
    next_budget,
    recording,
    run_padded,
    run_padfree,
    train_args_common,
)

PRESETS = {  # model -> defaults that the flags override
    "0.5b": dict(max_length=4096, batch=4, train_type=["full", "lora"], mem_bar=1.0, mem_bar_gib=None, steps=20,
                 warmup=5, pack_tokens=16384),
    "7b": dict(max_length=4096, batch=2, train_type=["lora"], mem_bar=1.0, mem_bar_gib=40.0, steps=10, warmup=3,
               pack_tokens=8192),
    "tiny": dict(max_length=256, batch=4, train_type=["full", "lora"], mem_bar=1.0, mem_bar_gib=None, steps=3,
                 warmup=1, pack_tokens=1024),
}
WORDS_PER_TOKEN = 1 / 2.2   # the built-in tokenizer makes about 2.2 tokens of the synthetic words


# ================================================================ lmforge

def run_lmforge(cfg: dict) -> dict:
    import torch

    from lmforge.arguments import TrainArguments
    from lmforge.pipelines.sft import TrainingSetup, run_training
    from lmforge.registry import CALLBACKS
    from lmforge.template import get_template
    from lmforge.trainers.collator import Collator
    from lmforge.trainers.trainer import LmforgeTrainer

    model, tok, on_gpu = build_model(cfg)
    rows = load_rows(cfg["rows"])
    profiling = bool(cfg.get("profile"))
    if profiling:
        from lmforge.trainers.trainer import FusedLoss

        FusedLoss.__call__ = marked_loss(FusedLoss.__call__)
    if cfg.get("curve"):   # the same rows per step as the plain run, flattened padding-free
        train = rows
        per_step = cfg["batch"]
    else:
        from datasets import Dataset

        from lmforge.dataset.packing import pack_dataset

        train = pack_dataset(Dataset.from_list([dict(r, length=len(r["input_ids"])) for r in rows]), cfg["max_length"])
        per_step = max(1, cfg["pack_tokens"] // cfg["max_length"])
    timer = step_timer(cfg["warmup"], cfg.get("profile"))
    CALLBACKS.register("bench_timer", timer, overwrite=True)
    force = "auto" if on_gpu else "true"   # CPU smoke runs exercise the same code paths
    ck = cfg["ckpt"]
    args = TrainArguments(
        model="bench", train_type=cfg["train_type"], output_dir=cfg["out"], add_version=False,
        per_device_train_batch_size=per_step, per_device_eval_batch_size=per_step, gradient_accumulation_steps=1,
        warmup_ratio=0.0, logging_steps=10 if cfg.get("curve") else 10**6, save_steps=10**9, save_only_model=True,
        report_to=["none"], plot=False, packing=True, max_length=cfg["max_length"], callbacks=["bench_timer"],
        gradient_checkpointing=ck not in ("off", "offload"), activation_offloading=ck == "offload",
        gradient_checkpointing_every=int(ck) if ck not in ("off", "offload") else 1,
        use_liger_kernel=cfg["liger"], lora_rank=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], lora_dropout=0.0,
        fused_ce=force, varlen_attention=force, lean_layers=force, torch_compile=cfg.get("compile", False),
        **train_args_common(cfg))
    template = get_template(tok, max_length=cfg["max_length"])
    setup = TrainingSetup(args, cfg["out"], model, tok, template, on_gpu, model.dtype)
    counter = CountingCollator(Collator(tok.pad_token_id, padding_free=True))
    cls = recording(LmforgeTrainer, profiling) if cfg.get("curve") or profiling else None
    if cls is not None:
        cls.bench_record = bool(cfg.get("curve"))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    result = run_training(setup, train, None, trainer_cls=cls, data_collator=counter)
    trainer = result["trainer"]
    return finish(cfg, trainer.model, counter, timer, trainer, {"kernels": _lmforge_kernels(trainer)})


def _lmforge_kernels(trainer: Any) -> list[str]:
    from lmforge.model.kernels import lean_layers, varlen_attention
    from lmforge.trainers import fused_ce

    fused = trainer._fused_ce
    out = [f"attention: {', '.join(varlen_attention.chosen_kernels()) or 'sdpa'}"
           f" ({varlen_attention.stats['varlen_calls']} varlen calls)",
           "loss: " + ((f"fused ({'Liger' if fused.use_liger else 'lmforge ' + fused_ce.kernel_status()})")
                       if fused else "full logits")]
    if trainer.lmforge_args.use_liger_kernel:
        out.append("layers: Liger RMSNorm/RoPE/SwiGLU")
    else:
        out.append(f"layers: lean ({lean_layers.kernel_status()})")
    lean = sum(1 for m in trainer.model.modules() if getattr(m, "_lmforge_lean_lora", False))
    if lean:
        out.append(f"adapters: lean LoRA ({lean} layers)")
    ck = trainer.lmforge_args
    out.append(f"checkpointing: {'every ' + str(ck.gradient_checkpointing_every) if ck.gradient_checkpointing else 'off'}")
    return out


# ================================================================ orchestration

def _child(cfg: dict) -> None:
    fn = {"padded": run_padded, "padfree": run_padfree, "lmforge": run_lmforge}[cfg["path"]]
    try:
        res = fn(cfg)
    except Exception as e:  # noqa: BLE001 - an OOM or failure is a result too
        import torch

        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        res = dict(cfg, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", oom=oom,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
        if not oom:
            import traceback

            traceback.print_exc()
    Path(cfg["result"]).write_text(json.dumps(res))


def _describe(cfg: dict) -> str:
    if cfg["path"] == "lmforge" and not cfg.get("curve"):
        how = "activations offloaded" if cfg["ckpt"] == "offload" else f"checkpointing {cfg['ckpt']}"
        return f"{how}, {cfg['pack_tokens']} tokens/step"
    if cfg["path"] == "padfree":
        return f"<= {cfg['padfree_tokens']} tokens/step" + (" (matching lmforge's peak)" if cfg.get("matched") else "")
    if cfg["path"] == "padded":
        return f"{cfg['batch']} rows/step, padded (weak baseline)"
    return ""


def spawn(cfg: dict, work: Path) -> dict:
    size = cfg.get("padfree_tokens") if cfg["path"] == "padfree" else cfg.get("pack_tokens", cfg["batch"])
    name = f"{cfg['path']}-{cfg['train_type']}-{cfg.get('ckpt', 'na')}-{size}"
    cfg = dict(cfg, out=str(work / name), result=str(work / f"{name}.json"))
    if cfg.get("profile"):
        cfg["profile"] = dict(cfg["profile"], name=f"{cfg['path']}-{cfg['train_type']}")
    print(f"\n== {cfg['path']} {cfg['train_type']}, {_describe(cfg)}", flush=True)
    return run_child(__file__, cfg, cfg, _one_line)[0]


def _one_line(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    mem = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
    return f"{r['tok_s']:,.0f} tokens/s{mfu}{mem}, {r['tokens_per_step']:,.0f} real tokens/step"


def prepare_rows(args: argparse.Namespace, work: Path, n_rows: int) -> tuple[Path, dict]:
    """Chat rows of ``--min_length``..``--max_length`` tokens (log-uniform), encoded once by lmforge's template."""
    from lmforge.dataset import encode_dataset, load_dataset
    from lmforge.model import load_tokenizer
    from lmforge.model.builtin import TOKENIZER_DIR
    from lmforge.template import get_template

    lo = max(8, int(args.min_length * WORDS_PER_TOKEN))
    hi = max(lo + 1, int(args.max_length * WORDS_PER_TOKEN * 0.95))
    src = mixed_length_jsonl(work / "mixed.jsonl", int(n_rows * 1.1) + 8, lo=lo, hi=hi, seed=0)
    tok = load_tokenizer(TOKENIZER_DIR)
    template = get_template(tok, max_length=args.max_length)
    template.set_mode("train")
    ds = encode_dataset(load_dataset([str(src)], shuffle=False)[0], template, cache=False)
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in ds
            if len(r["input_ids"]) <= args.max_length][:n_rows]
    lens = sorted(len(r["input_ids"]) for r in rows)
    stats = dict(rows=len(rows), min=lens[0], median=lens[len(lens) // 2], mean=sum(lens) / len(lens), max=lens[-1])
    path = work / "rows.json"
    path.write_text(json.dumps(rows))
    print(f"data: {stats['rows']} rows, tokens min {stats['min']} / median {stats['median']} / "
          f"mean {stats['mean']:.0f} / max {stats['max']}", flush=True)
    return path, stats


def _base_cfg(args: argparse.Namespace, rows: Path) -> dict:
    return dict(model=args.model, rows=str(rows), batch=args.batch, max_length=args.max_length,
                warmup=args.warmup, steps=args.steps, lora_rank=args.lora_rank, plain_ckpt=args.plain_ckpt,
                liger=args.liger_on, compile=args.compile, padfree_attn=args.padfree_attn,
                padfree_ckpt=args.padfree_ckpt, padfree_liger=args.liger != "false",
                model_dir=str(rows.parent / f"base-{args.model}"))


def _n_rows(args: argparse.Namespace, steps: int) -> int:
    """Enough rows for padfree at twice the largest budget (the matched-memory search may go up)."""
    lo, hi = max(8, args.min_length), args.max_length
    mean = (hi - lo) / math.log(hi / lo) if hi > lo else hi   # log-uniform lengths
    return max(args.rows or 0, steps * max(args.batch, 1), int(1.2 * steps * 2 * max(args.pack_tokens) / mean) + 16)


def speed(args: argparse.Namespace, work: Path) -> dict:
    rows, stats = prepare_rows(args, work, _n_rows(args, args.warmup + args.steps))
    report: dict[str, Any] = {"device": device_name(), "model": args.model, "data": stats, "runs": [], "best": {}}
    for tt in args.train_type:
        lr = args.lr or (1e-4 if tt == "full" else 2e-4)
        base = dict(_base_cfg(args, rows), train_type=tt, lr=lr)
        padded = None if args.no_padded else spawn(dict(base, path="padded"), work)
        for pack in args.pack_tokens:
            padfree = spawn(dict(base, path="padfree", padfree_tokens=pack), work)
            bar = _memory_bar(args, padfree)
            print(f"   memory bar for lmforge: {bar:.2f} GiB" if bar else "   memory bar: none (CPU)", flush=True)
            best = None
            for ck in args.ckpt:
                r = spawn(dict(base, path="lmforge", ckpt=ck, pack_tokens=pack), work)
                if not r.get("error") and (bar is None or (r.get("peak_gib") or 0) <= bar):
                    best = r
                    break  # later settings checkpoint more: slower
            matched = _match_memory(args, base, padfree, best, work)
            runs = dict(padfree=padfree, lmforge=best, matched=matched, padded=padded)
            report["runs"].append(runs)
            report["best"][f"{tt}-{pack}"] = best
            _summary(tt, runs, bar)
    return report


def _memory_bar(args: argparse.Namespace, padfree: dict) -> float | None:
    bars = []
    if args.mem_bar and padfree.get("peak_gib") and not padfree.get("error"):
        bars.append(args.mem_bar * padfree["peak_gib"])
    if args.mem_bar_gib:
        bars.append(args.mem_bar_gib)
    return min(bars) if bars else None


def _match_memory(args: argparse.Namespace, base: dict, padfree: dict, best: dict | None, work: Path) -> dict | None:
    """padfree with the largest token budget whose peak stays within lmforge's (``--match_runs`` tries)."""
    if not args.match_runs or best is None or best.get("peak_gib") is None or padfree.get("peak_gib") is None:
        if args.match_runs:
            print("   matched-memory padfree: skipped (needs GPU peaks from both)", flush=True)
        return None
    target = best["peak_gib"]
    points = [(padfree["padfree_tokens"], padfree["peak_gib"])]
    fits = padfree if padfree["peak_gib"] <= target and not padfree.get("error") else None
    if padfree.get("error"):
        print("   matched-memory padfree: skipped (padfree failed at the matched budget)", flush=True)
        return None
    longest = max(max(o) for o in padfree["order"])
    static = padfree.get("static_gib")
    for _ in range(args.match_runs):
        budget = next_budget(points, target, static, longest)
        if any(b == budget for b, _ in points):
            break
        r = spawn(dict(base, path="padfree", padfree_tokens=budget, matched=True), work)
        points.append((budget, r.get("peak_gib") or float("inf")))
        ok = not r.get("error") and r["peak_gib"] <= target
        if ok and (fits is None or budget > fits["padfree_tokens"]):
            fits = r
        if ok and r["peak_gib"] >= 0.97 * target:
            break
    print(f"   matched memory: lmforge peak {target:.2f} GiB; padfree tried "
          + ", ".join(f"{b} tokens -> {p:.2f} GiB" for b, p in points), flush=True)
    return fits


def _summary(tt: str, runs: dict, bar: float | None) -> None:
    print(f"\n## {tt}: lmforge vs transformers recipes")
    print("| row | tokens/s | MFU | peak GiB | real tokens/step | kernels |")
    print("|---|---|---|---|---|---|")
    labels = dict(lmforge="lmforge", padfree="padfree (Trainer + Liger + flattening)",
                  matched="padfree (Trainer + Liger + flattening) @ lmforge's peak", padded="padded (weak baseline)")
    for key in ("padfree", "matched"):
        if runs.get(key) and not runs[key].get("liger", True):
            labels[key] = labels[key].replace(" + Liger", "") + " [no Liger]"
    for key, name in labels.items():
        r = runs.get(key)
        if r is None:
            if key == "lmforge":
                print("| lmforge | no configuration under the memory bar | | | | |")
            continue
        if r.get("error"):
            print(f"| {name} | {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "n/a"
        print(f"| {name} | {r['tok_s']:,.0f} | {mfu} | {peak} | {r['tokens_per_step']:,.0f} | "
              f"{'; '.join(r.get('kernels', []))} |")
    ours = runs.get("lmforge")
    if not ours or ours.get("error"):
        return
    for key in ("padfree", "matched", "padded"):
        r = runs.get(key)
        if r and not r.get("error"):
            mem = (f", peak {ours['peak_gib']:.2f} vs {r['peak_gib']:.2f} GiB"
                   if ours.get("peak_gib") is not None and r.get("peak_gib") is not None else "")
            print(f"lmforge/{labels[key]}: tokens/s {ours['tok_s'] / r['tok_s']:.2f}x{mem}", flush=True)
    if bar:
        print(f"(lmforge's memory bar: {bar:.2f} GiB)", flush=True)


def profile(args: argparse.Namespace, work: Path) -> dict:
    """One step after warm-up of padfree and lmforge under torch.profiler; both summaries side by side."""
    from step_profile import compare

    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    steps = 1   # one timed step after the profiled one (the run still reports tokens/s)
    rows, stats = prepare_rows(args, work, _n_rows(args, args.warmup + steps + 1))
    report: dict[str, Any] = {"device": device_name(), "model": args.model, "data": stats, "profiles": {}}
    pack = args.pack_tokens[0]
    for tt in args.train_type:
        lr = args.lr or (1e-4 if tt == "full" else 2e-4)
        base = dict(_base_cfg(args, rows), train_type=tt, lr=lr, steps=steps, profile={"dir": str(out)})
        runs = [spawn(dict(base, path="padfree", padfree_tokens=pack), work),
                spawn(dict(base, path="lmforge", ckpt=args.ckpt[0], pack_tokens=pack), work)]
        sums = []
        for r in runs:
            f = out / f"{r['path']}-{tt}.summary.json"
            sums.append(json.loads(f.read_text()) if f.is_file() else None)
        report["profiles"][tt] = dict(zip(("padfree", "lmforge"), sums))
        if all(sums):
            text = compare(sums[1], sums[0])
            (out / f"compare-{tt}.txt").write_text(text + "\n")
            print(f"\n## step profile, {tt}\n{text}", flush=True)
        else:
            print(f"\n## step profile, {tt}: a run failed: {[r.get('error') for r in runs]}", flush=True)
    print(f"profiles in {out}", flush=True)
    return report


def loss_curve(args: argparse.Namespace, work: Path) -> dict:
    n = args.loss_curve
    rows, stats = prepare_rows(args, work, max(args.rows or 0, n * args.batch))
    print("loss curve: padded transformers recipe vs lmforge (same rows per step, flattened)", flush=True)
    report: dict[str, Any] = {"device": device_name(), "model": args.model, "data": stats, "curves": {}}
    for tt in args.train_type:
        lr = args.lr or (1e-4 if tt == "full" else 2e-4)
        base = dict(_base_cfg(args, rows), train_type=tt, lr=lr, warmup=0, steps=n, curve=True)
        plain = spawn(dict(base, path="padded"), work)
        ours = spawn(dict(base, path="lmforge", ckpt=args.ckpt[0], pack_tokens=0), work)
        if plain.get("error") or ours.get("error"):
            report["curves"][tt] = {"plain": plain, "lmforge": ours}
            continue
        a, b = plain["losses"], ours["losses"]
        diff = [abs(x - y) for x, y in zip(a, b)]
        tail = diff[-min(50, len(diff)):]
        # noise scale: how far the plain curve strays from its own 9-step moving average
        smooth = [sum(a[max(0, i - 4):i + 5]) / len(a[max(0, i - 4):i + 5]) for i in range(len(a))]
        noise = math.sqrt(sum((x - s) ** 2 for x, s in zip(a, smooth)) / len(a))
        same_order = plain["order"] == ours["order"]
        summary = dict(steps=len(diff), max_abs_diff=max(diff), mean_abs_diff_last50=sum(tail) / len(tail),
                       final_plain=a[-1], final_lmforge=b[-1], plain_noise_rms=noise, same_data_order=same_order)
        report["curves"][tt] = dict(summary, plain=a, lmforge=b, kernels=ours.get("kernels"))
        print(f"\n## loss curve, {tt}, {len(diff)} steps: first {a[0]:.4f} / {b[0]:.4f}, final {a[-1]:.4f} / {b[-1]:.4f}"
              f" (plain / lmforge); max |diff| {max(diff):.4f}, mean |diff| over the last {len(tail)} steps "
              f"{sum(tail) / len(tail):.4f}; plain's own step noise (rms about a 9-step mean) {noise:.4f}; "
              f"same rows per step: {'yes' if same_order else 'NO'}", flush=True)
        _write_curve(work, tt, a, b)
    return report


def _write_curve(work: Path, tt: str, a: list[float], b: list[float]) -> None:
    csv = work / f"loss_curve_{tt}.csv"
    csv.write_text("step,plain,lmforge\n" + "".join(f"{i + 1},{x:.6f},{y:.6f}\n" for i, (x, y) in enumerate(zip(a, b))))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(1, len(a) + 1), a, label="plain transformers")
        ax.plot(range(1, len(b) + 1), b, label="lmforge", alpha=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.savefig(work / f"loss_curve_{tt}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    except ImportError:
        pass
    print(f"   curves written to {csv}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(SPECS), default="0.5b")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: --model tiny")
    p.add_argument("--train_type", nargs="+", choices=["full", "lora", "qlora"], default=None,
                   help="qlora (GPU, bitsandbytes): the random model is saved once under the work dir and loaded in 4 bits")
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=None, help="steps before the clock starts (compilation happens here)")
    p.add_argument("--batch", type=int, default=None, help="padded baseline: rows per step")
    p.add_argument("--max_length", type=int, default=None, help="longest row; lmforge's bin size")
    p.add_argument("--min_length", type=int, default=64, help="shortest row (lengths spread log-uniformly)")
    p.add_argument("--pack_tokens", type=int, nargs="+", default=None,
                   help="lmforge and padfree: tokens per step (preset: 0.5b 16384, 7b 8192); each value is a comparison")
    p.add_argument("--ckpt", nargs="+", default=["off", "4", "2", "1"],
                   help="lmforge memory settings tried in order (off, every k-th layer checkpointed, or offload: --activation_offloading) until one fits")
    p.add_argument("--plain_ckpt", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="padded baseline with gradient checkpointing (default true)")
    p.add_argument("--no_padded", action="store_true", help="skip the padded (weak baseline) row")
    p.add_argument("--padfree_attn", default="sdpa", choices=["sdpa", "flex_attention", "eager"],
                   help="padfree baseline's attn_implementation (sdpa: block-diagonal mask from position_ids)")
    p.add_argument("--padfree_ckpt", action="store_true", help="padfree baseline with gradient checkpointing")
    p.add_argument("--match_runs", type=int, default=2,
                   help="runs of padfree searching the largest budget within lmforge's peak (GPU; 0: off)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile one step of padfree and lmforge into DIR (instead of the speed table)")
    p.add_argument("--mem_bar", type=float, default=None, help="lmforge's peak must stay under this x padfree's peak")
    p.add_argument("--mem_bar_gib", type=float, default=None, help="... and under this many GiB")
    p.add_argument("--liger", choices=["auto", "true", "false"], default="auto",
                   help="Liger kernels for lmforge and the padfree baseline (auto: when installed and on a GPU; "
                        "false: both without)")
    p.add_argument("--compile", action="store_true", help="lmforge with --torch_compile")
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 full, 2e-4 LoRA")
    p.add_argument("--rows", type=int, default=None, help="rows to generate (default: enough for every step)")
    p.add_argument("--loss_curve", type=int, default=0, metavar="N", help="run N steps of both paths; compare losses")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="JSON report (default: <workdir>/bench_train.json)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    preset = PRESETS[args.model]
    for key in ("max_length", "batch", "train_type", "mem_bar", "mem_bar_gib", "steps", "warmup", "pack_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if isinstance(args.pack_tokens, int):
        args.pack_tokens = [args.pack_tokens]
    return args


def main() -> None:
    args = parse_args()
    if args._child:
        _child(json.loads(args._child))
        return
    import torch

    on_gpu = torch.cuda.is_available()
    if args.liger == "auto":
        args.liger_on = liger_usable()
    else:
        args.liger_on = args.liger == "true"
    if args.model != "tiny" and not on_gpu:
        sys.exit("bench_train: the 0.5b/7b models need a CUDA GPU; use --tiny on a CPU")
    if "qlora" in args.train_type and not (on_gpu and importlib.util.find_spec("bitsandbytes")):
        sys.exit("bench_train: --train_type qlora needs a CUDA GPU and bitsandbytes")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_train on {device_name()}: model {args.model}, {args.train_type}, rows {args.min_length}.."
          f"{args.max_length} tokens, padded batch {args.batch}, lmforge/padfree {args.pack_tokens} tokens/step, "
          f"liger {'on' if args.liger_on else 'off'}; work dir {work}", flush=True)
    report = profile(args, work) if args.profile else loss_curve(args, work) if args.loss_curve else speed(args, work)
    out = Path(args.out or work / "bench_train.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"\nreport: {out}")


if __name__ == "__main__":
    main()
