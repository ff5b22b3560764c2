"""Merge LoRA adapters into their base model and save a model any transformers user can load.

The result is a plain model folder: safetensors weights, config (``use_cache`` back on: training
writes it off), generation config, tokenizer with its chat template, and an ``args.json`` that
keeps the template and system prompt, so ``lmforge infer --ckpt_dir <merged>`` chats with it
exactly as with base + adapter. The folder is written under a temporary name and renamed when
complete, so an interrupted export never leaves a folder that looks finished.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from lmforge.infer.checkpoint import attach_adapters, resolve_model_source

logger = logging.getLogger(__name__)


def _checkpoint_dtype(model: str, hub: str, revision: str | None, trust_remote_code: bool) -> str:
    """The base checkpoint's own dtype: merging must not silently turn bf16 weights into fp32 files."""
    from transformers import AutoConfig

    from lmforge.model import resolve_model_dir

    config = AutoConfig.from_pretrained(str(resolve_model_dir(model, hub=hub, revision=revision)),
                                        trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _write_v4_tokenizer_class(folder: Path) -> None:
    """transformers 5 names the fast tokenizer class ``TokenizersBackend``, which transformers 4 (and
    tools built on it, such as vLLM) cannot load; ``PreTrainedTokenizerFast`` loads in both."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _merged_args(train_args: dict[str, Any], out: Path, template: str | None, system: str | None) -> dict[str, Any]:
    args = dict(train_args)
    args.update(model=str(out.resolve()), template=template, system=system)
    if "train_type" in args:
        args["train_type"] = "full"  # the adapters are in the weights now
    args.pop("resume_from_checkpoint", None)
    return args


def merge_lora(*, model: str | None = None, ckpt_dir: str | None = None,
               adapters: Iterable[str] | Mapping[str, str] | None = None, output_dir: str | None = None,
               torch_dtype: str = "auto", device_map: str | None = None, hub: str = "hf", revision: str | None = None,
               trust_remote_code: bool = False, max_shard_size: str = "5GB", template: str | None = None,
               system: str | None = None) -> Path:
    """Merge the adapters of ``ckpt_dir`` (and/or ``adapters``) into the base model; return the output folder.

    The base comes from ``model``, else the checkpoint's args.json, else the adapter's config.
    ``output_dir`` defaults to ``<ckpt_dir>-merged`` (or ``<first adapter>-merged``).
    """
    import torch

    from lmforge.model import get_model_tokenizer
    from lmforge.utils.io import replace_dir

    src = resolve_model_source(model, ckpt_dir=ckpt_dir, adapters=adapters, template=template, system=system)
    if not src.adapters:
        where = f"--ckpt_dir {ckpt_dir} is a full model" if ckpt_dir else "no --adapters or --ckpt_dir given"
        raise ValueError(f"merge_lora: nothing to merge ({where}); it needs a LoRA adapter checkpoint")
    first = Path(ckpt_dir) if ckpt_dir else Path(next(iter(src.adapters.values())))
    out = Path(output_dir) if output_dir else first.with_name(f"{first.resolve().name}-merged")
    if out.resolve() in {Path(p).resolve() for p in src.adapters.values()}:
        raise ValueError(f"--output_dir {out} is an adapter folder being merged; choose another folder")

    dtype = _checkpoint_dtype(src.model, hub, revision, trust_remote_code) if torch_dtype == "auto" else torch_dtype
    logger.info("Merging %s into %s (%s)", ", ".join(src.adapters.values()), src.model, dtype)
    base, tokenizer = get_model_tokenizer(src.model, hub=hub, revision=revision, torch_dtype=dtype,
                                          device_map=device_map, trust_remote_code=trust_remote_code,
                                          device=None if device_map else "cpu")
    peft_model = attach_adapters(base, src.adapters)
    with torch.no_grad():
        merged = peft_model.merge_and_unload(adapter_names=list(src.adapters))

    merged.config.use_cache = True
    if hasattr(merged.config, "lmforge_model"):  # a run-time note of the loader, not part of this model
        del merged.config.lmforge_model
    gen = merged.generation_config
    if gen is not None:
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        from lmforge.model.vision import get_processor

        processor = get_processor(src.model, merged.config, tokenizer, hub=hub, revision=revision,
                                  min_pixels=src.train_args.get("min_pixels"),
                                  max_pixels=src.train_args.get("max_pixels"), trust_remote_code=trust_remote_code)
        if processor is not None:  # a vision-language model needs its image processor beside the weights
            processor.image_processor.save_pretrained(tmp)
        _write_v4_tokenizer_class(tmp)
        from lmforge.utils.io import atomic_write_text

        atomic_write_text(tmp / "args.json", json.dumps(_merged_args(src.train_args, out, src.template, src.system),
                                                        indent=2, ensure_ascii=False))
        if out.exists():
            logger.warning("Replacing the existing %s", out)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Merged model saved to %s", out)
    return out
