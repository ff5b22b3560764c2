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
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.arguments import PtArguments, TrainArguments, save_args
from lmforge.utils import distributed as dist
from lmforge.utils.command import command_name, model_slug, print_output
from lmforge.utils.errors import SetupError
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")


def resolve_output_dir(args: TrainArguments) -> str:
    """``output/<model>/v<N>-<timestamp>`` unless the user fixed it; resume continues in the checkpoint's run."""
    from lmforge.utils.checkpoint import find_last_checkpoint, verify_checkpoint

    root = Path(args.output_dir or Path("output") / model_slug(args.model))
    if args.resume_from_checkpoint:
        ckpt = find_last_checkpoint(root) if args.resume_from_checkpoint == "last" else Path(args.resume_from_checkpoint)
        if ckpt is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no intact checkpoint under {root} (the log above "
                                    "says what is wrong with any that were found)")
        if not ckpt.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {ckpt}: no such folder")
        problems = verify_checkpoint(ckpt, need_marker=False) if args.resume_from_checkpoint != "last" else []
        if problems:
            raise ValueError(f"--resume_from_checkpoint {ckpt}: the checkpoint is damaged ({'; '.join(problems)}); "
                             "pass an older one, or 'last' for the newest intact one")
        args.resume_from_checkpoint = str(ckpt)
        return str(ckpt.parent)
    if not args.add_version:
        return str(root)
    versions = [int(m.group(1)) for d in root.glob("v*-*") if (m := re.match(r"v(\d+)-", d.name))]
    return str(root / f"v{max(versions, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}")


def _apply_defaults(args: TrainArguments, on_gpu: bool, world: int | None = None) -> None:
    """Fill what the user left unset with values that train well for the chosen tuner (``world``: the number of
    processes, default ``WORLD_SIZE``)."""
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.is_adapter else 1e-5
    if args.per_device_train_batch_size is None:
        args.per_device_train_batch_size = 1 if on_gpu and (args.max_length or 0) > 4096 else 4
    if args.per_device_eval_batch_size is None:
        args.per_device_eval_batch_size = args.per_device_train_batch_size
    if args.gradient_accumulation_steps is None:
        world = world or int(os.environ.get("WORLD_SIZE", "1"))
        args.gradient_accumulation_steps = max(1, 16 // (args.per_device_train_batch_size * world))
    if args.eval_steps is None:
        args.eval_steps = args.save_steps


def _hf_training_arguments(args: TrainArguments, output_dir: str, has_eval: bool, dtype: Any) -> Any:
    import torch
    from transformers import TrainingArguments

    from lmforge.trainers.distributed import parallel_training_kwargs

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
        # pinned batches copied without a stream sync: the host prepares step k+1 while the GPU runs step k
        dataloader_pin_memory=on_gpu,
        accelerator_config={"non_blocking": True} if on_gpu else None,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        optim=args.optim or ("adamw_torch_fused" if on_gpu else "adamw_torch"),
        disable_tqdm=True,  # our progress callback draws the bar
        # The Trainer's NaN/inf loss filter reads every micro-step's loss on the host (a sync that stops
        # the host running ahead of the GPU); LmforgeTrainer filters on the device instead.
        logging_nan_inf_filter=False,
        torch_compile=bool(getattr(args, "torch_compile", False)),
        **parallel_training_kwargs(args, on_gpu),
    )
    # Liger kernels and activation checkpointing are applied by run_training (lmforge.model.patches),
    # not by the Trainer: their selection (every k-th layer, no Liger loss patch) is ours.
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kw[ckpt_key] = False
    kw["use_liger_kernel"] = False
    return one_gpu_per_process(TrainingArguments(**{k: v for k, v in kw.items() if k in fields}), on_gpu)


def one_gpu_per_process(targs: Any, on_gpu: bool) -> Any:
    """One process on a multi-GPU host trains on one GPU: the Trainer would otherwise wrap the model in
    ``nn.DataParallel``, which replicates it every step and breaks compiled layers and fused kernels."""
    if on_gpu and targs.n_gpu > 1:
        logger.warning("%d GPUs are visible to one process: training on %s only. For data parallel training "
                       "launch one process per GPU: NPROC_PER_NODE=%d lmforge sft ... (add --fsdp full_shard "
                       "or --deepspeed zero3 to shard a model that does not fit one GPU)",
                       targs.n_gpu, targs.device, targs.n_gpu)
        targs._n_gpu = 1
    return targs


