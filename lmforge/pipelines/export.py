"""``export_main`` / ``merge_lora_main``: a checkpoint in, a model other tools load out.

    lmforge export --ckpt_dir output/.../checkpoint-50 --merge_lora true [--output_dir D]
    lmforge export --ckpt_dir output/.../checkpoint-50 --quant_method gguf --quant_type q4_k_m
    lmforge export --ckpt_dir output/.../checkpoint-50 --quant_method int8 --push_to_hub true --hub_model_id me/m
    lmforge export --ckpt_dir output/.../checkpoint-50 --quant_method gptq --dataset train.jsonl   # W4A16 for vLLM
    lmforge merge-lora --ckpt_dir output/.../checkpoint-50
    lmforge export --ckpt_dir output/.../checkpoint-50      # an embedding checkpoint: a sentence-transformers folder

The steps run in order: merge (``--merge_lora``, or implied when quantising an adapter checkpoint),
quantise or convert (``--quant_method``), push (``--push_to_hub``: the last step's folder, or
``--ckpt_dir`` itself when nothing else ran). Every check that can fail without loading weights
(packages, GPU, architecture, hub reachability) runs before the first step.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmforge.arguments import ExportArguments
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")


def _default_output(args: ExportArguments, model: str, suffix: str = "") -> Path:
    """The one output rule (``utils/command.py``): ``export-[<checkpoint>-]<time><suffix>`` in the run folder."""
    from lmforge.utils.command import default_output

    return default_output("export", args.ckpt_dir or (args.adapters or [None])[0] or model, suffix)


def _name(args: ExportArguments, model: str) -> str:
    if args.ckpt_dir:
        return Path(args.ckpt_dir).resolve().name
    return Path(model).resolve().name if Path(model).is_dir() else model.split(":")[-1].split("/")[-1]


def _card(args: ExportArguments, src: Any, folder: Path, fmt: str) -> str:
    from lmforge.export.hub import command_line, find_eval_report, model_card

    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "README.md")
    return model_card(base_model=src.model, train_args=src.train_args, fmt=fmt, files=files,
                      export_command=command_line(args, ExportArguments()), repo_id=args.hub_model_id,
                      eval_report=find_eval_report(args.ckpt_dir))


def _quantize(args: ExportArguments, src: Any, model_dir: Path, out: Path) -> Path:
    """Write the ``--quant_method`` export of ``model_dir`` to ``out`` (built beside it, renamed when complete)."""
    from lmforge.export.merge import build_dir, save_tokenizer_and_args
    from lmforge.utils.io import atomic_write_text

    with build_dir(out) as tmp:
        if args.quant_method == "gguf":
            from lmforge.export.to_gguf import convert_to_gguf

            quant_type = args.quant_type or "f16"
            convert_to_gguf(model_dir, tmp / f"{_name(args, src.model)}-{quant_type}.gguf", quant_type,
                            name=_name(args, src.model))
        elif args.quant_method in ("gptq", "awq"):
            from lmforge.export.calibrated import calibration_ids, quantize_calibrated
            from lmforge.model.loader import load_tokenizer

            tokenizer = load_tokenizer(model_dir, trust_remote_code=args.trust_remote_code)
            samples = calibration_ids(
                tokenizer, args.dataset, n_samples=args.quant_n_samples, max_length=args.max_length,
                template=src.template, system=src.system, hub=args.hub,
                enable_thinking=src.enable_thinking if args.enable_thinking is None else args.enable_thinking,
                agent_template=args.agent_template or src.agent_template)
            quantize_calibrated(model_dir, tmp, args.quant_method, samples, tokenizer, quant_bits=args.quant_bits,
                                torch_dtype=args.torch_dtype, trust_remote_code=args.trust_remote_code,
                                max_shard_size=args.max_shard_size)
            save_tokenizer_and_args(tmp, tokenizer, src, out)
        else:
            from lmforge.export.quantize import quantize_model
            from lmforge.model.loader import load_tokenizer

            quantize_model(model_dir, tmp, args.quant_method, args.quant_bits, args.torch_dtype,
                           args.trust_remote_code)
            save_tokenizer_and_args(tmp, load_tokenizer(model_dir, trust_remote_code=args.trust_remote_code), src, out)
        atomic_write_text(tmp / "README.md", _card(args, src, tmp, args.quant_method))
    return out


def _merge(args: ExportArguments, output_dir: str | None) -> Path:
    from lmforge.export import merge_lora

    return merge_lora(model=args.model, ckpt_dir=args.ckpt_dir, adapters=args.adapters, output_dir=output_dir,
                      torch_dtype=args.torch_dtype, device_map=args.device_map, hub=args.hub, revision=args.revision,
                      trust_remote_code=args.trust_remote_code, max_shard_size=args.max_shard_size,
                      template=args.template, system=args.system)


def _sentence_transformers(args: ExportArguments) -> dict[str, Any]:
    """An embedding checkpoint (adapters merged) as a sentence-transformers folder, then pushed if asked."""
    from lmforge.export.sentence_transformers import export_sentence_transformers
    from lmforge.infer.checkpoint import resolve_model_source
    from lmforge.utils.command import print_output

    src = resolve_model_source(args.model, ckpt_dir=args.ckpt_dir, adapters=args.adapters, template=args.template,
                               system=args.system)
    out = Path(args.output_dir) if args.output_dir else _default_output(args, src.model)
    folder = export_sentence_transformers(src, out, torch_dtype=args.torch_dtype, hub=args.hub, revision=args.revision,
                                          trust_remote_code=args.trust_remote_code, max_shard_size=args.max_shard_size)
    print_output("export", "sentence-transformers model", folder)
    result: dict[str, Any] = {"output_dir": str(folder)}
    if args.push_to_hub:
        from lmforge.export.hub import push_folder

        result["hub_model_id"] = push_folder(folder, hub=args.hub, repo_id=args.hub_model_id, token=args.hub_token,
                                             private=args.hub_private_repo, card=_card(args, src, folder, "model"))
    return result


def _run(args: ExportArguments) -> dict[str, Any]:
    from lmforge.infer.checkpoint import resolve_model_source
    from lmforge.model import resolve_model_dir
    from lmforge.utils.command import print_output
    from lmforge.utils.io import atomic_write_text

    if not args.safe_serialization:
        logger.warning("--safe_serialization false is ignored: transformers 5 always writes safetensors")
    src = resolve_model_source(args.model, ckpt_dir=args.ckpt_dir, adapters=args.adapters, template=args.template,
                               system=args.system)
    method = args.quant_method
    if method == "gguf":  # the architecture and tokenizer are checked before any merge or weight load
        from lmforge.export.to_gguf import check_gguf_support

        check_gguf_support(resolve_model_dir(src.model, hub=args.hub, revision=args.revision))
    if method == "awq":  # an architecture without an AWQ layer map is refused before any merge or weight load
        from lmforge.export.calibrated import check_awq_support

        check_awq_support(resolve_model_dir(src.model, hub=args.hub, revision=args.revision))
    out = None
    if method:
        suffix = f"{method}-{args.quant_type or 'f16'}" if method == "gguf" else (
            f"bnb-{args.quant_bits or 4}bit" if method == "bnb" else
            f"{method}-w{args.quant_bits or 4}a16" if method in ("gptq", "awq") else method)
        out = Path(args.output_dir) if args.output_dir else _default_output(args, src.model, f"-{suffix}")
    result: dict[str, Any] = {}
    folder: Path | None = None  # what the last step wrote
    scratch = None
    try:
        if args.merge_lora:
            merged_to = _default_output(args, src.model, "-merged") if method else (
                args.output_dir or _default_output(args, src.model))
            folder = _merge(args, str(merged_to))
            atomic_write_text(folder / "README.md", _card(args, src, folder, "merged"))
            print_output("export", "merged model", folder)
        elif out is not None and src.adapters:  # quantising an adapter checkpoint: merge into scratch space first
            out.resolve().parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".lmforge-merge-", dir=out.resolve().parent))
            folder = _merge(args, str(scratch / "merged"))
        if out is not None:
            model_dir = folder or resolve_model_dir(src.model, hub=args.hub, revision=args.revision)
            if args.merge_lora:
                result["merged_dir"] = str(folder)
            folder = _quantize(args, src, model_dir, out)
            print_output("export", f"{method} model", folder)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if folder is not None:
        result["output_dir"] = str(folder)
    if args.push_to_hub:
        from lmforge.export.hub import push_folder

        target = folder or Path(args.ckpt_dir or resolve_model_dir(src.model, hub=args.hub, revision=args.revision))
        fmt = "adapter" if folder is None and src.adapters else "model"
        result["hub_model_id"] = push_folder(target, hub=args.hub, repo_id=args.hub_model_id, token=args.hub_token,
                                             private=args.hub_private_repo, card=_card(args, src, target, fmt))
    return result


def export_main(args: ExportArguments) -> dict[str, Any]:
    """Run the export steps ``args`` ask for; returns ``{"output_dir": ..., "hub_model_id": ..., ...}``."""
    setup_logging()
    from lmforge.export.quantize import check_quant_request
    from lmforge.registry import load_plugins

    load_plugins(args.external_plugins)
    check_quant_request(args.quant_method, args.quant_type, args.quant_bits, dataset=args.dataset,
                        n_samples=args.quant_n_samples)
    if args.dataset:  # a missing calibration file or unknown built-in fails now, not after a merge
        from lmforge.dataset.loader import check_datasets

        check_datasets(args.dataset)
    if args.push_to_hub:
        from lmforge.export.hub import check_push

        check_push(args.hub, args.hub_model_id)
    from lmforge.infer.pooling import checkpoint_task

    task = checkpoint_task(None, args.ckpt_dir, args.adapters)
    if task and args.quant_method:
        raise ValueError(f"--quant_method {args.quant_method}: quantised and GGUF exports are for language models; "
                         f"this checkpoint is a {task} model (export it without --quant_method)")
    if task == "embedding":
        return _sentence_transformers(args)
    if not (args.merge_lora or args.quant_method or args.push_to_hub):
        raise ValueError("nothing to do: pass --merge_lora true, --quant_method or --push_to_hub true "
                         "(or run lmforge merge-lora)")
    return _run(args)


def merge_lora_main(args: ExportArguments) -> dict[str, Any]:
    """``export --merge_lora true``."""
    args = dataclasses.replace(args, merge_lora=True)
    return export_main(args)
