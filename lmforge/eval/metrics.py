"""Eval metrics: exact match, numeric answers, multiple choice, BLEU, ROUGE, and user metrics.

Every metric scores one row at a time (``score_row`` -> ``{name: value}``, values in [0, 1]) and
then the whole dataset (``aggregate``; the mean of the rows unless the metric is corpus-level, as
BLEU is). They are registered in :data:`lmforge.registry.EVAL_METRICS`; a user metric is a plain
function registered from an ``--external_plugins`` file::

    from lmforge.registry import EVAL_METRICS

    @EVAL_METRICS.register("starts_with_yes")
    def starts_with_yes(prediction: str, reference: str, row: dict) -> float:
        return float(prediction.strip().lower().startswith("yes"))

A function may also return a dict ``{metric name: value}``. The dataset value is the mean over rows.

Why not the usual packages (sacrebleu, rouge-score, nltk): they are not dependencies, each
tokenizes differently, and none segments Chinese. These are the textbook definitions, small
enough to read: BLEU-4 after Papineni et al. (2002) with the add-one smoothing of Lin and Och
(2004) for sentence scores, ROUGE-N and ROUGE-L F1 after Lin (2004).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

from lmforge.registry import EVAL_METRICS

__all__ = [
    "EvalMetric", "FunctionMetric", "get_eval_metric", "normalize_text", "tokenize", "ngrams",
    "extract_answer", "parse_number", "answers_equal", "choice_list", "choice_letters", "reference_letter",
    "extract_choice", "modified_precision", "sentence_bleu", "corpus_bleu", "rouge_n", "rouge_l",
    "lcs_length", "looks_numeric",
]


# ------------------------------------------------------------------------------------------ text


def normalize_text(text: Any) -> str:
    """Whitespace collapsed and stripped (what exact match compares)."""
    return " ".join(str(text if text is not None else "").split())


_CJK = (r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
        r"\U00020000-\U0002a6df")
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+", re.UNICODE)
_CJK_RUN = re.compile(rf"[{_CJK}]")


def tokenize(text: str | None, segmenter: str = "char") -> list[str]:
    """Lower-cased word tokens; punctuation dropped; Chinese (CJK) text split by character or by jieba.

    ``segmenter``: ``char`` (every CJK character is a token: deterministic, no dependency) or
    ``jieba`` (words, when the package is installed).
    """
    out: list[str] = []
    for piece in _TOKEN.findall((text or "").lower()):
        if _CJK_RUN.match(piece):
            if segmenter == "jieba":
                try:
                    import jieba
                except ImportError as e:
                    raise ImportError("--eval_zh_segmenter jieba needs the jieba package (pip install jieba)") from e
                out.extend(w for w in jieba.lcut(piece) if w.strip())
            elif segmenter == "char":
                out.extend(piece)
            else:
                raise ValueError(f"unknown Chinese segmenter {segmenter!r}; expected char or jieba")
        else:
            out.append(piece)
    return out


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# ------------------------------------------------------------------------------ numeric answers

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_FRAC = re.compile(r"^\\d?frac\{([^{}]+)\}\{([^{}]+)\}$")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def parse_number(text: Any) -> Fraction | float | None:
    """``"1,234"``, ``"-3.5"``, ``"3/4"``, ``"\\frac{3}{4}"``, ``"$12"``, ``"45%"`` -> a number; None if not one."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Fraction(text) if isinstance(text, int) else float(text)
    s = str(text).strip().strip("$").replace("\\$", "").replace("\\%", "%").rstrip("%").strip().rstrip(".")
    s = s.replace("\\!", "").replace("{,}", ",")
    m = _FRAC.match(s)
    if m:
        num, den = parse_number(m.group(1)), parse_number(m.group(2))
        return None if num is None or den in (None, 0) else Fraction(num) / Fraction(den)
    if not s or not _NUMBER.fullmatch(s):
        return None
    s = s.replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return None if int(den) == 0 else Fraction(int(num), int(den))
        return Fraction(s) if "." not in s else Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str | None) -> str | None:
    """The final answer in a reply: the last ``\\boxed{}``, else what follows the last ``####``
    (GSM8K's marker), else the last number in the text; None if there is none."""
    if text is None:
        return None
    text = str(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        found = _NUMBER.findall(tail)
        return found[0].strip() if found else (tail.split("\n")[0].strip() or None)
    found = _NUMBER.findall(text)
    return found[-1].strip() if found else None


def answers_equal(a: str | None, b: str | None, rel_tol: float = 1e-6) -> bool:
    """Equal as numbers (``72 == 72.0 == 72.00 == 144/2``) when both are numbers, else as normalized text."""
    if a is None or b is None:
        return False
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return x == y or math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=1e-9)
    return normalize_text(a).lower() == normalize_text(b).lower()


