"""PNG plots of a training run's log history (loss, eval loss, learning rate, ...).

Used by the ``plot`` callback at the end of training, and on its own::

    python -m lmforge.trainers.plotting OUTPUT_DIR [--out DIR]

which reads ``OUTPUT_DIR/trainer_state.json``, else ``OUTPUT_DIR/logging.jsonl``, else the newest
``checkpoint-*/trainer_state.json``. Matplotlib is driven through ``Figure`` objects with the
Agg canvas, never pyplot, so plotting works headless and leaves a user's backend alone.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable

# eval_* keys that are timings, not quality: not worth a plot
_SKIP_EVAL = re.compile(r"eval_(runtime|.*_per_second|model_preparation_time|epoch)$")


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider).

    ``weight`` defaults to a value that grows with the number of points (none for <= 10 points,
    0.9 from 100 on), so short runs are not flattened into a straight line.
    """
    n = len(values)
    if weight is None:
        weight = min(0.9, max(0.0, 1.0 - 10.0 / max(n, 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1.0 - weight) * v
        out.append(avg / (1.0 - weight**i) if weight > 0 else v)
    return out


def series(log_history: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the history, skipping entries without it or non-finite values."""
    xs, ys = [], []
    for i, entry in enumerate(log_history):
        v = entry.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(entry.get("step", i)))
            ys.append(float(v))
    return xs, ys


def _plot(path: Path, title: str, ylabel: str, xs: list[float], ys: list[float],
          reference: tuple[str, list[float], list[float]] | None = None) -> Path:
    from matplotlib.figure import Figure  # lazy: matplotlib costs ~0.5 s to import

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    if len(xs) == 1:
        ax.plot(xs, ys, "o", color="C0", label=ylabel)
    else:
        sm = smooth(ys)
        if sm != ys:
            ax.plot(xs, ys, color="C0", alpha=0.3, linewidth=1, label=f"{ylabel} (raw)")
            ax.plot(xs, sm, color="C0", linewidth=2, label=f"{ylabel} (smoothed)")
        else:
            ax.plot(xs, ys, color="C0", linewidth=2, marker="o" if len(xs) <= 30 else None, label=ylabel)
    if reference is not None and reference[1]:
        name, rx, ry = reference
        ax.plot(rx, smooth(ry), color="C1", linestyle="--", linewidth=1, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_history(log_history: list[dict[str, Any]], output_dir: str | Path) -> list[Path]:
    """Write ``train_loss.png``, ``eval_loss.png``, ``learning_rate.png``, ``grad_norm.png`` and
    one ``eval_<metric>.png`` per other eval metric into ``output_dir``; a plot with no data is
    skipped. Returns the paths written.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    train = series(log_history, "loss")
    if train[0]:
        written.append(_plot(out / "train_loss.png", "training loss", "loss", *train))
    ev = series(log_history, "eval_loss")
    if ev[0]:
        written.append(_plot(out / "eval_loss.png", "evaluation loss", "eval_loss", *ev,
                             reference=("train loss", *train)))
    for key, title in (("learning_rate", "learning rate"), ("grad_norm", "gradient norm")):
        xs, ys = series(log_history, key)
        if xs:
            written.append(_plot(out / f"{key}.png", title, key, xs, ys))
    metric_keys = sorted({k for e in log_history for k in e
                          if k.startswith("eval_") and k != "eval_loss" and not _SKIP_EVAL.match(k)})
    for key in metric_keys:
        xs, ys = series(log_history, key)
        if xs:
            written.append(_plot(out / f"{key}.png", key[len("eval_"):].replace("_", " "), key, xs, ys))
    return written


def read_jsonl_history(path: str | Path) -> list[dict[str, Any]]:
    """Entries of a ``logging.jsonl``. A resumed run appends steps it had already logged before the
    crash; when the step goes backwards, the older entries from that step on are dropped."""
    entries: list[dict[str, Any]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        step = entry.get("step")
        if isinstance(step, (int, float)) and entries and step < entries[-1].get("step", -1):
            entries = [e for e in entries if e.get("step", -1) < step]
        entries.append(entry)
    return entries


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """Log history from a run folder, a ``trainer_state.json`` or a ``logging.jsonl``."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / "trainer_state.json", p / "logging.jsonl"]
        ckpts = sorted(p.glob("checkpoint-*/trainer_state.json"),
                       key=lambda f: int(m.group(1)) if (m := re.search(r"checkpoint-(\d+)$", f.parent.name)) else -1)
        candidates += ckpts[::-1]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{p}: no trainer_state.json, logging.jsonl or checkpoint-*/trainer_state.json")
        p = found
    if p.suffix == ".jsonl":
        return read_jsonl_history(p)
    return json.loads(p.read_text(encoding="utf-8"))["log_history"]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m lmforge.trainers.plotting",
                                     description="Plot loss and learning-rate curves of a training run.")
    parser.add_argument("path", help="run output_dir, trainer_state.json or logging.jsonl")
    parser.add_argument("--out", help="folder for the PNGs (default: the run folder)")
    ns = parser.parse_args(argv)
    src = Path(ns.path)
    out = Path(ns.out) if ns.out else (src if src.is_dir() else src.parent)
    paths = plot_history(load_history(src), out)
    for path in paths:
        print(path)
    if not paths:
        print("nothing to plot: the history has no loss, eval or learning-rate entries", file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
