"""Vision-language LoRA training speed and memory: the plain transformers recipe against ``lmforge sft``, same GPU,
model, data and batch size (issue #17).

    python benchmarks/bench_vl_train.py                          # GPU: Qwen2-VL-2B shape, 448x448 images
    python benchmarks/bench_vl_train.py --image_size mixed       # GPU: eight sizes from 224x224 to 896x448
    python benchmarks/bench_vl_train.py --tiny                   # CPU smoke run (builtin:tiny-vl's size)

Model: Qwen2-VL-2B-Instruct's architecture (``Qwen2VLForConditionalGeneration``: a 32-block ViT of width 1280,
the 2x2 merger into 1536, a 28-layer language model with a 151,936-token vocabulary) with random weights (bf16
on a GPU, float32 on a CPU), written once as a checkpoint folder with the processor ``builtin:tiny-vl`` ships:
the built-in tokenizer plus Qwen2-VL's vision tokens, and Qwen2-VL's image processor on its PIL path (no
torchvision; min/max pixels as Qwen2-VL-2B's, 3,136 and 12,845,056). Data: coloured shapes (as
``builtin:shapes`` draws them, scaled up to ``--image_size``) written as PNG files, one image per row with a
question about colour, shape or count and a one-sentence answer, in a JSONL of image paths.

plain: ``transformers.Trainer`` + peft LoRA on the language model's linear layers (q/k/v/o/gate/up/down; the
ViT and merger frozen), the processor's own collation (``apply_chat_template`` then ``processor(text, images)``,
padded; labels masked to the assistant reply), SDPA, fused AdamW, bf16.
lmforge: ``lmforge.pipelines.sft`` (prepare_training, load_training_data, run_training: what ``lmforge sft``
runs) with ``--train_type lora`` and its defaults (all-linear on the language model, ViT and aligner frozen; on
CUDA the fused linear + cross-entropy and lean layers; no packing). Both: rank, alpha and dropout of lmforge's
defaults (8, 32, 0.05), lr 1e-4 constant, ``--batch`` rows per step, no gradient accumulation, no activation
checkpointing, ``--workers`` data-loader processes. Each row runs in its own process (clean peak counters).

Reported per row over the ``--steps`` steps after ``--warmup``: images/s; tokens/s counting every real
(non-padding) token of the batch, image tokens included (the language model's sequence); peak GPU memory
(``torch.cuda.max_memory_allocated``: weights, optimizer state, activations); and lmforge / plain.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's lmforge, not an installed one
from common import QWEN2_VL_2B, device_name, make_vl_model_dir, run_child, step_timer  # noqa: E402

# builtin:tiny-vl's shape (lmforge.model.builtin.MODEL_SPECS["tiny-vl"]); the vocabulary is the tokenizer's
TINY_VL = dict(
    text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True),
    vision=dict(depth=4, embed_dim=128, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3),
    vocab_size=None, rope_theta=10000.0, mrope_section=None, min_pixels=56 * 56, max_pixels=112 * 112)
PRESETS = {"2b": dict(spec=QWEN2_VL_2B, image_size="448", batch=8, steps=20, warmup=3, dtype="bfloat16"),
           "tiny": dict(spec=TINY_VL, image_size="112", batch=4, steps=3, warmup=1, dtype="float32")}
MIXED_SIZES = [(448, 448), (224, 224), (672, 672), (640, 480), (480, 640), (896, 448), (336, 336), (560, 420)]
LORA = dict(rank=8, alpha=32, dropout=0.05)  # lmforge sft's defaults, given to both paths
# the language model's linear layers, as lmforge's all-linear picks them for a Qwen2-VL model (no lm_head)
PLAIN_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                 r"|mlp\.(gate_proj|up_proj|down_proj))")


# ================================================================ data (parent)

def _sizes(image_size: str, tiny: bool) -> list[tuple[int, int]]:
    if image_size == "mixed":
        return [(w // 4, h // 4) for w, h in MIXED_SIZES] if tiny else MIXED_SIZES
    try:
        side = int(image_size)
    except ValueError:
        raise SystemExit(f"--image_size: a side in pixels (448) or 'mixed', got {image_size!r}") from None
    return [(side, side)]


def write_rows(work: Path, n: int, sizes: list[tuple[int, int]], seed: int = 0) -> tuple[Path, dict]:
    """``n`` rows of one PNG each (a shapes picture scaled to one of ``sizes``, cycling) with a question and a
    one-sentence answer, as ``rows.jsonl`` beside an ``images/`` folder."""
    from PIL import Image

    from lmforge.dataset.shapes import COLOURS, IMAGE_SIZE, KINDS, draw_shapes

    rng = random.Random(seed)
    (work / "images").mkdir(parents=True, exist_ok=True)
    path = work / "rows.jsonl"
    cell = IMAGE_SIZE // 3
    with path.open("w") as fh:
        for i in range(n):
            kind, colour, count = rng.choice(KINDS), rng.choice(list(COLOURS)), rng.randint(1, 3)
            boxes = []
            for c in sorted(rng.sample(range(9), count)):
                s = rng.randint(16, cell - 4)
                x, y = (c % 3) * cell + rng.randint(1, cell - s - 1), (c // 3) * cell + rng.randint(1, cell - s - 1)
                boxes.append((x, y, s))
            w, h = sizes[i % len(sizes)]
            image = draw_shapes(kind, colour, (255, 255, 255), boxes).resize((w, h), Image.BICUBIC)
            name = f"images/{i:05d}.png"
            image.save(work / name)
            question = rng.choice(["What is in the picture?", "Describe the shapes.", "How many shapes are there, "
                                   "and of which colour?", "What shape and colour are they?"])
            noun = kind + ("s" if count > 1 else "")
            answer = f"There {'are' if count > 1 else 'is'} {count} {colour} {noun} on a white background."
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"<image>{question}"},
                                              {"role": "assistant", "content": answer}],
                                 "images": [name]}) + "\n")
    return path, {"rows": n, "image_sizes": [f"{w}x{h}" for w, h in sizes]}


# ================================================================ shared by both paths (run in the child)

def _batch_counts(inputs: dict, image_token_id: int) -> dict:
    """Real tokens (the attention mask's ones, or every token of a padding-free batch), image tokens, images."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    grid = inputs.get("image_grid_thw")
    return dict(tokens=int(mask.sum()) if mask is not None else int(ids.numel()), padded=int(ids.numel()),
                image_tokens=int((ids == image_token_id).sum()), images=int(grid.shape[0]) if grid is not None else 0)


def _counting(trainer_cls: type, image_token_id: int) -> type:
    """``trainer_cls`` that records each training batch's counts (in the main process, whatever the workers)."""

    class Counting(trainer_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            self.bench_batches.append(_batch_counts(inputs, image_token_id))
            return super().training_step(model, inputs, *args, **kwargs)

    Counting.bench_batches = []
    return Counting


def _common_train_kwargs(cfg: dict) -> dict:
    return dict(max_steps=cfg["warmup"] + cfg["steps"], learning_rate=1e-4, lr_scheduler_type="constant",
                weight_decay=0.0, max_grad_norm=1.0, seed=42, data_seed=42,
                per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
                dataloader_num_workers=cfg["workers"], logging_steps=5, report_to="none")


def _finish(cfg: dict, trainer: Any, timer: Any, model: Any, extra: dict) -> dict:
    import torch

    batches = trainer.bench_batches
    window = batches[cfg["warmup"]:cfg["warmup"] + cfg["steps"]]
    total = {k: sum(b[k] for b in window) for k in ("tokens", "padded", "image_tokens", "images")}
    seconds = (timer.t1 - timer.t0) if timer.t0 is not None and timer.t1 is not None else float("nan")
    on_gpu = torch.cuda.is_available()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(
        path=cfg["path"], steps=len(window), seconds=seconds, **total,
        images_s=total["images"] / seconds, tok_s=total["tokens"] / seconds,
        tokens_per_step=total["tokens"] / max(1, len(window)), padded_per_step=total["padded"] / max(1, len(window)),
        step_tokens=[b["tokens"] for b in batches],
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        params=sum(p.numel() for p in model.parameters()), dtype=str(next(model.parameters()).dtype),
        attn=getattr(model.config, "_attn_implementation", None), losses=losses, **extra)


# ================================================================ the plain recipe

class ProcessorCollator:
    """The usual transformers VL collation: render each conversation with the processor's chat template, let the
    processor expand the image tokens and make the pixels, pad; labels are the assistant reply (and its end
    token), everything before the last ``<|im_start|>assistant\\n`` and the padding are -100."""

    def __init__(self, processor: Any, base: Path):
        self.processor, self.base = processor, base
        self.header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def __call__(self, rows: list[dict]) -> dict:
        from PIL import Image

        texts, images = [], []
        for r in rows:
            user, reply = r["messages"]
            parts = [{"type": "image"}, {"type": "text", "text": user["content"].replace("<image>", "")}]
            texts.append(self.processor.apply_chat_template(
                [{"role": "user", "content": parts}, {"role": "assistant", "content": reply["content"]}],
                tokenize=False))
            images += [Image.open(self.base / p).convert("RGB") for p in r["images"]]
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        n = len(self.header)
        for i, ids in enumerate(batch["input_ids"].tolist()):
            last = next((k for k in range(len(ids) - n, -1, -1) if ids[k:k + n] == self.header), None)
            if last is None:
                raise ValueError(f"row {i} of the batch has no assistant header {self.header} to mask up to")
            labels[i, :last + n] = -100
        batch["labels"] = labels
        return dict(batch)


def run_plain(cfg: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Trainer, TrainingArguments

    from lmforge.model.vision import load_processor  # transformers' Qwen2VLProcessor, built without torchvision

    on_gpu = torch.cuda.is_available()
    model_dir = Path(cfg["model_dir"])
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if on_gpu else torch.float32, attn_implementation="sdpa")
    model.to("cuda" if on_gpu else "cpu")
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    processor = load_processor(model_dir, model.config, tok)
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=PLAIN_TARGETS, task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in Path(cfg["rows"]).read_text().splitlines()]
    timer = step_timer(cfg["warmup"])
    targs = TrainingArguments(
        output_dir=cfg["out"], save_strategy="no", bf16=on_gpu, optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=True, use_cpu=not on_gpu,
        **_common_train_kwargs(cfg))
    cls = _counting(Trainer, model.config.image_token_id)
    collator = ProcessorCollator(processor, Path(cfg["rows"]).parent)  # image paths are relative to the JSONL
    trainer = cls(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[timer])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return _finish(cfg, trainer, timer, model, {"kernels": ["sdpa", "the model's own loss over full logits"]})


# ================================================================ lmforge

def run_lmforge(cfg: dict) -> dict:
    import torch

    from lmforge.arguments import TrainArguments
    from lmforge.pipelines.sft import load_training_data, prepare_training, run_training
    from lmforge.registry import CALLBACKS
    from lmforge.trainers.trainer import LmforgeTrainer

    timer = step_timer(cfg["warmup"])
    CALLBACKS.register("bench_timer", timer, overwrite=True)
    kw = dict(_common_train_kwargs(cfg), report_to=["none"], warmup_ratio=0.0, model=cfg["model_dir"],
              dataset=[cfg["rows"]], train_type="lora", lora_rank=LORA["rank"], lora_alpha=LORA["alpha"],
              lora_dropout=LORA["dropout"], max_length=4096, output_dir=cfg["out"], add_version=False,
              save_steps=10**6, plot=False, callbacks=["bench_timer"])
    args = TrainArguments(**{**kw, **cfg["lmforge_args"]})
    setup = prepare_training(args)
    train, _ = load_training_data(args, setup.template)
    cls = _counting(LmforgeTrainer, setup.model.config.image_token_id)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run_training(setup, train, None, trainer_cls=cls)
    trainer = result["trainer"]
    return _finish(cfg, trainer, timer, trainer.model, {"kernels": _lmforge_kernels(trainer, setup.model)})


def _lmforge_kernels(trainer: Any, model: Any) -> list[str]:
    from lmforge.model.kernels import lean_layers
    from lmforge.trainers import fused_ce

    fused = trainer._fused_ce
    lean = sum(bool(getattr(m, "_lmforge_lean", False)) for m in model.modules())
    return [f"attention: {model.config._attn_implementation}",
            "loss: " + (f"fused ({'Liger' if fused.use_liger else 'lmforge ' + fused_ce.kernel_status()})"
                        if fused else "full logits"),
            f"lean layers: {lean} modules ({lean_layers.kernel_status()})" if lean else "lean layers: off"]


# ================================================================ orchestration

def _child(cfg: dict) -> None:
    if cfg["path"] == "make":
        make_vl_model_dir(cfg["spec"], cfg["model_dir"], dtype=cfg["dtype"])
        return
    try:
        res = (run_plain if cfg["path"] == "plain" else run_lmforge)(cfg)
    except Exception as e:  # noqa: BLE001 - an OOM or failure is a result too
        import traceback

        import torch

        traceback.print_exc()
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        res = dict(path=cfg["path"], error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                   oom=oom, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    Path(cfg["result"]).write_text(json.dumps(res))


def spawn(cfg: dict, work: Path) -> dict:
    cfg = dict(cfg, out=str(work / f"out-{cfg['path']}"), result=str(work / f"{cfg['path']}.json"))
    Path(cfg["result"]).unlink(missing_ok=True)
    print(f"\n== {cfg['path']}", flush=True)
    making = cfg["path"] == "make"
    res, code = run_child(__file__, cfg, {"path": cfg["path"]}, None if making else _one_line)
    if making:
        if code:
            raise SystemExit(f"bench_vl_train: writing the model folder failed (exit {code})")
        return {}
    return res


def _one_line(r: dict) -> str:
    mem = f", peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
    return f"{r['images_s']:,.1f} images/s, {r['tok_s']:,.0f} tokens/s{mem}"


def summary(runs: dict[str, dict]) -> list[str]:
    lines = ["| path | images/s | tokens/s (incl. image tokens) | peak GiB | real tokens/step (image; padded) | "
             "LoRA parameters | kernels |", "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if r.get("error"):
            lines.append(f"| {name} | {r['error']} | | | | | |")
            continue
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "n/a"
        lines.append(f"| {name} | {r['images_s']:,.1f} | {r['tok_s']:,.0f} | {peak} | {r['tokens_per_step']:,.0f} "
                     f"({r['image_tokens'] / max(1, r['steps']):,.0f}; {r['padded_per_step']:,.0f}) | "
                     f"{r['trainable']:,} | {'; '.join(r.get('kernels', []))} |")
    plain, ours = runs.get("plain", {}), runs.get("lmforge", {})
    if plain and ours and not plain.get("error") and not ours.get("error"):
        mem = (f", peak memory {ours['peak_gib'] / plain['peak_gib']:.2f}x"
               if ours.get("peak_gib") and plain.get("peak_gib") else "")
        lines.append(f"\nlmforge/plain: images/s {ours['images_s'] / plain['images_s']:.2f}x, tokens/s "
                     f"{ours['tok_s'] / plain['tok_s']:.2f}x{mem}; same LoRA parameters: "
                     f"{'yes' if ours['trainable'] == plain['trainable'] else 'NO'}; same tokens in the timed "
                     f"steps: {'yes' if ours['tokens'] == plain['tokens'] else 'no (row order differs)'}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: builtin:tiny-vl's size, float32")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 20; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the clock starts (default 3; tiny 1)")
    p.add_argument("--batch", type=int, default=None, help="rows (images) per step for both paths (default 8; tiny 4)")
    p.add_argument("--image_size", default=None, help="side of the square images in pixels, or 'mixed' "
                   f"({', '.join(f'{w}x{h}' for w, h in MIXED_SIZES)}; a quarter of that with --tiny); "
                   "default 448 (tiny 112)")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes, both paths (default 0, as both "
                   "frameworks default)")
    p.add_argument("--lmforge_args", type=json.loads, default={},
                   help='more TrainArguments for the lmforge row as JSON, e.g. \'{"packing": true}\'')
    p.add_argument("--paths", nargs="+", choices=["plain", "lmforge"], default=["plain", "lmforge"])
    p.add_argument("--workdir", default=None, help="keeps the model folder and images between runs")
    p.add_argument("--out", default=None, help="JSON report (default: <workdir>/bench_vl_train.json)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "2b"]
    for key in ("steps", "warmup", "batch", "image_size"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.preset = preset
    return args


def main() -> None:
    args = parse_args()
    if args._child:
        _child(json.loads(args._child))
        return
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_vl_train: the Qwen2-VL-2B shape needs a CUDA GPU; use --tiny on a CPU")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-vl-train-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = _sizes(str(args.image_size), args.tiny)
    n_rows = (args.warmup + args.steps) * args.batch
    data = work / f"data-{args.image_size}-{n_rows}"
    rows, stats = write_rows(data, n_rows, sizes)
    model_dir = work / ("model-tiny" if args.tiny else "model-qwen2-vl-2b")
    print(f"bench_vl_train on {device_name()}: {'tiny' if args.tiny else 'Qwen2-VL-2B'} shape, LoRA r{LORA['rank']}, "
          f"batch {args.batch}, images {'/'.join(stats['image_sizes'])}, {args.warmup} warm-up + {args.steps} timed "
          f"steps, {args.workers} workers; work dir {work}", flush=True)
    t = time.time()
    spawn(dict(path="make", spec=args.preset["spec"], dtype=args.preset["dtype"], model_dir=str(model_dir)), work)
    print(f"model folder ready: {model_dir} ({time.time() - t:.0f}s)", flush=True)
    base = dict(model_dir=str(model_dir), rows=str(rows), batch=args.batch, steps=args.steps, warmup=args.warmup,
                workers=args.workers, lmforge_args=args.lmforge_args)
    runs = {path: spawn(dict(base, path=path), work) for path in args.paths}
    lines = summary(runs)
    print("\n" + "\n".join(lines), flush=True)
    report = dict(device=device_name(), tiny=args.tiny, batch=args.batch, steps=args.steps, warmup=args.warmup,
                  workers=args.workers, lmforge_args=args.lmforge_args, data=stats, lora=LORA, runs=runs, summary=lines)
    out = Path(args.out or work / "bench_vl_train.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"\nreport: {out}")


if __name__ == "__main__":
    main()
