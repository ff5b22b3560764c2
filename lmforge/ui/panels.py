"""A job tab of the web UI: a form generated from a command's arguments class, the exact command it runs,
Start and Stop, and a view of the chosen job (state, progress, console log, loss and learning-rate
curves from ``logging.jsonl``, an eval report) refreshed every two seconds from the job's files."""
from __future__ import annotations

import dataclasses
import html
import time
from typing import Any, Callable

from lmforge.arguments import ArgumentError
from lmforge.ui import jobs as J
from lmforge.ui.forms import build_form, command_line, flags_of, form_values, parse_flags, split_secrets, to_argv
from lmforge.ui.runs import curves, find_checkpoints, read_history, report_files

REFRESH_S = 2.0
LOSS_KEYS = ("loss", "eval_loss")
LR_KEYS = ("learning_rate",)
# one colour per series, whichever of them a run logs
COLORS = {"loss": "#2563eb", "eval_loss": "#ea580c", "learning_rate": "#16a34a"}

# prepare(args, values) -> (values, run folder or None): fixes what the command writes where, before it starts
Prepare = Callable[[Any, dict], "tuple[dict, str | None]"]


@dataclasses.dataclass
class JobTab:
    """The components of one job tab that the page wires across tabs."""

    command: str
    jobs: Any  # the job dropdown
    last_checkpoint: Any  # a hidden textbox: the chosen run's newest checkpoint (training tabs)
    fields: dict[str, Any]  # flag name -> its component


