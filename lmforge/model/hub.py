"""Resolve a model name to a local folder: ``builtin:NAME``, a local path, or a hub id.

Hugging Face ids go through ``huggingface_hub.snapshot_download``; ModelScope ids through
``modelscope.snapshot_download`` when ``hub='modelscope'`` and the package is installed. Both are
real downloads; tests stop them at the network boundary (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from lmforge.model.builtin import builtin_model_dir, is_builtin

logger = logging.getLogger(__name__)


class ModelNotFoundError(OSError):
    """The model could not be found locally or fetched from the hub; the message says which and why."""


_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")


def missing_model_files(path: Path, *, need_weights: bool = True) -> list[str]:
    """What a local model folder lacks to load: config.json, weights, tokenizer files (empty list: nothing)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if need_weights and not any(any(path.glob(g)) for g in _WEIGHTS):
        missing.append("weights (*.safetensors or *.bin)")
    has_tokenizer = any(any(path.glob(g)) for g in _TOKENIZER)
    if not has_tokenizer and (path / "tokenizer_config.json").is_file():  # custom tokenizer code names its own files
        import json

        try:
            has_tokenizer = "auto_map" in json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    if not has_tokenizer:
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    return missing


def check_model_dir(path: Path, *, shown: str, flag: str = "--model", need_weights: bool = True) -> None:
    """Fail with one line naming what ``path`` lacks, before transformers fails on it with a misleading hint."""
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{flag} {shown}: a LoRA adapter, not a model; pass it as --ckpt_dir (its args.json "
                                 f"names the base model) or as --adapters beside --model BASE")
    missing = missing_model_files(path, need_weights=need_weights)
    if not missing:
        return
    if not any(path.iterdir()):
        raise ModelNotFoundError(f"{flag} {shown}: the folder is empty; a model folder holds config.json, the weights "
                                 f"(*.safetensors) and the tokenizer files")
    what = ", no ".join(missing[:-1]) + (" and no " if len(missing) > 1 else "") + missing[-1]
    raise ModelNotFoundError(f"{flag} {shown}: not a complete model folder: it has no {what}")


def resolve_model_dir(model: str, *, hub: str = "hf", revision: str | None = None, need_weights: bool = True,
                      flag: str = "--model") -> Path:
    """The local folder of ``model``; a local folder is checked for what loading needs (``need_weights``:
    the weights too, not only the config and tokenizer)."""
    if not model:
        raise ModelNotFoundError("no model given: pass --model (a hub id, a local folder, or builtin:tiny)")
    if is_builtin(model):
        return builtin_model_dir(model)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{flag} {model!r} is a file; expected a folder with config.json")
        if not (path / "config.json").is_file():
            from lmforge.utils.checkpoint import find_last_checkpoint

            last = find_last_checkpoint(path)  # a training run's folder: its newest complete checkpoint
            if last is not None and (last / "config.json").is_file():
                logger.info("%s %s is a training run; loading its last checkpoint %s", flag, model, last)
                path, model = last, str(last)
            elif last is not None:
                path, model = last, str(last)  # an adapter checkpoint: check_model_dir says how to pass it
        check_model_dir(path, shown=model, flag=flag, need_weights=need_weights)
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"--model {model!r}: no such folder")
    if hub == "modelscope":
        return _download_modelscope(model, revision)
    return _download_hf(model, revision)


def _download_hf(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    logger.info("Fetching %s from the Hugging Face hub (or its local cache)", repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                      "*.py", "*.tiktoken", "*.bin"]))
    except Exception as e:  # noqa: BLE001 - hub errors are many; say which model and why
        raise ModelNotFoundError(
            f"--model {repo_id!r}: not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}). Check the id, your network, HF_HUB_OFFLINE and HF_TOKEN.") from e


def _download_modelscope(model_id: str, revision: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelNotFoundError("--hub modelscope needs the modelscope package: pip install modelscope") from None
    logger.info("Fetching %s from ModelScope (or its local cache)", model_id)
    try:
        return Path(snapshot_download(model_id, revision=revision))
    except Exception as e:  # noqa: BLE001
        raise ModelNotFoundError(f"--model {model_id!r}: could not be fetched from ModelScope "
                                 f"({type(e).__name__}: {e})") from e
