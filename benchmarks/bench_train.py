"""Training speed and memory: the plain transformers recipe against lmforge's, same GPU, model and data.

    python benchmarks/bench_train.py                              # H100: Qwen2.5-0.5B shape, full and LoRA
    python benchmarks/bench_train.py --model 7b                   # Qwen2.5-7B shape, LoRA, 4096-token rows, 40 GiB bar
    python benchmarks/bench_train.py --loss_curve 200             # both paths, same rows per step: loss curves
    python benchmarks/bench_train.py --tiny                       # CPU smoke run (a 1M-parameter model)

plain: ``transformers.Trainer`` as usually set up: padded batches of ``--batch`` mixed-length rows,
SDPA, gradient checkpointing, fused AdamW, bf16, the model's own loss (logits upcast to float32).
lmforge: ``lmforge.pipelines.sft.run_training`` with its defaults on CUDA: packing (bins of
``--max_length``, ``--pack_tokens`` tokens per step), variable-length attention, fused linear +
cross-entropy, lean RMSNorm/SwiGLU (or Liger's kernels when installed), and the cheapest
activation checkpointing whose peak memory stays under the bar (``--mem_bar`` x plain's peak, or
``--mem_bar_gib``): no checkpointing first, then every 4th, 2nd, every layer. Same random
weights (seeded), same rows, same optimizer and learning rate. Each configuration runs in its own
process (clean peak-memory counters, no monkey-patch leaking into the plain run).

Reported per configuration, over the ``--steps`` steps after ``--warmup``:
- tokens/s: real (non-padding) tokens / wall time;
- MFU: model FLOPs / time / 989 TFLOP/s (H100 SXM dense bf16). Model FLOPs per step
  = k * N * tokens + 6 * L * d_attn * sum(s^2) over the step's sequences, with N the parameters
  used in matmuls (all but the input embedding; lm_head counted), k = 6 for full fine-tuning
  and k = 4 + 6 * N_trainable / N for LoRA (frozen weights get no weight gradient), L layers,
  d_attn = heads * head_dim, s each sequence's real length (causal attention, forward + backward);
  recomputation by checkpointing is not counted;
- peak GPU memory: ``torch.cuda.max_memory_allocated`` over the run (weights, optimizer, activations).

``--loss_curve N`` runs N steps of both paths over the same rows per step (lmforge flattens each
step's rows padding-free instead of packing bins) and prints and saves both loss curves (float32
scalars) with their differences.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN25_05B, QWEN25_7B, device_name, mixed_length_jsonl, step_timer  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=True)
SPECS = {"0.5b": QWEN25_05B, "7b": QWEN25_7B, "tiny": TINY}
PRESETS = {  # model -> defaults that the flags override
    "0.5b": dict(max_length=2048, batch=8, train_type=["full", "lora"], mem_bar=0.6, mem_bar_gib=None, steps=20,
                 warmup=5),
    "7b": dict(max_length=4096, batch=2, train_type=["lora"], mem_bar=None, mem_bar_gib=40.0, steps=10, warmup=3),
    "tiny": dict(max_length=256, batch=4, train_type=["full", "lora"], mem_bar=None, mem_bar_gib=None, steps=3,
                 warmup=1),
}
H100_BF16_PEAK = 989e12
WORDS_PER_TOKEN = 1 / 2.2   # the built-in tokenizer makes about 2.2 tokens of the synthetic words


# ================================================================ shared by both paths (run in the child)

def _row_lengths(row: dict) -> list[int]:
    pos = row.get("position_ids")
    if pos is None:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [e - s for s, e in zip(starts, starts[1:])]


class CountingCollator:
    """Wraps a collator; records each batch's real tokens, sum of squared sequence lengths and row lengths."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.batches: list[tuple[int, int, list[int]]] = []

    def __call__(self, rows: list[dict]) -> dict:
        lens = [n for r in rows for n in _row_lengths(r)]
        self.batches.append((sum(lens), sum(n * n for n in lens), [len(r["input_ids"]) for r in rows]))
        return self.inner(rows)


def _recording(trainer_cls: type) -> type:
    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training:
                self.bench_losses.append((out[0] if return_outputs else out).detach().float())
            return out

    Recording.bench_losses = []
    return Recording


