"""Rendering through a jinja chat template, and finding each message's characters in the result.

The engine never re-implements a model's prompt format: it renders with the tokenizer's own
``apply_chat_template`` (or a registered jinja string passed to it) and finds where each message
landed by rendering prefixes of the conversation:

* the context of message ``i`` is ``render(messages[:i])`` (with the generation prompt when ``i``
  is an assistant turn); when it is a prefix of the full rendering, message ``i`` starts where it
  ends;
* message ``i`` ends where ``render(messages[:i + 1])`` ends, when that is a prefix of the full
  rendering too.

Templates that break this prefix property (Qwen3-style templates render a reply differently
depending on what follows it) are handled where the break is harmless, and otherwise each
assistant reply is found in the full rendering by its role header (probed once per template,
:func:`probe_assistant_header`) and the end-of-turn marker, so every reply carries loss exactly as
the full rendering shows it (see ``SpanLocator.locate``). Each fallback is reported once.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

logger = logging.getLogger("lmforge.template")

_warned: set = set()


def warn_once(message: str, key: Any = None) -> None:
    """Log ``message`` once per process (per ``key``): a template quirk is worth one line, not one per row."""
    key = message if key is None else key
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first differing position; a[:lo] == b[:lo] always holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def render_chat(tokenizer: Any, messages: list[dict], *, chat_template: str | None = None,
                tools: list[dict] | None = None, add_generation_prompt: bool = False,
                continue_final_message: bool = False, template_kwargs: dict | None = None) -> str:
    """Render with transformers' own chat-template machinery, so the text matches it exactly."""
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
        **(template_kwargs or {}))


_PROBE_REPLY = "lmforge-probe-reply"


def probe_end_of_turn(render: Callable[..., str]) -> str | None:
    """The marker a template puts after an assistant reply (``<|im_end|>``, ``<|eot_id|>``, ``</s>``).

    Compares the text after a probe reply when it is the last message with the text after it when
    a user turn follows; their common start, cut back to whitespace and stripped, is the marker.
    """
    for head in ([], [{"role": "system", "content": "S"}]):
        user = [{"role": "user", "content": "Q"}]
        reply = [{"role": "assistant", "content": _PROBE_REPLY}]
        try:
            last = render(head + user + reply)
            more = render(head + user + reply + [{"role": "user", "content": "Q2"}])
        except Exception:  # noqa: BLE001 - a template may reject the probe; try the next shape
            continue
        if _PROBE_REPLY not in last or _PROBE_REPLY not in more:
            return None
        a = last[last.rindex(_PROBE_REPLY) + len(_PROBE_REPLY):]
        b = more[more.index(_PROBE_REPLY) + len(_PROBE_REPLY):]
        n = common_prefix_len(a, b)
        common = a[:n]
        if n < len(a.rstrip()):  # the two differ inside the marker area: keep whole pieces only
            cut = max(common.rfind(c) for c in " \n\t")
            common = common[:cut] if cut > 0 else common
        return common.strip() or None
    return None


def probe_assistant_header(render: Callable[..., str]) -> str | None:
    """The text a template puts before an assistant reply that is neither the last message nor the latest
    reply (``<|im_start|>assistant\n``): what follows ``render([user])`` in ``render([user, reply, user,
    reply2])`` up to the first reply. Templates add to the latest reply (think blocks), so it is not probed.

    A template that renders the last user turn differently (``render([user])`` is then no prefix) gets the
    text that precedes both of two earlier replies instead, which starts with the user turn's closing marker.
    """
    user = [{"role": "user", "content": "Q"}]
    probe = [{"role": "assistant", "content": _PROBE_REPLY}, {"role": "user", "content": "Q2"},
             {"role": "assistant", "content": _PROBE_REPLY + "2"}, {"role": "user", "content": "Q3"},
             {"role": "assistant", "content": "R3"}]
    for head in ([], [{"role": "system", "content": "S"}]):
        try:
            base = render(head + user)
            more = render(head + user + probe)
        except Exception:  # noqa: BLE001 - a template may reject the probe; try the next shape
            continue
        if _PROBE_REPLY not in more:
            continue
        first = more.index(_PROBE_REPLY)
        if more.startswith(base) and first >= len(base):
            return more[len(base):first] or None
        second = more.find(_PROBE_REPLY + "2", first + len(_PROBE_REPLY))
        if second > 0:
            a, b = more[:first][::-1], more[:second][::-1]
            common = a[:common_prefix_len(a, b)][::-1]
            return common or None
    return None


