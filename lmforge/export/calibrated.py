"""GPTQ and AWQ exports: weights rounded with calibration data, through llm-compressor.

Both write the compressed-tensors ``pack-quantized`` layout (``quant_method: compressed-tensors`` in
``config.json``): ``--quant_bits 4`` is compressed-tensors' W4A16 preset (int4 symmetric weights, one scale
per group of 128 input columns, activations untouched), ``8`` is W8A16 (the same with int8). vLLM serves
these folders and transformers loads them when the ``compressed-tensors`` package is installed
(decompressed to the checkpoint's dtype). ``lm_head`` stays in full precision. A linear layer whose input
width is above 128 and not a multiple of it is refused by llm-compressor before calibration, naming it.

* ``gptq`` rounds each linear layer's weights one column at a time and moves the rounding error onto the
  columns not yet rounded, weighted by the Hessian of that layer's inputs on the calibration rows
  (llm-compressor's ``GPTQModifier``). Any architecture whose decoder layers llm-compressor can trace.
* ``awq`` scales the input channels that carry large activations up (and the layer before down) so that
  rounding hurts them less, then rounds to nearest (``AWQModifier`` + ``QuantizationModifier``). It needs
  a map of which norm or projection feeds which projections; llm-compressor ships maps for Llama, Mistral,
  Qwen2/2.5/3 (dense and MoE), Gemma 2/3, Phi-3, Cohere, DeepSeek, OLMo and a few more
  (``AWQ_MAPPING_REGISTRY``); an architecture without one is refused here instead of silently getting
  round-to-nearest.

Calibration rows come from ``--dataset`` (any lmforge dataset: files, hub ids, ``builtin:NAME``,
``name#N``), shuffled with seed 42, the first ``--quant_n_samples`` of them, each rendered whole by the
model's own template (the checkpoint's ``args.json`` template and system prompt, as training and
``lmforge infer`` render them) and cut to ``--max_length`` tokens. Rows are fed one at a time, so no
padding reaches the statistics.

llm-compressor runs on a GPU when there is one (the model is loaded on the CPU and each decoder layer is
moved to the GPU in turn) and on the CPU otherwise (slow for real models; seconds for the test models).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.utils.errors import SetupError

logger = logging.getLogger(__name__)

METHODS = ("gptq", "awq")
PIP = "pip install 'lmforge[quant]'"
SCHEMES = {4: "W4A16", 8: "W8A16"}
DEFAULT_BITS = 4
CALIBRATION_SEED = 42


def scheme(quant_bits: int | None) -> str:
    """The compressed-tensors preset for ``--quant_bits`` (4 when not given)."""
    return SCHEMES[quant_bits or DEFAULT_BITS]


def check_calibrated_request(method: str, quant_bits: int | None, dataset: list[str] | None,
                             n_samples: int = 128) -> None:
    """Flags first (a missing ``--dataset`` is named even where llm-compressor is not installed), then the package."""
    if not dataset:
        raise ValueError(f"--quant_method {method} calibrates on data: pass --dataset (rows like those the model "
                         f"will see, e.g. the training file, train.jsonl#256, or builtin:NAME); each row is rendered "
                         f"by the model's own template")
    if quant_bits not in (None, 4, 8):
        raise ValueError(f"--quant_bits {quant_bits}: --quant_method {method} writes 4-bit (W4A16, default) or "
                         f"8-bit (W8A16) weights")
    if n_samples < 1:
        raise ValueError(f"--quant_n_samples {n_samples}: needs at least one calibration row")
    if importlib.util.find_spec("llmcompressor") is None:
        raise SetupError(f"--quant_method {method} needs llm-compressor: {PIP}")


def check_awq_support(model_dir: str | Path) -> None:
    """Refuse, before any weight is loaded, an architecture llm-compressor has no AWQ layer map for."""
    import json

    archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    from llmcompressor.modifiers.transform.awq import AWQ_DYNAMIC_MAPPING_REGISTRY, AWQ_MAPPING_REGISTRY

    known = set(AWQ_MAPPING_REGISTRY) | set(AWQ_DYNAMIC_MAPPING_REGISTRY)
    if not any(a in known for a in archs):
        raise SetupError(f"--quant_method awq: llm-compressor has no AWQ layer mapping for {', '.join(archs) or 'this'} "
                         f"architecture (it has: {', '.join(sorted(known))}); use --quant_method gptq, which needs none")


def calibration_ids(tokenizer: Any, dataset: list[str], *, n_samples: int, max_length: int | None,
                    template: str | None = None, system: str | None = None, enable_thinking: bool | None = None,
                    agent_template: str | None = None, hub: str = "hf") -> list[list[int]]:
    """Token ids of the first ``n_samples`` rows of ``dataset`` (shuffled), each a whole conversation (or text)
    rendered by the model's template and cut to ``max_length``."""
    from lmforge.dataset import encode_dataset, load_dataset
    from lmforge.template import get_template

    rows, _ = load_dataset(dataset, seed=CALIBRATION_SEED, hub=hub)
    if len(rows) < n_samples:
        logger.warning("--quant_n_samples %d: the dataset has %d rows; calibrating on all of them", n_samples, len(rows))
    rows = rows.select(range(min(n_samples, len(rows))))
    tpl = get_template(tokenizer, template, system=system, max_length=max_length, truncation_strategy="right",
                       enable_thinking=enable_thinking, agent_template=agent_template)
    tpl.set_mode("pt")  # the whole rendering, prompt and reply alike: what the layers see at inference
    encoded = encode_dataset(rows, tpl, cache=False, desc="Encoding calibration rows")
    return [list(ids) for ids in encoded["input_ids"]]


