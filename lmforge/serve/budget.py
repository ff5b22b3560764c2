"""What one request may cost: a character bound checked before admission, and freed memory returned.

Tokenising is the costly step a client controls: a 1 MB prompt took about 0.25 GB while the
tokenizer built its encoding, and six 15 MB prompts tokenised at once took a server from 0.6 to
20 GB. A prompt of ``max_model_len`` tokens cannot hold more characters than ``max_model_len``
times the longest vocabulary entry (each token covers at most that many characters), so a request
whose text is longer can be answered "too long" before any tokenisation, and the rest is
tokenised inside an admitted slot where concurrency is bounded.

After a large request, CPython's allocator keeps the freed arenas and glibc keeps freed heap pages;
:func:`release_memory` hands them back (``malloc_trim``) so that the process size falls again.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any, Iterable, Optional

from lmforge.serve.errors import APIError

logger = logging.getLogger("lmforge.serve")

# The ceiling used when the engine exposes no tokenizer vocabulary to measure.
DEFAULT_CHARS_PER_TOKEN = 32
# Requests whose body was at least this large give freed memory back when they finish.
TRIM_AFTER_BYTES = 1 << 20


def chars_per_token(engine: Any) -> int:
    """The most characters one token of ``engine``'s tokenizer can stand for (its longest vocabulary entry).

    Byte-level BPE vocabularies spell each byte as one character, so an entry's length is the bytes
    it covers, which is at least the characters; SentencePiece entries spell text as it is.
    """
    fixed = getattr(engine, "max_chars_per_token", None)
    if fixed:
        return int(fixed)
    tokenizer = getattr(engine, "tokenizer", None)
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return DEFAULT_CHARS_PER_TOKEN
    try:
        vocab = get_vocab()
    except Exception:  # noqa: BLE001 - some remote-code tokenizers cannot list their vocabulary
        return DEFAULT_CHARS_PER_TOKEN
    return max((len(t) for t in vocab), default=DEFAULT_CHARS_PER_TOKEN) or DEFAULT_CHARS_PER_TOKEN


class PromptBound:
    """Rejects text that cannot fit in ``max_model_len`` tokens, by counting characters only."""

    def __init__(self, max_model_len: Optional[int], per_token: int) -> None:
        self.max_model_len = max_model_len
        self.per_token = per_token
        self.max_chars = max_model_len * per_token if max_model_len else None

    def check(self, texts: Iterable[Optional[str]], param: str) -> int:
        """The characters of ``texts`` (the parts of one prompt); a 400 when they cannot fit."""
        total = sum(len(t) for t in texts if t)
        if self.max_chars is not None and total > self.max_chars:
            raise APIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens, but the text of "
                     f"{param} is {total:,} characters; {self.max_model_len} tokens of this tokenizer hold at most "
                     f"{self.max_chars:,} characters ({self.per_token} per token); shorten the prompt",
                param=param, code="context_length_exceeded")
        return total

    def check_prompt(self, prompt: Any, param: str = "prompt") -> None:
        """A raw completion prompt: a text (characters bounded) or token ids (their number is the count)."""
        if isinstance(prompt, str):
            self.check([prompt], param)
        elif self.max_model_len and len(prompt) >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but {param} "
                                f"is {len(prompt)} token ids, leaving no room for a reply; shorten it",
                           param=param, code="context_length_exceeded")


def chat_texts(messages: Iterable[Any], tools: Optional[Iterable[Any]] = None) -> list[Optional[str]]:
    """Every piece of client text a chat request puts into the prompt (validated schema objects)."""
    out: list[Optional[str]] = []
    for m in messages:
        out += [m.text(), m.reasoning_content, m.name]
        out += [c.function.arguments for c in m.tool_calls or []]
    for t in tools or []:
        out.append(t.function.model_dump_json())
    return out


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_memory() -> None:
    """Give freed heap memory back to the operating system (glibc only; elsewhere a no-op)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