def looks_numeric(reference: Any) -> bool:
    """A reference that is a number, or marks one with ``####`` or ``\\boxed{}`` (auto metric choice)."""
    if reference is None:
        return False
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return True
    s = str(reference)
    if parse_number(s) is not None:
        return True
    return ("####" in s or "\\boxed{" in s) and parse_number(extract_answer(s)) is not None


# ----------------------------------------------------------------------------- multiple choice

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def choice_list(choices: Any) -> list[tuple[str, str]]:
    """``["x", "y"]`` or ``{"A": "x", "B": "y"}`` (or a JSON string of either) -> ``[("A", "x"), ("B", "y")]``."""
    if isinstance(choices, str):
        import json

        choices = json.loads(choices)
    if isinstance(choices, dict):
        return [(str(k).strip().upper(), str(v)) for k, v in choices.items()]
    if isinstance(choices, (list, tuple)):
        if len(choices) > len(LETTERS):
            raise ValueError(f"at most {len(LETTERS)} choices, got {len(choices)}")
        return [(LETTERS[i], str(c)) for i, c in enumerate(choices)]
    raise ValueError(f"choices must be a list or a mapping of letters to texts, got {type(choices).__name__}")


def choice_letters(choices: Any) -> list[str]:
    return [letter for letter, _ in choice_list(choices)]


def reference_letter(answer: Any, choices: Any) -> str | None:
    """The correct letter from an answer given as a letter, a 0-based index or the choice's text."""
    if answer is None:
        return None
    items = choice_list(choices)
    letters = [k for k, _ in items]
    if isinstance(answer, int) and not isinstance(answer, bool):
        return letters[answer] if 0 <= answer < len(letters) else None
    s = str(answer).strip()
    letter = s.strip("()[]. :").upper()
    if letter in letters:
        return letter
    for k, text in items:
        if normalize_text(text).lower() == normalize_text(s).lower():
            return k
    return None


def extract_choice(prediction: str | None, choices: Any) -> str | None:
    """The letter a reply picks, or None when it picks none (or is ambiguous).

    In order: "answer is (B)" / "Answer: B" / "答案是B"; a reply that is only a letter ("B", "(B)",
    "B."); a reply that starts with one ("B. Paris", "(B) ..."); a reply equal to one choice's text; the only
    valid standalone letter in the reply.
    """
    if prediction is None:
        return None
    items = choice_list(choices)
    letters = "".join(k for k, _ in items)
    text = prediction.strip()
    if not text or not letters:
        return None
    cls = f"[{re.escape(letters)}]"
    m = re.search(rf"(?:answer|choice|option)\s*(?:is|:)?\s*[:：]?\s*\(?\s*({cls})\b", text, re.IGNORECASE)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = re.search(rf"(?:答案|选项|选择)\s*(?:是|为|应该是|应选)?\s*[:：]?\s*[(（]?\s*({cls})", text)
    if m:
        return m.group(1)
    m = re.fullmatch(rf"[(\[]?\s*({cls})\s*[)\].:：]?", text)
    if m:
        return m.group(1)
    m = re.match(rf"[(\[]?({cls})(?:[)\].:：,]|\s*\n)", text)
    if m:
        return m.group(1)
    for k, choice in items:
        if normalize_text(choice).lower() == normalize_text(text).lower():
            return k
    found = set(re.findall(rf"(?<![A-Za-z])({cls})(?![A-Za-z])", text))
    return found.pop() if len(found) == 1 else None


# ---------------------------------------------------------------------------------------- BLEU


