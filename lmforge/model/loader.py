"""Load a model and its tokenizer with the dtype, attention kernel and device the user asked for."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lmforge.model.hub import resolve_model_dir

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(torch_dtype: str | None, device: str, config: Any = None):
    """``auto`` means the checkpoint's dtype on GPU and float32 on CPU.

    CPUs without bf16 matrix units train bf16 weights tens of times slower than float32, so on
    CPU ``auto`` picks float32 and says so; an explicit choice is respected.
    """
    import torch

    if torch_dtype and torch_dtype != "auto":
        if torch_dtype not in _DTYPES:
            raise ValueError(f"--torch_dtype {torch_dtype!r}: expected auto, float32, bfloat16 or float16")
        dtype = getattr(torch, _DTYPES[torch_dtype])
        if device == "cpu" and dtype != torch.float32:
            logger.warning("--torch_dtype %s on CPU: most CPUs run this much slower than float32", torch_dtype)
        return dtype
    if device == "cpu":
        logger.info("Using float32 on CPU (bf16/fp16 are slow without CPU matrix units); pass --torch_dtype to override")
        return torch.float32
    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = getattr(torch, cfg_dtype, None)
    if cfg_dtype in (torch.float16, torch.bfloat16):
        return cfg_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_trust_remote_code(trust_remote_code: bool, model_kwargs: dict | None) -> tuple[bool, dict]:
    """``--trust_remote_code`` alone decides whether a model's own Python code runs.

    ``--model_kwargs`` may repeat the same value (it is then dropped) but not contradict it: a
    ``{"trust_remote_code": true}`` there used to override ``--trust_remote_code false`` silently.
    """
    kwargs = dict(model_kwargs or {})
    if "trust_remote_code" not in kwargs:
        return bool(trust_remote_code), kwargs
    given = kwargs.pop("trust_remote_code")
    if not isinstance(given, bool) or given != bool(trust_remote_code):
        raise ValueError(f"--model_kwargs sets trust_remote_code={given!r} but --trust_remote_code is "
                         f"{str(bool(trust_remote_code)).lower()}; whether to run a model's own code is set with "
                         "--trust_remote_code only")
    return given, kwargs


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding is masked out everywhere; any real token id serves.
        tok.pad_token = tok.eos_token
    return tok


def _auto_class(config: Any):
    """Causal LMs through AutoModelForCausalLM; vision-language models that are not one through
    AutoModelForImageTextToText (Qwen2-VL, LLaVA, ...)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from lmforge.model.vision import is_vision_config

    if getattr(config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and is_vision_config(config):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def get_model_tokenizer(
    model: str,
    *,
    hub: str = "hf",
    revision: str | None = None,
    torch_dtype: str | None = "auto",
    attn_impl: str | None = None,
    device_map: str | dict | None = None,
    model_kwargs: dict | None = None,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    load_model: bool = True,
    device: str | None = None,
    auto_class: str | None = None,
):
    """Return ``(model, tokenizer)`` for a hub id, local folder or ``builtin:NAME``.

    ``device`` picks where the model goes when ``device_map`` is not given (default: CUDA if there
    is one). With ``load_model=False`` the model is ``None`` (tokenizer-only commands). ``auto_class``
    names the transformers class that loads it (``AutoModel`` for an embedding model,
    ``AutoModelForSequenceClassification`` for a classifier or reranker:
    :func:`lmforge.model.tasks.task_auto_class`); None: a causal LM or a vision-language model's class.
    """
    import transformers
    from transformers import AutoConfig

    trust_remote_code, model_kwargs = resolve_trust_remote_code(trust_remote_code, model_kwargs)
    model_dir = resolve_model_dir(model, hub=hub, revision=revision, need_weights=load_model)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if not load_model:
        return None, tokenizer
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    device = device or default_device()
    dtype = resolve_dtype(torch_dtype, device, config)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_impl:
        kwargs["attn_implementation"] = attn_impl
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        # each process of a multi-GPU run quantizes onto its own GPU (torchrun sets LOCAL_RANK)
        device_map = device_map or {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if device_map:
        kwargs["device_map"] = device_map
    kwargs.update(model_kwargs)
    logger.info("Loading %s (%s) from %s", model, dtype, model_dir)
    cls = getattr(transformers, auto_class) if auto_class else _auto_class(config)
    m = cls.from_pretrained(str(model_dir), **kwargs)
    if not device_map:
        m.to(device)
    # Remember the user-facing name (builtin:tiny, a hub id) beside the folder it came from.
    m.config.lmforge_model = model
    return m, tokenizer
