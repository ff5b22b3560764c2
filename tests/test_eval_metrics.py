"""Eval metrics on hand-made cases, with the expected values worked out by hand."""
from __future__ import annotations

import math

import pytest

from lmforge.eval.metrics import (answers_equal, auto_metrics, choice_list, corpus_bleu, extract_answer, extract_choice,
                                  get_eval_metric, lcs_length, looks_numeric, modified_precision, parse_number,
                                  reference_letter, rouge_l, rouge_n, sentence_bleu, tokenize)
from lmforge.registry import EVAL_METRICS


def toks(s: str) -> list[str]:
    return s.split()


# ---------------------------------------------------------------------------------------- exact


def test_exact_match_collapses_whitespace_only():
    m = get_eval_metric("exact_match")
    assert m.score_row("  Paris \n", "Paris", {}) == {"exact_match": 1.0}
    assert m.score_row("New   York", "New York", {}) == {"exact_match": 1.0}
    assert m.score_row("paris", "Paris", {}) == {"exact_match": 0.0}  # case matters
    assert m.aggregate([{"exact_match": 1.0}, {"exact_match": 0.0}, {"exact_match": 1.0}], [], [], []) == \
        {"exact_match": pytest.approx(2 / 3)}


# -------------------------------------------------------------------------------------- numeric


@pytest.mark.parametrize("text, number", [
    ("42", 42), ("-7", -7), ("1,234", 1234), ("3.50", 3.5), ("3/4", 0.75), ("\\frac{3}{4}", 0.75),
    ("$12", 12), ("45%", 45), ("+5", 5), (".5", 0.5),
])
def test_parse_number(text, number):
    assert float(parse_number(text)) == pytest.approx(number)


