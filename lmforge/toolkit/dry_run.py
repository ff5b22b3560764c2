"""``--dry_run true`` on pt/sft/rlhf: what a run would do and need, without training.

The flags are checked as training checks them (``check_arguments``); what the flags need from a
machine (a GPU for QLoRA and DeepSpeed, bitsandbytes, deepspeed) becomes a note, since a dry run on
a laptop plans a GPU run. A sample of the training rows (``SAMPLE_ROWS``) goes through the real
template without a length limit, so the lengths are the rows' own and the truncation the flags would
cause is counted, not hidden. The model is built on the meta device from its config (no weights are
read or allocated; a 70B model costs nothing), the tuner is applied to it, and its trainable
parameters counted. The memory estimate is :mod:`lmforge.trainers.memory`'s, for one CUDA device of
the run (``NPROC_PER_NODE`` x ``NNODES`` processes, or ``WORLD_SIZE``).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
from typing import Any

logger = logging.getLogger("lmforge")

SAMPLE_ROWS = 1000
IGNORE = -100


def world_size() -> int:
    """Processes the run will have: ``WORLD_SIZE`` if set, else ``NPROC_PER_NODE`` x ``NNODES``."""
    if os.environ.get("WORLD_SIZE"):
        return max(1, int(os.environ["WORLD_SIZE"]))
    return max(1, int(os.environ.get("NPROC_PER_NODE") or 1)) * max(1, int(os.environ.get("NNODES") or 1))


def _mode(command: str, args: Any) -> str:
    if command == "pt":
        return "pt"
    if command == "rlhf":
        return {"kto": "train", "grpo": "infer", "gkd": "train", "rm": "rlhf"}.get(args.rlhf_type, "rlhf")
    return "train"


def _rlhf_checks(args: Any, notes: list[str]) -> Any:
    """rlhf's own checks and its row transform (KTO pairs -> unpaired rows, GRPO rows -> prompts)."""
    if args.rlhf_type == "kto":
        from lmforge.pipelines.rlhf import _check_kto_batch, kto_unpaired

        _check_kto_batch(args)
        return kto_unpaired
    if args.rlhf_type == "grpo":
        from pathlib import Path

        from lmforge.registry import MULTI_TURN, REWARDS
        from lmforge.rlhf.grpo_trainer import prompt_rows

        for name in args.reward_funcs:
            if name not in REWARDS:
                raise ValueError(f"--reward_funcs: {REWARDS.unknown_message(name)}")
        for path in args.reward_model:
            if not Path(path).exists():
                notes.append(f"--reward_model {path}: not a local folder; it is fetched from the hub when training starts")
        if args.multi_turn_scheduler and args.multi_turn_scheduler not in MULTI_TURN:
            raise ValueError(f"--multi_turn_scheduler: {MULTI_TURN.unknown_message(args.multi_turn_scheduler)}")
        return prompt_rows
    return None


# -------------------------------------------------------------------------------------------- data

def _sides(enc: dict) -> list[str]:
    return [p for p in ("chosen_", "rejected_") if f"{p}input_ids" in enc] or [""]


def _cut(ids: list[int], limit: int | None, strategy: str, mode: str) -> list[int] | None:
    """What ``Template._finish`` keeps of a sequence (None: dropped)."""
    if limit is None or len(ids) <= limit:
        return ids
    if strategy == "delete":
        return None
    if strategy == "left" or (mode == "infer" and strategy == "right"):
        return ids[len(ids) - limit:]
    return ids[:limit]


_FAILED = object()


def _try_encode(encode: Any, row: Any, i: int, strict: bool, reasons: list[str]) -> Any:
    """``encode(row)``; a row that fails stops the dry run (``--strict true``) or is counted (``_FAILED``)."""
    from lmforge.dataset.encode import _describe

    try:
        return encode(row)
    except ValueError as e:
        if strict:
            raise ValueError(f"--dry_run: cannot encode {_describe(row, i)}: {e} (--strict false skips such rows)") from e
        reasons.append(f"{_describe(row, i)}: {e}")
        return _FAILED


