"""Built-in datasets: self-cognition names, arithmetic determinism and a held-out split."""
from __future__ import annotations

import logging
import re
from collections import Counter

import pytest

from lmforge.dataset import DatasetError, arith_answer_correct, generate_arith, load_dataset
from lmforge.dataset.builtin import arith_in_test_split, self_cognition_rows
from lmforge.registry import DATASETS


def answers(rows):
    return [r["messages"][-1]["content"] for r in rows]


def test_self_cognition_fills_names_per_language():
    rows = self_cognition_rows(["小铁", "Iron"], ["铁匠铺", "Forge Inc"])
    assert 80 <= len(rows) <= 120
    zh = [a for a in answers(rows) if re.search(r"[\u4e00-\u9fff]", a)]
    en = [a for a in answers(rows) if a not in zh]
    assert len(zh) > 30 and len(en) > 30
    assert all("Iron" not in a and "Forge" not in a for a in zh) and any("小铁" in a for a in zh)
    assert all("小铁" not in a for a in en) and any("Iron" in a for a in en) and any("Forge Inc" in a for a in en)
    assert not any("{{" in a for a in answers(rows))
    assert len({r["messages"][0]["content"] for r in rows}) == len(rows)  # varied questions


def test_self_cognition_single_name_and_defaults(caplog):
    train, _ = load_dataset(["builtin:self-cognition"], model_name="Iron", model_author="Forge")
    assert sum("Iron" in a for a in answers(train)) > 60
    with caplog.at_level(logging.WARNING, logger="lmforge.dataset"):
        train, _ = load_dataset(["builtin:self-cognition"])
    assert "--model_name/--model_author not set" in caplog.text
    assert any("lmforge-bot" in a for a in answers(train)) and any("lmforge" in a for a in answers(train))


def test_arith_rows_are_correct_and_deterministic():
    rows = generate_arith()
    assert rows == generate_arith()
    assert rows != generate_arith(seed=1) and sorted(map(str, rows)) == sorted(map(str, generate_arith(seed=1)))
    for r in rows[:500]:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", r["messages"][0]["content"]).groups()
        a, b = int(a), int(b)
        assert 0 <= a <= 99 and 0 <= b <= 99 and (op == "+" or a >= b)
        assert r["solution"] == r["messages"][1]["content"] == str(a + b if op == "+" else a - b)
    ops = Counter(r["messages"][0]["content"].split()[3] for r in rows)
    assert set(ops) == {"+", "-"}


def test_arith_test_split_is_held_out():
    train, test = generate_arith(split="train"), generate_arith(split="test")
    questions = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert not questions(train) & questions(test)
    assert len(train) + len(test) == 100 * 100 + 100 * 101 // 2  # every problem, once
    assert 0.03 < len(test) / (len(train) + len(test)) < 0.07
    assert arith_in_test_split(3, "+", 4) == arith_in_test_split(3, "+", 4)
    # through the loader, sampled with repeats; still disjoint from the held-out split
    big, _ = load_dataset(["builtin:arith#20000"])
    held, _ = load_dataset(["builtin:arith:test"])
    assert len(big) == 20000 and len(held) == len(test)
    assert not questions(big) & questions(held)
    assert set(big["solution"][:100]) <= {str(i) for i in range(199)}


def test_arith_answer_correct():
    assert arith_answer_correct(" 82\n", "82") and arith_answer_correct("82", 82)
    assert not arith_answer_correct("82.0", "82") and not arith_answer_correct(None, "82")


def test_arith_preference_is_a_preference_set():
    train, _ = load_dataset(["builtin:arith-preference#50"])
    for r in train:
        assert r["rejected_response"] != r["messages"][-1]["content"] == r["solution"]
        assert int(r["rejected_response"]) >= 0


def test_unknown_builtin_suggests():
    with pytest.raises(DatasetError, match="Did you mean 'arith'"):
        load_dataset(["builtin:arth"])
    with pytest.raises(DatasetError, match="no split 'test'"):
        load_dataset(["builtin:self-cognition:test"])
    assert {"self-cognition", "arith", "arith-preference"} <= set(DATASETS.names())


def test_rag_reader_rows_are_agent_prompts_answered_from_one_passage():
    import json
    from pathlib import Path

    from lmforge.agents.rag import DEFAULT_SYSTEM
    from lmforge.dataset.rag_reader import generate_rag_reader, reader_answer_correct

    rows = generate_rag_reader("train", 300)
    assert rows == generate_rag_reader("train", 300)  # deterministic
    test = generate_rag_reader("test", 100)
    assert not {r["messages"][0]["content"] for r in rows} & {r["messages"][0]["content"] for r in test}
    for r in rows:  # the system prompt with the passages, then 1-3 questions each answered from one document
        system, *turns = r["messages"]
        assert system["content"].startswith(DEFAULT_SYSTEM + "\n\n[1] (") and turns[1]["content"] == r["solution"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and len(turns) <= 6
        passages = re.split(r"\n\n\[\d\] \(", system["content"])[1:]
        for answer in turns[1::2]:  # one passage, or overlapping chunks of the same file
            holding = {p.split(")")[0] for p in passages if answer["content"] in " ".join(p.split())}
            assert len(holding) == 1, r
        assert {p.split(")")[0] for p in passages if r["solution"] in " ".join(p.split())} == {r["source"]}
    assert len({r["solution"] for r in rows}) > 250  # values are drawn per row: nothing to memorise
    assert Counter(len(re.findall(r"^\[\d\] \(", r["messages"][0]["content"], re.M)) for r in rows).keys() == {1, 2, 3}
    # the station documents and questions (the rag proof's held-out set) are never in the training rows
    data = Path(__file__).resolve().parents[1] / "lmforge" / "agents" / "data"
    station = [json.loads(line) for line in (data / "station_questions.jsonl").read_text().splitlines()]
    text = "\n".join(m["content"] for r in generate_rag_reader("train", 3000) for m in r["messages"])
    assert not [q["question"] for q in station if q["question"] in text]
    text = " ".join(text.split())
    for q in station:  # the extractive answers are the documents' own words, and no sentence of theirs is trained on
        doc = " ".join((data / "station" / q["source"]).read_text().split())
        assert q["span"] is None or q["span"] in doc, q
        assert not [s for s in doc.split(". ") if len(s) > 25 and s in text]
    assert reader_answer_correct(" 480  kilowatt-hours.", "480 kilowatt-hours")
    assert not reader_answer_correct("the batteries store 480 kilowatt-hours " + "x" * 40, "480 kilowatt-hours")
    assert not reader_answer_correct("48 kilowatt-hours", "480 kilowatt-hours")
