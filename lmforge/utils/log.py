"""One logging set-up for every command: ``lmforge`` messages at INFO on stderr."""
from __future__ import annotations

import logging
import os


def setup_logging(level: str | int | None = None) -> None:
    root = logging.getLogger("lmforge")
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(levelname)s:%(name)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("LMFORGE_LOG_LEVEL", "INFO"))
    root.propagate = True