def encode_sample(rows: Any, template: Any, mode: str, strict: bool) -> dict[str, Any]:
    """Lengths (untruncated), truncation and labelled share of ``rows`` through ``template``."""
    from lmforge.dataset.encode import _describe

    free = copy.copy(template)
    free.max_length = None
    limit, strategy = template.max_length, template.truncation_strategy
    lengths, kept_lengths, failed, reasons = [], [], 0, []
    over = dropped = tokens = labelled = 0
    for i, row in enumerate(rows):
        enc = _try_encode(free.encode, row, i, strict, reasons)
        if enc is _FAILED:
            failed += 1
            continue
        n = max(len(enc[f"{p}input_ids"]) for p in _sides(enc))
        lengths.append(n)
        if limit is not None and n > limit:
            over += 1
            if strategy == "raise":
                raise ValueError(f"--dry_run: {_describe(row, i)} encodes to {n} tokens, over --max_length {limit}, and "
                                 "--truncation_strategy raise stops training there (raise --max_length, or pick "
                                 "delete/left/right)")
        kept = []
        for p in _sides(enc):
            ids = _cut(enc[f"{p}input_ids"], limit, strategy, mode)
            labels = _cut(enc.get(f"{p}labels") or [], limit, strategy, mode) if f"{p}labels" in enc else []
            if ids is None:
                kept = None
                break
            kept.append((ids, labels or []))
        if kept is None:
            dropped += 1
            continue
        kept_lengths.append(max(len(ids) for ids, _ in kept))
        for ids, labels in kept:
            tokens += len(ids)
            labelled += sum(1 for t in labels if t != IGNORE)
    return {"rows": len(lengths) + failed, "lengths": lengths, "kept_lengths": kept_lengths, "over_max_length": over,
            "dropped": dropped, "failed": failed, "failed_reasons": reasons[:3], "tokens": tokens,
            "labelled": labelled, "has_labels": mode != "infer"}


def encode_task_sample(rows: Any, encoder: Any, strict: bool, num_negatives: int | None = None) -> dict[str, Any]:
    """Lengths (untruncated, longest sequence of a row), truncation and tokens of an embedding / reranker /
    classifier sample: a row is several sequences (query, positive, negatives), each cut on its own; the
    collator keeps ``num_negatives`` of a row's negatives (all when None)."""
    free = copy.copy(encoder)
    free.max_length = None
    limit = encoder.max_length
    lengths, kept_lengths, reasons = [], [], []
    over = dropped = failed = tokens = sequences = 0
    for i, row in enumerate(rows):
        both = _try_encode(lambda r: (free.encode(r), encoder.encode(r)), row, i, strict, reasons)
        if both is _FAILED:
            failed += 1
            continue
        raw, enc = both
        lengths.append(raw["length"])
        over += int(limit is not None and raw["length"] > limit)
        if enc is None:
            dropped += 1
            continue
        negatives = list(enc.get("negative_ids") or [])
        seqs = [enc["input_ids"], *([enc["positive_ids"]] if "positive_ids" in enc else []),
                *(negatives if num_negatives is None else negatives[:num_negatives])]
        kept_lengths.append(max(len(x) for x in seqs))
        tokens += sum(len(x) for x in seqs)
        sequences += len(seqs)
    return {"rows": len(lengths) + failed, "lengths": lengths, "kept_lengths": kept_lengths, "over_max_length": over,
            "dropped": dropped, "failed": failed, "failed_reasons": reasons[:3], "tokens": tokens, "labelled": 0,
            "has_labels": False, "sequences_per_row": sequences / max(1, len(kept_lengths))}


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    s = sorted(lengths)

    def q(p: float) -> int:
        return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]

    return {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": s[-1]}


# ------------------------------------------------------------------------------------------- steps

def plan_steps(args: Any, n_rows: int | None, sample: dict[str, Any], packing: bool, world: int) -> dict[str, Any]:
    """Optimizer steps as ``transformers.Trainer`` counts them: per epoch, batches per process / accumulation,
    rounded up."""
    kept = len(sample["kept_lengths"])
    share = kept / max(1, sample["rows"])
    sequences = None if n_rows is None else int(round(n_rows * share))
    if packing and sequences is not None and kept:
        from lmforge.dataset.packing import plan_bins

        bins = len(plan_bins(sample["kept_lengths"], args.max_length))
        sequences = max(1, math.ceil(sequences * bins / kept))
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    out: dict[str, Any] = {"train_sequences": sequences, "sequences_per_step": per_step, "world_size": world,
                           "per_device_batch": args.per_device_train_batch_size,
                           "gradient_accumulation": args.gradient_accumulation_steps}
    if args.max_steps and args.max_steps > 0:
        out["steps"] = args.max_steps
    elif sequences is not None:
        batches = math.ceil(math.ceil(sequences / world) / args.per_device_train_batch_size)
        out["steps_per_epoch"] = max(1, math.ceil(batches / args.gradient_accumulation_steps))  # a partial last
        # accumulation still steps (transformers 5)
        out["steps"] = max(1, math.ceil(args.num_train_epochs * out["steps_per_epoch"]))
    else:
        out["steps"] = None  # a stream without --max_steps: unknown
    return out


# ------------------------------------------------------------------------------------------- model

def _model_config(args: Any) -> Any:
    """The model's config, read once (no weights): the processor and a task's encoder depend on it."""
    from transformers import AutoConfig

    from lmforge.model.hub import resolve_model_dir
    from lmforge.model.loader import resolve_trust_remote_code

    trust, _ = resolve_trust_remote_code(args.trust_remote_code, args.model_kwargs)
    folder = resolve_model_dir(args.model, hub=args.hub, revision=args.revision, need_weights=False)
    return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust)