def _recipe(method: str, quant_bits: int | None) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    quant = {"scheme": scheme(quant_bits), "targets": "Linear", "ignore": ["lm_head"]}
    if method == "gptq":
        return [GPTQModifier(**quant)]
    if method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(**quant)]
    if method == "rtn":  # plain round-to-nearest with the same scheme: the baseline the tests compare against
        return [QuantizationModifier(**quant)]
    raise ValueError(f"--quant_method {method}: not a calibrated method ({', '.join(METHODS)})")


@contextlib.contextmanager
def _no_pinning_without_accelerator() -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins its cached layer inputs in page-locked memory before each grid search, which
    fails on a machine without an accelerator ("Cannot access accelerator device when none is available"). Pinning
    only speeds up copies to the GPU, so where there is none it is skipped for the length of the run."""
    import torch

    try:
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError:
        yield
        return
    if torch.accelerator.is_available() or not hasattr(IntermediatesCache, "pin_memory"):
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def quantize_calibrated(model_dir: str | Path, out: Path, method: str, samples: list[list[int]], tokenizer: Any, *,
                        quant_bits: int | None = None, torch_dtype: str = "auto", trust_remote_code: bool = False,
                        max_shard_size: str = "5GB") -> Path:
    """Calibrate ``model_dir`` on ``samples`` (token id lists) with ``method`` and save the compressed folder to
    ``out`` (weights, config with ``quantization_config``, llm-compressor's ``recipe.yaml``)."""
    import datasets
    import torch
    from llmcompressor import oneshot
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.model.loader import resolve_dtype

    if not samples:
        raise ValueError(f"--quant_method {method}: no calibration rows were left after encoding --dataset")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    dtype = resolve_dtype(torch_dtype, device, config)
    tokens = sum(map(len, samples))
    logger.info("Quantising %s with %s %s on %s (%s), calibrated on %d rows (%d tokens)", model_dir, method,
                scheme(quant_bits), device, str(dtype).replace("torch.", ""), len(samples), tokens)
    # Loaded on the CPU: llm-compressor moves one decoder layer at a time to the GPU where there is one.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code)
    data = datasets.Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    start = time.perf_counter()
    with _no_pinning_without_accelerator():
        oneshot(model=model, processor=tokenizer, recipe=_recipe(method, quant_bits), dataset=data,
                num_calibration_samples=len(samples), max_seq_length=max(map(len, samples)), batch_size=1,
                shuffle_calibration_samples=False, trust_remote_code_model=trust_remote_code)
    logger.info("%s calibration took %.1f s", method, time.perf_counter() - start)
    model.config.use_cache = True
    model.save_pretrained(out, save_compressed=True, max_shard_size=max_shard_size)
    return out