@pytest.mark.parametrize("text", ["abc", "", "1.2.3", "12 apples", None, "3/0"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("text, answer", [
    ("82", "82"),
    ("37 + 45 = 82", "82"),  # the last number
    ("Natalia sold 48 clips in April and 24 in May, 72 in all.\n#### 72", "72"),  # GSM8K's marker
    ("so the total is 1,000 dollars #### 1,000", "1,000"),
    ("first 3, then \\boxed{\\frac{1}{2}}, and 7 is not it", "\\frac{1}{2}"),  # the last \boxed{} wins
    ("\\boxed{x^{2}}", "x^{2}"),  # nested braces
    ("no number here", None),
    (None, None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_numeric_metric_gsm8k_and_arith_styles():
    m = get_eval_metric("numeric")
    gsm_ref = "She has 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18"
    assert m.score_row("She makes 9 * 2 = $18 every day.", gsm_ref, {}) == {"accuracy": 1.0}
    assert m.score_row("The answer is \\boxed{18.0}", gsm_ref, {}) == {"accuracy": 1.0}
    assert m.score_row("16 - 3 - 4 = 9", gsm_ref, {}) == {"accuracy": 0.0}
    assert m.score_row("82", "82", {}) == {"accuracy": 1.0}
    assert m.score_row("83", "82", {}) == {"accuracy": 0.0}
    assert m.score_row("", "82", {}) == {"accuracy": 0.0}
    assert m.extract("so 37 + 45 = 82", {}) == "82"
    assert answers_equal("72", "72.00") and answers_equal("1,000", "1000") and answers_equal("0.5", "1/2")
    assert not answers_equal("72", "27")


def test_looks_numeric():
    assert looks_numeric("82") and looks_numeric(82) and looks_numeric("text\n#### 18")
    assert not looks_numeric("Paris") and not looks_numeric("It is 5 o'clock") and not looks_numeric(None)


# ------------------------------------------------------------------------------ multiple choice


CHOICES = ["Paris", "London", "Rome", "Berlin"]


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("(C)", "C"), ("D.", "D"), ("A)", "A"),
    ("The answer is C.", "C"), ("Answer: (B)", "B"), ("answer is d", "D"),
    ("答案是C", "C"), ("答案：B", "B"),
    ("B. London", "B"), ("(A) Paris, of course", "A"),
    ("Rome", "C"), ("  paris ", "A"),  # the choice's text
    ("I am sure it is B", "B"),  # the only standalone letter
    ("A or B", None), ("Either A or C", None),  # ambiguous
    ("no idea", None), ("E", None), ("", None), (None, None),
])
def test_extract_choice(reply, letter):
    assert extract_choice(reply, CHOICES) == letter


def test_choices_and_reference_forms():
    assert choice_list({"a": "x", "b": "y"}) == [("A", "x"), ("B", "y")]
    assert choice_list('["x", "y"]') == [("A", "x"), ("B", "y")]
    assert reference_letter("C", CHOICES) == "C"
    assert reference_letter(2, CHOICES) == "C"  # a 0-based index
    assert reference_letter("Rome", CHOICES) == "C"
    assert reference_letter("(b)", CHOICES) == "B"
    assert reference_letter("Madrid", CHOICES) is None
    assert reference_letter(9, CHOICES) is None


def test_multiple_choice_metric_generate_and_loglikelihood():
    m = get_eval_metric("multiple_choice")
    row = {"choices": CHOICES}
    assert m.score_row("The answer is A", "A", row) == {"accuracy": 1.0}
    assert m.score_row("The answer is A", 1, row) == {"accuracy": 0.0}
    # log-likelihood: the reply is the letter of the most likely choice; accuracy_norm divides by the
    # choice's length in characters: London (-6 / 6 = -1.0) beats Paris (-5.5 / 5 = -1.1).
    ll_row = {**row, "choice_logprobs": [-5.5, -6.0, -20.0, -21.0]}
    assert m.score_row("A", "B", ll_row) == {"accuracy": 0.0, "accuracy_norm": 1.0}


# ---------------------------------------------------------------------------------------- BLEU


def test_modified_precision_papineni_examples():
    # Papineni et al. (2002), section 2.1: "the the the the the the the" has unigram precision 2/7.
    refs = [toks("The cat is on the mat".lower()), toks("There is a cat on the mat".lower())]
    assert modified_precision(toks("the the the the the the the"), refs, 1) == (2, 7)
    # Example 1's candidate 1 against its three references: 17 of 18 unigrams match.
    cand = toks("It is a guide to action which ensures that the military always obeys the commands of the party")
    r = [toks("It is a guide to action that ensures that the military will forever heed Party commands"),
         toks("It is the guiding principle which guarantees the military forces always being under the command of "
              "the Party"),
         toks("It is the practical guide for the army always to heed the directions of the party")]
    lower = lambda s: [t.lower() for t in s]  # noqa: E731
    assert modified_precision(lower(cand), [lower(x) for x in r], 1) == (17, 18)


def test_sentence_bleu_by_hand():
    ref = toks("the cat sat on the mat")
    assert sentence_bleu(ref, [ref]) == pytest.approx(1.0)
    assert sentence_bleu(toks("dog"), [ref], smooth=False) == 0.0
    # "the cat sat on the" : 5 tokens vs 6 -> brevity penalty exp(1 - 6/5); all n-grams match:
    # p1 = 5/5, p2 = 4/4, p3 = 3/3, p4 = 2/2 -> BLEU = exp(-0.2)
    assert sentence_bleu(toks("the cat sat on the"), [ref]) == pytest.approx(math.exp(1 - 6 / 5))
    # "the cat on the mat" vs ref, smoothed (add one for n > 1):
    # p1 = 5/5, p2 = (3+1)/(4+1), p3 = (1+1)/(3+1), p4 = (0+1)/(2+1); BP = exp(1 - 6/5)
    expected = math.exp(1 - 6 / 5) * (1.0 * 0.8 * 0.5 * (1 / 3)) ** 0.25
    assert sentence_bleu(toks("the cat on the mat"), [ref]) == pytest.approx(expected)
    # several references: the closest reference length sets the brevity penalty
    assert sentence_bleu(toks("the cat sat on the"), [ref, toks("the cat sat on it")]) == pytest.approx(
        sentence_bleu(toks("the cat sat on the"), [toks("the cat sat on the mat"), toks("the cat sat on it")]))


def test_corpus_bleu_sums_counts_before_the_mean():
    a, b = toks("the cat sat on the mat"), toks("a dog ran in the park today")
    assert corpus_bleu([a, b], [[a], [b]]) == pytest.approx(1.0)
    # one perfect sentence, one with no 4-gram match: the corpus score is not the mean of sentence scores
    c = toks("a dog ran home")  # against b: 3 of 4 unigrams, 2 of 3 bigrams, 1 of 2 trigrams, 0 of 1 4-gram
    m = [6 + 3, 5 + 2, 4 + 1, 3 + 0]  # clipped matches for n = 1..4
    t = [6 + 4, 5 + 3, 4 + 2, 3 + 1]
    bp = math.exp(1 - (6 + 7) / (6 + 4))
    expected = bp * math.exp(sum(math.log(x / y) for x, y in zip(m, t)) / 4)
    assert corpus_bleu([a, c], [[a], [b]]) == pytest.approx(expected)


def test_bleu_metric_chinese_by_character():
    m = get_eval_metric("bleu", segmenter="char")
    assert m.score_row("我爱北京天安门", "我爱北京天安门", {}) == {"bleu": pytest.approx(1.0)}
    assert m.score_row("今天天气很好", "我爱北京天安门", {})["bleu"] < 0.2
    agg = m.aggregate([], ["我爱北京天安门", "今天天气很好"], ["我爱北京天安门", "今天天气很好"], [{}, {}])
    assert agg == {"bleu": pytest.approx(1.0)}


# --------------------------------------------------------------------------------------- ROUGE


def test_rouge_by_hand():
    ref, cand = toks("the cat sat on the mat"), toks("the cat on the mat")
    # ROUGE-1: 5 shared unigrams; P = 5/5, R = 5/6 -> F = 10/11
    assert rouge_n(cand, ref, 1) == pytest.approx(10 / 11)
    # ROUGE-2: shared bigrams "the cat", "on the", "the mat" = 3; P = 3/4, R = 3/5 -> F = 2/3
    assert rouge_n(cand, ref, 2) == pytest.approx(2 / 3)
    # ROUGE-L: LCS "the cat on the mat" = 5 -> the same as ROUGE-1 here
    assert lcs_length(cand, ref) == 5
    assert rouge_l(cand, ref) == pytest.approx(10 / 11)
    # word order matters to L but not to 1: "mat the on cat the" keeps only "the on the" in order (LCS 3)
    rev = list(reversed(cand))
    assert rouge_n(rev, ref, 1) == pytest.approx(10 / 11)
    assert lcs_length(rev, ref) == 3
    assert rouge_l(rev, ref) == pytest.approx(2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6))
    assert rouge_n([], ref, 1) == 0.0 and rouge_l(cand, []) == 0.0


def test_rouge_metric_chinese_and_mixed():
    m = get_eval_metric("rouge")
    s = m.score_row("我爱北京", "我爱上海", {})
    assert s["rouge1"] == pytest.approx(0.5)  # 我 爱 shared of 4 characters each
    assert s["rouge2"] == pytest.approx(1 / 3)  # 我爱 shared of 3 bigrams each
    assert s["rougeL"] == pytest.approx(0.5)
    assert tokenize("Hello, 世界! Hello") == ["hello", "世", "界", "hello"]


def test_jieba_segmenter_when_installed():
    pytest.importorskip("jieba")
    words = tokenize("我爱北京天安门", "jieba")
    assert "".join(words) == "我爱北京天安门" and len(words) < 7


def test_unknown_segmenter_and_metric():
    with pytest.raises(ValueError, match="segmenter"):
        tokenize("中文", "spaces")
    with pytest.raises(KeyError, match="exact_match"):
        get_eval_metric("exact_mach")


# ------------------------------------------------------------------------------- user metrics


def test_user_function_metric_registered_from_a_plugin(tmp_path):
    from lmforge.registry import load_plugins

    plugin = tmp_path / "my_eval_plugin.py"
    plugin.write_text(
        "from lmforge.registry import EVAL_METRICS\n"
        "@EVAL_METRICS.register('starts_with_yes')\n"
        "def starts_with_yes(prediction, reference, row):\n"
        "    return prediction.strip().lower().startswith('yes')\n"
        "@EVAL_METRICS.register('length_ratio')\n"
        "def length_ratio(prediction, reference, row):\n"
        "    return {'len_ratio': len(prediction) / max(1, len(reference)), 'nonempty': bool(prediction)}\n")
    load_plugins([str(plugin)])
    m = get_eval_metric("starts_with_yes")
    assert m.score_row("Yes, indeed", "", {}) == {"starts_with_yes": 1.0}
    assert m.score_row("no", "", {}) == {"starts_with_yes": 0.0}
    m2 = get_eval_metric("length_ratio")
    assert m2.score_row("abcd", "ab", {}) == {"len_ratio": 2.0, "nonempty": 1.0}
    assert "starts_with_yes" in EVAL_METRICS.names()


def test_auto_metrics():
    assert auto_metrics([{}, {}], ["82", "7"]) == ["numeric"]
    assert auto_metrics([{}], ["steps...\n#### 18"]) == ["numeric"]
    assert auto_metrics([{"choices": ["a", "b"]}], ["A"]) == ["multiple_choice"]
    assert auto_metrics([{}, {}], ["Paris", "82"]) == ["exact_match", "rouge"]
