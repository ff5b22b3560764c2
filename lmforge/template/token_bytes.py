"""Each token's bytes, for decoding a streamed reply a few tokens at a time without calling the tokenizer.

A byte-level BPE tokenizer (GPT-2, Qwen, Llama 3) spells every byte as one printable character, and its
decoder (the tokenizers library's ``ByteLevel``) maps each token's characters back to bytes, joins the bytes
of all tokens and reads them as UTF-8, replacing invalid sequences. So the text of any ids is the UTF-8 of
their joined bytes, and a stream can be decoded incrementally by feeding each new token's bytes to Python's
incremental UTF-8 decoder: a dictionary look-up and a C call per token, against a tokenizer call on a window
of ids (with its Python-to-Rust conversions) per chunk, the largest part of a served stream's host time per
chunk (benchmarks/RESULTS.md, 2026-12-01). The tokenizer stays the reference: the table is built only where
transformers' ``decode`` is the tokenizers library's own, the decoder is ``ByteLevel`` alone, and a sample of
random id sequences decodes to the same text both ways; each token's bytes are checked against the tokenizer's
decode of it alone the first time it is looked up, and a token that disagrees sends its stream back to the
tokenizer.
"""
from __future__ import annotations

import logging
import random
from typing import Any

logger = logging.getLogger(__name__)

_SAMPLES, _SAMPLE_LEN = 64, 12  # random id sequences checked when the table is built


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character; this maps them back (GPT-2's scheme:
    printable Latin-1 bytes are themselves, the rest are shifted to U+0100 and up in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in char_of:
            char_of[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in char_of.items()}


def spelled_bytes(spelling: str, alphabet: dict[str, int]) -> bytes | None:
    """A byte-level token's bytes from its spelling, or None when a character is outside the byte alphabet (an
    added token such as ``<|im_end|>`` with a space, say: the ByteLevel decoder then takes its UTF-8 as it is)."""
    if all(c in alphabet for c in spelling):
        return bytes(alphabet[c] for c in spelling)
    return None


class TokenBytes:
    """Token id -> its bytes, looked up lazily and checked once each; see the module docstring.

    ``join(ids)`` is the bytes of ``ids`` (None when one of them cannot be trusted: its stream falls back to
    the tokenizer). Build with :meth:`for_tokenizer`, which returns None for a tokenizer this does not fit."""

    def __init__(self, backend: Any, alphabet: dict[str, int]):
        self._backend, self._alphabet = backend, alphabet
        self._known: dict[int, bytes] = {}
        self._refused: set[int] = set()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> TokenBytes | None:
        from .base import raw_decoder

        backend = raw_decoder(tokenizer)
        if backend is None or type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
            return None
        table = cls(backend, byte_level_alphabet())
        try:
            size = backend.get_vocab_size(with_added_tokens=True)
            if not table._agrees(size):
                logger.info("token bytes: %s decodes differently from its bytes; streams use the tokenizer",
                            type(tokenizer).__name__)
                return None
        except Exception as e:  # noqa: BLE001 - any surprise in the tokenizer keeps the tokenizer's own path
            logger.info("token bytes: not used (%s: %s)", type(e).__name__, e)
            return None
        return table

    def _spelled(self, token_id: int) -> bytes | None:
        """The bytes the ByteLevel decoder gives one token: its characters mapped back, or (a token with a
        character outside the byte alphabet, an added token such as ``<|im_end|>``) its UTF-8 as it is."""
        spelling = self._backend.id_to_token(token_id)
        if spelling is None:
            return None
        raw = spelled_bytes(spelling, self._alphabet)
        return raw if raw is not None else spelling.encode("utf-8")

    def _agrees(self, size: int) -> bool:
        """Random id sequences (half of their ids from the added tokens and the bytes above 0x7f, where the
        rules differ) decode to the same text from their bytes as through the tokenizer."""
        rng = random.Random(0)
        pool = [*rng.sample(range(size), min(size, 8192)), *range(max(0, size - 512), size)]
        tricky = [i for i in pool if i >= size - 512 or (self._spelled(i) or b"\0")[0] >= 0x80]
        for _ in range(_SAMPLES):
            ids = [rng.choice(tricky) if tricky and rng.random() < 0.5 else rng.randrange(size)
                   for _ in range(rng.randrange(1, _SAMPLE_LEN + 1))]
            parts = [self._spelled(i) for i in ids]
            if any(p is None for p in parts):
                continue  # an id with no token (a gap in the vocabulary): never generated
            if b"".join(parts).decode("utf-8", "replace") != self._backend.decode(ids, skip_special_tokens=False):
                return False
        return True

    def _learn(self, token_id: int) -> bytes | None:
        if token_id in self._refused:
            return None
        raw = self._spelled(token_id) if token_id >= 0 else None
        if raw is None or raw.decode("utf-8", "replace") != self._backend.decode([token_id],
                                                                                 skip_special_tokens=False):
            self._refused.add(token_id)
            logger.info("token bytes: token %d does not decode as its bytes; its streams use the tokenizer", token_id)
            return None
        self._known[token_id] = raw
        return raw

    def join(self, ids: list[int]) -> bytes | None:
        known = self._known
        try:
            return b"".join([known[i] for i in ids])
        except KeyError:
            pass
        parts = []
        for i in ids:
            raw = known.get(i)
            if raw is None:
                raw = self._learn(i)
                if raw is None:
                    return None
            parts.append(raw)
        return b"".join(parts)
