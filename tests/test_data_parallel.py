"""``--data_parallel_size``: two engine replicas (CPU processes here, one GPU each elsewhere) answer exactly
what one engine answers, in order, through infer, streams, eval and one server in front."""
from __future__ import annotations

import pytest

from lmforge.infer import InferRequest, RequestConfig
from lmforge.infer.errors import InferRequestError, PromptTooLongError

QUESTIONS = [f"What is {a} + {b}?" for a, b in zip(range(10, 20), range(30, 40))]


@pytest.fixture(scope="module")
def dp_engine():
    from lmforge.infer.data_parallel import DataParallelEngine

    engine = DataParallelEngine("hf", ["cpu", "cpu"], model="builtin:tiny", max_batch_size=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def single():
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny", device="cpu", max_batch_size=8)


def _texts(outs) -> list[str]:
    return [o.choices[0].message.content for o in outs]


def test_replicas_answer_what_one_engine_answers_in_order(dp_engine, single):
    reqs = [InferRequest(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    cfg = RequestConfig(max_tokens=6, temperature=0)
    before = [r.sent for r in dp_engine._replicas]
    assert _texts(dp_engine.infer(reqs, cfg)) == _texts(single.infer(reqs, cfg))
    assert all(r.sent > b for r, b in zip(dp_engine._replicas, before))  # both replicas took part
    assert dp_engine.model_name == single.model_name and dp_engine.max_model_len == single.max_model_len
    assert dp_engine.max_num_seqs == 16  # what the server admits: both replicas' batches


def test_a_bad_request_is_named_by_its_place_in_the_whole_batch(dp_engine):
    reqs = [InferRequest(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]
    reqs[7] = InferRequest(messages=[{"role": "user", "content": "word " * 5000}])  # over max_model_len
    with pytest.raises(PromptTooLongError) as e:
        dp_engine.infer(reqs, RequestConfig(max_tokens=4))
    assert e.value.index == 7 and isinstance(e.value, InferRequestError)


def test_a_stream_matches_the_whole_answer(dp_engine):
    req = InferRequest(messages=[{"role": "user", "content": "What is 12 + 30?"}])
    cfg = RequestConfig(max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in dp_engine.infer_stream(req, cfg) if c.choices)
    assert streamed == _texts(dp_engine.infer([req], cfg))[0]
    assert dp_engine.count_prompt_tokens(req) > 5


def test_one_server_in_front_of_the_replicas(dp_engine, single):
    import concurrent.futures

    import openai

    from lmforge.arguments import DeployArguments
    from lmforge.serve import create_app
    from lmforge.serve.server import ServerThread

    want = _texts(single.infer([InferRequest(messages=[{"role": "user", "content": q}]) for q in QUESTIONS],
                               RequestConfig(max_tokens=6, temperature=0)))
    before = [r.sent for r in dp_engine._replicas]
    with ServerThread(create_app(dp_engine, DeployArguments(served_model_name="tiny"))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(q: str) -> str:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                               max_tokens=6, temperature=0)
            return r.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, QUESTIONS))
    assert got == want
    assert all(r.sent > b for r, b in zip(dp_engine._replicas, before))


def test_cli_flag_builds_replicas_and_checks_the_gpu_count(monkeypatch):
    from lmforge.pipelines.infer import replica_devices

    assert replica_devices(3) == ["cpu"] * 3  # no GPU here: CPU replicas
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert replica_devices(2) == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="only 2 GPU"):
        replica_devices(4)