# transformers optimizer names implemented by bitsandbytes (adamw_torch_8bit is torchao's, galore_* GaLore's)
_BNB_OPTIMS = {"adamw_8bit", "paged_adamw", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",
               "paged_lion_8bit", "paged_lion_32bit", "ademamix", "ademamix_8bit", "paged_ademamix_8bit",
               "paged_ademamix_32bit"}


def _check_optimizer(args: TrainArguments) -> None:
    """``--optim`` names that need bitsandbytes fail here with the flag named, not deep in the Trainer."""
    if args.optim and args.optimizer:
        logger.warning("--optim %s is ignored: --optimizer %s builds the optimizer", args.optim, args.optimizer)
    name = (args.optim or "").lower()
    if ("bnb" in name or name in _BNB_OPTIMS) and importlib.util.find_spec("bitsandbytes") is None:
        raise SetupError(f"--optim {args.optim} needs bitsandbytes (pip install 'lmforge[qlora]')")


def load_training_data(args: TrainArguments, template: Any, *, pack: bool | None = None,
               transform: Any = None) -> tuple[Any, Any]:
    """Load, (``transform``,) encode and (if ``pack``, default ``--packing``) pack the train and val data.

    ``transform(ds) -> ds`` edits the canonical rows before encoding (rlhf turns KTO pairs into
    unpaired rows there); ``pack=False`` lets a trainer flatten batches itself.
    """
    if not args.dataset:
        raise ValueError("no training data: pass --dataset (a file, a hub id, or builtin:arith)")
    # Rank 0 loads, encodes and packs into the cache first; the other ranks then read what it wrote.
    with dist.main_process_first():
        return _load_training_data(args, template, pack, transform)


def load_rows(args: TrainArguments) -> tuple[Any, Any]:
    """The canonical train and validation rows the data flags name (before encoding)."""
    from lmforge.dataset import load_dataset

    return load_dataset(
        args.dataset, val_dataset=args.val_dataset or None, split_dataset_ratio=args.split_dataset_ratio,
        seed=args.data_seed, columns=args.columns or None, strict=args.strict, streaming=args.streaming,
        num_proc=args.dataset_num_proc, model_name=args.model_name or None, model_author=args.model_author or None,
        hub=args.hub, task=_task_of(args))


def _load_training_data(args: TrainArguments, template: Any, pack: bool | None, transform: Any) -> tuple[Any, Any]:
    from lmforge.dataset import encode_dataset

    train, val = load_rows(args)
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
    """Validate arguments and dataset paths, pick the output folder (``run_training`` creates it), then load
    the model, tokenizer and template: every cheap check comes before the expensive load."""
    setup_logging()
    import torch
    from transformers import set_seed

    from lmforge.model import get_model_tokenizer
    from lmforge.model.tasks import task_load_kwargs
    from lmforge.tuners.prepare import qlora_quantization_config
    from lmforge.utils.distributed import init_distributed

    on_gpu = torch.cuda.is_available() and not args.use_cpu
    check_arguments(args)
    check_machine(args, on_gpu)
    init_distributed(on_gpu, args.ddp_backend, args.ddp_timeout)
    if not dist.is_main_process():
        logging.getLogger("lmforge").setLevel(logging.WARNING)  # one process speaks for the run
    _apply_defaults(args, on_gpu)
    if on_gpu and not args.device_map:
        from lmforge.trainers.distributed import check_model_fits

        check_model_fits(args, _command_of(args), dist.world_size())  # before reading gigabytes of weights
    # The output folder (a timestamp) and the resumed checkpoint are decided once, by rank 0; run_training
    # creates the folder when training starts.
    output_dir, args.resume_from_checkpoint = dist.broadcast_object(
        (resolve_output_dir(args), args.resume_from_checkpoint) if dist.is_main_process() else None)
    set_seed(args.seed)

    quant = qlora_quantization_config(args) if args.train_type == "qlora" else None
    auto_class, task_kwargs = task_load_kwargs(args)  # the chat model's class unless --task_type says otherwise
    model, tokenizer = get_model_tokenizer(
        args.model, hub=args.hub, revision=args.revision, torch_dtype=args.torch_dtype, attn_impl=args.attn_impl,
        device_map=args.device_map, model_kwargs={**task_kwargs, **args.model_kwargs},
        trust_remote_code=args.trust_remote_code, quantization_config=quant, device="cuda" if on_gpu else "cpu",
        auto_class=auto_class)
    from lmforge.model.vision import get_processor

    processor = get_processor(args.model, model.config, tokenizer, hub=args.hub, revision=args.revision,
                              min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                              trust_remote_code=args.trust_remote_code, video_fps=args.video_fps,
                              video_max_frames=args.video_max_frames)
    return TrainingSetup(args, output_dir, model, tokenizer, training_template(args, tokenizer, mode, processor),
                         on_gpu, model.dtype, processor)


