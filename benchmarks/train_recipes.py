"""The transformers recipes that ``bench_train.py`` measures lmforge against, and what every run shares.

Each function here runs inside one child process of ``bench_train.py`` (clean peak-memory counters,
no monkey-patch leaking between runs) and returns one JSON-able result. Both baselines use the plain
``transformers.Trainer`` (the recipe a user assembles; lmforge's own trainer is a ``Trainer`` subclass,
so the per-step loop overhead is the same kind on both sides).

- ``run_padded``: the weak baseline: padded batches of ``--batch`` rows, SDPA, the model's own loss
  over full float32 logits, gradient checkpointing (``--plain_ckpt``).
- ``run_padfree``: the strong baseline: ``DataCollatorWithFlattening`` (one flattened row per step,
  ``position_ids`` restarting at every sequence), the rows in file order grouped greedily into steps of
  at most ``pack_tokens`` real tokens, Liger's Qwen2 kernels (fused linear cross-entropy, RMSNorm, RoPE,
  SwiGLU) when ``liger_kernel`` imports on a GPU, else labelled "no Liger", fused AdamW, bf16, no
  checkpointing unless ``--padfree_ckpt``.
  Attention: ``attn_implementation="sdpa"``. Without the flash-attn package (absent on the GPU
  machine; transformers' hub "kernels" need network), sdpa is the varlen path transformers 5 offers:
  ``masking_utils.find_packed_sequence_indices`` reads the restarting ``position_ids`` and builds a
  block-diagonal causal mask, so SDPA stays exact per sequence (memory-efficient kernel with a mask,
  key/value heads repeated). ``flex_attention`` is not the default: transformers compiles it with
  ``dynamic=False``, so every new flattened length recompiles. ``--padfree_attn flex_attention``
  tries it anyway.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from common import QWEN25_05B, QWEN25_7B, step_timer

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=True)
SPECS = {"0.5b": QWEN25_05B, "7b": QWEN25_7B, "tiny": TINY}
BF16_PEAK = 989e12   # H100 / H200 SXM dense bf16


def _row_lengths(row: dict) -> list[int]:
    pos = row.get("position_ids")
    if pos is None:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [e - s for s, e in zip(starts, starts[1:])]


class CountingCollator:
    """Wraps a collator; records each batch's real tokens, sum of squared sequence lengths and row lengths.

    Every row of the benchmark counts through this, so all recipes count the same real (non-padding)
    tokens and feed the same FLOPs formula."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.batches: list[tuple[int, int, list[int]]] = []

    def __call__(self, rows: list[dict]) -> dict:
        lens = [n for r in rows for n in _row_lengths(r)]
        self.batches.append((sum(lens), sum(n * n for n in lens), [len(r["input_ids"]) for r in rows]))
        return self.inner(rows)


def recording(trainer_cls: type, profiling: bool = False) -> type:
    """A subclass that keeps each training loss (loss curves) and marks forward+loss for the profiler."""
    import torch

    class Recording(trainer_cls):

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.profiler.record_function("bench::forward+loss") if profiling else _null():
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            if model.training and self.bench_record:
                self.bench_losses.append((out[0] if return_outputs else out).detach().float())
            return out

    Recording.bench_losses = []
    Recording.bench_record = True
    return Recording


def _null():
    import contextlib

    return contextlib.nullcontext()


def marked_loss(fn: Any) -> Any:
    """``fn`` inside a ``bench::loss`` profiler range (the step profile reports its time)."""
    import torch

    def wrapped(*a, **kw):
        with torch.profiler.record_function("bench::loss"):
            return fn(*a, **kw)

    return wrapped


