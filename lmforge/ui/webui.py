"""``lmforge web-ui``: tabs to train (sft), align (rlhf), chat, evaluate and export.

Each job tab is ``lmforge <command> --help`` as a form (:mod:`lmforge.ui.forms`); the flags most runs
set come first, every other flag waits in a section per argument group. Start runs the command shown
above the button as a job (:mod:`lmforge.ui.jobs`); the page watches the job's files, so a reload or
a restarted page finds running jobs again. The Chat tab loads a model, checkpoint or adapters into
an engine in this process, through the same ``InferArguments`` and engine factory as ``lmforge infer``.
"""
from __future__ import annotations

import dataclasses
import gc
import threading
import time
from pathlib import Path
from typing import Any, Callable

from lmforge.arguments import ArgumentError
from lmforge.ui import jobs as J
from lmforge.ui.forms import build_form, command_line, flags_of, form_values, parse_flags, split_secrets, to_argv
from lmforge.ui.panels import job_choices, job_tab, newest_job, training_prepare
from lmforge.ui.runs import find_checkpoints, find_reports

# The flags most runs set, shown first (a dataclass's other flags are all there, folded by group).
MAIN_SFT = ["model", "dataset", "train_type", "max_steps", "num_train_epochs", "learning_rate",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_rank", "lora_alpha",
            "logging_steps", "save_steps", "output_dir", "resume_from_checkpoint"]
MAIN_RLHF = ["model", "dataset", "rlhf_type", "reward_funcs", "beta", "num_generations", "max_completion_length",
             "train_type", "max_steps", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
             "output_dir"]
MAIN_EVAL = ["model", "ckpt_dir", "adapters", "eval_dataset", "eval_metric", "eval_limit", "eval_url", "api_key",
             "max_new_tokens"]
MAIN_EXPORT = ["ckpt_dir", "model", "adapters", "merge_lora", "quant_method", "quant_type", "quant_bits",
               "output_dir", "push_to_hub", "hub_model_id", "hub_token"]
MAIN_CHAT = ["model", "ckpt_dir", "adapters"]
CHAT_SKIP_GROUPS = ("data", "generation")  # the chat panel has its own sampling settings; no dataset to answer


@dataclasses.dataclass
class Hooks:
    """What the page needs from the pipelines, handed in by ``lmforge.pipelines.ui``."""

    train_run_dir: Callable[[Any], str]  # TrainArguments/RlhfArguments -> the run folder training will use
    eval_output_dir: Callable[[Any], str]  # EvalArguments -> the folder the report goes to
    build_engine: Callable[[Any], Any]  # InferArguments -> an engine


