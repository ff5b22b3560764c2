"""/v1/embeddings, /v1/rerank and /v1/classify on real pooling engines (builtin:tiny, untrained: the numbers
are checked against the engine itself), driven by the official openai client and httpx: shapes,
base64, dimensions, token-id input, batching of concurrent requests, and the chat server's
limits (auth, body size, character bound, queue) and metrics on these routes."""
from __future__ import annotations

import base64
import threading

import httpx
import numpy as np
import openai
import pytest
import torch

from lmforge.arguments import DeployArguments
from lmforge.infer.pooling import PoolingEngine
from lmforge.serve import create_app
from lmforge.serve.server import ServerThread


@pytest.fixture(scope="module")
def embedder():
    return PoolingEngine("builtin:tiny", task_type="embedding", query_prompt="Query: ", max_model_len=64)


@pytest.fixture(scope="module")
def server(embedder):
    args = DeployArguments(model="builtin:tiny", served_model_name="tiny", api_key="sk-test", max_concurrency=2,
                           max_queue=64, max_request_bytes=20_000)
    with ServerThread(create_app(embedder, args)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)


def _post(server, path, body, key="sk-test"):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_openai_client_embeddings(client, embedder):
    texts = ["What is 12 + 30?", "12 + 30 = 42"]
    default = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 by default
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    want, tokens = embedder.embed(texts)
    assert [d.index for d in default.data] == [0, 1] and default.usage.prompt_tokens == tokens
    for d, f, w in zip(default.data, floats.data, want):
        assert np.allclose(d.embedding, w.numpy(), atol=1e-6) and np.allclose(f.embedding, w.numpy(), atol=1e-6)
        assert abs(np.linalg.norm(d.embedding) - 1) < 1e-5
    short = client.embeddings.create(model="tiny", input="12 + 30 = 42", dimensions=16, encoding_format="float")
    full = want[1][:16]
    assert np.allclose(short.data[0].embedding, (full / full.norm()).numpy(), atol=1e-6)
    ids = client.embeddings.create(model="tiny", input=[[9, 10, 11]], encoding_format="float")
    assert len(ids.data[0].embedding) == 128
    query = client.embeddings.create(model="tiny", input="What is 12 + 30?", encoding_format="float",
                                     extra_body={"input_type": "query"})  # lmforge: the trained query prompt
    assert np.allclose(query.data[0].embedding, embedder.embed(["Query: What is 12 + 30?"])[0][0].numpy(), atol=1e-6)


def test_raw_base64_is_little_endian_float32(server, embedder):
    r = _post(server, "/v1/embeddings", {"model": "tiny", "input": "hello", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, embedder.embed(["hello"])[0][0].numpy(), atol=1e-7)


def test_rerank_on_an_embedding_model_is_cosine(server, embedder):
    docs = ["12 + 30 = 42", {"text": "7 - 3 = 4"}, "hello there"]
    r = _post(server, "/v1/rerank", {"model": "tiny", "query": "What is 12 + 30?", "documents": docs, "top_n": 2})
    body = r.json()
    scores, _ = embedder.rerank("What is 12 + 30?", ["12 + 30 = 42", "7 - 3 = 4", "hello there"])
    order = sorted(range(3), key=lambda i: -scores[i])[:2]
    assert [x["index"] for x in body["results"]] == order
    assert body["results"][0]["relevance_score"] == pytest.approx(scores[order[0]], abs=1e-6)
    assert "document" in body["results"][0] and body["usage"]["total_tokens"] > 0
    bare = _post(server, "/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "return_documents": False})
    assert "document" not in bare.json()["results"][0]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/embeddings", {"model": "tiny", "input": ""}, 400, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": []}, 400, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "dimensions": 0}, 400, "dimensions"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "dimensions": 999}, 400, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": [[1, 99999]]}, 400, "input[0]"),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model"),
    ("/v1/embeddings", {"model": "tiny", "input": "word " * 2000}, 400, "input[0]"),
    ("/v1/embeddings", {"model": "tiny", "input": "word " * 100}, 400, "input[0]"),
    ("/v1/rerank", {"model": "tiny", "query": "", "documents": ["a"]}, 400, "query"),
    ("/v1/rerank", {"model": "tiny", "query": "q", "documents": []}, 400, "documents"),
    ("/v1/classify", {"model": "tiny", "input": "x"}, 400, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, 400, None),
])
def test_bad_requests_name_the_field(server, path, body, status, param):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_auth_body_limit_and_metrics(server):
    assert _post(server, "/v1/embeddings", {"model": "tiny", "input": "x"}, key="wrong").status_code == 401
    assert _post(server, "/v1/embeddings", {"model": "tiny", "input": ["x" * 100] * 300}).status_code == 413
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-test"}).text
    assert 'endpoint="embeddings"' in metrics and 'endpoint="rerank"' in metrics


def test_concurrent_requests_share_batches(embedder, client):
    texts = [f"{a} + {a} = {2 * a}" for a in range(24)]
    want, _ = embedder.embed(texts)
    before = embedder.forward_batches
    got: dict[int, list[float]] = {}

    def one(i: int) -> None:
        got[i] = client.embeddings.create(model="tiny", input=texts[i], encoding_format="float").data[0].embedding

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, w in enumerate(want):
        assert np.allclose(got[i], w.numpy(), atol=1e-5)
    assert embedder.forward_batches - before <= len(texts)  # never more batches than requests; usually fewer


def test_classifier_and_reranker_servers():
    clf = PoolingEngine("builtin:tiny", task_type="seq_cls")
    rr = PoolingEngine("builtin:tiny", task_type="generative_reranker")
    with ServerThread(create_app(clf, DeployArguments(model="builtin:tiny", served_model_name="tiny"))) as srv:
        r = httpx.post(srv.url + "/v1/classify", json={"model": "tiny", "input": ["good", "bad"]}).json()
        probs, _ = clf.classify(["good", "bad"])
        assert [d["label"] for d in r["data"]] == [str(int(p.argmax())) for p in probs]
        assert np.allclose([d["probs"] for d in r["data"]], probs.numpy(), atol=1e-6)
        assert r["data"][0]["num_classes"] == 2
        assert httpx.post(srv.url + "/v1/embeddings", json={"model": "tiny", "input": "x"}).status_code == 400
    with ServerThread(create_app(rr, DeployArguments(model="builtin:tiny", served_model_name="tiny"))) as srv:
        r = httpx.post(srv.url + "/v2/rerank", json={"model": "tiny", "query": "What is 1 + 2?",
                                                     "documents": ["1 + 2 = 3", "4 + 4 = 8"]}).json()
        scores, _ = rr.rerank("What is 1 + 2?", ["1 + 2 = 3", "4 + 4 = 8"])
        assert sorted(x["relevance_score"] for x in r["results"]) == pytest.approx(sorted(scores), abs=1e-6)
        assert all(0 < s < 1 for s in scores)
    assert torch.is_tensor(probs)
