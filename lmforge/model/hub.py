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


def resolve_model_dir(model: str, *, hub: str = "hf", revision: str | None = None) -> Path:
    if not model:
        raise ModelNotFoundError("no model given: pass --model (a hub id, a local folder, or builtin:tiny)")
    if is_builtin(model):
        return builtin_model_dir(model)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"--model {model!r} is a file; expected a folder with config.json")
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
            f"({type(e).__name__}: {e}). Check the id, your network, HF_HUB_OFFLINE and HF_TOKEN.") from e


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
