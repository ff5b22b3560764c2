"""``sft_main`` / ``pt_main``: arguments -> model, template, data -> trained checkpoints.

    from lmforge import sft_main, TrainArguments
    result = sft_main(TrainArguments(model="builtin:tiny", dataset=["builtin:arith#2000"]))
    print(result["last_checkpoint"])
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from lmforge.arguments import PtArguments, TrainArguments, save_args
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")


def model_slug(model: str) -> str:
    """A folder-safe name for a model id, path or builtin name."""
    p = Path(model)
    name = p.name if p.exists() else model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def resolve_output_dir(args: TrainArguments) -> str:
    """``output/<model>/v<N>-<timestamp>`` unless the user fixed it; resume continues in the checkpoint's run."""
    from lmforge.utils.checkpoint import find_last_checkpoint

    root = Path(args.output_dir or Path("output") / model_slug(args.model))
    if args.resume_from_checkpoint:
        ckpt = find_last_checkpoint(root) if args.resume_from_checkpoint == "last" else Path(args.resume_from_checkpoint)
        if ckpt is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no complete checkpoint under {root}")
        if not ckpt.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {ckpt}: no such folder")
        args.resume_from_checkpoint = str(ckpt)
        return str(ckpt.parent)
    if not args.add_version:
        return str(root)
    versions = [int(m.group(1)) for d in root.glob("v*-*") if (m := re.match(r"v(\d+)-", d.name))]
    return str(root / f"v{max(versions, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}")


def _apply_defaults(args: TrainArguments, on_gpu: bool) -> None:
    """Fill what the user left unset with values that train well for the chosen tuner."""
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.is_adapter else 1e-5
    if args.per_device_train_batch_size is None:
        args.per_device_train_batch_size = 1 if on_gpu and (args.max_length or 0) > 4096 else 4
    if args.per_device_eval_batch_size is None:
        args.per_device_eval_batch_size = args.per_device_train_batch_size
    if args.gradient_accumulation_steps is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        args.gradient_accumulation_steps = max(1, 16 // (args.per_device_train_batch_size * world))
    if args.eval_steps is None:
        args.eval_steps = args.save_steps


def _hf_training_arguments(args: TrainArguments, output_dir: str, has_eval: bool, dtype: Any) -> Any:
    import torch
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    on_gpu = torch.cuda.is_available() and not args.use_cpu
    report_to = [r for r in args.report_to if r != "none"]
    kw: dict[str, Any] = dict(
        output_dir=output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio (warmup_ratio is gone)
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        logging_dir=str(Path(output_dir) / "runs"),
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        save_only_model=args.save_only_model,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps if has_eval else None,
        seed=args.seed,
        data_seed=args.data_seed,
        report_to=report_to or "none",
        dataloader_num_workers=args.dataloader_num_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        use_cpu=not on_gpu,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        optim=args.optim or ("adamw_torch_fused" if on_gpu else "adamw_torch"),
        disable_tqdm=True,  # our progress callback draws the bar
        # nan_guard must see NaN losses; the default filter would replace them with a running mean.
        logging_nan_inf_filter="nan_guard" not in args.callbacks,
        torch_compile=bool(getattr(args, "torch_compile", False)),
    )
    # Liger kernels and activation checkpointing are applied by run_training (lmforge.model.patches),
    # not by the Trainer: their selection (every k-th layer, no Liger loss patch) is ours.
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kw[ckpt_key] = False
    kw["use_liger_kernel"] = False
    return TrainingArguments(**{k: v for k, v in kw.items() if k in fields})


# transformers optimizer names implemented by bitsandbytes (adamw_torch_8bit is torchao's, galore_* GaLore's)
_BNB_OPTIMS = {"adamw_8bit", "paged_adamw", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",
               "paged_lion_8bit", "paged_lion_32bit", "ademamix", "ademamix_8bit", "paged_ademamix_8bit",
               "paged_ademamix_32bit"}


def _check_optimizer(args: TrainArguments) -> None:
    """``--optim`` names that need bitsandbytes fail here with the flag named, not deep in the Trainer."""
    name = (args.optim or "").lower()
    if ("bnb" in name or name in _BNB_OPTIMS) and importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"--optim {args.optim} needs bitsandbytes (pip install 'lmforge[qlora]')")


