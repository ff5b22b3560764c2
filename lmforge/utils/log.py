"""One logging set-up for every command: ``lmforge`` messages at INFO on stderr; secrets masked.

:func:`mask_secret` registers a value (an API key, a hub token) that must never be written: from
then on every log record created in this process (lmforge's or a library's) has it replaced by
``***`` before any handler sees it, which is why this is a record factory and not a filter (a
filter on one logger misses records that other loggers propagate). :func:`masked` does the same
for text that is not a log record, such as a child process's output.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

_SECRETS: set[str] = set()
_LOCK = threading.Lock()
_MIN_SECRET_LEN = 4  # masking "a" or "" would mangle every line without protecting anything
MASK = "***"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream it was created with: a
    notebook, a test's capture or a UI may swap stderr, and a handler holding the old (closed) one fails."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str | int | None = None) -> None:
    root = logging.getLogger("lmforge")
    if root.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[%(levelname)s:%(name)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("LMFORGE_LOG_LEVEL", "INFO"))
    root.propagate = True


def masked(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def mask_secret(value: str | None) -> None:
    """Never log ``value``: mask it in every log record from now on (values under 4 characters are ignored)."""
    if not value or len(value) < _MIN_SECRET_LEN:
        return
    with _LOCK:
        first = not _SECRETS
        _SECRETS.add(value)
        if first:
            _install_factory()


def _install_factory() -> None:
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's own error to report
            return record
        clean = masked(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # tracebacks may quote a failing command line
            record.exc_text = masked(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
