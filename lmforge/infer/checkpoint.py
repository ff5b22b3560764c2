"""What to load for a checkpoint: the base model, its adapters, and the template it was trained with.

A training checkpoint is either a LoRA adapter (``adapter_config.json``) or a full model
(``config.json``); its ``args.json`` (in the checkpoint or the run folder above it) names the base
model, the template and the system prompt, so that ``--ckpt_dir`` alone is enough to chat with it
exactly as it was trained. ``infer``, ``deploy`` and ``export`` all resolve checkpoints here.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from lmforge.arguments.base import read_args_json

logger = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """Resolved inputs: ``model`` for get_model_tokenizer, adapter folders by name, template settings."""

    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    agent_template: str | None = None
    enable_thinking: bool | None = None
    train_args: dict[str, Any] = field(default_factory=dict)  # the args.json found, if any
    default_adapter: str | None = None  # --ckpt_dir of an adapter: requests that name no adapter use it


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def parse_adapters(adapters: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["dir", "name=dir"]`` or ``{name: dir}`` -> ``{name: dir}``; unnamed ones take the folder's name."""
    if not adapters:
        return {}
    if isinstance(adapters, Mapping):
        items = list(adapters.items())
    else:
        items = []
        for a in adapters:
            name, sep, path = str(a).partition("=")
            items.append((name, path) if sep and name and not Path(a).exists() else (None, str(a)))
    out: dict[str, str] = {}
    for name, path in items:
        if not is_adapter_dir(path):
            raise FileNotFoundError(f"--adapters {path!r}: not a LoRA adapter folder (no adapter_config.json)")
        if name is None:
            base = name = Path(path).resolve().name
            k = 2
            while name in out:
                name, k = f"{base}-{k}", k + 1
        elif name in out:
            raise ValueError(f"--adapters: the name {name!r} is used twice")
        out[name] = str(path)
    return out


def attach_adapters(model: Any, adapters: Mapping[str, str]) -> Any:
    """``model`` wrapped in a PeftModel holding every adapter under its name (``model`` itself if none)."""
    if not adapters:
        return model
    from peft import PeftModel

    from lmforge.tuners.prepare import peft_checkpointing_query

    names = list(adapters)
    with peft_checkpointing_query():  # peft reads a name transformers 5 deprecated; see there
        peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(adapters[name], adapter_name=name)
    return peft_model


def _adapter_base(path: str | Path) -> str | None:
    cfg = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    return cfg.get("base_model_name_or_path")


def resolve_model_source(model: str | None = None, *, ckpt_dir: str | None = None,
                         adapters: Iterable[str] | Mapping[str, str] | None = None,
                         template: str | None = None, system: str | None = None) -> ModelSource:
    """Work out what to load from ``--model``, ``--ckpt_dir`` and ``--adapters``.

    Values the user gave (model, template, system) win over those read from ``args.json``.
    """
    named = parse_adapters(adapters)
    train_args: dict[str, Any] = {}
    default_adapter = None
    if ckpt_dir:
        ckpt = Path(ckpt_dir)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"--ckpt_dir {ckpt_dir!r}: no such folder")
        if not is_adapter_dir(ckpt) and not (ckpt / "config.json").is_file():
            from lmforge.utils.checkpoint import find_last_checkpoint

            last = find_last_checkpoint(ckpt)  # a run folder: use its newest complete checkpoint
            if last is not None:
                logger.info("--ckpt_dir %s is a run folder; using its last checkpoint %s", ckpt, last)
                ckpt = last
        train_args = read_args_json(ckpt)
        if is_adapter_dir(ckpt):
            model = model or train_args.get("model") or _adapter_base(ckpt)
            ckpt_named = parse_adapters([str(ckpt)])
            default_adapter = next(iter(ckpt_named))
            named = {**ckpt_named, **named}
        elif (ckpt / "config.json").is_file():
            if model and model != str(ckpt):
                logger.info("--ckpt_dir %s is a full model; loading it instead of --model %s", ckpt, model)
            model = str(ckpt)
        else:
            raise FileNotFoundError(f"--ckpt_dir {ckpt_dir!r}: neither a LoRA adapter (adapter_config.json) "
                                    f"nor a model (config.json)")
    elif named and not model:
        first = next(iter(named.values()))
        train_args = read_args_json(first)
        model = train_args.get("model") or _adapter_base(first)
    if not model:
        raise ValueError("no model: pass --model (a hub id, a local folder, or builtin:tiny), or --ckpt_dir")
    return ModelSource(
        model=model, adapters=named,
        template=template or train_args.get("template"),
        system=system if system is not None else train_args.get("system"),
        agent_template=train_args.get("agent_template"),
        enable_thinking=train_args.get("enable_thinking"),
        train_args=train_args, default_adapter=default_adapter)
