"""RL data: ``builtin:arith-preference``, ``builtin:arith-rl`` and pairs made from a model's own samples.

``arith-preference`` pairs every ``builtin:arith`` question with its right answer (chosen) and a
wrong answer of the kind a half-trained model actually gives (rejected): off by one, off by ten,
two digits swapped, or a column added/subtracted without its carry/borrow. Near misses make the
preference hard to fake: the pair differs in one or two digit tokens. The rows are deterministic
(the kind of error depends on the question alone) and the ``test`` split holds exactly the
held-out ``builtin:arith:test`` questions, so a DPO run can be scored on questions SFT never saw.

``arith-rl`` holds the same questions as prompts only (no answer message) with the answer in a
``solution`` column, the shape GRPO wants (``--reward_funcs accuracy`` compares against it); its
``test`` split is again exactly ``builtin:arith:test``.

``pairs_from_samples`` turns a model's sampled answers into the same kind of rows, for
on-policy preference data (sample, check, pair, train again), or ranks them by scores
(``lmforge sample --sample_format dpo``).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lmforge.dataset.builtin import BuiltinContext, BuiltinDataset, arith_answer_correct, generate_arith
from lmforge.registry import DATASETS

__all__ = ["ERROR_KINDS", "arith_preference_rows", "arith_rl_rows", "pairs_from_samples", "plausible_wrong_answer"]

ERROR_KINDS = ("off_by_one", "off_by_ten", "digit_swap", "wrong_carry")
_QUESTION = re.compile(r"What is (\d+) ([+\-*]) (\d+)\?")


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)]


def _no_carry(a: int, op: str, b: int) -> int | None:
    """The answer computed column by column without carrying (``+``) or borrowing (``-``: the
    smaller digit taken from the larger), the classic written-arithmetic slip; None for ``*``."""
    if op not in "+-":
        return None
    width = max(len(str(a)), len(str(b)))
    cols = zip(_digits(a, width), _digits(b, width))
    digits = [(x + y) % 10 if op == "+" else abs(x - y) for x, y in cols]
    return int("".join(map(str, digits)))


def _swap_digits(n: int) -> int | None:
    """The last two digits swapped (82 -> 28, 105 -> 150); None when that changes nothing."""
    s = str(n)
    if len(s) < 2 or s[-1] == s[-2]:
        return None
    swapped = s[:-2] + s[-1] + s[-2]
    return int(swapped) if not (swapped.startswith("0") and len(swapped) > 1) else None


def plausible_wrong_answer(a: int, op: str, b: int) -> tuple[int, str]:
    """A wrong answer to ``a op b`` and its kind (one of ``ERROR_KINDS``), chosen by a hash of the problem.

    When the drawn kind does not apply (no carry happened, a one-digit answer cannot be swapped)
    the next kind is tried, so every problem gets a wrong answer; answers stay non-negative.
    """
    right = {"+": a + b, "-": a - b, "*": a * b}[op]
    digest = hashlib.sha256(f"arith-preference:{a}{op}{b}".encode()).digest()
    sign = 1 if digest[1] % 2 else -1
    start = digest[0] % len(ERROR_KINDS)
    for k in range(len(ERROR_KINDS)):
        kind = ERROR_KINDS[(start + k) % len(ERROR_KINDS)]
        if kind in ("off_by_one", "off_by_ten"):
            step = 1 if kind == "off_by_one" else 10
            wrong = right + sign * step if right + sign * step >= 0 else right + step
        elif kind == "digit_swap":
            wrong = _swap_digits(right)
        else:
            wrong = _no_carry(a, op, b)
        if wrong is not None and wrong != right and wrong >= 0:
            return wrong, kind
    raise AssertionError("off_by_one always applies")  # pragma: no cover


def arith_preference_rows(split: str = "train", seed: int = 0) -> list[dict]:
    """One preference row per ``builtin:arith`` question of ``split``: right answer over a plausible wrong one."""
    rows = []
    for row in generate_arith(split=split, seed=seed):
        question = row["messages"][0]["content"]
        m = _QUESTION.fullmatch(question)
        if m is None:  # pragma: no cover - generate_arith writes exactly this form
            raise ValueError(f"unexpected arith question {question!r}")
        wrong, kind = plausible_wrong_answer(int(m.group(1)), m.group(2), int(m.group(3)))
        rows.append({**row, "rejected_response": str(wrong), "error_kind": kind})
    return rows


def arith_rl_rows(split: str = "train", seed: int = 0) -> list[dict]:
    """``builtin:arith`` questions of ``split`` as prompts (the user turn only) with the answer in ``solution``."""
    return [{"messages": row["messages"][:1], "solution": row["solution"]} for row in generate_arith(split=split, seed=seed)]


def pairs_from_samples(rows: Iterable[dict], samples: Iterable[Sequence[str]], *,
                       is_correct: Callable[[str, str], bool] = arith_answer_correct,
                       use_reference_if_none_correct: bool = True,
                       scores: Iterable[Sequence[float]] | None = None, min_score: float | None = None) -> list[dict]:
    """Preference rows from a model's own sampled replies to ``rows``.

    By correctness (each row with a ``solution``): the first correct sample is chosen (or the row's
    reference reply when no sample is right and ``use_reference_if_none_correct``) and the first
    wrong sample rejected; rows where every sample is right teach no preference and are skipped.

    By ``scores`` (one list per row, a score per sample, as ``lmforge sample`` computes them): the
    best-scored sample is chosen and the worst rejected; a row is skipped when they tie or when the
    best scores below ``min_score``.

    The rows' last message must be the user turn or the reference assistant reply (which is replaced).
    """
    out = []
    score_lists = iter(scores) if scores is not None else None
    for row, replies in zip(rows, samples):
        messages = list(row["messages"])
        reference = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
        if score_lists is not None:
            s = list(next(score_lists))
            best = max(range(len(replies)), key=lambda k: s[k], default=None)
            worst = min(range(len(replies)), key=lambda k: s[k], default=None)
            if best is None or s[best] <= s[worst] or (min_score is not None and s[best] < min_score):
                continue
            right, wrong = replies[best], replies[worst]
        else:
            solution = row["solution"]
            right = next((r for r in replies if is_correct(r, solution)), None)
            wrong = next((r for r in replies if not is_correct(r, solution)), None)
            if right is None and use_reference_if_none_correct:
                right = reference if reference is not None else str(solution)
            if right is None or wrong is None:
                continue
        extra = {k: v for k, v in row.items()
                 if v is not None and k not in ("messages", "rejected_response", "rejected_messages", "label")}
        out.append({**extra, "messages": [*messages, {"role": "assistant", "content": right}],
                    "rejected_response": wrong})
    return out


def _load(split: str, ctx: BuiltinContext) -> list[dict]:
    return arith_preference_rows(split=split)


def _load_rl(split: str, ctx: BuiltinContext) -> list[dict]:
    return arith_rl_rows(split=split)


DATASETS.register(
    "arith-preference",
    BuiltinDataset(
        "arith-preference",
        _load,
        splits=("train", "test"),
        description="every arith question: the right answer (chosen) over an off-by-one, off-by-ten, digit-swap or "
                    "no-carry answer (rejected_response); test = the held-out arith:test questions",
        # the rows are generated by this file: any edit to it invalidates cached encodings
        version=hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12],
    ),
)
DATASETS.register(
    "arith-rl",
    BuiltinDataset(
        "arith-rl",
        _load_rl,
        splits=("train", "test"),
        description="every arith question as a prompt only (for GRPO), the answer in 'solution'; test = the "
                    "held-out arith:test questions",
        version=hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12],
    ),
)