def modified_precision(candidate: Sequence[str], references: Sequence[Sequence[str]], n: int) -> tuple[int, int]:
    """(clipped n-gram matches, candidate n-grams): each n-gram counts at most as often as in any one reference."""
    cand = ngrams(candidate, n)
    max_ref: Counter = Counter()
    for ref in references:
        for gram, count in ngrams(ref, n).items():
            max_ref[gram] = max(max_ref[gram], count)
    matches = sum(min(count, max_ref[gram]) for gram, count in cand.items())
    return matches, sum(cand.values())


def _closest_ref_length(candidate_len: int, references: Sequence[Sequence[str]]) -> int:
    return min((abs(len(r) - candidate_len), len(r)) for r in references)[1]


def _bleu(matches: list[int], totals: list[int], cand_len: int, ref_len: int, smooth: bool) -> float:
    if cand_len == 0:
        return 0.0
    log_p = 0.0
    for n, (m, t) in enumerate(zip(matches, totals), 1):
        if smooth and n > 1:  # Lin & Och (2004): add one to the counts of n-grams longer than one word
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        log_p += math.log(m / t) / len(matches)
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_p)


def sentence_bleu(candidate: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
                  smooth: bool = True) -> float:
    """BLEU of one tokenized candidate against one or more tokenized references (0..1)."""
    refs = [list(r) for r in references] or [[]]
    stats = [modified_precision(candidate, refs, n) for n in range(1, max_n + 1)]
    return _bleu([m for m, _ in stats], [t for _, t in stats], len(candidate),
                 _closest_ref_length(len(candidate), refs), smooth)


def corpus_bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                max_n: int = 4, smooth: bool = False) -> float:
    """Corpus BLEU: n-gram counts and lengths summed over all sentences before the geometric mean."""
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        refs = [list(r) for r in refs] or [[]]
        for n in range(1, max_n + 1):
            m, t = modified_precision(cand, refs, n)
            matches[n - 1] += m
            totals[n - 1] += t
        cand_len += len(cand)
        ref_len += _closest_ref_length(len(cand), refs)
    return _bleu(matches, totals, cand_len, ref_len, smooth)


# --------------------------------------------------------------------------------------- ROUGE


def _f1(overlap: int, cand_total: int, ref_total: int) -> float:
    if overlap == 0 or cand_total == 0 or ref_total == 0:
        return 0.0
    p, r = overlap / cand_total, overlap / ref_total
    return 2 * p * r / (p + r)


