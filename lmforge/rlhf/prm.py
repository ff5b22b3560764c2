"""Process reward models (PRMs): a score for every step of a reply, the built-ins of the ``PRMS`` registry.

An outcome reward (``lmforge.rlhf.rewards``) judges only the final answer; a PRM judges the way
there, step by step (Lightman et al. 2023, "Let's Verify Step by Step", arXiv:2305.20050), so that
best-of-N can prefer a right answer reached by right steps. ``lmforge sample --prm NAME`` ranks
samples by the PRM's steps reduced to one number (``--prm_aggregate``: min, the weakest step, by
default; last; mean; prod).

A PRM is a callable ``prm(completions, **kwargs) -> list[list[float | None]]`` (one score per step;
``None`` for a step it cannot judge), with the same keyword lists as an outcome reward
(``prompts``, ``solution``, ...). Register a class (built with ``--prm_kwargs``) or a function::

    from lmforge.registry import PRMS

    @PRMS.register("no_hedging")
    def no_hedging(completions, **kwargs):
        return [[0.0 if "maybe" in step else 1.0 for step in split_steps(c)] for c in completions]

Built-ins: ``arith_steps`` (checks every ``expression = number`` it finds; no model) and
``reward_model`` (a sequence-classification reward model scoring each prefix of steps).
"""
from __future__ import annotations

import ast
import math
import operator
from fractions import Fraction
from typing import Any, Sequence

from lmforge.registry import PRMS
from lmforge.rlhf.rewards import RewardError

__all__ = ["split_steps", "aggregate_steps", "evaluate_arithmetic", "ArithStepsPRM", "RewardModelPRM", "build_prm", "PRM_AGGREGATES"]

PRM_AGGREGATES = ("min", "last", "mean", "prod")


def split_steps(text: str | None, separator: str = "\n") -> list[str]:
    """The non-empty steps of a reply (lines by default)."""
    return [s.strip() for s in (text or "").split(separator) if s.strip()]


def aggregate_steps(scores: Sequence[float | None], how: str = "min") -> float | None:
    """One number for a reply's step scores (None scores are skipped; None when no step was judged)."""
    values = [float(s) for s in scores if s is not None]
    if not values:
        return None
    if how == "min":
        return min(values)
    if how == "last":
        return values[-1]
    if how == "mean":
        return sum(values) / len(values)
    if how == "prod":
        return math.prod(values)
    raise ValueError(f"--prm_aggregate must be one of {', '.join(PRM_AGGREGATES)}, got {how!r}")


# ----------------------------------------------------------------------------- arithmetic steps

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ARITH = "-+*/×÷()0123456789., \t"


def evaluate_arithmetic(expr: str) -> Fraction | None:
    """An arithmetic expression of numbers, + - * / and brackets, evaluated exactly; None if it is not one."""
    text = expr.replace("×", "*").replace("÷", "/").replace(",", "").strip()
    if not text or len(text) > 200:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("not arithmetic")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError):
        return None


@PRMS.register("arith_steps")
class ArithStepsPRM:
    """Rule-based PRM for worked arithmetic: a step scores 1 when every ``expression = number`` in it is
    right, 0 when one is wrong, and None (not judged) when it holds no such equation.

    Both sides of each ``=`` are the runs of numbers, operators and brackets around it, evaluated
    exactly: ``12 + 30 = 42`` and ``3 × 4 = 12`` are right, ``7 * 8 = 54`` wrong, and a chain is
    checked link by link (``2 + 3 = 5 = 10 / 2``). Steps are split on ``step_separator`` (newline).
    """

    def __init__(self, step_separator: str = "\n"):
        self.sep = step_separator

    @staticmethod
    def score_step(step: str) -> float | None:
        verdicts = []
        for k, ch in enumerate(step):
            if ch != "=":
                continue
            i = k
            while i > 0 and step[i - 1] in _ARITH:
                i -= 1
            j = k + 1
            while j < len(step) and step[j] in _ARITH:
                j += 1
            left, right = evaluate_arithmetic(step[i:k]), evaluate_arithmetic(step[k + 1:j].rstrip(". ,"))
            if left is not None and right is not None:
                verdicts.append(left == right)
        if not verdicts:
            return None
        return 1.0 if all(verdicts) else 0.0

    def __call__(self, completions: list[str], **kwargs: Any) -> list[list[float | None]]:
        return [[self.score_step(s) for s in split_steps(c, self.sep)] for c in completions]


@PRMS.register("reward_model")
class RewardModelPRM:
    """A sequence-classification reward model (``lmforge rlhf --rlhf_type rm``) as a PRM: step k's score is
    the model's reward for the reply cut after step k. ``--prm_kwargs '{"model": "PATH"}'``."""

    def __init__(self, model: str | None = None, step_separator: str = "\n", batch_size: int = 16,
                 device: str | None = None):
        if not model:
            raise RewardError('PRM reward_model needs --prm_kwargs \'{"model": "PATH"}\' (a reward-model checkpoint)')
        from lmforge.rlhf.rewards import RewardModelScorer

        self.scorer = RewardModelScorer(model, device=device, batch_size=batch_size)
        self.sep = step_separator

    def __call__(self, completions: list[str], **kwargs: Any) -> list[list[float | None]]:
        prompts = kwargs.get("prompts")
        if prompts is None:
            raise RewardError("PRM reward_model: the caller passed no 'prompts'")
        convs, owners = [], []
        for i, (c, p) in enumerate(zip(completions, prompts)):
            steps = split_steps(c, self.sep)
            for k in range(len(steps)):
                convs.append([*p, {"role": "assistant", "content": self.sep.join(steps[:k + 1])}])
                owners.append(i)
        scores = self.scorer.score_conversations(convs) if convs else []
        out: list[list[float | None]] = [[] for _ in completions]
        for i, s in zip(owners, scores):
            out[i].append(s)
        return out


def build_prm(name: str, kwargs: dict[str, Any] | None = None) -> Any:
    """The PRM registered as ``name``, built with ``kwargs`` (``--prm_kwargs``) when it is a class."""
    if name not in PRMS:
        raise RewardError(f"--prm: {PRMS.unknown_message(name)}")
    obj = PRMS.get(name)
    if isinstance(obj, type):
        try:
            return obj(**(kwargs or {}))
        except TypeError as e:
            raise RewardError(f"--prm_kwargs for PRM {name!r}: {e}") from None
    if kwargs:
        raise RewardError(f"--prm_kwargs: PRM {name!r} is a plain function and takes no settings")
    return obj