def liger_usable() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def build_model(cfg: dict, attn: str = "sdpa", liger: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lmforge.model import load_tokenizer
    from lmforge.model.builtin import TOKENIZER_DIR

    if liger:   # class-level patch before the model exists; this child process builds only this model
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    tok = load_tokenizer(TOKENIZER_DIR)
    on_gpu = torch.cuda.is_available()
    conf = Qwen2Config(**SPECS[cfg["model"]], rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                       use_cache=False)
    if cfg["train_type"] == "qlora":
        return load_4bit(cfg, conf, attn), tok, on_gpu
    torch.manual_seed(0)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    with torch.device("cuda" if on_gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation=attn)
    return model, tok, on_gpu


def load_4bit(cfg: dict, conf: Any, attn: str) -> Any:
    """QLoRA rows: the random bf16 model is saved once to ``cfg["model_dir"]`` (by the first row that runs), then
    every row loads it in 4 bits as a user loads a checkpoint. The config is the one the QLoRA recipe and
    lmforge's ``qlora_quantization_config`` both use: NF4, double quantisation, bf16 compute."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = Path(cfg["model_dir"])
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                attn_implementation=attn, device_map={"": 0})


def model_flops(model: Any, tokens: int, sum_sq: int, full: bool) -> float:
    """k * N * tokens + 6 * L * d_attn * sum(s^2): the same formula for every recipe (see bench_train)."""
    cfg = model.config
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings().weight
    total = sum(_numel(p) for p in base.parameters())
    n = total - (0 if cfg.tie_word_embeddings else emb.numel())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    k = 6.0 if full else 4.0 + 6.0 * trainable / n
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", None) if getattr(cfg, "head_dim", None) else \
        cfg.hidden_size
    return k * n * tokens + 6.0 * cfg.num_hidden_layers * d_attn * sum_sq


def _numel(p: Any) -> int:
    """Elements of the weight a parameter stands for (a 4-bit parameter stores two in a byte)."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return p.numel()


def load_rows(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())


def train_args_common(cfg: dict) -> dict:
    profiled = 1 if cfg.get("profile") else 0
    return dict(max_steps=cfg["warmup"] + cfg["steps"] + profiled, learning_rate=cfg["lr"],
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, seed=42, data_seed=42)


def finish(cfg: dict, model: Any, counter: CountingCollator, timer: Any, trainer: Any, extra: dict) -> dict:
    import torch

    w = cfg["warmup"] + (1 if cfg.get("profile") else 0)   # the profiled step is not timed
    end = cfg["warmup"] + cfg["steps"] + (1 if cfg.get("profile") else 0)
    window = counter.batches[w:end]
    tokens = sum(b[0] for b in window)
    sum_sq = sum(b[1] for b in window)
    seconds = (timer.t1 - timer.t0) if timer.t0 is not None and timer.t1 is not None else float("nan")
    on_gpu = torch.cuda.is_available()
    flops = model_flops(model, tokens, sum_sq, cfg["train_type"] == "full")
    out = dict(cfg, tokens=tokens, seconds=seconds, tok_s=tokens / seconds if seconds else float("nan"),
               mfu=(flops / seconds / BF16_PEAK) if on_gpu and seconds else None,
               tflops=flops / seconds / 1e12 if seconds else None,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
               reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if on_gpu else None,
               static_gib=timer.static_gib, tokens_per_step=tokens / max(1, len(window)),
               max_tokens_per_step=max((b[0] for b in counter.batches[:end]), default=0),
               order=[b[2] for b in counter.batches[:end]], **extra)
    losses = getattr(trainer, "bench_losses", None)
    if losses:
        out["losses"] = [float(x) for x in torch.stack(losses).cpu()]
    return out


def _lora(model: Any, cfg: dict, ckpt: bool = False) -> Any:
    """peft LoRA on every linear layer; for QLoRA after peft's k-bit preparation, as its docs show."""
    if cfg["train_type"] not in ("lora", "qlora"):
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg["train_type"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)

    return get_peft_model(model, LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def _training_args(cfg: dict, on_gpu: bool, batch: int, ckpt: bool):
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=cfg["out"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        logging_steps=10 if cfg.get("curve") else 10**6, save_strategy="no", report_to="none", bf16=on_gpu,
        optim="adamw_torch_fused" if on_gpu else "adamw_torch", remove_unused_columns=False,
        dataloader_drop_last=True, disable_tqdm=True, use_cpu=not on_gpu,
        **{name: ckpt, f"{name}_kwargs": {"use_reentrant": False}}, **train_args_common(cfg))


def _mark_model_loss(model: Any) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.loss_function = marked_loss(base.loss_function)


# ================================================================ the padded recipe (weak baseline)

def run_padded(cfg: dict) -> dict:
    import torch
    from transformers import Trainer

    from lmforge.trainers.collator import Collator

    model, tok, on_gpu = build_model(cfg)
    model = _lora(model, cfg, cfg["plain_ckpt"])
    profiling = bool(cfg.get("profile"))
    if profiling:
        _mark_model_loss(model)
    counter = CountingCollator(Collator(tok.pad_token_id))
    timer = step_timer(cfg["warmup"], cfg.get("profile"))
    targs = _training_args(cfg, on_gpu, cfg["batch"], cfg["plain_ckpt"])
    cls = recording(Trainer, profiling)
    cls.bench_record = bool(cfg.get("curve"))
    trainer = cls(model=model, args=targs, train_dataset=load_rows(cfg["rows"]), data_collator=counter,
                  callbacks=[timer])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    kernels = ["sdpa (4D mask for padded rows)", "model's own loss over full logits",
               f"gradient checkpointing {'on' if cfg['plain_ckpt'] else 'off'}"]
    return finish(cfg, model, counter, timer, trainer, {"kernels": kernels})


# ================================================================ the padding-free recipe (strong baseline)

def group_by_tokens(rows: list[dict], budget: int) -> list[list[dict]]:
    """Consecutive rows (file order) per step, as many as fit in ``budget`` tokens (a longer row goes alone)."""
    groups: list[list[dict]] = []
    cur: list[dict] = []
    n = 0
    for r in rows:
        k = len(r["input_ids"])
        if cur and n + k > budget:
            groups.append(cur)
            cur, n = [], 0
        cur.append(r)
        n += k
    if cur:
        groups.append(cur)
    return groups


def run_padfree(cfg: dict) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithFlattening, Trainer

    liger = cfg.get("padfree_liger", True) and liger_usable()
    attn = cfg.get("padfree_attn", "sdpa")
    model, _tok, on_gpu = build_model(cfg, attn=attn, liger=liger)
    model = _lora(model, cfg, cfg.get("padfree_ckpt", False))
    profiling = bool(cfg.get("profile"))
    if profiling:
        if liger:   # lce_forward looks the loss up in its module at call time
            import liger_kernel.transformers.model.qwen2 as liger_qwen2

            liger_qwen2.LigerForCausalLMLoss = marked_loss(liger_qwen2.LigerForCausalLMLoss)
        else:
            _mark_model_loss(model)
    budget = cfg["padfree_tokens"]
    groups = [{"rows": g} for g in group_by_tokens(load_rows(cfg["rows"]), budget)]
    need = cfg["warmup"] + cfg["steps"] + (1 if profiling else 0)
    if len(groups) < need:
        raise RuntimeError(f"padfree: {len(groups)} steps of <= {budget} tokens from the rows, {need} needed "
                           "(pass a larger --rows)")
    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    counter = CountingCollator(flatten)
    timer = step_timer(cfg["warmup"], cfg.get("profile"))
    targs = _training_args(cfg, on_gpu, 1, cfg.get("padfree_ckpt", False))
    base = recording(Trainer, profiling)

    class InOrder(base):
        """The rows in file order, one token-budgeted group per step (no shuffling)."""

        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

    InOrder.bench_record = bool(cfg.get("curve"))
    trainer = InOrder(model=model, args=targs, train_dataset=groups, data_collator=lambda b: counter(b[0]["rows"]),
                      callbacks=[timer])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    kernels = [f"attention: {attn} over flattened rows (position_ids restart per sequence)",
               "Liger: fused linear CE, RMSNorm, RoPE, SwiGLU" if liger else "no Liger: model's own loss and layers",
               f"checkpointing {'on' if cfg.get('padfree_ckpt') else 'off'}", f"<= {budget} tokens/step"]
    return finish(cfg, model, counter, timer, trainer, {"kernels": kernels, "liger": liger})


def next_budget(points: list[tuple[int, float]], target: float, static: float | None, longest: int,
                step: int = 256) -> int:
    """The next token budget to try so that the peak lands just under ``target`` GiB.

    ``points`` are (budget, peak) pairs measured so far. With two or more, the line through the two
    closest to the target; with one, peak - static taken as proportional to the budget (the gradients
    are a fixed part of that, so the guess errs high when shrinking and low when growing; the second
    run's secant corrects it). 2% under the guess, rounded down to ``step``, never under ``longest``."""
    pts = sorted(points, key=lambda p: abs(p[1] - target))[:2]
    if len(pts) == 2 and pts[0][0] != pts[1][0] and pts[0][1] != pts[1][1]:
        (b1, p1), (b2, p2) = pts
        slope = (p2 - p1) / (b2 - b1)
        guess = b1 + (target - p1) / slope if slope > 0 else b1
    else:
        b1, p1 = pts[0]
        base = static if static is not None and static < min(p1, target) else 0.0
        guess = b1 * (target - base) / max(p1 - base, 1e-9)
    return max(longest, int(0.98 * guess) // step * step)
