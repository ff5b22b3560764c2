"""``lmforge <command> [flags]``: the route table.

Each route names the argument dataclass and the pipeline function by import path, so that
``lmforge --help`` imports nothing heavy and a command imports only what it runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

# command -> (arguments class, pipeline function, one-line description)
ROUTES: dict[str, tuple[str, str, str]] = {
    "pt": ("lmforge.arguments:PtArguments", "lmforge.pipelines.sft:pt_main", "continued pre-training on raw text"),
    "sft": ("lmforge.arguments:TrainArguments", "lmforge.pipelines.sft:sft_main",
            "supervised fine-tuning (lora, dora, qlora, full, freeze)"),
    "rlhf": ("lmforge.arguments:RlhfArguments", "lmforge.pipelines.rlhf:rlhf_main",
             "preference and RL training: dpo, kto, orpo, simpo, cpo, rm, grpo"),
    "infer": ("lmforge.arguments:InferArguments", "lmforge.pipelines.infer:infer_main",
              "chat in the terminal, or answer a dataset into a JSONL"),
    "deploy": ("lmforge.arguments:DeployArguments", "lmforge.pipelines.deploy:deploy_main",
               "OpenAI-compatible HTTP server"),
    "export": ("lmforge.arguments:ExportArguments", "lmforge.pipelines.export:export_main",
               "merge LoRA adapters, save, push to a hub"),
    "merge-lora": ("lmforge.arguments:ExportArguments", "lmforge.pipelines.export:merge_lora_main",
                   "shorthand for export --merge_lora true"),
    "eval": ("lmforge.arguments:EvalArguments", "lmforge.pipelines.eval:eval_main", "score a model or a server on datasets; write a report"),
    "sample": ("lmforge.arguments:SampleArguments", "lmforge.pipelines.sample:sample_main",
               "best-of-N / rejection sampling scored by reward functions and PRMs"),
    "rollout": ("lmforge.arguments:RolloutArguments", "lmforge.pipelines.rollout:rollout_main",
                "generation server that a GRPO trainer pushes weights to and pulls samples from"),
    "env": ("lmforge.arguments:EnvArguments", "lmforge.toolkit.env:env_main",
            "check this machine: package versions and imports, GPUs, known-bad combinations, free disk"),
    "presets": ("lmforge.arguments:PresetsArguments", "lmforge.presets:presets_main",
                "list the training presets (--preset NAME on pt/sft/rlhf)"),
    "rag index": ("lmforge.arguments:RagIndexArguments", "lmforge.toolkit.agents_cli:rag_index_main",
                  "index a folder of documents into a local vector index (incremental)"),
    "rag query": ("lmforge.arguments:RagQueryArguments", "lmforge.toolkit.agents_cli:rag_query_main",
                  "answer questions from an index, citing the documents"),
    "agent": ("lmforge.arguments:AgentArguments", "lmforge.toolkit.agents_cli:agent_main",
              "serve agents (rag, preference, domain assistants) over HTTP"),
    "preference train": ("lmforge.arguments:PreferenceArguments", "lmforge.toolkit.agents_cli:preference_train_main",
                         "one dpo/kto round on recorded feedback, evaluated against the last round"),
    "app": ("lmforge.arguments:AppArguments", "lmforge.pipelines.ui:app_main",
            "a chat page in the browser for a model or an OpenAI-compatible server"),
    "web-ui": ("lmforge.arguments:WebUIArguments", "lmforge.pipelines.ui:webui_main",
               "a browser page to train and watch runs, chat, evaluate and export"),
}


def _load(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def available_routes() -> dict[str, tuple[str, str, str]]:
    """Routes whose pipeline module exists in this installation."""
    out = {}
    for name, route in ROUTES.items():
        if importlib.util.find_spec(route[1].partition(":")[0]) is not None:
            out[name] = route
    return out


def _usage() -> str:
    from lmforge import __version__

    lines = [f"lmforge {__version__}: fine-tune, align, serve, evaluate and export LLMs", "",
             "usage: lmforge <command> [flags]    lmforge <command> --help", "", "commands:"]
    for name, (_, _, desc) in available_routes().items():
        lines.append(f"  {name:<17} {desc}")
    lines += ["", "Every command also reads --config file.yaml (flags override it)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(__version__)
        return 0
    routes = available_routes()
    cmd, rest = argv[0], argv[1:]
    if rest and f"{cmd} {rest[0]}" in routes:  # two-word commands: rag index, rag query, preference train
        cmd, rest = f"{cmd} {rest[0]}", rest[1:]
    if cmd not in routes:
        subs = [r.split(" ", 1)[1] for r in routes if r.startswith(f"{cmd} ")]
        if subs:
            print(f"lmforge {cmd}: expected one of: {', '.join(subs)} (lmforge {cmd} {subs[0]} --help)", file=sys.stderr)
            return 2
        import difflib

        close = difflib.get_close_matches(cmd, list(routes), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"lmforge: unknown command {cmd!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    args_path, main_path, _ = routes[cmd]
    from lmforge.arguments import parse_args
    from lmforge.cli.launch import relaunch_under_torchrun
    from lmforge.utils.command import set_invocation

    args = parse_args(_load(args_path), rest, prog=f"lmforge {cmd}")  # flag errors once, before any process starts
    try:
        if not getattr(args, "dry_run", False):  # a dry run plans for NPROC_PER_NODE processes in this one
            relaunch_under_torchrun(cmd, rest)
    except ValueError as e:
        print(f"lmforge {cmd}: error: {e}", file=sys.stderr)
        return 2
    set_invocation(cmd, rest)
    try:
        code = _run(cmd, _load(main_path), args)
    finally:
        set_invocation(None, [])  # main() may be called again in this process (tests, notebooks)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from lmforge.utils.distributed import exit_process

        exit_process(code)  # a launched worker: see exit_process for why not a normal exit
    return code


def _run(cmd: str, pipeline: Any, args: Any) -> int:
    """Run the pipeline; exit 2 with one line for an input error, 130 after Ctrl-C."""
    try:
        result = pipeline(args)
        from lmforge.utils.distributed import shutdown

        shutdown()  # every rank leaves the process group together (a no-op in one process)
    except KeyboardInterrupt:
        # Ctrl-C: whatever was running has said what it saved (training prints where to resume)
        print(f"lmforge {cmd}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # lmforge's own input errors (bad dataset line, unknown reward, unsupported model...) already name
        # the file, line, field or flag: print that, not a traceback (LMFORGE_TRACEBACK=1 shows it).
        import traceback

        frames = traceback.extract_tb(e.__traceback__)
        ours = type(e).__module__.startswith("lmforge.") or (
            not isinstance(e, RuntimeError) and frames and "lmforge" in Path(frames[-1].filename).parts)
        if not ours or os.environ.get("LMFORGE_TRACEBACK"):
            raise
        print(f"lmforge {cmd}: error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and result.get("interrupted"):  # stopped cleanly by Ctrl-C, resumable
        return 130
    if isinstance(result, dict) and isinstance(result.get("exit_code"), int):  # a check that failed (lmforge env)
        return result["exit_code"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