def _build_model(cfg: dict):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lmforge.model import load_tokenizer
    from lmforge.model.builtin import TOKENIZER_DIR

    tok = load_tokenizer(TOKENIZER_DIR)
    on_gpu = torch.cuda.is_available()
    conf = Qwen2Config(**SPECS[cfg["model"]], rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                       use_cache=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    with torch.device("cuda" if on_gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation="sdpa")
    return model, tok, on_gpu


def _model_flops(model: Any, tokens: int, sum_sq: int, full: bool) -> float:
    cfg = model.config
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings().weight
    total = sum(p.numel() for p in base.parameters())
    n = total - (0 if cfg.tie_word_embeddings else emb.numel())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    k = 6.0 if full else 4.0 + 6.0 * trainable / n
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", None) if getattr(cfg, "head_dim", None) else \
        cfg.hidden_size
    return k * n * tokens + 6.0 * cfg.num_hidden_layers * d_attn * sum_sq


def _load_rows(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())


def _train_args_common(cfg: dict, on_gpu: bool) -> dict:
    return dict(max_steps=cfg["warmup"] + cfg["steps"], learning_rate=cfg["lr"], lr_scheduler_type="constant",
                weight_decay=0.0, max_grad_norm=1.0, seed=42, data_seed=42)


def _finish(cfg: dict, model: Any, counter: CountingCollator, timer: Any, trainer: Any, extra: dict) -> dict:
    import torch

    w, end = cfg["warmup"], cfg["warmup"] + cfg["steps"]
    window = counter.batches[w:end]
    tokens = sum(b[0] for b in window)
    sum_sq = sum(b[1] for b in window)
    seconds = (timer.t1 - timer.t0) if timer.t0 is not None and timer.t1 is not None else float("nan")
    on_gpu = torch.cuda.is_available()
    flops = _model_flops(model, tokens, sum_sq, cfg["train_type"] == "full")
    out = dict(cfg, tokens=tokens, seconds=seconds, tok_s=tokens / seconds if seconds else float("nan"),
               mfu=(flops / seconds / H100_BF16_PEAK) if on_gpu and seconds else None,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
               reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
               tokens_per_step=tokens / max(1, len(window)),
               order=[b[2] for b in counter.batches[:end]], **extra)
    losses = getattr(trainer, "bench_losses", None)
    if losses:
        out["losses"] = [float(x) for x in torch.stack(losses).cpu()]
    return out


# ================================================================ the plain recipe

def run_plain(cfg: dict) -> dict:
    import dataclasses

    import torch
    from transformers import Trainer, TrainingArguments

    from lmforge.trainers.collator import Collator

    model, tok, on_gpu = _build_model(cfg)
    if cfg["train_type"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = _load_rows(cfg["rows"])
    counter = CountingCollator(Collator(tok.pad_token_id))
    timer = step_timer(cfg["warmup"])
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    targs = TrainingArguments(
        output_dir=cfg["out"], per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
        logging_steps=10 if cfg.get("curve") else 10**6, save_strategy="no", report_to="none", bf16=on_gpu,
        optim="adamw_torch_fused" if on_gpu else "adamw_torch", remove_unused_columns=False,
        dataloader_drop_last=True, disable_tqdm=True, use_cpu=not on_gpu,
        **{ckpt: cfg["plain_ckpt"], f"{ckpt}_kwargs": {"use_reentrant": False}}, **_train_args_common(cfg, on_gpu))
    cls = _recording(Trainer) if cfg.get("curve") else Trainer
    trainer = cls(model=model, args=targs, train_dataset=rows, data_collator=counter, callbacks=[timer])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    kernels = ["sdpa (4D mask for padded rows)", "model's own loss over full logits",
               f"gradient checkpointing {'on' if cfg['plain_ckpt'] else 'off'}"]
    return _finish(cfg, model, counter, timer, trainer, {"kernels": kernels})


# ================================================================ lmforge

def run_lmforge(cfg: dict) -> dict:
    import torch

    from lmforge.arguments import TrainArguments
    from lmforge.pipelines.sft import TrainingSetup, run_training
    from lmforge.registry import CALLBACKS
    from lmforge.template import get_template
    from lmforge.trainers.collator import Collator
    from lmforge.trainers.trainer import LmforgeTrainer

    model, tok, on_gpu = _build_model(cfg)
    rows = _load_rows(cfg["rows"])
    if cfg.get("curve"):   # the same rows per step as the plain run, flattened padding-free
        train = rows
        per_step = cfg["batch"]
    else:
        from datasets import Dataset

        from lmforge.dataset.packing import pack_dataset

        train = pack_dataset(Dataset.from_list([dict(r, length=len(r["input_ids"])) for r in rows]), cfg["max_length"])
        per_step = max(1, cfg["pack_tokens"] // cfg["max_length"])
    timer = step_timer(cfg["warmup"])
    CALLBACKS.register("bench_timer", timer, overwrite=True)
    force = "auto" if on_gpu else "true"   # CPU smoke runs exercise the same code paths
    ck = cfg["ckpt"]
    args = TrainArguments(
        model="bench", train_type=cfg["train_type"], output_dir=cfg["out"], add_version=False,
        per_device_train_batch_size=per_step, per_device_eval_batch_size=per_step, gradient_accumulation_steps=1,
        warmup_ratio=0.0, logging_steps=10 if cfg.get("curve") else 10**6, save_steps=10**9, save_only_model=True,
        report_to=["none"], plot=False, packing=True, max_length=cfg["max_length"], callbacks=["bench_timer"],
        gradient_checkpointing=ck != "off", gradient_checkpointing_every=int(ck) if ck != "off" else 1,
        use_liger_kernel=cfg["liger"], lora_rank=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], lora_dropout=0.0,
        fused_ce=force, varlen_attention=force, lean_layers=force, torch_compile=cfg.get("compile", False),
        **_train_args_common(cfg, on_gpu))
    template = get_template(tok, max_length=cfg["max_length"])
    setup = TrainingSetup(args, cfg["out"], model, tok, template, on_gpu, model.dtype)
    counter = CountingCollator(Collator(tok.pad_token_id, padding_free=True))
    cls = _recording(LmforgeTrainer) if cfg.get("curve") else None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    result = run_training(setup, train, None, trainer_cls=cls, data_collator=counter)
    trainer = result["trainer"]
    return _finish(cfg, trainer.model, counter, timer, trainer, {"kernels": _lmforge_kernels(trainer)})


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
    ck = trainer.lmforge_args
    out.append(f"checkpointing: {'every ' + str(ck.gradient_checkpointing_every) if ck.gradient_checkpointing else 'off'}")
    return out


# ================================================================ orchestration

def _child(cfg: dict) -> None:
    fn = run_plain if cfg["path"] == "plain" else run_lmforge
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


def spawn(cfg: dict, work: Path) -> dict:
    name = f"{cfg['path']}-{cfg['train_type']}-{cfg.get('ckpt', 'na')}-{cfg.get('pack_tokens', 0)}"
    cfg = dict(cfg, out=str(work / name), result=str(work / f"{name}.json"))
    what = (f"{cfg['path']} {cfg['train_type']}" + (f", checkpointing {cfg['ckpt']}, {cfg['pack_tokens']} tokens/step"
                                                    if cfg["path"] == "lmforge" and not cfg.get("curve") else ""))
    print(f"\n== {what}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    t = time.time()
    proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(cfg)], env=env)
    res = json.loads(Path(cfg["result"]).read_text()) if Path(cfg["result"]).is_file() else dict(
        cfg, error=f"child exited with {proc.returncode}")
    res["wall"] = time.time() - t
    print(f"   -> {_one_line(res)}  ({res['wall']:.0f}s)", flush=True)
    return res


def _one_line(r: dict) -> str:
    if r.get("error"):
        return ("OOM" if r.get("oom") else "FAILED") + f": {r['error']}"
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    mem = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
    return f"{r['tok_s']:,.0f} tokens/s{mfu}{mem}"


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
                liger=args.liger_on, compile=args.compile)


