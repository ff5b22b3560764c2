"""Generated tokens -> OpenAI stream chunks for one request's ``n`` choices (shared by the hf and native engines).

The engine hands over steps: ``(token of each choice, logprob entry of each choice or None)``. Several
steps may be given at once (a consumer that fell behind, or an engine that reports per step): they
become one chunk, each choice's new text decoded once, so the host work per chunk does not grow with
the number of tokens it carries. The pieces add up to the non-streaming reply: each is cut from the
decoded reply so far, holding back an incomplete character or a possible stop string until it is settled.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from lmforge.infer.protocol import (ChatCompletionStreamResponse, ChoiceLogprobs, DeltaMessage, StreamChoice,
                                    TokenLogprob, Usage, _id)
from lmforge.infer.utils import IncrementalDecoder, StopStrings

Step = tuple[Sequence[int], Optional[Sequence[TokenLogprob]]]


class ReplyStream:
    """Chunk builder for one streamed request; ``engine`` supplies ``_decode``, ``stop_words``,
    ``stop_token_ids``, ``template``, ``model_name`` and ``_choice_message`` (an :class:`HfEngine`)."""

    def __init__(self, engine: Any, job: Any, cfg: Any):
        self.engine, self.job, self.cfg, self.n = engine, job, cfg, cfg.n
        self.stop = StopStrings([*cfg.stop, *engine.stop_words])
        # Windowed: each push decodes the new tokens (and a few before them), not the whole reply so far.
        # Without a tokenizer call where the template allows (byte-level BPE): each token's bytes, decoded as UTF-8.
        tpl = engine.template
        hold = {*engine.stop_token_ids, getattr(engine, "pad_token_id", None), *tpl.decode_cut_ids()} - {None}
        table = tpl.token_bytes()
        self.decoders = [IncrementalDecoder(engine._decode, self.stop, window=True, hold_ids=hold, token_bytes=table,
                                            strip=tpl.strip_stop_words) for _ in range(cfg.n)]
        # Text that may be a tool call is held back (from ``<tool_call>`` on, say) and sent as
        # ``delta.tool_calls`` in the last chunk once the whole reply has been parsed.
        agent = getattr(engine.template, "agent_template", None)
        self.hold = getattr(agent, "stream_hold", None) if job.request.tools else None
        self.settled = [""] * cfg.n  # text the decoder has let out so far
        self.shown = [0] * cfg.n  # how much of it has been sent
        self.done = [False] * cfg.n
        self.pending: list[list[TokenLogprob]] = [[] for _ in range(cfg.n)]  # logprobs of tokens not sent yet
        self.sent = [0] * cfg.n  # logprob entries sent per choice
        self.stop_ids = set(engine.stop_token_ids) if not cfg.ignore_eos else set()
        self.chunk_id, self.created = _id("chatcmpl"), int(time.time())
        self.model = job.request.adapter or engine.model_name

    def chunk(self, choices: list[StreamChoice], usage: Usage | None = None) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=self.chunk_id, created=self.created, model=self.model,
                                            choices=choices, usage=usage)

    def first(self) -> ChatCompletionStreamResponse:
        return self.chunk([StreamChoice(index=r, delta=DeltaMessage(role="assistant", content=""))
                           for r in range(self.n)])

    def _take_logprobs(self, r: int) -> ChoiceLogprobs | None:
        if not self.cfg.logprobs:
            return None
        out, self.pending[r] = self.pending[r], []
        self.sent[r] += len(out)
        return ChoiceLogprobs(content=out)

    def steps(self, steps: Sequence[Step]) -> ChatCompletionStreamResponse | None:
        """One chunk for any number of steps (None when nothing is settled yet)."""
        new: list[list[int]] = [[] for _ in range(self.n)]
        # A stop string may end a choice mid-batch; its text is cut there either way, but the logprob entries of
        # the tokens after it must not be sent: with logprobs and stop strings, decode token by token.
        per_token = bool(self.stop) and bool(self.cfg.logprobs)
        deltas = [""] * self.n
        for tokens, entries in steps:
            for r, tok in enumerate(tokens):
                if self.done[r]:
                    continue
                if entries is not None:
                    self.pending[r].append(entries[r])
                if tok in self.stop_ids:
                    self.done[r] = True
                    continue
                dec = self.decoders[r]
                if per_token:
                    deltas[r] += dec.push((tok,))
                    self.done[r] = dec.stopped or len(dec.ids) >= self.job.max_tokens
                else:
                    new[r].append(tok)
                    self.done[r] = len(dec.ids) + len(new[r]) >= self.job.max_tokens
        choices = []
        for r in range(self.n):
            delta = deltas[r] + (self.decoders[r].push(new[r]) if new[r] else "")
            if self.hold is not None and delta:
                self.settled[r] += delta
                cut = self.settled[r][:self.hold(self.settled[r])]
                end = max(self.shown[r], len(cut.rstrip()))  # trailing space too: parsed content is stripped
                delta, self.shown[r] = self.settled[r][self.shown[r]:end], end
            if delta:
                choices.append(StreamChoice(index=r, delta=DeltaMessage(content=delta),
                                            logprobs=self._take_logprobs(r)))
        return self.chunk(choices) if choices else None

    def final(self, rows: Sequence[Any]) -> ChatCompletionStreamResponse:
        """The last chunk: the rest of each reply (exactly the non-streaming text), tool calls, finish reason, usage."""
        final = []
        for r, row in enumerate(rows):
            message, reason = self.engine._choice_message(row, bool(self.job.request.tools))
            rest = self.decoders[r].finish(row.text)
            if self.hold is not None:
                sent_text = self.settled[r][:self.shown[r]]
                rest = (row.text if not message.tool_calls else (message.content or ""))
                rest = rest[len(sent_text):] if rest.startswith(sent_text) else ""
            if row.logprobs is not None:  # the final table is exact: send the part not sent yet
                self.pending[r] = row.logprobs[self.sent[r]:]
            tool_calls = ([{"index": i, **c.model_dump()} for i, c in enumerate(message.tool_calls)]
                          if message.tool_calls else None)
            final.append(StreamChoice(index=r, delta=DeltaMessage(content=rest or None, tool_calls=tool_calls),
                                      finish_reason=reason, logprobs=self._take_logprobs(r)))
        completion = sum(len(r.token_ids) for r in rows)
        prompt = len(self.job.input_ids)
        return self.chunk(final, Usage(prompt_tokens=prompt, completion_tokens=completion,
                                       total_tokens=prompt + completion))
