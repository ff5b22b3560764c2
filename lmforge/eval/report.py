"""Eval reports: ``eval_report.json``, a Markdown table per dataset, a PNG chart, and side-by-side comparisons.

The chart is drawn only when it shows more than the table: bars for several metrics, datasets or runs;
for a single number, that metric by reference length (when the row scores differ between lengths);
otherwise no picture, and the log says why.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("lmforge.eval")

REPORT_NAME = "eval_report.json"
MIN_ROWS_PER_BUCKET = 3  # a length bucket with fewer rows says nothing


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def report_markdown(report: dict) -> str:
    lines = [f"# Eval report: {report.get('target', '')}", ""]
    run = report.get("run") or {}
    gen = run.get("generation") or {}
    if gen.get("task"):
        lines += [f"Task: {gen['task']}" + (f" ({gen['pooling']} pooling)" if gen.get("pooling") else ""), ""]
    elif gen:
        lines += [f"Generation: max_new_tokens {gen.get('max_new_tokens')}, temperature {gen.get('temperature')}", ""]
    for name, ds in report["datasets"].items():
        errors = f", {ds['errors']} errors" if ds.get("errors") else ""
        mc = f" (multiple choice by {ds['mc_mode']})" if ds.get("mc_mode") else ""
        lines += [f"## {name}", "", f"{ds['rows']} rows{errors}; metrics: {', '.join(ds.get('metric_names', []))}{mc}", "",
                  "| metric | value |", "| --- | ---: |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in ds["metrics"].items()]
        lines.append("")
    return "\n".join(lines)


def plot_bars(groups: list[str], series: dict[str, list[float | None]], path: Path, title: str, *,
              ylabel: str = "", notes: list[str] | None = None) -> Path | None:
    """Grouped bars: one group per ``dataset / metric`` (or length bucket), one bar per series (a run).

    ``notes``: a line under each group's label (row counts)."""
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + len(groups) * (0.5 + 0.35 * n)), 4.0))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, ys, width, label=label)
        for b, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(groups)))
    labels = [f"{g}\n{n}" for g, n in zip(groups, notes)] if notes else groups
    ax.set_xticklabels(labels, rotation=20 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center",
                       fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel)
    top = max([v for vals in series.values() for v in vals if v is not None] or [1.0])
    ax.set_ylim(0, max(1.0, top * 1.15))
    ax.set_title(title)
    if n > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _groups(reports: dict[str, dict]) -> tuple[list[str], list[tuple[str, str]]]:
    keys: list[tuple[str, str]] = []
    for rep in reports.values():
        for ds_name, ds in rep["datasets"].items():
            for m in ds["metrics"]:
                if (ds_name, m) not in keys:
                    keys.append((ds_name, m))
    return [f"{d}\n{m}" for d, m in keys], keys


def write_report(report: dict, output_dir: str | Path, *, plot: bool = True) -> dict[str, str]:
    """Write ``eval_report.json``, ``eval_report.md`` and (``plot``) ``eval_report.png``; returns the paths."""
    from lmforge.utils.io import atomic_write_text

    out = Path(output_dir)
    files = {"json": str(out / REPORT_NAME), "markdown": str(out / "eval_report.md")}
    if plot:
        png = _plot_report(report, out, out / "eval_report.png")
        if png:
            files["plot"] = str(png)
    atomic_write_text(out / "eval_report.md", report_markdown(report))
    atomic_write_text(out / REPORT_NAME, json.dumps({**report, "files": files}, indent=2, ensure_ascii=False,
                                                    default=str))
    return files


def _plot_report(report: dict, out: Path, png: Path) -> Path | None:
    """Bars of every metric when there are several; one metric by reference length; or nothing."""
    labels, keys = _groups({"run": report})
    title = f"eval: {report.get('target', '')}"
    if len(keys) > 1:
        values = [report["datasets"][d]["metrics"][m] for d, m in keys]
        return plot_bars(labels, {str(report.get("target", "run")): values}, png, title)
    if not keys:
        return None
    dataset, metric = keys[0]
    buckets = length_buckets(out / report["datasets"][dataset].get("predictions", ""), metric)
    if buckets is None:
        logger.info("eval: no plot (one number, %s %s, already in the table; its rows do not differ by "
                    "reference length)", dataset, metric)
        return None
    names, values, counts = buckets
    return plot_bars(names, {metric: values}, png, f"{title}\n{dataset}: {metric} by reference length (characters)",
                     ylabel=metric, notes=[f"n={n}" for n in counts])


