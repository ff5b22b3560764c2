"""Merge LoRA adapters into their base model and save a model any transformers user can load.

The result is a plain model folder: safetensors weights, config (``use_cache`` back on: training
writes it off), generation config, tokenizer with its chat template, and an ``args.json`` that
keeps the template and system prompt, so ``lmforge infer --ckpt_dir <merged>`` chats with it
exactly as with base + adapter. The folder is written under a temporary name and renamed when
complete, so an interrupted export never leaves a folder that looks finished.

A QLoRA adapter is merged into its base quantised and dequantised the way training saw it, and a
merge that would change no weight (a zero adapter, or deltas lost to bf16 rounding) is an error.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

from lmforge.export.tokenizer_v4 import write_v4_tokenizer_config
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


def _qlora_bits(train_args: dict[str, Any]) -> int | None:
    """The bitsandbytes width the adapters were trained against, if the run was QLoRA."""
    if train_args.get("train_type") != "qlora":
        return None
    return int(train_args.get("quant_bits") or 4)


def _load_dequantized_base(model: str, bits: int, *, hub: str, revision: str | None, trust_remote_code: bool,
                           dtype: str):
    """The base as QLoRA saw it: quantised the way training quantised it, then dequantised.

    A QLoRA adapter learnt a correction to the *quantised* weights; merging it into the original
    full-precision weights would give a model that was never trained. bitsandbytes runs on CPU
    for this (slowly) where no GPU is present.
    """
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lmforge.model import resolve_model_dir
    from lmforge.model.loader import load_tokenizer

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("merging a QLoRA adapter dequantises its 4/8-bit base, which needs bitsandbytes: "
                          "pip install 'lmforge[qlora]'")
    torch_dtype = getattr(torch, dtype)
    quant = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch_dtype))
    folder = resolve_model_dir(model, hub=hub, revision=revision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info("QLoRA checkpoint: loading %s in %d-bit on %s, then dequantising to %s", model, bits, device, dtype)
    base = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quant, dtype=torch_dtype,
                                                device_map=device, trust_remote_code=trust_remote_code)
    base = base.dequantize().to(torch_dtype)
    if getattr(base.config, "quantization_config", None) is not None:
        del base.config.quantization_config
    base.is_quantized = False
    base.hf_quantizer = None
    return base, load_tokenizer(folder, trust_remote_code=trust_remote_code)


def check_merge_changes(peft_model: Any, adapter_names: list[str]) -> dict[str, Any]:
    """Refuse a merge that would change no weight; returns ``{"changed": n, "layers": n, "max_delta": x}``.

    A LoRA whose B matrices are zero (an untrained or freshly initialised adapter), or whose deltas
    are all below the rounding step of the base's dtype (bf16 keeps ~3 significant digits), merges to
    the base model bit for bit: the export would look successful and ship the untouched base. This
    computes each layer's delta one at a time and checks that adding it changes the stored weight.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    changed = layers = 0
    max_delta = 0.0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        for name in adapter_names:
            if name not in getattr(module, "lora_A", {}) and name not in getattr(module, "lora_embedding_A", {}):
                continue
            layers += 1
            with torch.no_grad():
                delta = module.get_delta_weight(name)
                max_delta = max(max_delta, float(delta.abs().max()))
                if torch.any((weight + delta.to(weight.dtype)) != weight):
                    changed += 1
    saved = [n for n in adapter_names if getattr(peft_model.peft_config[n], "modules_to_save", None)]
    if layers and not changed and not saved:
        why = ("its LoRA B matrices are all zero (an adapter that was never trained?)" if max_delta == 0 else
               f"its largest change, {max_delta:.3g}, is below the rounding step of the "
               f"{str(weight.dtype).replace('torch.', '')} base weights")
        raise ValueError(f"merge_lora: merging {', '.join(adapter_names)} would change no weight of the base model: "
                         f"{why}. The export would be the base model unchanged; nothing was written")
    return {"changed": changed, "layers": layers, "max_delta": max_delta}


@contextmanager
def build_dir(out: Path) -> Iterator[Path]:
    """A scratch folder beside ``out`` that replaces ``out`` when the block succeeds and is removed if it fails,
    so an interrupted export never leaves a folder that looks finished."""
    from lmforge.utils.io import replace_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            logger.warning("Replacing the existing %s", out)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tokenizer_and_args(folder: Path, tokenizer: Any, src: Any, out: Path) -> None:
    """The tokenizer (plus its transformers-4 config) and the ``args.json`` that lets ``--ckpt_dir <out>`` chat."""
    from lmforge.utils.io import atomic_write_text

    tokenizer.save_pretrained(folder)
    write_v4_tokenizer_config(folder, tokenizer)
    atomic_write_text(folder / "args.json", json.dumps(export_args(src.train_args, out, src.template, src.system),
                                                       indent=2, ensure_ascii=False))


def export_args(train_args: dict[str, Any], out: Path, template: str | None, system: str | None) -> dict[str, Any]:
    """The ``args.json`` of an exported folder: ``lmforge infer --ckpt_dir <out>`` chats with the run's template."""
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

    from types import SimpleNamespace

    from lmforge.model import get_model_tokenizer
    from lmforge.model.tasks import task_load_kwargs

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
    bits = _qlora_bits(src.train_args)
    if bits:
        base, tokenizer = _load_dequantized_base(src.model, bits, hub=hub, revision=revision,
                                                 trust_remote_code=trust_remote_code, dtype=dtype)
    else:
        # a classifier or reranker checkpoint merges into the model class it was trained as (its head kept)
        auto_class, task_kwargs = task_load_kwargs(SimpleNamespace(**{**dict.fromkeys(
            ("task_type", "num_labels", "problem_type", "label_names")), **src.train_args}))
        base, tokenizer = get_model_tokenizer(src.model, hub=hub, revision=revision, torch_dtype=dtype,
                                              device_map=device_map, trust_remote_code=trust_remote_code,
                                              device=None if device_map else "cpu", auto_class=auto_class,
                                              model_kwargs=task_kwargs)
    peft_model = attach_adapters(base, src.adapters)
    stats = check_merge_changes(peft_model, list(src.adapters))
    logger.info("The merge changes %d of %d LoRA layers (largest |delta| %.3g)", stats["changed"], stats["layers"],
                stats["max_delta"])
    with torch.no_grad():
        merged = peft_model.merge_and_unload(adapter_names=list(src.adapters))

    merged.config.use_cache = True
    if hasattr(merged.config, "lmforge_model"):  # a run-time note of the loader, not part of this model
        del merged.config.lmforge_model
    gen = getattr(merged, "generation_config", None)  # classifiers have none
    if gen is not None:
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id

    with build_dir(out) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        save_tokenizer_and_args(tmp, tokenizer, src, out)
        from lmforge.model.vision import get_processor

        processor = get_processor(src.model, merged.config, tokenizer, hub=hub, revision=revision,
                                  min_pixels=src.train_args.get("min_pixels"),
                                  max_pixels=src.train_args.get("max_pixels"), trust_remote_code=trust_remote_code)
        if processor is not None:  # a vision-language model needs its image processor beside the weights
            processor.image_processor.save_pretrained(tmp)
    logger.info("Merged model saved to %s", out)
    return out