def rouge_n(candidate: Sequence[str], reference: Sequence[str], n: int) -> float:
    """ROUGE-N F1: n-grams shared (clipped) over the candidate's (precision) and the reference's (recall)."""
    cand, ref = ngrams(candidate, n), ngrams(reference, n)
    overlap = sum(min(c, ref[g]) for g, c in cand.items())
    return _f1(overlap, sum(cand.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1: the longest common subsequence over the candidate's and the reference's lengths."""
    return _f1(lcs_length(candidate, reference), len(candidate), len(reference))


# ------------------------------------------------------------------------------------- metrics


class EvalMetric:
    """A dataset metric. ``score_row`` gives one row's values; ``aggregate`` the dataset's (mean by default).

    ``options`` come from the eval arguments (``segmenter`` for BLEU and ROUGE). ``extract`` (optional)
    returns what was read out of a reply (a number, a letter), shown beside it in the predictions file.
    """

    name: str = ""

    def __init__(self, **options: Any):
        self.options = options

    def score_row(self, prediction: str, reference: Any, row: dict) -> dict[str, float]:
        raise NotImplementedError

    def extract(self, prediction: str, row: dict) -> Any:
        return None

    def aggregate(self, scores: list[dict[str, float]], predictions: list[str], references: list[Any],
                  rows: list[dict]) -> dict[str, float]:
        keys = list(dict.fromkeys(k for s in scores for k in s))
        return {k: sum(s.get(k, 0.0) for s in scores) / len(scores) if scores else 0.0 for k in keys}


class FunctionMetric(EvalMetric):
    """A user function ``fn(prediction, reference, row) -> float | bool | dict`` as a metric."""

    def __init__(self, name: str, fn: Callable[..., Any], **options: Any):
        super().__init__(**options)
        self.name, self.fn = name, fn

    def score_row(self, prediction: str, reference: Any, row: dict) -> dict[str, float]:
        value = self.fn(prediction, reference, row)
        if isinstance(value, dict):
            return {str(k): float(v) for k, v in value.items()}
        return {self.name: float(value)}


def get_eval_metric(name: str, **options: Any) -> EvalMetric:
    """The registered metric ``name``: an EvalMetric subclass (built with ``options``), an instance, or a function."""
    obj = EVAL_METRICS.get(name)
    if isinstance(obj, type) and issubclass(obj, EvalMetric):
        metric = obj(**options)
        metric.name = metric.name or name
        return metric
    if isinstance(obj, EvalMetric):
        return obj
    if callable(obj):
        return FunctionMetric(name, obj, **options)
    raise TypeError(f"eval metric {name!r} is a {type(obj).__name__}; expected an EvalMetric or a function")


@EVAL_METRICS.register("exact_match")
class ExactMatch(EvalMetric):
    """1 when the reply equals the reference (whitespace collapsed), else 0."""

    name = "exact_match"

    def score_row(self, prediction, reference, row):
        return {"exact_match": float(normalize_text(prediction) == normalize_text(reference))}


@EVAL_METRICS.register("numeric")
class NumericMatch(EvalMetric):
    """``accuracy``: the reply's final answer (last ``\\boxed{}``, ``####``, or last number) equals the reference's."""

    name = "numeric"

    def extract(self, prediction, row):
        return extract_answer(prediction)

    def score_row(self, prediction, reference, row):
        ref = extract_answer(str(reference)) if reference is not None else None
        return {"accuracy": float(answers_equal(extract_answer(prediction), ref))}


@EVAL_METRICS.register("multiple_choice")
class MultipleChoice(EvalMetric):
    """``accuracy``: the letter picked (read from the reply, or the most likely choice under log-likelihood
    scoring) is the reference's; log-likelihood scoring also gives ``accuracy_norm`` (per-character log-prob)."""

    name = "multiple_choice"

    def extract(self, prediction, row):
        return extract_choice(prediction, row["choices"])

    def score_row(self, prediction, reference, row):
        choices = row["choices"]
        gold = reference_letter(reference, choices)
        out = {"accuracy": float(gold is not None and extract_choice(prediction, choices) == gold)}
        logprobs = row.get("choice_logprobs")
        if logprobs:
            items = choice_list(choices)
            norm = [lp / max(1, len(text)) for lp, (_, text) in zip(logprobs, items)]
            out["accuracy_norm"] = float(items[max(range(len(norm)), key=norm.__getitem__)][0] == gold)
        return out


class _Segmented(EvalMetric):
    def _tokens(self, text: Any) -> list[str]:
        return tokenize(None if text is None else str(text), self.options.get("segmenter") or "char")


@EVAL_METRICS.register("bleu")
class Bleu(_Segmented):
    """``bleu``: corpus BLEU-4 for the dataset; each row's value is its smoothed sentence BLEU-4."""

    name = "bleu"

    def _refs(self, reference: Any) -> list[list[str]]:
        refs = reference if isinstance(reference, (list, tuple)) else [reference]
        return [self._tokens(r) for r in refs]

    def score_row(self, prediction, reference, row):
        return {"bleu": sentence_bleu(self._tokens(prediction), self._refs(reference))}

    def aggregate(self, scores, predictions, references, rows):
        return {"bleu": corpus_bleu([self._tokens(p) for p in predictions], [self._refs(r) for r in references])}


@EVAL_METRICS.register("rouge")
class Rouge(_Segmented):
    """``rouge1``, ``rouge2``, ``rougeL``: F1, averaged over rows."""

    name = "rouge"

    def score_row(self, prediction, reference, row):
        cand, ref = self._tokens(prediction), self._tokens(reference)
        return {"rouge1": rouge_n(cand, ref, 1), "rouge2": rouge_n(cand, ref, 2), "rougeL": rouge_l(cand, ref)}


def auto_metrics(rows: Iterable[dict], references: Iterable[Any]) -> list[str]:
    """Multiple choice if rows carry ``choices``; numeric if every reference is a number; else exact match + ROUGE."""
    rows, references = list(rows), list(references)
    if rows and all(r.get("choices") for r in rows):
        return ["multiple_choice"]
    refs = [r for r in references if r is not None]
    if refs and all(looks_numeric(r) for r in refs):
        return ["numeric"]
    return ["exact_match", "rouge"]
