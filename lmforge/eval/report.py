"""Eval reports: ``eval_report.json``, a Markdown table per dataset, a PNG bar chart, and side-by-side comparisons."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_NAME = "eval_report.json"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def report_markdown(report: dict) -> str:
    lines = [f"# Eval report: {report.get('target', '')}", ""]
    run = report.get("run") or {}
    gen = run.get("generation") or {}
    if gen:
        lines += [f"Generation: max_new_tokens {gen.get('max_new_tokens')}, temperature {gen.get('temperature')}", ""]
    for name, ds in report["datasets"].items():
        errors = f", {ds['errors']} errors" if ds.get("errors") else ""
        mc = f" (multiple choice by {ds['mc_mode']})" if ds.get("mc_mode") else ""
        lines += [f"## {name}", "", f"{ds['rows']} rows{errors}; metrics: {', '.join(ds.get('metric_names', []))}{mc}", "",
                  "| metric | value |", "| --- | ---: |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in ds["metrics"].items()]
        lines.append("")
    return "\n".join(lines)


def plot_bars(groups: list[str], series: dict[str, list[float | None]], path: Path, title: str) -> Path | None:
    """Grouped bars: one group per ``dataset / metric``, one bar per series (a run)."""
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
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center",
                       fontsize=8)
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
        labels, keys = _groups({"run": report})
        values = [report["datasets"][d]["metrics"][m] for d, m in keys]
        png = plot_bars(labels, {str(report.get("target", "run")): values}, out / "eval_report.png",
                        f"eval: {report.get('target', '')}")
        if png:
            files["plot"] = str(png)
    atomic_write_text(out / "eval_report.md", report_markdown(report))
    atomic_write_text(out / REPORT_NAME, json.dumps({**report, "files": files}, indent=2, ensure_ascii=False,
                                                    default=str))
    return files


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
        png = plot_bars(labels, series, out / "compare_report.png", " vs ".join(cmp["runs"]))
        if png:
            files["plot"] = str(png)
    atomic_write_text(out / "compare_report.md", compare_markdown(cmp))
    public = {k: v for k, v in cmp.items() if not k.startswith("_")}
    atomic_write_text(out / "compare_report.json", json.dumps({**public, "files": files}, indent=2,
                                                              ensure_ascii=False))
    return files