class SpanLocator:
    """Character spans of messages inside the full rendering of one conversation.

    ``render(k, gen)`` renders ``messages[:k]``; results are memoised because neighbouring
    messages share renders (the end of message ``i`` is the context of message ``i + 1``).
    """

    def __init__(self, render: Callable[[list[dict], bool], str], messages: list[dict], full: str,
                 end_of_turn: str | None, template_name: str, header: str | None = None):
        self._render = render
        self.messages = messages
        self.full = full
        self.end_of_turn = end_of_turn
        self.template_name = template_name
        self.header = header
        self._floor = 0  # end of the last span located: a later message starts after it
        self._cache: dict[tuple[int, bool], str | None] = {(len(messages), False): full}

    def prefix(self, k: int, gen: bool = False) -> str | None:
        """Rendering of ``messages[:k]``, or None if the template refuses that prefix."""
        if k == 0:
            return ""
        key = (k, gen)
        if key not in self._cache:
            try:
                self._cache[key] = self._render(self.messages[:k], gen)
            except Exception:  # noqa: BLE001 - e.g. a template that demands a user turn first
                self._cache[key] = None
        return self._cache[key]

    def _note(self, i: int, what: str) -> None:
        warn_once(f"template {self.template_name!r}: {what}. Falling back for such turns; see "
                  f"SpanLocator.locate in lmforge/template/jinja.py (first seen at message {i}).",
                  key=(self.template_name, what))

    def locate(self, i: int) -> tuple[int, int] | None:
        """``[start, end)`` of message ``i`` in the full rendering, or None when it cannot be found.

        Messages are located in order. For an assistant turn the span starts after the generation
        prompt, so it holds exactly what the model generates: the reply and the end-of-turn marker.
        Text after the marker up to the next turn (usually a newline) is left out: the model stops at
        the marker and never generates it. Cases handled, in order:

        1. prefix property holds: exact span.
        2. only text after the turn differs (a template appending EOS to the whole conversation):
           the turn ends where the two renderings part, provided the reply lies before that.
        3. the turn renders differently once later turns follow (earlier ``<think>`` dropped): the
           turn is labelled as it appears in the full rendering, from its start to the
           end-of-turn marker. Warned once.
        4. the generation prompt differs from how the turn starts in the conversation (a forced or an
           empty ``<think>`` block in the prompt): the span starts after the assistant header in the
           full rendering, or where the two part when the header is not there. Warned once.
        5. the context itself renders differently (a system prompt moved to the last user turn, a
           reply rendered one way as the last message and another way before a later turn): the
           reply is found by its assistant header after the previous span and ends at the
           end-of-turn marker. Warned once. Only a template without a probeable header or marker
           leaves a reply untrained, and says so.
        """
        span = self._locate(i)
        if span is not None:
            self._floor = span[1]
        return span

    def _locate(self, i: int) -> tuple[int, int] | None:
        full, msg = self.full, self.messages[i]
        is_reply = msg["role"] == "assistant"
        context = self.prefix(i, is_reply)
        if context is not None and full.startswith(context) and len(context) >= self._floor:
            start = len(context)
        else:
            plain = self.prefix(i, False) if is_reply else context
            n = common_prefix_len(context, full) if context is not None else 0
            if is_reply and plain is not None and full.startswith(plain) and n >= len(plain) >= self._floor:
                self._note(i, "the generation prompt differs from how the assistant turn starts in the "
                              "conversation; labels start after the assistant header")
                header = self.header
                start = len(plain) + len(header) if header and full.startswith(header, len(plain)) else n
            elif is_reply:
                return self._by_header(i)
            else:
                self._note(i, "the conversation before this message renders differently once later turns "
                              "follow, so the message cannot be located; it is not trained")
                return None
        end = self._end(i, start, context or "")
        if end is None:
            self._note(i, "the message renders differently once later turns follow and no end-of-turn "
                          "marker was found; it is not trained")
            return None
        return self._trim(start, end)

    def _by_header(self, i: int) -> tuple[int, int] | None:
        """Case 5: the reply after the next assistant header past the previous span, up to the end-of-turn marker."""
        full, header, eot = self.full, self.header, self.end_of_turn
        k = full.find(header, self._floor) if header else -1
        end = full.find(eot, k + len(header)) if k >= 0 and eot else -1
        if end < 0:
            self._note(i, "the conversation before this reply renders differently once later turns follow and "
                          "the template has no probeable assistant header or end-of-turn marker; the reply is "
                          "not trained")
            return None
        self._note(i, "the conversation before this reply renders differently once later turns follow; the reply "
                      "is found by its assistant header and labelled as the full conversation shows it")
        return self._trim(k + len(header), end + len(eot))

    def _end(self, i: int, start: int, context: str) -> int | None:
        full = self.full
        alone = self.prefix(i + 1)
        if alone is not None and full.startswith(alone) and len(alone) > start:
            return len(alone)
        content = self.messages[i].get("content") or ""
        if alone is not None and content:  # an empty content (a tool call) gives no anchor for case 2
            n = common_prefix_len(alone, full)
            own_start = len(context) if alone.startswith(context) else common_prefix_len(context, alone)
            pos = alone.find(content, own_start)
            if n > start and pos >= 0 and n >= pos + len(content):
                return n  # case 2: only what follows the message differs
        if self.end_of_turn:
            k = full.find(self.end_of_turn, start)
            if k >= 0:
                self._note(i, "the message renders differently once later turns follow (e.g. earlier "
                              "reasoning is dropped), so the prefix property does not hold; it is "
                              "labelled as it appears in the full conversation")
                return k + len(self.end_of_turn)
        return None

    def _trim(self, start: int, end: int) -> tuple[int, int] | None:
        """End the span at its last end-of-turn marker, or drop trailing whitespace when there is none."""
        text = self.full[start:end]
        eot = self.end_of_turn
        if eot and eot in text:
            end = start + text.rindex(eot) + len(eot)
        elif text.strip():
            end = start + len(text.rstrip())
        return (start, end) if end > start else None
