"""Arguments of the browser commands: ``lmforge app`` (a chat page) and ``lmforge web-ui`` (train, watch,
chat, evaluate and export)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmforge.arguments.base import ArgumentError, field
from lmforge.arguments.infer import InferArguments


@dataclass
class UIArguments:
    """Where the page listens and who may open it."""

    server_name: str = field("127.0.0.1", "address to listen on; 0.0.0.0 exposes the page to the network "
                                          "(use --auth then)")
    server_port: int = field(7860, "port to listen on")
    auth: Optional[str] = field(None, "a login for the page: user:pass, or a file with one user:pass per line "
                                      "(a file keeps the password out of the process list)")
    share: bool = field(False, "also publish the page on a public gradio.live link (traffic goes through "
                               "Gradio's relay servers)")

    def check_ui(self) -> None:
        if not 0 <= self.server_port <= 65535:
            raise ArgumentError(f"--server_port must be 0..65535, got {self.server_port}")


@dataclass
class AppArguments(InferArguments, UIArguments):
    """A chat page in the browser: lmforge app --model M [--adapters A] | --base_url URL [--api_key KEY]."""

    base_url: Optional[str] = field(None, "chat with an OpenAI-compatible server at this URL "
                                          "(http://host:port/v1) instead of loading a model; --model then "
                                          "names the served model (default: the server's first)")
    api_key: Optional[str] = field(None, "API key for --base_url (default: the OPENAI_API_KEY environment "
                                         "variable)")
    tools: Optional[str] = field(None, "a JSON file with a list of OpenAI tool definitions offered to the "
                                       "model; its tool calls are shown in the chat")
    title: Optional[str] = field(None, "page title (default: the model's name)")

    def __post_init__(self) -> None:
        self.check_ui()
        if not self.base_url and not (self.model or self.ckpt_dir or self.adapters):
            raise ArgumentError("nothing to chat with: pass --model / --ckpt_dir (a local model) "
                                "or --base_url (a running OpenAI-compatible server)")
        if self.base_url and (self.ckpt_dir or self.adapters):
            raise ArgumentError("--base_url chats with a server; --ckpt_dir and --adapters are for a local model")


@dataclass
class WebUIArguments(UIArguments):
    """Train, watch, chat, evaluate and export in the browser: lmforge web-ui."""

    jobs_dir: str = field("output/webui-jobs", "where the page keeps each job's command, console log and exit "
                                               "code; running jobs are found again there after a reload or a "
                                               "restart of the page")
    runs_dir: str = field("output", "where the page looks for checkpoints and eval reports to offer")

    def __post_init__(self) -> None:
        self.check_ui()