def check_arguments(args: TrainArguments) -> None:
    """Checks that need no model and no device: plugins, a model named, registered names, dataset paths."""
    from lmforge.dataset.loader import check_datasets
    from lmforge.registry import LOSSES, METRICS, OPTIMIZERS, TASK_LOSSES, load_plugins

    load_plugins(args.external_plugins)
    if not args.model:
        raise ValueError("no model: pass --model (a hub id, a local folder, or builtin:tiny)")
    task = _task_of(args)
    if task and _command_of(args) != "sft":
        raise ValueError(f"--task_type {task} trains with lmforge sft, not lmforge {_command_of(args)}")
    losses = TASK_LOSSES if task else LOSSES  # a task's losses are checked against it by its pipeline
    for name, reg, value in (("--loss_type", losses, args.loss_type), ("--eval_metric", METRICS, args.eval_metric),
                             ("--optimizer", OPTIMIZERS, args.optimizer)):
        if value and value not in reg:
            raise ValueError(f"{name}: {reg.unknown_message(value)}")
    check_datasets(args.dataset, args.val_dataset)  # a missing file fails now, not after the model loaded


def check_machine(args: TrainArguments, on_gpu: bool) -> None:
    """What the flags need from this machine (a GPU for qlora/DeepSpeed, bitsandbytes, deepspeed): RuntimeError
    naming it; a bad --fsdp/--deepspeed value is a ValueError."""
    from lmforge.trainers.distributed import parallel_training_kwargs

    if args.train_type == "qlora" and not on_gpu:
        raise SetupError("--train_type qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU use --train_type lora")
    _check_optimizer(args)
    parallel_training_kwargs(args, on_gpu)  # a bad --fsdp/--deepspeed fails here, before anything loads


def training_template(args: TrainArguments, tokenizer: Any, mode: str, processor: Any = None) -> Any:
    """The template the training flags describe, in ``mode`` (rendering images through ``processor``)."""
    from lmforge.template import get_template

    template = get_template(tokenizer, args.template, system=args.system, max_length=args.max_length,
                            truncation_strategy=args.truncation_strategy, loss_scale=args.loss_scale,
                            enable_thinking=args.enable_thinking, agent_template=args.agent_template,
                            processor=processor)
    template.set_mode(mode)
    return template


def default_collator(setup: TrainingSetup, model: Any) -> Any:
    """Padded or padding-free batches of token ids, plus pixels for a vision-language model."""
    from lmforge.trainers.collator import Collator

    pad, packing = setup.tokenizer.pad_token_id, setup.args.packing
    vision = getattr(setup.template, "vision", None)
    if vision is None:
        from lmforge.model.kernels.varlen_attention import ATTN_NAME

        varlen = getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_NAME
        return Collator(pad, padding_free=packing, boundaries=packing and varlen and _takes_extra_kwargs(model))
    from lmforge.model.vision import require_family
    from lmforge.trainers.vision_collator import VisionCollator

    family = require_family(model)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", 2)
    return VisionCollator(pad, vision, family, merge_size=merge, padding_free=packing)


