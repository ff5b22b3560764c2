"""Errors that mean "this machine or this set of flags cannot do what was asked" (a missing package, no GPU,
flags that conflict). They subclass RuntimeError, and the CLI prints them as one line (exit 2): a
RuntimeError of any other type may be a bug, and keeps its traceback."""
from __future__ import annotations


class SetupError(RuntimeError):
    """The message names the flag or package and what to do."""