def _frame(rows: list[dict]) -> Any:
    """The rows as a plot's data; None when there are none (vega loses the line colours of a plot whose first
    data was an empty table)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=["step", "value", "series"]) if rows else None


def _progress_html(job: J.Job | None, tail: str) -> str:
    if job is None:
        return ""
    done_total = J.progress(tail)
    state = job.state
    if done_total is None:
        return f"<div id='job-progress'><b>{html.escape(state)}</b></div>"
    done, total = done_total
    pct = 100.0 * done / total if total else 0.0
    return (f"<div id='job-progress'><b>{html.escape(state)}</b> &middot; step {done}/{total} ({pct:.0f}%)"
            f"<progress value='{done}' max='{max(total, 1)}' style='width:100%'></progress></div>")


def _status(job: J.Job | None, tail: str) -> str:
    if job is None:
        return "No job yet: fill in the form and press Start."
    started = time.strftime("%H:%M:%S", time.localtime(job.info.get("started", 0)))
    lines = [f"**{job.id}** &middot; {job.state} &middot; started {started}"
             + (f" &middot; exit code {job.exit_code}" if job.exit_code not in (None, 0) else ""),
             f"`{job.info.get('display', '')}`"]
    if job.run_dir:
        lines.append(f"run folder: `{job.run_dir}`")
    lines += [f"- `{row}`" for row in J.result_lines(tail)]
    return "\n\n".join(lines)


def job_choices(jobs_dir: str, command: str) -> list[tuple[str, str]]:
    return [(job.label, job.id) for job in J.list_jobs(jobs_dir, (command,))]


def newest_job(jobs_dir: str, command: str) -> str | None:
    """The job a fresh page shows: the newest running one, else the newest."""
    jobs = J.list_jobs(jobs_dir, (command,))
    pick = [j for j in jobs if j.state in ("running", "stopping")] or jobs
    return pick[0].id if pick else None


def job_tab(gr: Any, *, command: str, cls: type, jobs_dir: str, main: list[str], prepare: Prepare | None = None,
            choices: dict[str, list[str]] | None = None, skip: set[str] = frozenset(), plots: bool = False,
            report: bool = False) -> JobTab:
    """Build the tab's contents in the current layout (see the module docstring)."""
    with gr.Row():
        with gr.Column(scale=5):
            flags, components = build_form(gr, flags_of(cls), prefix=command, main=main, choices=choices, skip=skip,
                                           per_row=2)
        with gr.Column(scale=4):
            preview = gr.Code(command_line(command, []), language="shell", label="command", interactive=False,
                              lines=2, wrap_lines=True, show_line_numbers=False, elem_id=f"{command}-command")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id=f"{command}-start")
                stop = gr.Button("Stop", variant="stop", elem_id=f"{command}-stop")
            message = gr.Markdown(elem_id=f"{command}-message")
            with gr.Row():
                jobs = gr.Dropdown(job_choices(jobs_dir, command), value=None, label="job", scale=4,
                                   elem_id=f"{command}-jobs", info=f"jobs started here, now or earlier (in {jobs_dir})")
                refresh_button = gr.Button("Refresh", scale=1, elem_id=f"{command}-refresh")
            status = gr.Markdown(elem_id=f"{command}-status")
            bar = gr.HTML(elem_id=f"{command}-progress")
            outputs: list[Any] = [status, bar]
            last_checkpoint = gr.Textbox(visible=False, elem_id=f"{command}-last-checkpoint")
            if plots:
                loss_plot = gr.LinePlot(None, x="step", y="value", color="series", title="loss", y_title="loss",
                                        color_map=COLORS, elem_id=f"{command}-loss-plot", height=220)
                lr_plot = gr.LinePlot(None, x="step", y="value", color="series", title="learning rate", y_title="lr",
                                      color_map=COLORS, elem_id=f"{command}-lr-plot", height=180)
                outputs += [loss_plot, lr_plot, last_checkpoint]
            if report:
                report_md = gr.Markdown(elem_id=f"{command}-report")
                report_png = gr.Image(type="filepath", label="chart", interactive=False, visible=False,
                                      elem_id=f"{command}-chart")
                outputs += [report_md, report_png]
            log = gr.Textbox(label="console", lines=12, max_lines=12, autoscroll=True, interactive=False,
                             elem_id=f"{command}-log")
            outputs.insert(2, log)

    def values_of(widget_values: tuple) -> tuple[dict, dict]:
        return split_secrets(flags, form_values(flags, list(widget_values)))

    def show_command(*widget_values: Any) -> str:
        try:
            public, hidden = values_of(widget_values)
        except ArgumentError as e:
            return f"# {e}"
        return command_line(command, to_argv(flags, public), hidden)

    def refresh(job_id: str | None) -> tuple:
        job = J.load_job(jobs_dir, job_id)
        tail = J.log_tail(job) if job else ""
        out: list[Any] = [_status(job, tail), _progress_html(job, tail), tail]
        if plots:
            history = read_history(job.run_dir) if job else []
            ckpts = find_checkpoints(job.run_dir) if job and job.run_dir else []
            out += [_frame(curves(history, LOSS_KEYS)), _frame(curves(history, LR_KEYS)), ckpts[0] if ckpts else ""]
        if report:
            md, png = report_files(job.run_dir if job and job.state == "finished" else None)
            out += [md, gr.update(value=png, visible=png is not None)]  # eval draws a chart only when it says more
        return tuple(out)

    def start_job(*widget_values: Any) -> tuple:
        try:
            public, hidden = values_of(widget_values)
            args = parse_flags(cls, to_argv(flags, public), hidden)  # the command's own checks, now
            run_dir = None
            if prepare is not None:
                public, run_dir = prepare(args, public)
            argv = to_argv(flags, public)
        except (ArgumentError, ValueError, OSError) as e:
            return f"**Not started:** {e}", gr.update()
        job = J.start_job(jobs_dir, command, argv, display=command_line(command, argv, hidden), run_dir=run_dir,
                          secret_values=hidden)
        return f"Started **{job.id}**.", gr.update(choices=job_choices(jobs_dir, command), value=job.id)

    def stop_job(job_id: str | None) -> str:
        job = J.load_job(jobs_dir, job_id)
        return J.stop_job(job) if job else "Choose a job first."

    def tick(job_id: str | None) -> tuple:
        return (gr.update(choices=job_choices(jobs_dir, command)), *refresh(job_id))

    gr.on([c.change for c in components], show_command, components, preview, show_progress="hidden")
    start.click(start_job, components, [message, jobs])
    stop.click(stop_job, jobs, message)
    jobs.change(refresh, jobs, outputs, show_progress="hidden")
    refresh_button.click(tick, jobs, [jobs, *outputs], show_progress="hidden")
    gr.Timer(REFRESH_S).tick(tick, jobs, [jobs, *outputs], show_progress="hidden")
    return JobTab(command, jobs, last_checkpoint, {f.name: c for f, c in zip(flags, components)})


def training_prepare(run_dir_of: Callable[[Any], str]) -> Prepare:
    """The run folder decided before the job starts (``--output_dir`` fixed, no version suffix added), so the
    page knows where ``logging.jsonl`` and the checkpoints will be."""
    from pathlib import Path

    def prepare(args: Any, values: dict) -> tuple[dict, str]:
        run_dir = run_dir_of(dataclasses.replace(args))
        if not getattr(args, "dry_run", False):  # claimed now, so no two jobs share it (a dry run writes nothing)
            Path(run_dir).mkdir(parents=True, exist_ok=bool(args.resume_from_checkpoint))
        return {**values, "output_dir": run_dir, "add_version": False}, run_dir

    return prepare
