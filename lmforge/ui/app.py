"""``lmforge app``: one chat page over a responder (a local engine or an OpenAI-compatible server)."""
from __future__ import annotations

from typing import Any

from lmforge.ui.chat import Responder, chat_panel


def build_app(respond: Responder, *, title: str, defaults: Any, adapters: list[str] | None = None,
              default_adapter: str | None = None, tools: list | None = None, keep_history: bool = True,
              stream: bool = True) -> Any:
    """The page: a chat (streaming, history, regenerate, stop, clear, tool calls shown) and its settings.
    ``defaults`` holds the sampling defaults the command was started with (``AppArguments``)."""
    import gradio as gr

    with gr.Blocks(title=f"lmforge app: {title}", analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        chat_panel(gr, lambda: respond, prefix="app", defaults=defaults, adapters=adapters,
                   default_adapter=default_adapter, tools=tools, keep_history=keep_history, stream=stream)
    return demo
