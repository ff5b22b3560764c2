"""Multi-turn rollouts: schedulers that decide when a trajectory ends and what the next turn is.

A GRPO rollout with ``--multi_turn_scheduler NAME`` does, for each sampled trajectory::

    reply = engine.infer(conversation)                 # one model turn
    conversation += reply (text and/or tool calls)
    while not scheduler.check_finished(conversation, reply, turn) and turn < --max_turns:
        conversation += scheduler.step(conversation, reply, row)   # e.g. the tools' results
        reply = engine.infer(conversation); conversation += reply

The reward functions see the last reply as ``completions`` and the whole trajectory as
``messages``. Only the model's own turns are trained: the trajectory is encoded with the
template, whose labels cover assistant replies and tool calls but not tool results or user turns.

Register a scheduler (a class, built with ``max_turns`` and ``--multi_turn_kwargs``) from a
plugin file::

    from lmforge.registry import MULTI_TURN
    from lmforge.rlhf.multi_turn import MultiTurnScheduler

    @MULTI_TURN.register("hint")
    class Hint(MultiTurnScheduler):
        def check_finished(self, messages, choice, turn):
            return super().check_finished(messages, choice, turn) or "42" in (choice.message.content or "")
        def step(self, messages, choice, row):
            return [{"role": "user", "content": "Not quite. Check your arithmetic and try again."}]

Built-in: ``tool_call`` (:class:`ToolCallScheduler`), which runs the tool calls the model makes
(parsed by the template's agent template) and answers with their results.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

from lmforge.registry import MULTI_TURN

__all__ = ["MultiTurnScheduler", "ToolCallScheduler", "build_scheduler", "reply_messages", "calculator", "weather"]

logger = logging.getLogger(__name__)


def reply_messages(choice: Any) -> list[dict]:
    """A generated reply as canonical messages: its text (if any), then one ``tool_call`` per call."""
    msg = choice.message
    out: list[dict] = []
    content = msg.content if isinstance(msg.content, str) else None
    calls = msg.tool_calls or []
    if content or not calls:
        out.append({"role": "assistant", "content": content or ""})
    for call in calls:
        try:
            args = json.loads(call.function.arguments) if call.function.arguments else {}
        except json.JSONDecodeError:
            args = call.function.arguments
        out.append({"role": "tool_call", "content": json.dumps({"name": call.function.name, "arguments": args},
                                                                ensure_ascii=False)})
    return out


class MultiTurnScheduler:
    """Base class: a trajectory ends after ``max_turns`` model turns or a reply cut off at the token limit.

    Subclasses write :meth:`step` (the messages that follow the model's reply) and may extend
    :meth:`check_finished`. ``messages`` always includes the reply being judged.
    """

    def __init__(self, max_turns: int = 3, **kwargs: Any):
        if max_turns < 1:
            raise ValueError(f"--max_turns must be >= 1, got {max_turns}")
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no settings {sorted(kwargs)}")
        self.max_turns = max_turns

    def check_finished(self, messages: list[dict], choice: Any, turn: int) -> bool:
        """True when the trajectory ends after model turn ``turn`` (1-based)."""
        return turn >= self.max_turns or choice.finish_reason == "length"

    def step(self, messages: list[dict], choice: Any, row: dict[str, Any]) -> list[dict]:
        """Messages to append before the model's next turn (a user turn, or ``tool_response`` messages)."""
        raise NotImplementedError(f"{type(self).__name__}.step")


# ----------------------------------------------------------------------------- tools


def calculator(expression: str) -> str:
    """Evaluates numbers with + - * / and brackets exactly (no names, no calls: safe on model output)."""
    from lmforge.rlhf.prm import evaluate_arithmetic

    value = evaluate_arithmetic(str(expression))
    if value is None:
        raise ValueError(f"cannot evaluate {expression!r}")
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.6g}"


def weather(city: str) -> str:
    """A made-up but deterministic forecast (the builtin:tool-calls tool, for offline rollouts)."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(str(city).strip().lower().encode()).digest()[:4], "big")
    return f"{h % 41 - 5} C, {('sunny', 'cloudy', 'rainy', 'windy')[h // 41 % 4]}"


@MULTI_TURN.register("tool_call")
class ToolCallScheduler(MultiTurnScheduler):
    """Runs the model's tool calls and answers with their results until it replies without a call.

    ``tools`` maps a tool name to a Python function called with the call's arguments; the default
    has ``calculator`` and ``weather`` (the tools of ``builtin:tool-calls``). A call to an unknown
    tool, with bad arguments, or that raises, is answered with an ``error: ...`` result, so the model
    sees its mistake (and earns what the rewards give for it). Subclass and set ``tools`` to add yours.
    """

    tools: dict[str, Callable[..., Any]] = {"calculator": calculator, "weather": weather}

    def check_finished(self, messages: list[dict], choice: Any, turn: int) -> bool:
        return super().check_finished(messages, choice, turn) or not choice.message.tool_calls

    def step(self, messages: list[dict], choice: Any, row: dict[str, Any]) -> list[dict]:
        return [{"role": "tool_response", "content": self.run(c.function.name, c.function.arguments)}
                for c in choice.message.tool_calls or []]

    def run(self, name: str, arguments: str | dict) -> str:
        fn = self.tools.get(name)
        if fn is None:
            return f"error: unknown tool {name!r}; tools: {', '.join(sorted(self.tools))}"
        try:
            args = json.loads(arguments) if isinstance(arguments, str) else arguments
            if not isinstance(args, dict):
                return f"error: the arguments of {name} must be a JSON object"
            return str(fn(**args))
        except Exception as e:  # noqa: BLE001 - the model's call failed: tell the model
            return f"error: {type(e).__name__}: {e}"


def build_scheduler(name: str | None, max_turns: int, kwargs: dict[str, Any] | None = None) -> MultiTurnScheduler | None:
    """The scheduler registered as ``name`` (``--multi_turn_scheduler``), or None for single-turn rollouts."""
    if not name:
        return None
    if name not in MULTI_TURN:
        raise ValueError(f"--multi_turn_scheduler: {MULTI_TURN.unknown_message(name)}")
    obj = MULTI_TURN.get(name)
    try:
        scheduler = obj(max_turns=max_turns, **(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"--multi_turn_scheduler {name}: {e} (check --multi_turn_kwargs)") from None
    if not all(callable(getattr(scheduler, m, None)) for m in ("check_finished", "step")):
        raise ValueError(f"--multi_turn_scheduler {name}: needs check_finished and step methods")
    return scheduler
