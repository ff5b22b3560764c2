"""Serving a page: the login (``--auth``), an offline theme, and ``launch`` with lmforge's defaults.

Gradio's default theme loads its fonts from Google's servers; the page here names system fonts
instead, so it renders at once on a machine without internet access. Analytics are off.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lmforge.arguments import ArgumentError
from lmforge.utils.log import mask_secret

logger = logging.getLogger("lmforge")

_SANS = ["ui-sans-serif", "system-ui", "sans-serif"]
_MONO = ["ui-monospace", "Consolas", "monospace"]
CSS = """
#train-log textarea, #rlhf-log textarea, #eval-log textarea, #export-log textarea { font-family: monospace;
  font-size: 12px; }
"""


def quiet_gradio() -> None:
    """No usage analytics (set before gradio is imported)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """``user:pass`` or a file of ``user:pass`` lines (blank lines and ``#`` comments skipped)."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        lines = [(i, line.strip()) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
        entries = [(f"{path}:{i}", line) for i, line in lines if line and not line.startswith("#")]
        if not entries:
            raise ArgumentError(f"--auth {path}: no user:pass line in the file")
    elif ":" in spec or "/" not in spec:
        entries = [("--auth", spec)]
    else:
        raise ArgumentError(f"--auth {spec}: no such file (pass user:pass or a file of user:pass lines)")
    out = []
    for where, entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ArgumentError(f"{where}: expected user:pass (a user name, a colon, a password)")
        mask_secret(password)
        out.append((user, password))
    return out


def theme(gr: Any) -> Any:
    return gr.themes.Default(font=_SANS, font_mono=_MONO)


def launch(demo: Any, args: Any, auth: list[tuple[str, str]] | None, *, allowed_paths: list[str] = (),
           block: bool = True) -> Any:
    """Serve ``demo`` as ``args`` say (server_name, server_port, share); blocks until Ctrl-C unless ``block``."""
    import gradio as gr

    if args.share:
        logger.warning("--share: the page gets a public gradio.live address; anyone with the link can use it%s",
                       "" if auth else " (no --auth set)")
    if args.server_name not in ("127.0.0.1", "localhost", "::1") and not auth:
        logger.warning("listening on %s without --auth: anyone who can reach port %d can use this page",
                       args.server_name, args.server_port)
    demo.queue(default_concurrency_limit=4)
    return demo.launch(server_name=args.server_name, server_port=args.server_port, auth=auth, share=args.share,
                       prevent_thread_lock=not block, ssr_mode=False, show_error=True, inbrowser=False,
                       allowed_paths=[str(Path(p).resolve()) for p in allowed_paths], theme=theme(gr), css=CSS,
                       footer_links=[])
