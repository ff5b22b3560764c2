"""``export_main`` / ``merge_lora_main``: a checkpoint in, a standalone model folder out.

    lmforge export --ckpt_dir output/.../checkpoint-50 --merge_lora true [--output_dir D]
    lmforge merge-lora --ckpt_dir output/.../checkpoint-50
"""
from __future__ import annotations

import logging
from typing import Any

from lmforge.arguments import ExportArguments
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")


def _push(folder: str, args: ExportArguments) -> str:
    from huggingface_hub import HfApi

    if not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (org/name)")
    api = HfApi(token=args.hub_token)
    api.create_repo(args.hub_model_id, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=args.hub_model_id, folder_path=folder, repo_type="model")
    logger.info("Uploaded %s to %s", folder, args.hub_model_id)
    return args.hub_model_id


def export_main(args: ExportArguments) -> dict[str, Any]:
    """Run the export steps ``args`` ask for; returns ``{"output_dir": ..., "hub_model_id": ...}``."""
    setup_logging()
    from lmforge.registry import load_plugins

    load_plugins(args.external_plugins)
    if not args.merge_lora:
        raise ValueError("nothing to do: pass --merge_lora true (or run lmforge merge-lora)")
    if not args.safe_serialization:
        logger.warning("--safe_serialization false is ignored: transformers 5 always writes safetensors")
    from lmforge.export import merge_lora
    from lmforge.utils.command import default_output, print_output

    output_dir = args.output_dir or default_output("export", args.ckpt_dir or (args.adapters or [None])[0] or args.model)
    out = merge_lora(model=args.model, ckpt_dir=args.ckpt_dir, adapters=args.adapters, output_dir=output_dir,
                     torch_dtype=args.torch_dtype, device_map=args.device_map, hub=args.hub, revision=args.revision,
                     trust_remote_code=args.trust_remote_code, max_shard_size=args.max_shard_size,
                     template=args.template, system=args.system)
    result: dict[str, Any] = {"output_dir": str(out)}
    if args.push_to_hub:
        result["hub_model_id"] = _push(str(out), args)
    print_output("export", "merged model", out)
    return result


def merge_lora_main(args: ExportArguments) -> dict[str, Any]:
    """``export --merge_lora true``."""
    args.merge_lora = True
    return export_main(args)
