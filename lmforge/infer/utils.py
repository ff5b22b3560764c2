"""Text utilities shared by engines: stop-string matching and a streaming detokenizer.

Streaming must send exactly the text the non-streaming path returns, in pieces, and never a piece
that later turns out wrong: half of a multi-byte character (it decodes to U+FFFD until its last
byte arrives) or the start of a stop string (which will be cut away if it completes).
"""
from __future__ import annotations

import codecs
import logging
from typing import Any, Callable, Iterable

from lmforge.template.token_bytes import byte_level_alphabet, spelled_bytes

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"


class StopStrings:
    """A set of stop strings: where the first one starts, and how much of a text's end might begin one."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops: list[str] = [s for s in dict.fromkeys(stops) if s]
        self.max_len = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str) -> int:
        """Index where the earliest stop string starts in ``text``, or -1."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits, default=-1)

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` up to the first stop string (which is dropped, as OpenAI does), and whether one was found."""
        if not self.stops:
            return text, False
        i = self.find(text)
        return (text, False) if i < 0 else (text[:i], True)

    def partial_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start (not the whole) of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


class IncrementalDecoder:
    """Token ids in, text deltas out, for one streamed reply.

    Each ``push`` finds the whole reply so far with ``decode`` (the same function the final text
    comes from, so the pieces add up to it) and emits only the part that is settled: no trailing
    U+FFFD (an incomplete UTF-8 sequence), and nothing that may be the start of a stop string.

    By default the whole reply is decoded on every push, O(n^2) in its length. With ``window`` the
    reply is cut at an *anchor* (the last push whose text ended on a whole character) and only the
    tokens after it are decoded, after ``CONTEXT`` tokens before it (a SentencePiece tokenizer drops
    the leading space of the first token it decodes; the context's own text is then taken off). The
    windowed text is checked against that context: if the tokenizer's text is not prefix-stable
    there, this decoder decodes the whole reply from then on. An anchor is only set where the
    reply's text ends with its context's text (so not where ``decode`` stripped a stop word longer
    than the context), and ``hold_ids`` (stop and pad tokens, which ``decode`` cuts or strips) turn
    windowing off, so the pieces still add up to ``decode(all ids)``.

    With ``token_bytes`` (a :class:`~lmforge.template.token_bytes.TokenBytes`: the tokenizer's text of any ids is
    the UTF-8 of their joined bytes) no tokenizer call is made: each push feeds the new tokens' bytes to an
    incremental UTF-8 decoder (which holds back an incomplete character) and ``strip`` (the template's
    trailing stop-word strip, the rest of ``decode``) is applied to the text so far. A held id or a token the
    table does not trust switches the stream to the tokenizer from then on.
    """

    CONTEXT = 4
    REANCHOR = 8  # tokens past the anchor before it moves: a move costs a decode, a longer window costs little

    def __init__(self, decode: Callable[[list[int]], str], stop: StopStrings | None = None, *,
                 window: bool = False, hold_ids: Iterable[int] = (), token_bytes: Any = None,
                 strip: Callable[[str], str] | None = None):
        self._decode = decode
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if token_bytes is not None else None
        self._strip = strip
        self._raw = ""  # with token_bytes: the UTF-8 of every id's bytes so far (an incomplete character held)
        self._stop = stop or StopStrings()
        self.ids: list[int] = []
        self.sent = ""  # text emitted so far
        self.stopped = False  # a stop string has appeared; later tokens are ignored
        self._window = window
        self._hold_ids = frozenset(hold_ids)
        self._anchor = 0  # ids[:anchor] decode to anchor_text, a prefix of every later text
        self._anchor_text = ""
        self._context_text = ""  # decode(ids[anchor - CONTEXT:anchor])

    def push(self, ids: Iterable[int]) -> str:
        if self.stopped:
            return ""
        start = len(self.ids)
        self.ids += [int(i) for i in ids]
        text = self._text(start)
        cut, self.stopped = self._stop.cut(text)
        if self.stopped:
            return self._emit(cut, len(cut))
        end = len(text.rstrip(REPLACEMENT_CHAR))
        end -= self._stop.partial_len(text[:end])
        return self._emit(text, end)

    def _text(self, start: int) -> str:
        ids = self.ids
        if self._bytes is not None:
            new = ids[start:]
            raw = None if self._hold_ids.intersection(new) else self._bytes.join(new)
            if raw is not None:
                self._raw += self._utf8.decode(raw)
                return self._strip(self._raw) if self._strip is not None else self._raw
            self._bytes = self._utf8 = None  # the tokenizer from here on (the window starts at the reply's start)
        if not self._window:
            return self._decode(ids)
        if self._hold_ids.intersection(ids[start:]):
            self._window = False  # cut or stripped by decode: never anchor over it
            return self._decode(ids)
        if self._anchor:
            ctx = max(0, self._anchor - self.CONTEXT)
            tail = self._decode(ids[ctx:])
            if not tail.startswith(self._context_text):
                self._window = False
                return self._decode(ids)
            text = self._anchor_text + tail[len(self._context_text):]
        else:
            text = self._decode(ids)
        if not text.endswith(REPLACEMENT_CHAR) and len(ids) - self._anchor >= self.REANCHOR:
            context = self._decode(ids[max(0, len(ids) - self.CONTEXT):])
            if text.endswith(context):  # not so when decode stripped more than the context holds
                self._anchor, self._anchor_text, self._context_text = len(ids), text, context
        return text

    def _emit(self, text: str, end: int) -> str:
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):end]
        self.sent = text[:end]
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text``, the reply exactly as the non-streaming path returns it."""
        if final_text.startswith(self.sent):
            delta, self.sent = final_text[len(self.sent):], final_text
            return delta
        # Sent text cannot be taken back; this only happens if decoding is not prefix-stable.
        logger.warning("streamed text %r is not a prefix of the final reply %r", self.sent[-40:], final_text[-40:])
        return ""


class TokenPieces:
    """Each token's text and its exact bytes, for logprobs.

    A token that holds part of a multi-byte character decodes to U+FFFD on its own; OpenAI's
    ``bytes`` field exists so clients can rebuild such characters, so for byte-level tokenizers
    the bytes come from the token's own spelling rather than from its decoded text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.alphabet = byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = None
            if self.alphabet is not None and token_id not in self.added:
                spelling = self.tokenizer.convert_ids_to_tokens(token_id)
                if isinstance(spelling, str):
                    spelled = spelled_bytes(spelling, self.alphabet)
                    raw = list(spelled) if spelled is not None else None
            self._cache[token_id] = (text, raw if raw is not None else list(text.encode("utf-8")))
        return self._cache[token_id]
