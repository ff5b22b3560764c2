"""Quantised exports that transformers (and vLLM) load from ``config.json``'s ``quantization_config``.

Data-free methods are transformers' own quantisers, run while loading the model and kept by
``save_pretrained``: bitsandbytes 4/8-bit (``bnb``), torchao int8 and int4 weight-only, and block-wise
FP8 (``fp8``, transformers' ``FineGrainedFP8Config``: float8 weights with one scale per 128x128 block,
the ``quant_method: fp8`` layout vLLM reads). Nothing is written by hand here.

Calibrated methods, ``gptq`` and ``awq``, run llm-compressor over ``--dataset`` rows and write the
compressed-tensors W4A16/W8A16 layout (``calibrated.py``).

``check_quant_request`` runs before any work (before a merge, a download or a load), so a missing
package, a missing ``--dataset`` or a GPU-only method on a CPU machine fails in a second with the fix in
the message.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from lmforge.utils.errors import SetupError

logger = logging.getLogger(__name__)

METHODS = ("gguf", "bnb", "fp8", "int4", "int8", "gptq", "awq")
_PACKAGES = {"gguf": ("gguf", "pip install 'lmforge[export]'"),
             "bnb": ("bitsandbytes", "pip install 'lmforge[qlora]'"),
             "int8": ("torchao", "pip install 'lmforge[export]'"),
             "int4": ("torchao", "pip install 'lmforge[export]'")}
# transformers' fine-grained FP8 runs its matmuls through the `kernels` package (seen on an H200 with
# transformers 5.17: "finegrained-fp8 kernel unavailable" without it); checked after the GPU is
_FP8_PACKAGE = ("kernels", "pip install 'kernels>=0.16,<0.17'")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_quant_request(method: str | None, quant_type: str | None, quant_bits: int | None, *,
                        dataset: list[str] | None = None, n_samples: int = 128) -> None:
    """Raise, before any work, if this request cannot run here; the message says what to install or use.

    ``dataset`` and ``n_samples`` are ``--dataset`` and ``--quant_n_samples``: the calibration rows of gptq/awq."""
    from lmforge.export import calibrated

    if method is None:
        if quant_type or quant_bits:
            flag = "--quant_type" if quant_type else "--quant_bits"
            raise ValueError(f"{flag} needs --quant_method (gguf for --quant_type, bnb, gptq or awq for --quant_bits)")
        if dataset:
            raise ValueError("--dataset is the calibration data of --quant_method gptq|awq; export takes no data "
                             "otherwise")
        return
    if method not in METHODS:
        raise ValueError(f"--quant_method {method!r}: expected one of {', '.join(METHODS)}")
    if quant_type and method != "gguf":
        raise ValueError(f"--quant_type {quant_type} is for --quant_method gguf (bnb, gptq and awq take "
                         f"--quant_bits 4|8)")
    if method in calibrated.METHODS:
        calibrated.check_calibrated_request(method, quant_bits, dataset, n_samples)
        return
    if dataset:
        raise ValueError(f"--dataset is the calibration data of --quant_method gptq|awq; --quant_method {method} "
                         f"needs no data")
    if quant_bits is not None and method != "bnb":
        raise ValueError(f"--quant_bits is for --quant_method bnb, gptq or awq; --quant_method {method} has a "
                         f"fixed width")
    if method == "bnb" and quant_bits not in (None, 4, 8):
        raise ValueError(f"--quant_bits {quant_bits}: bitsandbytes exports 4 or 8 bits")
    if method in _PACKAGES:
        module, pip = _PACKAGES[method]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"--quant_method {method} needs the {module} package: {pip}")
    if method == "fp8":
        if not _cuda():
            raise SetupError("--quant_method fp8 needs a CUDA GPU with FP8 support (compute capability 8.9+: "
                               "L4, L40, H100, H200, B200); this machine has none")
        import torch

        if torch.cuda.get_device_capability() < (8, 9):
            raise SetupError(f"--quant_method fp8 needs compute capability 8.9+; this GPU is "
                               f"{'.'.join(map(str, torch.cuda.get_device_capability()))}")
        if importlib.util.find_spec(_FP8_PACKAGE[0]) is None:
            raise ImportError(f"--quant_method fp8 needs the {_FP8_PACKAGE[0]} package: {_FP8_PACKAGE[1]}")
    if method == "int4" and not _cuda():
        raise SetupError("--quant_method int4 needs a CUDA GPU: torchao's int4 weight-only kernels (tinygemm) "
                           "run only there; on CPU use --quant_method int8 or --quant_method gguf "
                           "--quant_type q4_k_m")


def quantization_config(method: str, quant_bits: int | None) -> Any:
    """The transformers ``quantization_config`` for a method (``gguf`` has none: it is a file format)."""
    import torch

    if method == "bnb":
        from transformers import BitsAndBytesConfig

        if (quant_bits or 4) == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        dtype = torch.bfloat16 if _cuda() else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if method == "fp8":
        from transformers import FineGrainedFP8Config

        return FineGrainedFP8Config()
    from transformers import TorchAoConfig

    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        try:  # version 2 (a plain tensor subclass) is the one torchao can write to safetensors; 0.18 defaults to it
            return TorchAoConfig(Int8WeightOnlyConfig(version=2))
        except TypeError:
            import torchao

            raise ImportError(f"--quant_method int8 needs torchao's Int8WeightOnlyConfig version 2 (torchao >= 0.17); "
                              f"this is torchao {torchao.__version__}: pip install -U torchao") from None
    if method == "int4":
        from torchao.quantization import Int4WeightOnlyConfig

        return TorchAoConfig(Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    raise ValueError(f"--quant_method {method}: no transformers quantization_config")


def quantize_model(model_dir: str | Path, out: Path, method: str, quant_bits: int | None = None,
                   torch_dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Load ``model_dir`` quantised by ``method`` and save it to ``out`` (weights and config only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.model.loader import resolve_dtype

    device = "cuda" if _cuda() else "cpu"
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    dtype = resolve_dtype(torch_dtype, device, config)
    logger.info("Quantising %s with %s%s on %s (%s)", model_dir, method,
                f" {quant_bits or 4}-bit" if method == "bnb" else "", device, str(dtype).replace("torch.", ""))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map=device,
                                                     quantization_config=quantization_config(method, quant_bits),
                                                     trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "local cache" not in str(e) or "offline" not in str(e):
            raise
        # transformers' FP8 matmuls come from a Hub kernel repository (through `kernels`), fetched on first use
        raise SetupError(f"--quant_method {method}: transformers needs a kernel from the Hugging Face Hub that is not "
                         f"cached here and the Hub is offline ({e}). Run the export once with network access (the "
                         f"kernel is then cached), or pick --quant_method bnb|int8|int4|gguf") from None
    model.config.use_cache = True
    model.save_pretrained(out)
    return out