def _task_encoder(args: Any, tokenizer: Any, template: Any, config: Any) -> Any:
    """The encoder training uses for ``--task_type`` (a classifier's label spec read from its rows)."""
    from lmforge.dataset.task_encode import TaskEncoder
    from lmforge.model.tasks import is_decoder_config
    from lmforge.pipelines.task import resolve_label_spec

    spec = resolve_label_spec(args) if args.task_type == "seq_cls" else None
    return TaskEncoder(args.task_type, tokenizer, template, decoder=is_decoder_config(config),
                       max_length=args.max_length, truncation_strategy=args.truncation_strategy,
                       query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                       rerank_instruction=args.rerank_instruction, label_spec=spec)


def _processor(args: Any, tokenizer: Any, config: Any) -> Any:
    """A vision-language model's processor (its image rows are encoded as training encodes them); None for text."""
    from lmforge.model.loader import resolve_trust_remote_code
    from lmforge.model.vision import get_processor

    trust, _ = resolve_trust_remote_code(args.trust_remote_code, args.model_kwargs)
    return get_processor(args.model, config, tokenizer, hub=args.hub, revision=args.revision,
                         min_pixels=args.min_pixels, max_pixels=args.max_pixels, trust_remote_code=trust,
                         video_fps=getattr(args, "video_fps", None),
                         video_max_frames=getattr(args, "video_max_frames", None))


def meta_model(args: Any, tokenizer: Any, command: str) -> tuple[Any, dict[str, Any]]:
    """The model built on the meta device with the tuner applied (a reward model's head for rm); its counts."""
    from lmforge.trainers.memory import meta_model_counts

    adapt = None
    if command == "rlhf" and args.rlhf_type == "rm":
        def adapt(model: Any, args: Any) -> tuple[Any, Any]:
            from lmforge.rlhf.reward_model import reward_head_names, reward_model_from_causal_lm

            model = reward_model_from_causal_lm(model, tokenizer)
            if args.is_adapter:
                args = copy.copy(args)
                args.modules_to_save = list(dict.fromkeys([*args.modules_to_save, *reward_head_names(model)]))
            return model, args
    return meta_model_counts(args, adapt)


# ------------------------------------------------------------------------------------------ memory

