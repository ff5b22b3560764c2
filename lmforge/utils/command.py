"""The command this process runs: what to type next, and where its output goes.

``lmforge <command>`` records its name and flags here (``set_invocation``); a training run stopped
by Ctrl-C prints the same command with ``--resume_from_checkpoint``. Python callers (``sft_main(...)``)
record nothing and get the Python form of the hint. Values of secret flags (keys, tokens) are never
repeated.

One rule places every command's output unless ``--output_dir``/``--result_path`` says otherwise
(``default_output``): training creates a run folder ``output/<model>/v<N>-<time>/``; any other
command writes a new ``<command>-[<checkpoint>-]<time>`` entry into the run folder of the checkpoint
it used, or into ``output/<model>/`` for a model that is not a training checkpoint. Every command
ends with one ``<command>: <what> -> <where>`` line (``print_output``).
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

_invocation: tuple[str, list[str]] | None = None

SECRET_SUFFIXES = ("api_key", "token", "password", "secret")


def set_invocation(command: str | None, argv: list[str]) -> None:
    """Record ``lmforge <command> <argv>`` (``None``: forget it)."""
    global _invocation
    _invocation = (command, list(argv)) if command else None


def command_name(default: str) -> str:
    """The ``lmforge`` command being run (``default`` when called from Python)."""
    return _invocation[0] if _invocation else default


def is_secret(flag: str) -> bool:
    return flag.lstrip("-").split("=", 1)[0].lower().endswith(SECRET_SUFFIXES)


def _without_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag`` and its values (``--flag v`` or ``--flag=v``)."""
    out, skipping = [], False
    for a in argv:
        if a == flag or a.startswith(flag + "="):
            skipping = a == flag
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def _hide_secrets(argv: list[str]) -> list[str]:
    out, hide = [], False
    for a in argv:
        if hide and not a.startswith("--"):
            out.append("<hidden>")
            hide = False
            continue
        hide = False
        if a.startswith("--") and is_secret(a):
            if "=" in a:
                a = a.split("=", 1)[0] + "=<hidden>"
            else:
                hide = True
        out.append(a)
    return out


def rerun_command(replace: dict[str, str]) -> str:
    """The command this process runs with each flag of ``replace`` set to its value (secrets hidden)."""
    if _invocation is None:
        kwargs = ", ".join(f"{k.lstrip('-')}={v!r}" for k, v in replace.items())
        return f"the same call with {kwargs} in its arguments"
    command, argv = _invocation
    for flag in replace:
        argv = _without_flag(argv, flag)
    for flag, value in replace.items():
        argv = [*argv, flag, value]
    env = f"NPROC_PER_NODE={os.environ['NPROC_PER_NODE']} " if os.environ.get("NPROC_PER_NODE") else ""
    return env + "lmforge " + shlex.join([command, *_hide_secrets(argv)])


def print_output(command: str, what: str, where: object) -> None:
    """The last line of a command: ``<command>: <what> -> <where>`` on stdout."""
    print(f"{command}: {what} -> {where}", file=sys.stdout, flush=True)


_CHECKPOINT = re.compile(r"checkpoint-\d+")


def model_slug(model: str) -> str:
    """A folder-safe name for a model id, path or builtin name (``<run>-checkpoint-N`` for a checkpoint)."""
    p = Path(model).expanduser()
    if p.exists():
        name = p.name
        if _CHECKPOINT.fullmatch(name):
            name = f"{p.resolve().parent.name}-{name}"
    else:
        name = model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def output_home(source: str | None) -> tuple[Path, str]:
    """(folder, checkpoint name) for outputs made from ``source`` (a model or checkpoint): a checkpoint's run
    folder, a run folder itself, else ``output/<model>``."""
    p = Path(source).expanduser() if source else None
    if p is not None and p.is_dir():
        if _CHECKPOINT.fullmatch(p.name):
            return p.parent, p.name
        if any(d.is_dir() and _CHECKPOINT.fullmatch(d.name) for d in p.glob("checkpoint-*")):
            return p, ""
    return Path("output") / model_slug(source or "model"), ""


def default_output(command: str, source: str | None, suffix: str = "") -> Path:
    """``<home>/<command>-[<checkpoint>-]<time><suffix>``: see the module docstring."""
    home, checkpoint = output_home(source)
    name = "-".join([command, *([checkpoint] if checkpoint else []), time.strftime("%Y%m%d-%H%M%S")])
    return home / f"{name}{suffix}"
