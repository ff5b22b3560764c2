"""Loss-scale strategies: which parts of a conversation are trained, and with what weight.

A strategy answers two questions for the template engine:

1. ``message_weights(roles)``: a weight per message (0 = not trained). ``default`` trains every
   assistant turn, ``last_round`` the assistant turns after the last user message, ``all`` every
   message and every token between them (prompts, headers, BOS).
2. ``span_weights(role, text)``: optional weights for sub-spans of one trained turn (the rendered
   reply plus its end-of-turn marker). Rule-based strategies (exact strings or regexes, loaded from
   a JSON file) use it to up- or down-weight parts of a reply; that is what produces a non-0/1
   ``loss_scale`` list.

A per-message ``"loss": true|false`` in the row overrides ``message_weights`` for that message;
the template applies it, so strategies never see it.

Strategies are registered in ``LOSS_SCALES``; ``get_loss_scale`` also accepts a path to a JSON rule
file::

    {"base": "default",                       # optional: default | last_round | all
     "rules": [{"pattern": "<think>\\n\\n</think>\\n\\n", "weight": 0.0},
               {"pattern": "Final answer: .*", "regex": true, "weight": 2.0}]}

A mapping ``{"pattern": weight}`` is accepted as a short form of ``rules`` (exact strings).

Agent data needs one more kind of rule: an exact-string key with two weights,
``[weight_of_key, weight_of_following_text]``. The text after the key, up to the next matched key
(or the end of the turn), takes the second weight: ``"Action Input:": [2.0, 2.0]`` up-weights the
tool-call JSON, ``"Observation:": [0.0, 0.0]`` skips a tool result written inside a reply. Keys and
regexes may also be given as mappings::

    {"base": "default",
     "exact": {"Action:": [2.0, 2.0], "Observation:": [0.0, 0.0]},   # [key, following text]
     "regex": {"<tool_call>.*?</tool_call>": 2.0}}                   # one weight per match

(a rule in ``rules`` takes the two weights as ``"weight": [a, b]``; the short mapping accepts
``{"key": [a, b]}`` too). Built-in agent strategies: ``react``, ``hermes`` (weight the tool call,
skip observations) and ``ignore_empty_think``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

from lmforge.registry import LOSS_SCALES

TRAINED_ROLES = frozenset({"assistant"})


class LossScale:
    """Base strategy: trains every assistant turn with weight 1 (the ``default`` strategy)."""

    name: str = "default"
    #: When true every token is trained by default, including those outside any message.
    all_tokens: bool = False

    def message_weights(self, roles: Sequence[str]) -> list[float]:
        return [1.0 if r in TRAINED_ROLES else 0.0 for r in roles]

    def span_weights(self, role: str, text: str) -> list[tuple[int, int, float]]:
        """Weights for ``[start, end)`` character ranges of one trained turn's text; later ranges win."""
        return []

    @property
    def has_span_rules(self) -> bool:
        return False

    def cache_key(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class LastRoundLossScale(LossScale):
    """Trains only the last round: the assistant turns after the last user message.

    Without tool calls that is the last assistant reply; with them it is the final reply together
    with the tool calls the assistant made to answer the last question.
    """

    name = "last_round"

    def message_weights(self, roles: Sequence[str]) -> list[float]:
        last_user = max((i for i, r in enumerate(roles) if r == "user"), default=-1)
        return [1.0 if r in TRAINED_ROLES and i > last_user else 0.0 for i, r in enumerate(roles)]


class AllLossScale(LossScale):
    """Trains every token (prompts, headers and replies): continued pre-training on chat data."""

    name = "all"
    all_tokens = True

    def message_weights(self, roles: Sequence[str]) -> list[float]:
        return [1.0] * len(roles)


@dataclass
class Rule:
    pattern: str
    weight: float
    regex: bool = False
    follow: float | None = None  # weight of the text after the match, up to the next matched key
    _compiled: re.Pattern | None = field(default=None, repr=False, compare=False)

    def finditer(self, text: str):
        if self._compiled is None:
            self._compiled = re.compile(self.pattern if self.regex else re.escape(self.pattern), re.DOTALL)
        return self._compiled.finditer(text)


class RuleLossScale(LossScale):
    """A base strategy plus weights for exact-string or regex matches inside trained turns."""

    def __init__(self, name: str, base: LossScale, rules: Sequence[Rule]):
        self.name = name
        self.base = base
        self.rules = list(rules)
        self.all_tokens = base.all_tokens

    def message_weights(self, roles: Sequence[str]) -> list[float]:
        return self.base.message_weights(roles)

    def span_weights(self, role: str, text: str) -> list[tuple[int, int, float]]:
        hits = [(m.start(), m.end(), r) for r in self.rules for m in r.finditer(text) if m.end() > m.start()]
        spans = []
        starts = sorted(s for s, _, _ in hits)
        for s, e, r in hits:  # following text first, so that the keys themselves win
            if r.follow is not None:
                nxt = next((k for k in starts if k >= e), len(text))
                if nxt > e:
                    spans.append((e, nxt, r.follow))
        return spans + [(s, e, r.weight) for s, e, r in hits]

    @property
    def has_span_rules(self) -> bool:
        return bool(self.rules)

    def cache_key(self) -> str:
        spec = json.dumps([self.base.cache_key(), [(r.pattern, r.weight, r.regex) + ((r.follow,) if r.follow is not None
                                                                                     else ()) for r in self.rules]])
        return f"{self.name}:{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def rules_from_json(spec: dict | list, name: str = "rules") -> RuleLossScale:
    """Build a rule strategy from the parsed JSON (see the module docstring for the format)."""
    if isinstance(spec, dict) and not {"rules", "base", "exact", "regex"} & set(spec):
        spec = {"rules": [{"pattern": k, "weight": v} for k, v in spec.items()]}
    elif isinstance(spec, list):
        spec = {"rules": spec}
    base_name = spec.get("base", "default")
    base = get_loss_scale(base_name)
    raw = list(spec.get("rules", []))
    raw += [{"pattern": k, "weight": v} for k, v in (spec.get("exact") or {}).items()]
    raw += [{"pattern": k, "weight": v, "regex": True} for k, v in (spec.get("regex") or {}).items()]
    rules = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or "pattern" not in r or "weight" not in r:
            raise ValueError(f"loss-scale rule {i} of {name!r} needs 'pattern' and 'weight', got {r!r}")
        weight, follow = r["weight"], r.get("follow_weight")
        if isinstance(weight, (list, tuple)):
            if len(weight) != 2 or r.get("regex"):
                raise ValueError(f"loss-scale rule {i} of {name!r}: a [key, following] weight pair needs an exact "
                                 f"key and two numbers, got {weight!r}")
            weight, follow = weight
        weight, follow = float(weight), None if follow is None else float(follow)
        if weight < 0 or (follow is not None and follow < 0):
            raise ValueError(f"loss-scale rule {i} of {name!r} has a negative weight")
        rules.append(Rule(str(r["pattern"]), weight, bool(r.get("regex", False)), follow))
    return RuleLossScale(name, base, rules)


def get_loss_scale(name: str | LossScale) -> LossScale:
    """A registered strategy by name, or a rule strategy from a ``.json`` file path."""
    if isinstance(name, LossScale):
        return name
    if name in LOSS_SCALES:
        obj = LOSS_SCALES.get(name)
        return obj() if isinstance(obj, type) else obj
    if str(name).endswith(".json") and os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            return rules_from_json(json.load(f), name=os.path.basename(name))
    raise ValueError(LOSS_SCALES.unknown_message(name) + " (or a path to a JSON rule file)")


LOSS_SCALES.register("default", LossScale())
LOSS_SCALES.register("last_round", LastRoundLossScale())
LOSS_SCALES.register("all", AllLossScale())
# Don't train the empty reasoning block that thinking templates insert when thinking is off.
LOSS_SCALES.register(
    "ignore_empty_think",
    RuleLossScale("ignore_empty_think", LossScale(), [Rule(r"<think>\s*</think>\s*", 0.0, regex=True)]),
)

# Agent strategies, written in the JSON rule-file format (see the module docstring).
AGENT_LOSS_SCALES = {
    # ReAct: the action and its JSON input count double; a tool result written into a reply is not trained.
    "react": {"exact": {"Action:": [2.0, 2.0], "Action Input:": [2.0, 2.0], "Thought:": [1.0, 1.0],
                        "Final Answer:": [1.0, 1.0], "Observation:": [0.0, 0.0]}},
    # <tool_call> JSON counts double; <tool_response> blocks inside a reply are not trained.
    "hermes": {"regex": {r"<tool_call>.*?</tool_call>": 2.0, r"<tool_response>.*?</tool_response>\s*": 0.0}},
}
for _name, _spec in AGENT_LOSS_SCALES.items():
    LOSS_SCALES.register(_name, rules_from_json(_spec, name=_name))