def length_buckets(predictions: Path, metric: str) -> tuple[list[str], list[float], list[int]] | None:
    """``metric`` averaged over rows grouped by the length of their reference, or None when that shows
    nothing (no per-row scores, fewer than two buckets of ``MIN_ROWS_PER_BUCKET`` rows, or equal means)."""
    if not predictions.is_file():
        return None
    pairs: list[tuple[int, float]] = []
    for line in predictions.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("reference") is None:
            continue
        score = (rec.get("scores") or {}).get(metric)
        if score is None and not rec.get("error"):
            return None  # a corpus-level metric (BLEU ...): no per-row value to group
        pairs.append((len(str(rec["reference"])), float(score or 0.0)))  # an error counts as wrong, as in the table
    lengths = sorted({n for n, _ in pairs})
    if len(lengths) <= 8:
        edges = [(n, n) for n in lengths]
    else:  # about six ranges of equal row counts
        ordered = sorted(n for n, _ in pairs)
        cuts = sorted({ordered[min(len(ordered) - 1, len(ordered) * k // 6)] for k in range(1, 6)})
        lows = [ordered[0], *[c + 1 for c in cuts]]
        edges = [(lo, hi) for lo, hi in zip(lows, [*cuts, ordered[-1]]) if lo <= hi]
    names, values, counts = [], [], []
    for lo, hi in edges:
        scores = [v for n, v in pairs if lo <= n <= hi]
        if len(scores) >= MIN_ROWS_PER_BUCKET:
            names.append(str(lo) if lo == hi else f"{lo}-{hi}")
            values.append(sum(scores) / len(scores))
            counts.append(len(scores))
    if len(names) < 2 or max(values) - min(values) < 1e-9:
        return None
    return names, values, counts


def load_report(path: str | Path) -> dict:
    """A report from its JSON file or the run folder holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"--compare {path}: no {REPORT_NAME} there (run lmforge eval with that --output_dir)")
    return json.loads(p.read_text(encoding="utf-8"))


def _label_path(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if sep and label and not Path(spec).exists():
        return label, path
    p = Path(spec)
    name = p.parent.name if p.suffix == ".json" else p.name
    return name or spec, spec


def compare_reports(specs: list[str]) -> dict:
    """Several reports side by side: ``{"runs": [...], "datasets": {ds: {"rows": {run: n}, "metrics": {m: {run: v}}}}}``."""
    reports: dict[str, dict] = {}
    for spec in specs:
        label, path = _label_path(spec)
        base, k = label, 2
        while label in reports:
            label, k = f"{base}-{k}", k + 1
        reports[label] = load_report(path)
    datasets: dict[str, dict] = {}
    for label, rep in reports.items():
        for ds_name, ds in rep["datasets"].items():
            entry = datasets.setdefault(ds_name, {"rows": {}, "metrics": {}})
            entry["rows"][label] = ds["rows"]
            for m, v in ds["metrics"].items():
                entry["metrics"].setdefault(m, {})[label] = v
    return {"runs": list(reports), "sources": {label: _label_path(s)[1] for label, s in zip(reports, specs)},
            "datasets": datasets, "_reports": reports}


def compare_markdown(cmp: dict) -> str:
    runs = cmp["runs"]
    lines = []
    for ds_name, entry in cmp["datasets"].items():
        lines += [f"### {ds_name}", "", "| metric | " + " | ".join(runs) + " |",
                  "| --- |" + " ---: |" * len(runs)]
        for m, by_run in entry["metrics"].items():
            lines.append(f"| {m} | " + " | ".join(_fmt(by_run[r]) if r in by_run else "-" for r in runs) + " |")
        lines.append("| rows | " + " | ".join(str(entry["rows"].get(r, "-")) for r in runs) + " |")
        lines.append("")
    return "\n".join(lines)


def write_compare(cmp: dict, output_dir: str | Path, *, plot: bool = True) -> dict[str, str]:
    from lmforge.utils.io import atomic_write_text

    out = Path(output_dir)
    files = {"json": str(out / "compare_report.json"), "markdown": str(out / "compare_report.md")}
    if plot:
        labels, keys = _groups(cmp["_reports"])
        series = {r: [cmp["datasets"][d]["metrics"][m].get(r) for d, m in keys] for r in cmp["runs"]}
        if len(keys) * len(series) > 1:  # one bar is a number, not a picture
            png = plot_bars(labels, series, out / "compare_report.png", " vs ".join(cmp["runs"]))
            if png:
                files["plot"] = str(png)
    atomic_write_text(out / "compare_report.md", compare_markdown(cmp))
    public = {k: v for k, v in cmp.items() if not k.startswith("_")}
    atomic_write_text(out / "compare_report.json", json.dumps({**public, "files": files}, indent=2,
                                                              ensure_ascii=False))
    return files