def memory_plan(args: Any, command: str, shape: Any, params: dict[str, Any], sample: dict[str, Any],
                world: int) -> dict[str, Any]:
    from lmforge.arguments.train import switch
    from lmforge.pipelines.sft import _task_of
    from lmforge.trainers.memory import TrainPlan, deepspeed_name, estimate, holds_reference_copy

    rlhf_type = getattr(args, "rlhf_type", None) if command == "rlhf" else None
    longest = max(sample["kept_lengths"] or [args.max_length or 2048])
    packing = bool(args.packing) and rlhf_type is None
    seq = args.max_length if packing and args.max_length else longest
    rows = args.per_device_train_batch_size
    objective, completion = "sft", 0
    if rlhf_type in ("dpo", "orpo", "simpo", "cpo"):
        objective, rows = "preference", 2 * rows
    elif rlhf_type == "grpo":
        objective, rows = "grpo", rows * args.num_generations
        seq = longest + args.max_completion_length
        completion = rows * args.max_completion_length
    elif rlhf_type == "gkd":  # student and teacher logits over sampled or dataset completions
        objective, completion = "grpo", rows * args.max_completion_length
        seq = longest + args.max_completion_length
    task = _task_of(args)
    if task:  # every sequence of a row (query, positive, negatives) goes through the model, padded per batch
        objective, rows = "task", int(round(rows * sample.get("sequences_per_row", 1)))
        seq, packing = longest, False
    tokens = rows * seq
    share = sample["labelled"] / max(1, sample["tokens"]) if sample["has_labels"] else 1.0
    lean = switch(args.lean_layers)
    fused = switch(args.fused_ce)
    reference = holds_reference_copy(args, command)
    plan = TrainPlan(
        train_type=args.train_type, trainable=params["trainable"], dtype_bytes=4 if args.torch_dtype == "float32" else 2,
        tokens=tokens, labelled_tokens=int(tokens * share), padded=not packing, objective=objective,
        completion_tokens=completion, checkpointing=bool(args.gradient_checkpointing),
        checkpoint_every=args.gradient_checkpointing_every, offloading=bool(getattr(args, "activation_offloading", False)),
        lean_layers=(lean is not False) or args.use_liger_kernel,
        fused_ce=fused is not False and objective == "sft", lora_dropout=args.lora_dropout,
        lean_lora=bool(getattr(args, "lean_lora", True)), float16=args.torch_dtype in ("float16", "fp16"),
        head_trainable=params["head_trainable"], optim=args.optim or "adamw_torch_fused", world=world,
        fsdp=args.fsdp, deepspeed=deepspeed_name(args.deepspeed), reference_copy=reference)
    est = estimate(shape, plan)
    est["tokens_per_micro_batch"] = tokens
    return est


# ------------------------------------------------------------------------------------------ report

def dry_run(args: Any, command: str) -> dict[str, Any]:
    """Check, sample, count and estimate; print the plan and return it (``exit_code`` 0). Nothing trains."""
    import torch

    from lmforge.model import get_model_tokenizer
    from lmforge.pipelines.sft import (_apply_defaults, _task_of, check_arguments, check_machine, load_rows,
                                       training_template)
    from lmforge.utils.log import setup_logging

    setup_logging()
    notes: list[str] = []
    check_arguments(args)
    transform = _rlhf_checks(args, notes) if command == "rlhf" else None
    plan_gpu = not args.use_cpu
    has_gpu = torch.cuda.is_available()
    try:
        check_machine(args, on_gpu=plan_gpu)
    except RuntimeError as e:
        notes.append(f"the training machine needs: {e}")
    if args.train_type == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        notes.append("the training machine needs: bitsandbytes for --train_type qlora (pip install 'lmforge[qlora]')")
    if plan_gpu and not has_gpu:
        notes.append("no GPU here: the plan and the memory estimate are for CUDA devices")
    args = copy.copy(args)
    world = world_size()
    _apply_defaults(args, plan_gpu, world)

    _, tokenizer = get_model_tokenizer(args.model, hub=args.hub, revision=args.revision, load_model=False,
                                       trust_remote_code=args.trust_remote_code, model_kwargs=args.model_kwargs)
    task = _task_of(args)
    if task:
        from lmforge.pipelines.task import _check

        _check(args)
        args.packing = False  # a task pools or scores each sequence on its own
    mode = "train" if task else _mode(command, args)
    config = _model_config(args)
    processor = _processor(args, tokenizer, config)
    template = training_template(args, tokenizer, mode, processor)
    if processor is not None:
        notes.append("vision-language model: the estimate counts the language model's activations; the vision "
                     "tower's are " + ("not counted (--freeze_vit false trains it)" if not args.freeze_vit
                                       else "none (frozen: --freeze_vit true keeps no activations for a backward)"))
    train, _ = load_rows(args)
    if transform is not None:
        train = transform(train)
    n_rows = len(train) if hasattr(train, "__len__") else None
    if n_rows is None:
        sample_rows = list(train.take(SAMPLE_ROWS))
    else:
        sample_rows = train.select(range(min(SAMPLE_ROWS, n_rows)))
    if task:
        sample = encode_task_sample(sample_rows, _task_encoder(args, tokenizer, template, config), args.strict,
                                    args.num_negatives)
        if task != "seq_cls":
            notes.append(f"--task_type {task}: {sample['sequences_per_row']:.1f} sequences per row (the query, "
                         "positive and negatives each go through the model); no vocabulary-wide loss")
    else:
        sample = encode_sample(sample_rows, template, mode, args.strict)
    if not sample["kept_lengths"]:
        raise ValueError(f"--dry_run: none of the {sample['rows']} sampled rows survives encoding (too long for "
                         f"--max_length {args.max_length} with --truncation_strategy {args.truncation_strategy}, or "
                         "failed); training would stop with an empty dataset")
    packing = bool(args.packing) and command != "rlhf"
    steps = plan_steps(args, n_rows, sample, packing, world)
    shape, params = meta_model(args, tokenizer, command)
    longest = args.max_length if packing else max(sample["kept_lengths"])
    if longest and shape.max_positions and longest > shape.max_positions:
        notes.append(f"sequences of {longest} tokens go beyond the model's max_position_embeddings "
                     f"({shape.max_positions}): positions past it were never trained")
    memory = memory_plan(args, command, shape, params, sample, world)
    report = {"command": command, "model": args.model, "train_type": args.train_type, "rows": n_rows,
              "sample": {k: v for k, v in sample.items() if k not in ("lengths", "kept_lengths")},
              "length": length_stats(sample["lengths"]), "max_length": args.max_length,
              "truncation_strategy": args.truncation_strategy,
              "labelled_share": round(sample["labelled"] / max(1, sample["tokens"]), 4) if sample["has_labels"] else None,
              "parameters": params, "steps": steps, "memory": memory, "notes": notes, "exit_code": 0}
    print(format_report(report), flush=True)
    return report