def speed(args: argparse.Namespace, work: Path) -> dict:
    steps = args.warmup + args.steps
    n_rows = max(args.rows or 0, steps * max(args.batch, 1), int(steps * max(args.pack_tokens) * 1.2 / 400))
    rows, stats = prepare_rows(args, work, n_rows)
    report: dict[str, Any] = {"device": device_name(), "model": args.model, "data": stats, "runs": []}
    for tt in args.train_type:
        lr = args.lr or (1e-4 if tt == "full" else 2e-4)
        base = dict(_base_cfg(args, rows), train_type=tt, lr=lr)
        plain = spawn(dict(base, path="plain"), work)
        report["runs"].append(plain)
        bar = _memory_bar(args, plain)
        print(f"   memory bar for lmforge: {bar:.1f} GiB" if bar else "   memory bar: none (CPU)", flush=True)
        best = None
        for pack in args.pack_tokens:
            for ck in args.ckpt:
                r = spawn(dict(base, path="lmforge", ckpt=ck, pack_tokens=pack), work)
                report["runs"].append(r)
                fits = not r.get("error") and (bar is None or (r.get("peak_gib") or 0) <= bar)
                if fits:
                    if best is None or r["tok_s"] > best["tok_s"]:
                        best = r
                    break  # later settings checkpoint more: slower
        report.setdefault("best", {})[tt] = best
        _summary(tt, plain, best, bar)
    return report


