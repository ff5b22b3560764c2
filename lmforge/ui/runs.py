"""What training and eval leave on disk, read for the page: a run's ``logging.jsonl``, its checkpoints, eval
reports. Only files are read (the formats the trainer's ``jsonl_logger`` and ``lmforge eval`` write), so
the page shows runs started from a terminal as well as its own."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CHECKPOINT_MARKER = "lmforge_checkpoint.json"  # written last by the trainer (lmforge.utils.checkpoint)
REPORT_NAMES = ("eval_report.json", "compare_report.json")


def read_history(run_dir: str | Path | None) -> list[dict[str, Any]]:
    """The log dicts of a run (``logging.jsonl``), in order; unreadable lines are skipped."""
    if not run_dir:
        return []
    path = Path(run_dir) / "logging.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def curves(history: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """``{"step", "value", "series"}`` rows for each finite number logged under one of ``keys``."""
    rows = []
    for entry in history:
        for key in keys:
            value = entry.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
                    and abs(value) != float("inf"):
                rows.append({"step": entry.get("step", 0), "value": float(value), "series": key})
    return rows


def _walk(root: Path, depth: int, skip: Path | None):
    """Folders under ``root`` down to ``depth`` levels (not into ``skip`` or hidden folders)."""
    if not root.is_dir():
        return
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        yield folder
        if level >= depth:
            continue
        try:
            children = [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        stack += [(c, level + 1) for c in children if not c.name.startswith(".") and c != skip]


def find_checkpoints(runs_dir: str | Path, *, skip: str | Path | None = None, limit: int = 50) -> list[str]:
    """Complete training checkpoints under ``runs_dir``, newest first."""
    skip_path = Path(skip).resolve() if skip else None
    found = [f for f in _walk(Path(runs_dir), 5, skip_path)
             if f.name.startswith("checkpoint-") and (f / CHECKPOINT_MARKER).is_file()]
    found.sort(key=lambda f: f.stat().st_mtime, reverse=True)
    return [str(f) for f in found[:limit]]


def find_reports(runs_dir: str | Path, *, skip: str | Path | None = None, limit: int = 50) -> list[str]:
    """Folders holding an eval report under ``runs_dir``, newest first."""
    skip_path = Path(skip).resolve() if skip else None
    found = [f for f in _walk(Path(runs_dir), 6, skip_path) if (f / REPORT_NAMES[0]).is_file()]
    found.sort(key=lambda f: (f / REPORT_NAMES[0]).stat().st_mtime, reverse=True)
    return [str(f) for f in found[:limit]]


def report_files(folder: str | Path | None) -> tuple[str, str | None]:
    """(Markdown table, PNG chart or None) of the eval or comparison report in ``folder``."""
    if not folder:
        return "", None
    for name in REPORT_NAMES:
        path = Path(folder) / name
        if path.is_file():
            md, png = path.with_suffix(".md"), path.with_suffix(".png")
            text = md.read_text(encoding="utf-8") if md.is_file() else ""
            return text, str(png) if png.is_file() else None
    return "", None