def _takes_extra_kwargs(model: Any) -> bool:
    """Whether the model's forward passes unnamed keywords on (transformers' ``**kwargs`` to the attention
    layers), so that the collator may add the sequence boundaries; a model with a closed signature gets none."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def run_training(setup: TrainingSetup, train_ds: Any, val_ds: Any, *, trainer_cls: Any = None,
                 data_collator: Any = None, **trainer_kwargs: Any) -> dict[str, Any]:
    """Apply the tuner, build the trainer (``LmforgeTrainer`` or a subclass), train, save the last step."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lmforge.model.patches import configure_for_training, enable_gradient_checkpointing
    from lmforge.registry import LOSSES, METRICS, OPTIMIZERS
    from lmforge.trainers.callbacks import InterruptCallback
    from lmforge.trainers.trainer import LmforgeTrainer
    from lmforge.tuners import prepare_model

    args, output_dir = setup.args, setup.output_dir
    _log_sample(train_ds, setup.template)
    if dist.is_main_process():
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # work starts: a failed start leaves no empty run folder
        save_args(args, output_dir)
    logger.info("Output folder: %s%s", output_dir, f" ({dist.world_size()} processes)" if dist.world_size() > 1 else "")
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
    if "loss_fn" not in trainer_kwargs:  # a task trainer brings its own loss
        trainer_kwargs["loss_fn"] = LOSSES.get(args.loss_type) if args.loss_type else None
    interrupt = InterruptCallback(resume_from=args.resume_from_checkpoint)
    trainer = (trainer_cls or LmforgeTrainer)(
        model=model, args=hf_args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=data_collator or default_collator(setup, model),
        processing_class=setup.processor or setup.tokenizer, callbacks=[*_callbacks(args), interrupt],
        optimizers=optimizers,
        lmforge_args=args, **trainer_kwargs,
    )
    for cb in (ProgressCallback, PrinterCallback):  # our progress callback replaces both
        trainer.remove_callback(cb)
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except KeyboardInterrupt:  # a second Ctrl-C
        if trainer.is_world_process_zero():
            print(interrupt.stop_message(trainer.state, output_dir, hard=True), file=sys.stderr, flush=True)
        raise

    last = Path(output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not dist.broadcast_object(last.is_dir()):  # one answer for all ranks: saving is collective
        trainer.final_save = True
        trainer._save_checkpoint(trainer.model, None)
    metrics = {}
    if val_ds is not None and not interrupt.requested:  # reuse an evaluation made at the last step
        done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        metrics = done[-1] if done else trainer.evaluate()
    if trainer.is_world_process_zero():
        if interrupt.requested:
            print(interrupt.stop_message(trainer.state, output_dir, hard=False), file=sys.stderr, flush=True)
        print_output(command_name(_command_of(args)), "checkpoints, logs and plots", f"{output_dir} (last: {last})")
    return {"output_dir": output_dir, "last_checkpoint": str(last), "log_history": trainer.state.log_history,
            "metrics": metrics, "trainer": trainer, "template": setup.template, "interrupted": interrupt.requested}


def _task_of(args: Any) -> str | None:
    """``--task_type`` when it is not the chat model's ``causal_lm`` (those rows and models differ), else None."""
    task = getattr(args, "task_type", None)
    return task if task not in (None, "causal_lm") else None


def _command_of(args: Any) -> str:
    return "pt" if isinstance(args, PtArguments) else "rlhf" if hasattr(args, "rlhf_type") else "sft"


def sft_main(args: TrainArguments) -> dict[str, Any]:
    """Train, checkpoint, and return ``{"output_dir", "last_checkpoint", "log_history", "metrics", ...}``.
    With ``--dry_run`` nothing trains: the plan (data, parameters, steps, memory) is printed and returned."""
    if args.dry_run:
        from lmforge.toolkit.dry_run import dry_run  # the one import upward: the toolkit reads this module

        return dry_run(args, _command_of(args))
    if _task_of(args):  # an embedding model, reranker or classifier: lmforge.pipelines.task
        from lmforge.pipelines.task import task_main

        return task_main(args)
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
        if f"{prefix}labels" in row:  # task rows (embedding, rerankers) have no token labels
            labels = [t for t in row[f"{prefix}labels"] if t != -100]
            logger.info("Sample %slabels: %r", prefix, template.safe_decode(labels)[:300])
