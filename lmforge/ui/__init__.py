"""Browser pages (gradio, ``pip install 'lmforge[ui]'``): ``lmforge app`` (chat) and ``lmforge web-ui`` (train,
watch, chat, evaluate, export).

The pages drive the same argument dataclasses as the terminal (forms are generated from their fields,
see :mod:`lmforge.ui.forms`) and run the same commands: a job is ``lmforge <command> ...`` in a process
of its own (:mod:`lmforge.ui.jobs`), so what the page starts can be typed in a terminal, and stopped,
resumed and found again the same way. What needs the pipelines (building an engine, naming a run
folder) is handed in by ``lmforge.pipelines.ui``, keeping this layer below the commands.
"""
from __future__ import annotations

import importlib.util

from lmforge.utils.errors import SetupError


class MissingExtraError(SetupError):
    """An optional dependency the command needs is not installed (the message says how to get it)."""


def require_gradio() -> None:
    """A one-line error when gradio is missing, before anything loads."""
    if importlib.util.find_spec("gradio") is None:
        raise MissingExtraError("the browser pages need gradio: pip install 'lmforge[ui]'")
