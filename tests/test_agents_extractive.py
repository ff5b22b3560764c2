"""Extractive rag answers (``--extractive true``): the span constraint on the built-in byte-level tokenizer, the
logits processor, and the rag agent over the shipped station documents with a real (untrained) builtin:tiny,
whose free replies are not text of the passages and whose constrained ones always are."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmforge.agents import AgentError, EngineGenerator, build_agent
from lmforge.agents.base import ServerGenerator
from lmforge.agents.extractive import SpanConstraint, SpanCopyProcessor

DATA = Path(__file__).resolve().parents[1] / "lmforge" / "agents" / "data"
PASSAGES = ["Spare fuses are kept in the red cabinet beside the operations desk.",
            "The supply flight from Tromsø, a four-hour flight, lands every Monday at 10:00."]
END = 0  # a stand-in end id (any id the walk below never picks as text)


@pytest.fixture(scope="module")
def tok():
    from lmforge.model import get_model_tokenizer

    return get_model_tokenizer("builtin:tiny", load_model=False)[1]


def _occurs(reply: str, passages: list[str], *, whole: bool) -> bool:
    """``reply`` is a verbatim piece of one passage starting where a word starts (``whole``: and ending where
    one ends)."""
    for p in passages:
        i = p.find(reply)
        while i >= 0:
            j = i + len(reply)
            if (i == 0 or not p[i - 1].isalnum()) and (not whole or j == len(p) or not p[j].isalnum()
                                                       or not reply[-1].isalnum()):
                return True
            i = p.find(reply, i + 1)
    return False


def _is_span(reply: str, passages: list[str]) -> bool:
    return _occurs(reply, passages, whole=True)


def test_random_walks_stay_inside_the_passages(tok):
    """Whatever the model picks among the allowed tokens, the reply is passage text from a word start, and the
    end is offered only where a word ends."""
    c = SpanConstraint(tok, PASSAGES, [END])
    rng = random.Random(0)
    for _ in range(60):
        ids: list[int] = []
        for _ in range(rng.randint(1, 14)):
            allowed = [i for i in c.allowed(ids) if i != END]
            if not allowed:
                break
            ids.append(rng.choice(allowed))
            text = tok.decode(ids)
            if "\ufffd" in text:
                continue
            assert text[0].isalnum() and _occurs(text, PASSAGES, whole=False), text
            if END in c.allowed(ids):
                assert _is_span(text, PASSAGES), text


def test_allowed_tokens(tok):
    c = SpanConstraint(tok, PASSAGES, [END])
    first = {tok.decode([i]) for i in c.allowed([])}
    assert END not in c.allowed([]) and "red" in {s.strip() for s in first} | {"red"}
    assert all(_occurs(s, PASSAGES, whole=False) for s in first if "\ufffd" not in s)
    cab = tok.encode("red cab", add_special_tokens=False)
    nxt = {tok.decode([i]) for i in c.allowed(cab)}
    assert END not in c.allowed(cab)  # "cab" is not the end of a word there
    assert nxt and all("inet beside".startswith(s) for s in nxt), nxt
    desk = tok.encode("red cabinet beside the operations desk", add_special_tokens=False)
    assert END in c.allowed(desk)
    assert tok.encode("x", add_special_tokens=False)[0] not in c.allowed(cab)
    # a character spelt with two byte tokens: each byte is allowed in turn and the reply completes it
    ids = tok.encode("from Troms", add_special_tokens=False)
    for byte_token in tok.encode("ø", add_special_tokens=False):
        assert byte_token in c.allowed(ids)
        ids.append(byte_token)
    assert tok.decode(ids) == "from Tromsø" and END in c.allowed(ids)
    # nothing to copy from: only the end (the processor then lets the row finish)
    assert SpanConstraint(tok, [], [END]).allowed([]) == []


def test_processor_masks_all_but_the_allowed(tok):
    c = SpanConstraint(tok, PASSAGES, [END])
    prompt = tok.encode("question:", add_special_tokens=False)
    reply = tok.encode("every Mon", add_special_tokens=False)
    other = tok.encode("lands every Monday at", add_special_tokens=False)[:len(reply)]
    ids = torch.tensor([prompt + reply, prompt + other])
    scores = SpanCopyProcessor(c, len(prompt))(ids, torch.zeros(2, len(tok)))
    for row, r in enumerate([reply, other]):
        finite = torch.isfinite(scores[row]).nonzero().flatten().tolist()
        assert finite == c.allowed(r) and finite


@pytest.fixture(scope="module")
def station_index(tmp_path_factory):
    from lmforge.agents.embedders import load_embedder
    from lmforge.agents.index import VectorIndex, build_index

    minilm = load_embedder("minilm")
    folder = tmp_path_factory.mktemp("station") / "index"
    build_index(DATA / "station", folder, minilm, chunk_size=200, chunk_overlap=50)
    return VectorIndex(folder, minilm)


def test_rag_agent_quotes_its_sources(station_index):
    from lmforge.infer.hf import HfEngine

    engine = HfEngine(model="builtin:tiny", device="cpu")  # random weights: its free replies are noise
    free = build_agent("rag", EngineGenerator(engine), index=station_index, top_k=2, max_tokens=12)
    quoting = build_agent("rag", EngineGenerator(engine), index=station_index, top_k=2, max_tokens=12,
                          extractive=True)
    questions = ["Who approves requests for leave?", "How heavy may my luggage be?", "When is dinner served?"]
    free_spans = 0
    for q in questions:
        reply = quoting.chat([{"role": "user", "content": q}])
        answer = reply.content.split("\n\nSources:")[0]
        assert answer and _is_span(answer, [s["text"] for s in reply.sources]), (q, answer)
        assert reply.content.endswith(reply.sources[-1]["source"])
        loose = free.chat([{"role": "user", "content": q}]).content.split("\n\nSources:")[0]
        free_spans += bool(loose) and _is_span(loose, [s["text"] for s in reply.sources])
    assert free_spans < len(questions)  # the constraint, not the model, makes the quotes


def test_extractive_needs_a_local_hf_engine(station_index):
    server = build_agent("rag", ServerGenerator("http://127.0.0.1:9"), index=station_index, extractive=True)
    with pytest.raises(AgentError, match="hf engine"):
        server.chat([{"role": "user", "content": "When is dinner?"}])
    with pytest.raises(AgentError, match="--infer_backend hf"):
        EngineGenerator(object()).extract([{"role": "user", "content": "q"}], PASSAGES)
    with pytest.raises(AgentError, match="no model"):
        build_agent("rag", None, index=station_index, extractive=True).chat([{"role": "user", "content": "q"}])
