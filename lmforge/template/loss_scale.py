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
        return [(m.start(), m.end(), r.weight) for r in self.rules for m in r.finditer(text) if m.end() > m.start()]

    @property
    def has_span_rules(self) -> bool:
        return bool(self.rules)

    def cache_key(self) -> str:
        spec = json.dumps([self.base.cache_key(), [(r.pattern, r.weight, r.regex) for r in self.rules]])
        return f"{self.name}:{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def rules_from_json(spec: dict | list, name: str = "rules") -> RuleLossScale:
    """Build a rule strategy from the parsed JSON (see the module docstring for the format)."""
    if isinstance(spec, dict) and "rules" not in spec and "base" not in spec:
        spec = {"rules": [{"pattern": k, "weight": v} for k, v in spec.items()]}
    elif isinstance(spec, list):
        spec = {"rules": spec}
    base_name = spec.get("base", "default")
    base = get_loss_scale(base_name)
    rules = []
    for i, r in enumerate(spec.get("rules", [])):
        if not isinstance(r, dict) or "pattern" not in r or "weight" not in r:
            raise ValueError(f"loss-scale rule {i} of {name!r} needs 'pattern' and 'weight', got {r!r}")
        weight = float(r["weight"])
        if weight < 0:
            raise ValueError(f"loss-scale rule {i} of {name!r} has a negative weight {weight}")
        rules.append(Rule(str(r["pattern"]), weight, bool(r.get("regex", False))))
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
