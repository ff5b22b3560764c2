"""``--fsdp`` / ``--deepspeed`` / ``--ddp_*`` -> the Trainer's own arguments for several processes.

The sharding engines are accelerate's FSDP2 and DeepSpeed ZeRO, driven by ``transformers.Trainer``;
lmforge only turns its short flags into their configuration, ships the ZeRO presets (``ds_configs/``),
and says clearly what cannot work before anything loads. Plain DDP needs nothing from here: a
launcher that sets ``WORLD_SIZE`` is enough.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmforge.utils.errors import SetupError

FSDP_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard")
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")
PRESET_DIR = Path(__file__).with_name("ds_configs")


def _json_arg(value: str | None, flag: str) -> dict[str, Any]:
    """A JSON object given inline or as a path to a .json file."""
    from lmforge.arguments.base import _parse_dict

    if not value:
        return {}
    try:
        return _parse_dict(Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value)
    except ValueError as e:
        raise ValueError(f"{flag}: neither a .json file nor {e}") from None


def fsdp_kwargs(fsdp: str, fsdp_config: str | None) -> dict[str, Any]:
    """``--fsdp 'full_shard [offload]'`` -> TrainingArguments(fsdp=True, fsdp_config=..., parallelism_config=...)."""
    words = fsdp.replace(",", " ").split()
    strategies = [w for w in words if w in FSDP_STRATEGIES]
    unknown = [w for w in words if w not in FSDP_STRATEGIES and w != "offload"]
    if unknown or len(strategies) != 1:
        raise ValueError(f"--fsdp {fsdp!r}: expected one of {', '.join(FSDP_STRATEGIES)}, optionally with 'offload'")
    strategy = strategies[0]
    cfg = _json_arg(fsdp_config, "--fsdp_config")
    cfg = {k[5:] if k.startswith("fsdp_") else k: v for k, v in cfg.items()}
    if int(cfg.get("version", 2)) != 2:
        raise ValueError("--fsdp_config: lmforge drives FSDP2 (version 2); FSDP1 is deprecated in transformers")
    cfg["version"] = 2
    cfg.setdefault("reshard_after_forward", strategy != "shard_grad_op")
    cfg.setdefault("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
    # Sharded checkpoints during training (resumable on another world size); run_training writes
    # consolidated weights at the end.
    cfg.setdefault("state_dict_type", "SHARDED_STATE_DICT")
    if "offload" in words:
        cfg["cpu_offload"] = True
    kw: dict[str, Any] = {"fsdp": True, "fsdp_config": cfg}
    if strategy == "hybrid_shard":
        from accelerate.parallelism_config import ParallelismConfig

        nnodes = int(os.environ.get("NNODES", "1"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(max(1, world // nnodes))))
        if nnodes < 2:
            raise ValueError("--fsdp hybrid_shard shards within a node and replicates across nodes: it needs NNODES >= 2 "
                             "(on one node use full_shard)")
        kw["parallelism_config"] = ParallelismConfig(dp_replicate_size=nnodes, dp_shard_size=per_node)
    return kw


def deepspeed_config(value: str) -> str:
    """A shipped preset name or a user's DeepSpeed JSON file -> the file's path."""
    if value in DEEPSPEED_PRESETS:
        return str(PRESET_DIR / f"{value}.json")
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--deepspeed {value!r}: not a preset ({', '.join(DEEPSPEED_PRESETS)}) and no such file")
    _json_arg(value, "--deepspeed")
    return str(path)


def parallel_training_kwargs(args: Any, on_gpu: bool) -> dict[str, Any]:
    """TrainingArguments keywords for the several-process flags of ``args``; checks them first."""
    import importlib.util

    fsdp, ds = getattr(args, "fsdp", None), getattr(args, "deepspeed", None)
    if fsdp and ds:
        raise ValueError("--fsdp and --deepspeed both shard the model: choose one")
    # DDP's search for unused parameters costs a graph traversal per step; off unless asked (a model that
    # skips parameters then fails with DDP's own message naming them).
    kw: dict[str, Any] = {"ddp_timeout": args.ddp_timeout,
                          "ddp_find_unused_parameters": bool(args.ddp_find_unused_parameters)}
    if args.ddp_backend:
        kw["ddp_backend"] = args.ddp_backend
    if fsdp:
        if args.train_type == "qlora":
            raise ValueError("--fsdp with --train_type qlora is not supported (4-bit weights do not shard); use lora")
        kw.update(fsdp_kwargs(fsdp, args.fsdp_config))
    elif args.fsdp_config:
        raise ValueError("--fsdp_config without --fsdp: pass --fsdp full_shard (or shard_grad_op, hybrid_shard)")
    if ds:
        if importlib.util.find_spec("deepspeed") is None:
            raise SetupError(f"--deepspeed {ds} needs DeepSpeed: pip install 'lmforge[deepspeed]'")
        if not on_gpu:
            raise SetupError(f"--deepspeed {ds} needs CUDA GPUs; on CPU use --fsdp full_shard or plain DDP")
        kw["deepspeed"] = deepspeed_config(ds)
    return kw


def does_not_fit(shape: Any, plan: Any, device_bytes: float, headroom: float = 0.95) -> str | None:
    """Why the model cannot train on devices of ``device_bytes`` in ``plan``'s world, or None if it may.

    Only what is held for the whole run counts (weights, gradients, optimizer states, a reference copy:
    a lower bound of the peak, so the check never refuses a run that would fit), plus the load itself:
    every process loads the whole model onto its GPU before FSDP/ZeRO shard it.
    """
    from lmforge.trainers.memory import GiB, estimate

    est = estimate(shape, plan)
    static = est["weights"] + est["gradients"] + est["optimizer"] + est["reference_model"]
    whole = shape.params * plan.dtype_bytes
    limit = headroom * device_bytes

    def gib(b: float) -> str:
        return f"{b / GiB:.1f} GiB"

    if whole > limit:
        return (f"the model's weights alone take {gib(whole)} and each process loads them whole onto a GPU of "
                f"{gib(device_bytes)} before sharding: use a GPU with more memory or --train_type qlora")
    if static <= limit:
        return None
    how = (f"--fsdp {plan.fsdp}" if plan.fsdp else f"--deepspeed {plan.deepspeed}" if plan.deepspeed
           else "no sharding")
    sharded = bool(plan.fsdp or plan.deepspeed) and plan.world > 1
    if not sharded:
        hints = ["--fsdp full_shard" + ("" if plan.world > 1 else " on several GPUs (NPROC_PER_NODE=N)")]
    else:
        hints = ["more GPUs"]
    if "offload" not in f"{plan.fsdp}{plan.deepspeed}":
        hints.append("--deepspeed zero3_offload")
    if plan.train_type in ("full", "freeze"):
        hints.append("--train_type lora")
    return (f"weights, gradients and optimizer states need about {gib(static)} per GPU ({plan.train_type}, "
            f"{plan.world} process(es), {how}; weights {gib(est['weights'])}, gradients {gib(est['gradients'])}, "
            f"optimizer {gib(est['optimizer'])}) and each GPU has {gib(device_bytes)}, before any activation: "
            f"try {' or '.join(hints) or 'more GPUs'}")


def check_model_fits(args: Any, command: str, world: int) -> None:
    """Refuse, before the load, a model that cannot train on this machine's GPUs even sharded (SetupError).

    The parameter counts come from the model built on the meta device (no weights read); a model that
    cannot be built that way (remote code, a reward head) is not checked here.
    """
    import torch

    from lmforge.trainers.memory import TrainPlan, deepspeed_name, holds_reference_copy, meta_model_counts

    if command == "rlhf" and getattr(args, "rlhf_type", None) == "rm":
        return
    try:
        shape, params = meta_model_counts(args)
    except Exception:  # noqa: BLE001 - a model the meta build cannot make is checked by its own load
        return
    plan = TrainPlan(train_type=args.train_type, trainable=params["trainable"],
                     dtype_bytes=4 if args.torch_dtype == "float32" else 2, optim=args.optim or "adamw_torch_fused",
                     world=world, fsdp=args.fsdp, deepspeed=deepspeed_name(args.deepspeed),
                     reference_copy=holds_reference_copy(args, command))
    device = int(os.environ.get("LOCAL_RANK", "0"))
    reason = does_not_fit(shape, plan, torch.cuda.get_device_properties(device).total_memory)
    if reason:
        raise SetupError(f"{args.model} does not fit: {reason}")
