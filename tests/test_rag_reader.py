"""``builtin:rag-reader``: rows are the rag agent's prompts, varied enough to teach copying rather than one
phrasing, and the shipped station documents (the held-out proof) never leak into them."""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from lmforge.agents.rag import DEFAULT_SYSTEM, system_prompt
from lmforge.dataset.rag_reader import generate_rag_reader

DATA = Path(__file__).resolve().parents[1] / "lmforge" / "agents" / "data"
PASSAGE = re.compile(r"\[(\d+)\] \((.+?)\) ")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate_rag_reader("train", 1000, meta=True)


def passages_of(system: str) -> list[dict]:
    """The ``[n] (file) text`` passages of a system prompt, parsed back."""
    body = system[len(DEFAULT_SYSTEM) + 2:]
    starts = [m for m in PASSAGE.finditer(body) if m.start() == 0 or body[m.start() - 2:m.start()] == "\n\n"]
    starts = [m for i, m in enumerate(starts) if int(m.group(1)) == i + 1]
    ends = [m.start() - 2 for m in starts[1:]] + [len(body)]
    return [{"source": m.group(2), "text": body[m.end():e]} for m, e in zip(starts, ends)]


def test_rows_are_the_agents_prompt_and_each_answer_is_copied_from_its_own_file(rows):
    for r in rows:
        system, *turns = r["messages"]
        assert [m["role"] for m in r["messages"]] == ["system"] + ["user", "assistant"] * (len(turns) // 2)
        passages = passages_of(system["content"])
        assert 1 <= len(passages) <= 3 and system["content"] == system_prompt(DEFAULT_SYSTEM, passages)
        assert turns[1]["content"] == r["solution"] and len(turns) <= 6
        norm = [" ".join(p["text"].split()) for p in passages]
        for i, answer in enumerate(turns[1::2]):
            files = {p["source"] for p, n in zip(passages, norm) if answer["content"] in n}
            assert len(files) == 1, r  # in one or more passages (overlapping chunks), all of one document
            if i == 0:
                assert files == {r["source"]}
        assert len({q["content"] for q in turns[0::2]}) == len(turns) // 2
    assert Counter(len(passages_of(r["messages"][0]["content"])) for r in rows).keys() == {1, 2, 3}
    assert generate_rag_reader("train", 50) == [{k: v for k, v in r.items() if k != "meta"} for r in rows[:50]]
    test = generate_rag_reader("test", 200)
    assert not {r["messages"][0]["content"] for r in rows} & {r["messages"][0]["content"] for r in test}


def test_documents_questions_and_values_vary(rows):
    meta = [r["meta"] for r in rows]
    templates, questions = Counter(m["template"] for m in meta), Counter(m["question"] for m in meta)
    assert len(templates) >= 250 and max(templates.values()) < 60  # sentence and line shapes of the answer
    assert len(questions) >= 150 and len(Counter(m["kind"] for m in meta)) >= 30
    assert {m["style"] for m in meta} == {"prose:sentence", "prose:pred", "prose:pronoun", "prose:two-subjects",
                                          "prose:join0", "prose:join1", "prose:join2", "prose:join3", "kv", "list",
                                          "table:pipes", "table:columns", "bullets"}
    value_first = [t for t in templates if "{W" in t and "{S" in t and t.index("{W") < t.index("{S")]
    assert len(value_first) >= 30
    spans = [r["solution"] for r in rows]
    assert len(set(spans)) > 900
    lengths = Counter(len(s.split()) for s in spans)
    assert lengths[1] > 50 and lengths[3] > 50 and sum(v for k, v in lengths.items() if k >= 6) > 50
    forms = {"24h": r"^\d\d:\d\d$", "am/pm": r"\d ?[ap]\.?m\.?$", "dotted": r"^\d\d?\.\d\d$", "decimal": r"\d\.\d+ \w",
             "range": r"\d+ ?(-|to|and) ?\d", "thousands": r"\d,\d\d\d", "symbol": r"\d ?(kg|km/h|°C|m²|kW|Mbit/s)$",
             "money": r"^[€$£]\d", "title": r"^(Dr\.?|Prof\.|Ms\.|Mr\.|Mrs\.|Capt\.|Rev\.) ", "date": r"^\d{4}-\d\d-\d\d$"}
    for name, pattern in forms.items():
        assert any(re.search(pattern, s) for s in spans), name
    # distractors share words with the question, as a retriever's near misses do
    shared = []
    for r in rows:
        ps = passages_of(r["messages"][0]["content"])
        if len(ps) > 1:
            q = set(re.findall(r"[a-z]{4,}", r["messages"][1]["content"].lower()))
            shared.append(any(q & set(re.findall(r"[a-z]{4,}", p["text"].lower()))
                              for p in ps if r["solution"] not in " ".join(p["text"].split())))
    assert sum(shared) / len(shared) > 0.55


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_the_station_documents_never_reach_the_generator(rows):
    """The proof is answering questions about unseen documents, so: no template shares five words in a row with
    the station documents or four with their questions, no generated row shares six, no station name, question
    or worded answer (four words or more, no number) appears, and the generator does not read the data folder."""
    from lmforge.dataset import rag_facts, rag_lexicon, rag_reader

    docs = [p.read_text(encoding="utf-8") for p in sorted((DATA / "station").glob("*.md"))]
    questions = [json.loads(line) for line in (DATA / "station_questions.jsonl").read_text().splitlines()]
    doc_grams = {n: set().union(*(_grams(_words(d), n) for d in docs)) for n in (5, 6)}
    q_grams = {n: set().union(*(_grams(_words(q["question"]), n) for q in questions)) for n in (4, 6)}
    # every template a fact kind can produce, split at its fields
    rng, templates = random.Random(0), set()
    for kind, (_, _, variants, _) in rag_facts.KINDS.items():
        for variant in variants:
            for _ in range(12):
                fact = rag_facts.make_fact(rng, kind, "the thing", rag_reader._Row(rng), variant)
                templates |= set(fact.preds + fact.sentences + fact.questions)
    fragments = [_words(part) for t in templates for part in re.split(r"\{[^}]*\}", t)]
    assert len(templates) > 600
    assert not [f for f in fragments if _grams(f, 5) & doc_grams[5] or _grams(f, 4) & q_grams[4]]
    # the generated text, both splits
    text = [m["content"] for r in rows + generate_rag_reader("test", 500) for m in r["messages"]]
    assert not [t for t in text if _grams(_words(t), 6) & (doc_grams[6] | q_grams[6])]
    joined = "\n".join(text).lower()
    assert not [q["question"] for q in questions if q["question"].lower() in joined]
    worded = [q["span"] for q in questions if q["span"] and len(q["span"].split()) >= 4 and not re.search(r"\d", q["span"])]
    assert len(worded) >= 6 and not [s for s in worded if s.lower() in joined]  # numbers are drawn: they may match
    lower = set(re.findall(r"\b[a-zø]+\b", " ".join(docs)))  # proper names: capitalised mid-sentence, never lower
    names = {w for d in docs for w in re.findall(r"(?:(?<=[a-z,] )|(?<=Dr\. ))[A-Z][a-zø]+", d) if w.lower() not in lower}
    names -= set(rag_lexicon.MONTHS + rag_lexicon.DAYS)
    assert len(names) >= 6 and not [n for n in names if re.search(rf"\b{n}\b", "\n".join(text))]
    for module in (rag_facts, rag_lexicon, rag_reader):
        source = Path(module.__file__).read_text(encoding="utf-8")
        assert "agents/data" not in source and "station_questions" not in source and "open(" not in source
