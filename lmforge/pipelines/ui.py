"""``app_main`` and ``webui_main``: the browser pages, with what they need from the pipelines handed in.

    lmforge app --model builtin:tiny                                   # chat with a local model
    lmforge app --base_url http://127.0.0.1:8000/v1 --api_key KEY      # ... or with any OpenAI server
    lmforge web-ui                                                     # train, watch, chat, eval, export

Cheap checks first (gradio installed, the login, the tools file, a free port), then the model.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lmforge.arguments import AppArguments, WebUIArguments
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")


def _check_port(host: str, port: int) -> None:
    from lmforge.pipelines.deploy import check_port

    try:
        check_port(host, port)
    except OSError as e:  # deploy's words name deploy's flags
        raise OSError(str(e).replace("--port", "--server_port").replace("--host", "--server_name")) from None


def _prepare(args: Any) -> list[tuple[str, str]] | None:
    from lmforge.ui import require_gradio
    from lmforge.ui.launch import parse_auth, quiet_gradio

    require_gradio()
    auth = parse_auth(args.auth)
    _check_port(args.server_name, args.server_port)
    quiet_gradio()
    return auth


def load_tools(path: str | None) -> list[dict] | None:
    if not path:
        return None
    from lmforge.ui.chat import parse_tools

    try:
        return parse_tools(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise OSError(f"--tools {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"--tools {path}: {e}") from None


def _server_responder(args: AppArguments) -> tuple[Any, str]:
    """(responder, model name) for ``--base_url``: the server must answer /v1/models now, not at the first turn."""
    import openai

    from lmforge.ui.chat import openai_responder
    from lmforge.utils.log import mask_secret

    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    mask_secret(key)
    client = openai.OpenAI(base_url=args.base_url, api_key=key or "unused", max_retries=0)  # the client wants one
    model = args.model
    if not model:
        try:
            served = client.models.list().data
        except openai.APIError as e:
            raise ConnectionError(f"--base_url {args.base_url}: cannot list the served models ({e})") from None
        if not served:
            raise ValueError(f"--base_url {args.base_url}: the server lists no model; pass --model")
        model = served[0].id
    return openai_responder(client, model), model


def app_main(args: AppArguments) -> None:
    """Serve the chat page until Ctrl-C."""
    setup_logging()
    auth = _prepare(args)
    tools = load_tools(args.tools)
    adapters: list[str] = []
    default_adapter = None
    if args.base_url:
        respond, name = _server_responder(args)
    else:
        import torch

        from lmforge.pipelines.infer import build_engine
        from lmforge.registry import load_plugins
        from lmforge.ui.chat import adapter_choices, engine_responder

        load_plugins(args.external_plugins)
        torch.manual_seed(args.seed)
        engine = build_engine(args)
        respond, name = engine_responder(engine), engine.model_name
        adapters = list(engine.adapters)
        default_adapter = adapter_choices(engine)[1] if adapters else None
    from lmforge.ui.app import build_app
    from lmforge.ui.launch import launch

    demo = build_app(respond, title=args.title or name, defaults=args, adapters=adapters,
                     default_adapter=default_adapter, tools=tools,
                     keep_history=args.keep_history is not False, stream=args.stream)
    logger.info("chat page for %s on http://%s:%d", name, args.server_name, args.server_port)
    launch(demo, args, auth)


def _train_run_dir(args: Any) -> str:
    from lmforge.pipelines.sft import resolve_output_dir

    return resolve_output_dir(args)


def _eval_output_dir(args: Any) -> str:
    from lmforge.eval.runner import default_output_dir

    return str(default_output_dir(args))


def _build_engine(args: Any) -> Any:
    """As ``infer_main`` builds its engine: plugins first, then the seed, then the engine."""
    import torch

    from lmforge.pipelines.infer import build_engine
    from lmforge.registry import load_plugins

    load_plugins(args.external_plugins)
    torch.manual_seed(args.seed)
    return build_engine(args)


def webui_main(args: WebUIArguments) -> None:
    """Serve the training page until Ctrl-C (the jobs it started go on; the page finds them again)."""
    setup_logging()
    auth = _prepare(args)
    from lmforge.ui.launch import launch
    from lmforge.ui.webui import Hooks, build_webui

    hooks = Hooks(train_run_dir=_train_run_dir, eval_output_dir=_eval_output_dir, build_engine=_build_engine)
    demo = build_webui(args, hooks)
    logger.info("web-ui on http://%s:%d (jobs in %s)", args.server_name, args.server_port, args.jobs_dir)
    launch(demo, args, auth, allowed_paths=[args.runs_dir, args.jobs_dir])