def load_training_data(args: TrainArguments, template: Any, *, pack: bool | None = None,
               transform: Any = None) -> tuple[Any, Any]:
    """Load, (``transform``,) encode and (if ``pack``, default ``--packing``) pack the train and val data.

    ``transform(ds) -> ds`` edits the canonical rows before encoding (rlhf turns KTO pairs into
    unpaired rows there); ``pack=False`` lets a trainer flatten batches itself.
    """
    from lmforge.dataset import encode_dataset, load_dataset

    if not args.dataset:
        raise ValueError("no training data: pass --dataset (a file, a hub id, or builtin:arith)")
    train, val = load_dataset(
        args.dataset, val_dataset=args.val_dataset or None, split_dataset_ratio=args.split_dataset_ratio,
        seed=args.data_seed, columns=args.columns or None, strict=args.strict, streaming=args.streaming,
        num_proc=args.dataset_num_proc, model_name=args.model_name or None, model_author=args.model_author or None,
        hub=args.hub)
    if transform is not None:
        train, val = transform(train), (transform(val) if val is not None else None)
    train = encode_dataset(train, template, num_proc=args.dataset_num_proc, strict=args.strict, desc="Encoding train")
    if val is not None:
        val = encode_dataset(val, template, num_proc=args.dataset_num_proc, strict=args.strict, desc="Encoding val")
    if args.packing if pack is None else pack:
        if args.streaming:
            raise ValueError("--packing needs a map-style dataset; drop --streaming or --packing")
        from lmforge.dataset.packing import pack_dataset

        train = pack_dataset(train, args.max_length)
        if val is not None:
            val = pack_dataset(val, args.max_length)
    return train, val


def _callbacks(args: TrainArguments) -> list[Any]:
    from lmforge.registry import CALLBACKS

    names = ["progress", "jsonl_logger"] + (["plot"] if args.plot else []) + list(args.callbacks)
    out = []
    for name in names:
        if name not in CALLBACKS:
            raise ValueError(f"--callbacks: {CALLBACKS.unknown_message(name)}")
        cb = CALLBACKS.get(name)
        out.append(cb() if isinstance(cb, type) else cb)
    return out


@dataclasses.dataclass
class TrainingSetup:
    """What every training command builds before its trainer: shared by sft, pt and rlhf."""

    args: Any
    output_dir: str
    model: Any
    tokenizer: Any
    template: Any
    on_gpu: bool
    dtype: Any
    processor: Any = None  # a vision-language model's (tokenizer + image processor); None for text models


def prepare_training(args: TrainArguments, mode: str = "train") -> TrainingSetup:
    """Validate arguments, pick the output folder, load the model, tokenizer and template."""
    setup_logging()
    import torch
    from transformers import set_seed

    from lmforge.model import get_model_tokenizer
    from lmforge.registry import LOSSES, METRICS, OPTIMIZERS, load_plugins
    from lmforge.template import get_template
    from lmforge.tuners.prepare import qlora_quantization_config

    load_plugins(args.external_plugins)
    if not args.model:
        raise ValueError("no model: pass --model (a hub id, a local folder, or builtin:tiny)")
    on_gpu = torch.cuda.is_available() and not args.use_cpu
    if args.train_type == "qlora" and not on_gpu:
        raise RuntimeError("--train_type qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU use --train_type lora")
    for name, reg, value in (("--loss_type", LOSSES, args.loss_type), ("--eval_metric", METRICS, args.eval_metric),
                             ("--optimizer", OPTIMIZERS, args.optimizer)):
        if value and value not in reg:
            raise ValueError(f"{name}: {reg.unknown_message(value)}")
    _apply_defaults(args, on_gpu)
    output_dir = resolve_output_dir(args)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_args(args, output_dir)
    logger.info("Output folder: %s", output_dir)
    set_seed(args.seed)

    quant = qlora_quantization_config(args) if args.train_type == "qlora" else None
    model, tokenizer = get_model_tokenizer(
        args.model, hub=args.hub, revision=args.revision, torch_dtype=args.torch_dtype, attn_impl=args.attn_impl,
        device_map=args.device_map, model_kwargs=args.model_kwargs, trust_remote_code=args.trust_remote_code,
        quantization_config=quant, device="cuda" if on_gpu else "cpu")
    from lmforge.model.vision import get_processor

    processor = get_processor(args.model, model.config, tokenizer, hub=args.hub, revision=args.revision,
                              min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                              trust_remote_code=args.trust_remote_code)
    template = get_template(tokenizer, args.template, system=args.system, max_length=args.max_length,
                            truncation_strategy=args.truncation_strategy, loss_scale=args.loss_scale,
                            enable_thinking=args.enable_thinking, agent_template=args.agent_template,
                            processor=processor)
    template.set_mode(mode)
    return TrainingSetup(args, output_dir, model, tokenizer, template, on_gpu, model.dtype, processor)