def format_report(r: dict[str, Any]) -> str:
    from lmforge.trainers.memory import format_bytes

    s, st, m, p = r["sample"], r["steps"], r["memory"], r["parameters"]
    n = f"{r['rows']:,}" if r["rows"] is not None else "a stream of"
    L = r["length"]
    lines = [f"dry run: lmforge {r['command']} --model {r['model']} --train_type {r['train_type']} (nothing is trained)",
             f"data: {n} rows; sample of {s['rows']} encoded through the template",
             f"  tokens per row: min {L['min']}, mean {L['mean']}, p50 {L['p50']}, p90 {L['p90']}, p99 {L['p99']}, "
             f"max {L['max']}",
             f"  over --max_length {r['max_length']}: {s['over_max_length']} of {s['rows']} "
             f"({'dropped' if r['truncation_strategy'] == 'delete' else 'cut ' + r['truncation_strategy']}, "
             f"--truncation_strategy {r['truncation_strategy']})"
             + (f"; {s['failed']} failed to encode (skipped: --strict false)" if s["failed"] else "")]
    if r["labelled_share"] is not None:
        lines.append(f"  labelled tokens: {100 * r['labelled_share']:.1f}% of {s['tokens']:,} sampled tokens carry loss")
    lines.append(f"parameters: {p['trainable']:,} trainable of {p['total']:,} ({100 * p['trainable'] / max(1, p['total']):.3f}%)")
    steps = "unknown (a stream without --max_steps)" if st["steps"] is None else f"{st['steps']:,}"
    seqs = f"{st['train_sequences']:,} training sequences, " if st["train_sequences"] is not None else ""
    lines.append(f"steps: {steps} ({seqs}{st['sequences_per_step']} per step = {st['per_device_batch']} per device x "
                 f"{st['gradient_accumulation']} accumulation x {st['world_size']} process(es))")
    shard = ", ".join(k for k, v in m["sharding"].items() if v) or "none"
    lines += [f"peak GPU memory per device: about {format_bytes(m['peak'])} (allocated by PyTorch; add ~0.5-1 GiB for "
              f"the CUDA context)",
              f"  weights {format_bytes(m['weights'])}, gradients {format_bytes(m['gradients'])}, optimizer "
              f"{format_bytes(m['optimizer'])}, activations {format_bytes(m['activations'])} "
              f"({m['tokens_per_micro_batch']:,} tokens per micro-batch), loss {format_bytes(m['loss'])}"
              + (f", reference model {format_bytes(m['reference_model'])}" if m["reference_model"] else "")
              + f"; sharded: {shard}"]
    lines += [f"note: {x}" for x in r["notes"]]
    lines.append(f"{r['command']} --dry_run: ok, nothing trained or written")
    return "\n".join(lines)