class _EngineSlot:
    """The Chat tab's engine: one at a time for the whole page; loading another frees the previous one."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.lock = threading.Lock()

    def load(self, build: Callable[[Any], Any], args: Any) -> Any:
        with self.lock:
            self.engine = None
            gc.collect()
            self.engine = build(args)
            return self.engine


def _eval_prepare(hooks: Hooks, runs_dir: str):
    def prepare(args: Any, values: dict) -> tuple[dict, str]:
        if args.output_dir:
            out = args.output_dir
        elif args.compare:
            out = str(Path(runs_dir) / f"eval-compare-{time.strftime('%Y%m%d-%H%M%S')}")
        else:
            out = str(hooks.eval_output_dir(args))
        return {**values, "output_dir": out}, out

    return prepare


def _chat_tab(gr: Any, hooks: Hooks, runs_dir: str, jobs_dir: str) -> dict[str, Any]:
    from lmforge.arguments import GenerationArguments, InferArguments
    from lmforge.ui.chat import adapter_choices, chat_panel, engine_responder

    slot = _EngineSlot()
    flags = [f for f in flags_of(InferArguments) if f.group not in CHAT_SKIP_GROUPS and f.name != "result_path"]
    gr.Markdown("Load a model, a training checkpoint or adapters (the flags of `lmforge infer`), then chat.")
    flags, components = build_form(gr, flags, prefix="chat", main=MAIN_CHAT,
                                   choices={"ckpt_dir": find_checkpoints(runs_dir, skip=jobs_dir)})
    with gr.Row():
        load = gr.Button("Load", variant="primary", elem_id="chat-load")
        loaded = gr.Markdown("No model loaded.", elem_id="chat-loaded")
    panel = chat_panel(gr, lambda: engine_responder(slot.engine) if slot.engine is not None else None,
                       prefix="chat", defaults=GenerationArguments())

    def do_load(*widget_values: Any):
        try:
            public, hidden = split_secrets(flags, form_values(flags, list(widget_values)))
            argv = to_argv(flags, public)
            args = parse_flags(InferArguments, argv, hidden)
            if not (args.model or args.ckpt_dir or args.adapters):
                raise ArgumentError("nothing to load: fill in model, ckpt_dir or adapters")
            engine = slot.load(hooks.build_engine, args)
        except Exception as e:  # noqa: BLE001 - a load error is shown on the page, which stays usable
            return f"**Not loaded:** {type(e).__name__}: {e}", gr.update(), [], []
        names, chosen = adapter_choices(engine)
        return (f"Loaded **{engine.model_name}**" + (f" with adapter {chosen}" if len(names) > 1 else "")
                + f" &middot; `{command_line('infer', argv, hidden)}`",
                gr.update(choices=names, value=chosen, visible=len(names) > 1), [], [])

    load.click(do_load, components, [loaded, panel["adapter"], panel["chatbot"], panel["conv"]])
    by_name = dict(zip([f.name for f in flags], components))
    return {"ckpt_dir": by_name["ckpt_dir"], "model": by_name["model"], "adapters": by_name["adapters"]}


def build_webui(args: Any, hooks: Hooks) -> Any:
    """The page (``args``: ``WebUIArguments``)."""
    import gradio as gr

    from lmforge.arguments import EvalArguments, ExportArguments, RlhfArguments, TrainArguments
    from lmforge.registry import DATASETS, REWARDS

    jobs_dir, runs_dir = args.jobs_dir, args.runs_dir
    data = ", ".join(f"`builtin:{name}`" for name in DATASETS.names())
    with gr.Blocks(title="lmforge web-ui", analytics_enabled=False) as demo:
        gr.Markdown("## lmforge web-ui\nEach tab is a command's flags (`lmforge <command> --help`); Start runs the "
                    f"command shown, and its job goes on if this page closes. Built-in data: {data}; model "
                    "`builtin:tiny` trains on a CPU.")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = job_tab(gr, command="sft", cls=TrainArguments, jobs_dir=jobs_dir, main=MAIN_SFT,
                                prepare=training_prepare(hooks.train_run_dir), plots=True)
                train_chat = gr.Button("Chat with this run's newest checkpoint", elem_id="sft-chat")
            with gr.Tab("RLHF", id="rlhf", elem_id="tab-rlhf"):
                rlhf = job_tab(gr, command="rlhf", cls=RlhfArguments, jobs_dir=jobs_dir, main=MAIN_RLHF,
                               prepare=training_prepare(hooks.train_run_dir), plots=True,
                               choices={"reward_funcs": REWARDS.names()})
                rlhf_chat = gr.Button("Chat with this run's newest checkpoint", elem_id="rlhf-chat")
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat = _chat_tab(gr, hooks, runs_dir, jobs_dir)
            with gr.Tab("Eval", id="eval", elem_id="tab-eval"):
                evaluation = job_tab(gr, command="eval", cls=EvalArguments, jobs_dir=jobs_dir, main=MAIN_EVAL,
                                     prepare=_eval_prepare(hooks, runs_dir), report=True, skip={"compare"},
                                     choices={"ckpt_dir": find_checkpoints(runs_dir, skip=jobs_dir)})
                with gr.Accordion("Compare eval reports", open=False):
                    reports = gr.Dropdown(find_reports(runs_dir, skip=jobs_dir), multiselect=True,
                                          allow_custom_value=True, label="reports (run folders)",
                                          elem_id="eval-compare-reports")
                    compare = gr.Button("Compare", elem_id="eval-compare")
                    compare_message = gr.Markdown()
            with gr.Tab("Export", id="export", elem_id="tab-export"):
                export = job_tab(gr, command="export", cls=ExportArguments, jobs_dir=jobs_dir, main=MAIN_EXPORT,
                                 choices={"ckpt_dir": find_checkpoints(runs_dir, skip=jobs_dir)})

        def to_chat(checkpoint: str):
            if not checkpoint:
                return gr.update(), gr.update(), gr.update()
            return gr.Tabs(selected="chat"), gr.update(value=checkpoint), gr.update(value="")

        for tab, button in ((train, train_chat), (rlhf, rlhf_chat)):
            button.click(to_chat, tab.last_checkpoint, [tabs, chat["ckpt_dir"], chat["model"]])

        def start_compare(folders: list[str]):
            if not folders or len(folders) < 2:
                return "Pick two or more reports.", gr.update()
            out = str(Path(runs_dir) / f"eval-compare-{time.strftime('%Y%m%d-%H%M%S')}")
            argv = ["--compare", *folders, "--output_dir", out]
            try:
                parse_flags(EvalArguments, argv)
            except ArgumentError as e:
                return f"**Not started:** {e}", gr.update()
            job = J.start_job(jobs_dir, "eval", argv, display=command_line("eval", argv), run_dir=out)
            return f"Started **{job.id}**.", gr.update(choices=job_choices(jobs_dir, "eval"), value=job.id)

        compare.click(start_compare, reports, [compare_message, evaluation.jobs])

        def on_load():
            """A fresh page (or a reload) shows each tab's newest running job, else its newest job."""
            ckpts = find_checkpoints(runs_dir, skip=jobs_dir)
            updates = [gr.update(choices=job_choices(jobs_dir, t.command), value=newest_job(jobs_dir, t.command))
                       for t in (train, rlhf, evaluation, export)]
            return (*updates, *[gr.update(choices=ckpts)] * 3, gr.update(choices=find_reports(runs_dir, skip=jobs_dir)))

        demo.load(on_load, None, [train.jobs, rlhf.jobs, evaluation.jobs, export.jobs, chat["ckpt_dir"],
                                  evaluation.fields["ckpt_dir"], export.fields["ckpt_dir"], reports])
    return demo