def _memory_bar(args: argparse.Namespace, plain: dict) -> float | None:
    bars = []
    if args.mem_bar and plain.get("peak_gib"):
        bars.append(args.mem_bar * plain["peak_gib"])
    if args.mem_bar_gib:
        bars.append(args.mem_bar_gib)
    return min(bars) if bars else None


def _summary(tt: str, plain: dict, best: dict | None, bar: float | None) -> None:
    print(f"\n## {tt}: plain vs lmforge")
    print("| path | tokens/s | MFU | peak GiB | tokens/step | kernels |")
    print("|---|---|---|---|---|---|")
    for name, r in (("plain", plain), ("lmforge", best)):
        if r is None:
            print(f"| {name} | no configuration under the memory bar | | | | |")
            continue
        if r.get("error"):
            print(f"| {name} | {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        print(f"| {name} | {r['tok_s']:,.0f} | {mfu} | {peak} | {r['tokens_per_step']:,.0f} | "
              f"{'; '.join(r.get('kernels', []))} |")
    if best and not best.get("error") and not plain.get("error"):
        ratio = best["tok_s"] / plain["tok_s"]
        mem = (f", peak memory {best['peak_gib'] / plain['peak_gib']:.2f}x"
               if best.get("peak_gib") and plain.get("peak_gib") else "")
        print(f"\nlmforge/plain: tokens/s {ratio:.2f}x{mem}" + (f" (bar {bar:.1f} GiB)" if bar else ""), flush=True)


def loss_curve(args: argparse.Namespace, work: Path) -> dict:
    n = args.loss_curve
    rows, stats = prepare_rows(args, work, max(args.rows or 0, n * args.batch))
    report: dict[str, Any] = {"device": device_name(), "model": args.model, "data": stats, "curves": {}}
    for tt in args.train_type:
        lr = args.lr or (1e-4 if tt == "full" else 2e-4)
        base = dict(_base_cfg(args, rows), train_type=tt, lr=lr, warmup=0, steps=n, curve=True)
        plain = spawn(dict(base, path="plain"), work)
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
    p.add_argument("--train_type", nargs="+", choices=["full", "lora"], default=None)
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=None, help="steps before the clock starts (compilation happens here)")
    p.add_argument("--batch", type=int, default=None, help="plain: rows per step")
    p.add_argument("--max_length", type=int, default=None, help="longest row; lmforge's bin size")
    p.add_argument("--min_length", type=int, default=64, help="shortest row (lengths spread log-uniformly)")
    p.add_argument("--pack_tokens", type=int, nargs="+", default=None,
                   help="lmforge: tokens per step (default batch x max_length); several values are all tried")
    p.add_argument("--ckpt", nargs="+", default=["off", "4", "2", "1"],
                   help="lmforge checkpointing settings tried in order (off, or every k-th layer) until one fits")
    p.add_argument("--plain_ckpt", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="plain recipe with gradient checkpointing (default true)")
    p.add_argument("--mem_bar", type=float, default=None, help="lmforge's peak must stay under this x plain's peak")
    p.add_argument("--mem_bar_gib", type=float, default=None, help="... and under this many GiB")
    p.add_argument("--liger", choices=["auto", "true", "false"], default="auto",
                   help="lmforge with Liger kernels (auto: when installed and on a GPU)")
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
    for key in ("max_length", "batch", "train_type", "mem_bar", "mem_bar_gib", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.pack_tokens = args.pack_tokens or [args.batch * args.max_length]
    return args


def main() -> None:
    args = parse_args()
    if args._child:
        _child(json.loads(args._child))
        return
    import torch

    on_gpu = torch.cuda.is_available()
    if args.liger == "auto":
        args.liger_on = on_gpu and importlib.util.find_spec("liger_kernel") is not None
    else:
        args.liger_on = args.liger == "true"
    if args.model != "tiny" and not on_gpu:
        sys.exit("bench_train: the 0.5b/7b models need a CUDA GPU; use --tiny on a CPU")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_train on {device_name()}: model {args.model}, {args.train_type}, rows {args.min_length}.."
          f"{args.max_length} tokens, plain batch {args.batch}, lmforge {args.pack_tokens} tokens/step, "
          f"liger {'on' if args.liger_on else 'off'}; work dir {work}", flush=True)
    report = loss_curve(args, work) if args.loss_curve else speed(args, work)
    out = Path(args.out or work / "bench_train.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"\nreport: {out}")


if __name__ == "__main__":
    main()
