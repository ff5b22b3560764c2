"""Extractive answers: decoding that can only copy text out of the retrieved passages (``rag --extractive true``).

A small reader finds the right place in its passages more often than it copies what is there letter for letter:
builtin:tiny trained on ``builtin:rag-reader`` starts "the red cabinet beside the op..." and drifts into another
word (benchmarks/RESULTS.md). Under this constraint every next token must continue, character for character, a
stretch of the passages that the reply so far equals, and a reply may start only where a word starts and end only
where a word ends. So the reply is always a verbatim span of its sources, chosen and ended by the model. It is the
right mode for small local readers and for answers that must be quoted (a policy's figures, a date); it cannot
paraphrase, count or say "no".

The decoding is transformers' ``generate`` on the engine's own model (greedy, or sampling at the agent's
temperature) with :class:`SpanCopyProcessor`; what is written here is only the constraint, which transformers
does not have (its ``prefix_allowed_tokens_fn`` hook works on token ids, and a span of text is reached by many
tokenisations, in particular at its first token, which in the passage carries a leading space).

Characters that the tokenizer spells with several byte tokens (``ø`` in byte-level BPE) are not tokens of their
own: where the reply so far ends in an incomplete character, any byte token is allowed until it completes.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch

_SEP = "\x00"  # between passages: no token's text contains it, so no reply runs from one passage into the next
_MAX_ENDS = 4096  # matching positions looked at per step (a one-letter reply can match everywhere)
_PIECES: dict[int, tuple[dict[str, list[int]], list[int], int]] = {}


def token_pieces(tokenizer: Any) -> tuple[dict[str, list[int]], list[int], int]:
    """Every token's text as it reads after other text -> its ids; the ids of byte tokens that are
    not whole characters; the longest text. Cached per tokenizer object (one decode per vocabulary entry)."""
    key = id(tokenizer)
    if key not in _PIECES:
        anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        base = tokenizer.decode(anchor)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pieces: dict[str, list[int]] = {}
        partial: list[int] = []
        for i in range(len(tokenizer)):
            if i in special:
                continue
            text = tokenizer.decode(anchor + [i])
            text = text[len(base):] if text.startswith(base) else tokenizer.decode([i])
            if "\ufffd" in text:
                partial.append(i)
            elif text and _SEP not in text:
                pieces.setdefault(text, []).append(i)
        _PIECES[key] = (pieces, partial, max((len(p) for p in pieces), default=1))
    return _PIECES[key]


class SpanConstraint:
    """Which tokens may come next so that the reply stays a verbatim span of ``passages``."""

    def __init__(self, tokenizer: Any, passages: Iterable[str], end_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.text = _SEP.join(passages)
        self.pieces, self.partial, self.longest = token_pieces(tokenizer)
        self.end_ids = sorted({int(i) for i in end_ids if i is not None})
        self.starts = [i for i in range(len(self.text)) if self._starts_at_word(i)]

    def _ends(self, reply: str) -> list[int]:
        """Where the text just after a copy of ``reply`` begins, at every place the passages hold it."""
        if not reply:
            return self.starts[:_MAX_ENDS]
        found = [m.start() + len(reply) for m in re.finditer(f"(?={re.escape(reply)})", self.text)]
        return [e for e in found if self._starts_at_word(e - len(reply))][:_MAX_ENDS]

    def _starts_at_word(self, i: int) -> bool:
        return self.text[i].isalnum() and (i == 0 or not self.text[i - 1].isalnum())

    def allowed(self, reply_ids: list[int]) -> list[int]:
        """Token ids that may follow ``reply_ids`` (the reply's tokens so far)."""
        reply = self.tokenizer.decode(reply_ids) if reply_ids else ""
        if reply.endswith("\ufffd"):  # inside a character spelt with several byte tokens
            return self.partial
        ends = self._ends(reply)
        out: set[int] = set()
        text, pieces = self.text, self.pieces
        for e in ends:
            for k in range(1, self.longest + 1):
                s = text[e:e + k]
                if len(s) < k or _SEP in s:
                    break
                ids = pieces.get(s)
                if ids:
                    out.update(ids)
            if e < len(text) and not text[e].isascii():
                out.update(self.partial)  # the next character may need byte tokens
        if reply and any(e >= len(text) or not text[e].isalnum() for e in ends):
            out.update(self.end_ids)  # a reply ends where a word of the passages does, never inside one
        return sorted(out)


class SpanCopyProcessor:
    """A transformers ``LogitsProcessor``: all but :meth:`SpanConstraint.allowed` masked, for every row, each
    row's reply being its ids after ``prompt_len``."""

    def __init__(self, constraint: SpanConstraint, prompt_len: int):
        self.constraint, self.prompt_len = constraint, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):
            allowed = [i for i in self.constraint.allowed(ids) if i < scores.shape[-1]]
            if not allowed:  # nothing matches (a wrong byte inside a character): let it end
                allowed = [i for i in self.constraint.end_ids if i < scores.shape[-1]]
            mask[row, allowed] = 0.0
        return scores + mask


def extractive_reply(engine: Any, messages: list[dict[str, Any]], passages: list[str], *, max_tokens: int = 64,
                     temperature: float = 0.0) -> str:
    """The reply of ``engine`` (an :class:`~lmforge.infer.hf.HfEngine`) to ``messages``, decoded under the
    span constraint over ``passages``."""
    from transformers import LogitsProcessorList

    from lmforge.infer import InferRequest

    tok = engine.tokenizer
    prompt = engine.encode(InferRequest(messages=messages))
    ends = list(getattr(engine, "stop_token_ids", []) or []) + [tok.eos_token_id]
    constraint = SpanConstraint(tok, passages, ends)
    model = engine.model
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    kwargs: dict[str, Any] = dict(do_sample=False)
    if temperature > 0:
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 logits_processor=LogitsProcessorList([SpanCopyProcessor(constraint, len(prompt))]),
                                 eos_token_id=constraint.end_ids or None, pad_token_id=engine.pad_token_id, **kwargs)
    finally:
        model.train(was_training)
    reply = [i for i in out[0, len(prompt):].tolist() if i not in constraint.end_ids and i != engine.pad_token_id]
    return tok.decode(reply, skip_special_tokens=True)
