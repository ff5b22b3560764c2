"""Run Triton kernels on CPU tensors under the Triton interpreter, for one test module at a time.

A module that tests kernels imports them with :func:`import_kernels` (``TRITON_INTERPRET=1`` while the
decorators run when no GPU is present, put back right after, so that other modules' tests collected in the same
process never run kernels under the interpreter) and uses :func:`interpreter_fixture` as an autouse module fixture: it keeps the variable set
while the module runs, rebuilds kernels that were compiled for a GPU by an earlier import, makes triton 3.6's
interpreter work with numpy >= 2.4 (it calls ``int()`` on a 1-element array for dynamic loop bounds:
triton-lang/triton#9171), and afterwards restores the variable and reloads the modules so later test modules
get the normal path again.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Iterator

import pytest


def restore(previous: str | None) -> None:
    """Put TRITON_INTERPRET back to ``previous`` (None: unset)."""
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous


def import_kernels(name: str, always: bool = False) -> tuple[ModuleType, str | None]:
    """Import triton and module ``name`` with TRITON_INTERPRET=1 when no GPU is present (triton's own language
    helpers are ``@triton.jit`` functions too, built when triton is first imported); return the module and the
    variable's value from before (for :func:`interpreter_fixture`); ``always``: the interpreter even with a GPU
    (tests on CPU tensors). Skips the calling module without triton, or when triton was already imported in
    this process outside the interpreter (its helpers then cannot run in it)."""
    import torch

    previous = os.environ.get("TRITON_INTERPRET")
    on_cpu = always or not torch.cuda.is_available()
    if on_cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton")
        if on_cpu and type(triton.language.standard.zeros).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported earlier in this process outside the Triton interpreter",
                        allow_module_level=True)
        return importlib.import_module(name), previous
    finally:
        restore(previous)


def interpreter_fixture(previous: str | None, kernel: Callable[[], object], *modules: ModuleType,
                        always: bool = False) -> Iterator[ModuleType]:
    """The body of a module fixture (yields ``modules[0]``): ``previous`` is TRITON_INTERPRET from before the
    module's import, ``kernel()`` returns one kernel of ``modules[0]`` (to see whether it was built under the
    interpreter), ``modules`` are reloaded in order when it was not (and once more at the end); ``always`` as
    for :func:`import_kernels`."""
    import torch

    if torch.cuda.is_available() and not always:
        yield modules[0]
        return
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    rebuilt = type(kernel()).__name__ != "InterpretedFunction"
    if rebuilt:
        for m in modules:
            importlib.reload(m)
    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is not None:  # fixed upstream after 3.6; harmless where the fix is in

        def patch(tensor, scope):
            orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        mp.setattr(interpreter, "_patch_lang_tensor", patch)
    yield modules[0]
    mp.undo()
    restore(previous)
    for m in modules:  # later modules get the compiled (or the plain torch) path again
        importlib.reload(m)
