"""Finding complete checkpoints (light: no torch or transformers import, so infer can use it cheaply)."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "lmforge_checkpoint.json"  # written last: its presence means the checkpoint is whole


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file() and (Path(path) / "trainer_state.json").is_file()


def find_last_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``root`` or its run folders (``root/v*/``)."""
    root = Path(root)
    cands = [p for p in list(root.glob("checkpoint-*")) + list(root.glob("*/checkpoint-*"))
             if p.is_dir() and p.name.split("-")[-1].isdigit()]
    complete = [p for p in cands if is_complete_checkpoint(p)]
    for p in set(cands) - set(complete):
        logger.warning("Ignoring incomplete checkpoint %s (no %s: it was cut off mid-write)", p, COMPLETE_MARKER)
    if not complete:
        return None
    def order(p: Path) -> tuple[int, str, int]:  # newest run folder (v<N>-<time>), then the highest step in it
        m = re.match(r"v(\d+)-", p.parent.name) if p.parent != root else None
        return (int(m.group(1)) if m else -1, p.parent.name, int(p.name.split("-")[-1]))

    return max(complete, key=order)
