"""Final answers of math replies and reference solutions, read as numbers where they are numbers.

``lmforge eval`` finds a reply's answer as its last ``\\boxed{}``, else what follows ``####``, else
its last number (:func:`lmforge.eval.metrics.extract_answer`). That is right for a reply but wrong
for a *reference solution* written as bare LaTeX: ``\\frac{3}{4}`` has no ``\\boxed{}``, so its
"last number" is ``4`` and the correct ``\\boxed{\\frac{3}{4}}`` scores 0 while ``\\boxed{4}``
scores 1. Here a text is first read whole as a math value; only when it is not one is an answer
extracted from it. Why not a symbolic library (sympy, math-verify): rewards run on every sample
of every step and the built-in task needs numbers only; what is not a number is compared as
normalised text.

The one rule for which ``\\boxed{}`` counts: :data:`BOXED` (the last, as ``lmforge eval`` reads it).
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from lmforge.eval.metrics import _last_boxed, answers_equal, extract_answer, parse_number

__all__ = ["BOXED", "PERCENT_MODES", "boxed_content", "math_value", "final_answer", "math_answers_match"]

BOXED = "last"  # which \boxed{} of a text is its answer: the last one (a reply may box intermediate results), as
# lmforge eval reads it (lmforge.eval.metrics._last_boxed); change both together
PERCENT_MODES = ("number", "fraction")  # 50\% is 50, or 0.5 (only when the task says so)

_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_POWER = re.compile(r"^(.+?)\s*\^\s*(?:\{\s*([-+]?\d+)\s*\}|([-+]?\d+))$")
_PRODUCT = re.compile(r"\\times|\\cdot")
# a number-like piece of a reply, for "the last one": a LaTeX fraction, or a number with an optional power
# or percent sign
_LAST_VALUE = re.compile(r"\\[dt]?frac\{[^{}]+\}\{[^{}]+\}"
                         r"|[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*\^\s*(?:\{\s*[-+]?\d+\s*\}|[-+]?\d+))?"
                         r"(?:\s*\\?%)?")


def boxed_content(text: str) -> str | None:
    """Content of the :data:`BOXED` ``\\boxed{...}`` (or ``\\fbox{...}``) of ``text``, braces balanced; None if
    there is none or it is not closed. The rule is ``lmforge eval``'s, so rewards and evaluation agree."""
    return _last_boxed(text)


def _unwrap(s: str) -> str:
    s = s.strip().rstrip(".").strip()
    changed = True
    while changed:
        changed = False
        for a, b in _WRAPPERS:
            if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b):
                s, changed = s[len(a):-len(b)].strip(), True
        if s.startswith(("\\boxed{", "\\fbox{")) and s.endswith("}"):
            inner = boxed_content(s)
            if inner is not None and len(inner) == len(s) - s.index("{") - 2:
                s, changed = inner.strip(), True
    return s


def math_value(text: Any, percent: str = "number") -> Fraction | float | None:
    """``text`` as a number, or None: plain numbers (``1,000``, ``-3.5``, ``3/4``), LaTeX fractions
    (``\\frac{3}{4}``, ``\\dfrac{1}{2}``, ``\\tfrac``), powers (``10^{3}``, ``2^5``), products
    (``2 \\times 10^{3}``), percentages (``50\\%``: 50, or 0.5 with ``percent="fraction"``), an equation's
    right side (``x = 5``), and any of those inside ``$...$``, ``\\(...\\)`` or ``\\boxed{}``."""
    if percent not in PERCENT_MODES:
        raise ValueError(f"percent must be one of {', '.join(PERCENT_MODES)}, got {percent!r}")
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Fraction(text) if isinstance(text, int) else float(text)
    s = _unwrap(str(text))
    if "=" in s:
        s = _unwrap(s.rsplit("=", 1)[1])
    s = re.sub(r"\\[dt]frac", r"\\frac", s).replace("\\left", "").replace("\\right", "").replace("\\!", "")
    if s.endswith("\\%") or s.endswith("%"):
        base = math_value(s[:-2] if s.endswith("\\%") else s[:-1], percent)
        return None if base is None else (Fraction(base) / 100 if percent == "fraction" else base)
    parts = _PRODUCT.split(s)
    if len(parts) == 2:
        a, b = (math_value(p, percent) for p in parts)
        return None if a is None or b is None else _exact(a) * _exact(b)
    m = _POWER.match(s)
    if m:
        base, exp = math_value(m.group(1)), int(m.group(2) or m.group(3))
        if base is None or abs(exp) > 64 or (base == 0 and exp < 0):
            return None
        return _exact(base) ** exp
    return parse_number(s)


def _exact(x: Fraction | float) -> Fraction | float:
    return x if isinstance(x, Fraction) or not math.isfinite(x) else Fraction(x)


def final_answer(text: str | None, percent: str = "number") -> str | None:
    """The answer a text gives: its :data:`BOXED` ``\\boxed{}``; else the whole text when it is one math value
    (a reference written as ``\\frac{3}{4}``); else what follows ``####``; else its last number-like piece (a
    LaTeX fraction counts as one, so "the answer is \\frac{3}{4}" gives ``\\frac{3}{4}``, not ``4``)."""
    if text is None:
        return None
    text = str(text)
    boxed = boxed_content(text)
    if boxed is not None:
        return boxed.strip()
    if math_value(text, percent) is not None:
        return text.strip()
    if "####" in text:
        return extract_answer(text)
    found = [m.group(0) for m in _LAST_VALUE.finditer(text)]
    return found[-1].strip() if found else None


def math_answers_match(completion: str | None, solution: Any, percent: str = "number") -> bool:
    """Do the final answers of ``completion`` and ``solution`` agree? As numbers when both are numbers,
    else as whitespace- and case-normalised text (the whole texts when either has no answer)."""
    if completion is None or solution is None:
        return False
    pred, gold = final_answer(completion, percent), final_answer(str(solution), percent)
    if pred is None or gold is None:
        pred, gold = completion, str(solution)
    x, y = math_value(pred, percent), math_value(gold, percent)
    if x is not None and y is not None:
        return x == y or math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)
    return answers_equal(pred, gold)