def default_collator(setup: TrainingSetup, model: Any) -> Any:
    """Padded or padding-free batches of token ids, plus pixels for a vision-language model."""
    from lmforge.trainers.collator import Collator

    pad, packing = setup.tokenizer.pad_token_id, setup.args.packing
    vision = getattr(setup.template, "vision", None)
    if vision is None:
        return Collator(pad, padding_free=packing)
    from lmforge.model.vision import require_family
    from lmforge.trainers.vision_collator import VisionCollator

    family = require_family(model)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", 2)
    return VisionCollator(pad, vision, family, merge_size=merge, padding_free=packing)


def run_training(setup: TrainingSetup, train_ds: Any, val_ds: Any, *, trainer_cls: Any = None,
                 data_collator: Any = None, **trainer_kwargs: Any) -> dict[str, Any]:
    """Apply the tuner, build the trainer (``LmforgeTrainer`` or a subclass), train, save the last step."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lmforge.model.patches import configure_for_training, enable_gradient_checkpointing
    from lmforge.registry import LOSSES, METRICS, OPTIMIZERS
    from lmforge.trainers.trainer import LmforgeTrainer
    from lmforge.tuners import prepare_model

    args, output_dir = setup.args, setup.output_dir
    _log_sample(train_ds, setup.template)
    _check_optimizer(args)
    for line in configure_for_training(setup.model, args, setup.on_gpu):
        logger.info(line)
    model = prepare_model(setup.model, args)
    if args.gradient_checkpointing:
        logger.info(enable_gradient_checkpointing(model, args.gradient_checkpointing_every))
    hf_args = _hf_training_arguments(args, output_dir, val_ds is not None, setup.dtype)
    optimizer = args.optimizer or ("multimodal" if getattr(args, "vit_lr", None) or getattr(args, "aligner_lr", None)
                                   else None)
    optimizers = (OPTIMIZERS.get(optimizer)(model, args), None) if optimizer else (None, None)
    if val_ds is not None and "compute_metrics" not in trainer_kwargs:
        metric = METRICS.get(args.eval_metric or "token_accuracy")
        metric = metric() if isinstance(metric, type) else metric
        trainer_kwargs.update(compute_metrics=metric.compute, preprocess_logits_for_metrics=metric.preprocess)
    trainer = (trainer_cls or LmforgeTrainer)(
        model=model, args=hf_args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=data_collator or default_collator(setup, model),
        processing_class=setup.processor or setup.tokenizer, callbacks=_callbacks(args), optimizers=optimizers,
        loss_fn=LOSSES.get(args.loss_type) if args.loss_type else None, lmforge_args=args, **trainer_kwargs,
    )
    for cb in (ProgressCallback, PrinterCallback):  # our progress callback replaces both
        trainer.remove_callback(cb)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    last = Path(output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not last.is_dir():
        trainer._save_checkpoint(trainer.model, None)
    metrics = {}
    if val_ds is not None:  # reuse an evaluation made at the last step instead of running it again
        done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        metrics = done[-1] if done else trainer.evaluate()
    logger.info("Last checkpoint: %s", last)
    return {"output_dir": output_dir, "last_checkpoint": str(last), "log_history": trainer.state.log_history,
            "metrics": metrics, "trainer": trainer, "template": setup.template}


def sft_main(args: TrainArguments) -> dict[str, Any]:
    """Train, checkpoint, and return ``{"output_dir", "last_checkpoint", "log_history", "metrics", ...}``."""
    setup = prepare_training(args, "pt" if isinstance(args, PtArguments) else "train")
    train_ds, val_ds = load_training_data(args, setup.template)
    return run_training(setup, train_ds, val_ds)


def pt_main(args: PtArguments) -> dict[str, Any]:
    """Continued pre-training: every token of the ``text`` column carries loss."""
    return sft_main(args)


def _log_sample(ds: Any, template: Any) -> None:
    try:
        row = next(iter(ds))
    except StopIteration:
        raise ValueError("the training set is empty after encoding (every row too long or skipped?)") from None
    for prefix in [p for p in ("", "chosen_", "rejected_") if f"{p}input_ids" in row]:  # rlhf rows: both sides
        logger.info("Sample %sinput: %r", prefix, template.safe_decode(row[f"{prefix}input_ids"])[:500])
        labels = [t for t in row[f"{prefix}labels"] if t != -100]
        logger.info("Sample %slabels: %r", prefix, template.safe_decode(labels)[:300])
