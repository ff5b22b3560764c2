"""Compile a small element-wise function on CUDA, run it eagerly elsewhere or when compiling fails.

Why hand-written: the lean layers and the fused cross-entropy are memory-bound chains of
element-wise ops. Eagerly, each op is a kernel that reads and writes the whole tensor in float32;
compiled by inductor the chain becomes one or two kernels that read the bf16 inputs once. That is
what Liger's Triton kernels do by hand; here inductor writes them. ``torch.compile`` itself is
reused, this module only adds the policy: CUDA tensors only, shapes marked dynamic once (token
counts change every step), one warning and eager forever after if compiling fails, and
``LMFORGE_COMPILE_KERNELS=0`` to switch it off.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any, Callable

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None   # a path search: tens of microseconds, once


def compile_enabled() -> bool:
    """False when ``LMFORGE_COMPILE_KERNELS=0`` or triton is not importable (asked on every kernel call)."""
    if os.environ.get("LMFORGE_COMPILE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _triton_installed()


class CudaCompiled:
    """Call ``fn`` compiled when the first tensor argument is on CUDA, eagerly otherwise.

    ``status`` says which it was last time: ``"eager"``, ``"compiled"`` or ``"eager (compile failed: ...)"``.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed: str | None = None
        self.status = "eager"
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = next((a for a in args if hasattr(a, "is_cuda")), None)
        if first is None or not first.is_cuda or self._failed is not None or not compile_enabled():
            return self.fn(*args, **kwargs)
        import torch

        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            out = self._compiled(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise                      # not the compiler's fault: the eager form would not fit either
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same math, eagerly
            self._failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            self.status = f"eager (compile failed: {self._failed})"
            logger.warning("Compiling %s failed (%s); running it eagerly (same result, slower)",
                           getattr(self.fn, "__name__", "kernel"), self._failed)
            return self.fn(*args, **kwargs)
        self.status = "compiled"
        return out


def cuda_compiled(fn: Callable[..., Any]) -> CudaCompiled:
    """Decorator form of :class:`CudaCompiled`."""
    return CudaCompiled(fn)
