"""The hf engine on builtin:tiny: adapters, streaming, seeds, stop strings, lengths, logprobs, errors."""
from __future__ import annotations

import asyncio
import threading
import time
import warnings

import pytest

from lmforge.infer import InferRequest, RequestConfig
from lmforge.infer.errors import InferRequestError, PromptTooLongError

HELLO = [{"role": "user", "content": "What is 37 + 45?"}]


def make_lora_checkpoint(root, seed: int = 0):
    """A training-run folder (args.json) holding checkpoint-5: a LoRA adapter with random, non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lmforge.arguments import TrainArguments, save_args
    from lmforge.model import get_model_tokenizer

    model, _ = get_model_tokenizer("builtin:tiny", device="cpu")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated in v5
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear",
                                                      init_lora_weights=False))
    ckpt = root / "checkpoint-5"
    peft_model.save_pretrained(ckpt)
    save_args(TrainArguments(model="builtin:tiny", system="You are a careful calculator."), root)
    return ckpt


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    return make_lora_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def engine(lora_ckpt):
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny", adapters={"calc": str(lora_ckpt)}, device="cpu", max_batch_size=8)


def req(messages=HELLO, **kw) -> InferRequest:
    return InferRequest(messages=messages, **kw)


def texts(resp) -> list[str]:
    return [c.message.content for c in resp.choices]


def stream_texts(chunks, n: int = 1) -> list[str]:
    out = [""] * n
    for ch in chunks:
        for c in ch.choices:
            out[c.index] += c.delta.content or ""
    return out


SAMPLE = RequestConfig(max_tokens=24, temperature=1.0, seed=1234)


def test_adapter_changes_greedy_output(engine):
    cfg = RequestConfig(max_tokens=16)
    base, tuned = engine.infer([req(), req(adapter="calc")], cfg)
    assert base.choices[0].token_ids != tuned.choices[0].token_ids
    assert (base.model, tuned.model) == ("builtin:tiny", "calc")
    # the adapter is switched per batch: asking again gives the same answers
    assert engine.infer([req(adapter="calc")], cfg)[0].choices[0].token_ids == tuned.choices[0].token_ids
    with pytest.raises(InferRequestError, match="unknown adapter 'nope'.*calc"):
        engine.infer([req(adapter="nope")])


def test_batching_does_not_change_greedy_output(engine):
    prompts = [[{"role": "user", "content": "hi " * k}] for k in (1, 9, 3, 20, 5)]
    cfg = RequestConfig(max_tokens=12)
    together = engine.infer([req(p) for p in prompts], cfg)
    alone = [engine.infer([req(p)], cfg)[0] for p in prompts]
    assert [r.choices[0].token_ids for r in together] == [r.choices[0].token_ids for r in alone]


def test_usage_counts_tokens(engine):
    r = engine.infer([req()], RequestConfig(max_tokens=7))[0]
    assert r.usage.prompt_tokens == engine.count_prompt_tokens(req()) > 0
    assert r.usage.completion_tokens == len(r.choices[0].token_ids) == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("cfg", [RequestConfig(max_tokens=20),
                                 SAMPLE.model_copy(update={"n": 3}),
                                 SAMPLE.model_copy(update={"top_k": 40, "top_p": 0.9, "repetition_penalty": 1.3,
                                                           "presence_penalty": 0.5, "frequency_penalty": 0.5})])
def test_stream_gives_the_same_text(engine, cfg):
    whole = engine.infer([req()], cfg)[0]
    chunks = list(engine.infer_stream(req(), cfg))
    assert stream_texts(chunks, cfg.n) == texts(whole)
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert [c.finish_reason for c in last.choices] == [c.finish_reason for c in whole.choices]
    assert last.usage == whole.usage and len({c.id for c in chunks}) == 1
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 3  # really incremental


def test_seed_makes_n_samples_reproducible(engine):
    cfg = SAMPLE.model_copy(update={"n": 4})
    first = texts(engine.infer([req()], cfg)[0])
    assert len(set(first)) == 4  # four different samples at temperature 1
    assert texts(engine.infer([req()], cfg)[0]) == first
    # the same request with the same seed gives the same samples in another batch
    other = engine.infer([req([{"role": "user", "content": "a much longer question " * 5}]), req()], cfg)
    assert texts(other[1]) == first
    assert texts(engine.infer([req()], cfg.model_copy(update={"seed": 99}))[0]) != first


def test_stop_strings_cut_and_say_why(engine):
    full = texts(engine.infer([req()], SAMPLE)[0])[0]
    assert len(full) > 12
    stop = full[6:9]
    at = full.find(stop)
    for cfg in (SAMPLE.model_copy(update={"stop": [stop]}),
                SAMPLE.model_copy(update={"stop": ["never-appears", stop]})):
        r = engine.infer([req()], cfg)[0]
        assert r.choices[0].message.content == full[:at]
        assert r.choices[0].finish_reason == "stop"
        assert stream_texts(engine.infer_stream(req(), cfg)) == [full[:at]]
    # no stop string: the budget ends it
    r = engine.infer([req()], SAMPLE)[0]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == SAMPLE.max_tokens


def test_eos_ends_a_row_with_stop(engine):
    """generate() pads rows that finished early; the row ends at its stop token, which is counted, not shown."""
    from lmforge.infer.hf import _StopCriteria
    from lmforge.infer.utils import StopStrings

    eos, pad = engine.stop_token_ids[0], engine.tokenizer.pad_token_id
    word = engine.tokenizer.encode("hello", add_special_tokens=False)
    crit = _StopCriteria(0, [10], engine.device, StopStrings(), {eos}, engine._decode, None)
    row = engine._finish_row(0, [*word, eos, pad, pad], 10, crit, StopStrings(), None)
    assert (row.token_ids, row.text, row.finish_reason) == ([*word, eos], "hello", "stop")
    row = engine._finish_row(0, [*word, pad, pad], 3, crit, StopStrings(), None)  # budget reached first
    assert row.finish_reason == "length" and len(row.token_ids) == 3


def test_logprobs(engine):
    r = engine.infer([req()], SAMPLE.model_copy(update={"logprobs": True, "top_logprobs": 3}))[0]
    c = r.choices[0]
    assert len(c.logprobs.content) == len(c.token_ids)
    for entry in c.logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # the best token comes first
    chunks = list(engine.infer_stream(req(), SAMPLE.model_copy(update={"logprobs": True})))
    streamed = [e for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in c.logprobs.content])


@pytest.mark.parametrize("bad, error, match", [
    ({"messages": []}, InferRequestError, "must not be empty"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, InferRequestError, "role.*wizard"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, InferRequestError,
     "replies to a user"),
    ({"messages": [{"role": "user", "content": "word " * 1500}]}, PromptTooLongError,
     r"\d+ tokens but max_model_len is 1024"),
])
def test_bad_input_is_a_clear_error(engine, bad, error, match):
    with pytest.raises(error, match=match) as info:
        engine.infer([req(), bad], RequestConfig(max_tokens=2))
    assert info.value.index == 1 and str(info.value).startswith("request 1: ")
    with pytest.raises(error, match=match):
        engine.infer_stream(bad)  # raised at once, before any chunk


def test_max_tokens_is_clamped_to_the_context(engine):
    n = engine.count_prompt_tokens(req())
    engine_len, engine.max_model_len = engine.max_model_len, n + 3
    try:
        r = engine.infer([req()], RequestConfig(max_tokens=50))[0]
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    finally:
        engine.max_model_len = engine_len


def test_closing_a_stream_stops_generation(engine):
    chunks = engine.infer_stream(req(), RequestConfig(max_tokens=800))
    next(chunks), next(chunks)
    start = time.perf_counter()
    chunks.close()
    assert time.perf_counter() - start < 5
    assert not [t for t in threading.enumerate() if t.name == "lmforge-generate"]
    assert engine.infer([req()], RequestConfig(max_tokens=2))[0].usage.completion_tokens == 2  # lock released


def test_async_twins(engine):
    async def main():
        whole = await engine.infer_async(req(), RequestConfig(max_tokens=10))
        parts = [c async for c in engine.infer_stream_async(req(), RequestConfig(max_tokens=10))]
        return whole, parts

    whole, parts = asyncio.run(main())
    assert stream_texts(parts) == texts(whole)


def test_engine_from_checkpoint_uses_args_json(lora_ckpt):
    from lmforge.infer.hf import HfEngine

    e = HfEngine(ckpt_dir=str(lora_ckpt), device="cpu")
    assert e.model_name == "builtin:tiny" and list(e.adapters) == ["checkpoint-5"]
    assert e.template.system == "You are a careful calculator."


def test_repetition_penalty_equals_transformers_processor():
    """The hf engine's own repetition penalty (older transformers 5 releases refuse per-row ignore lengths) gives
    transformers' processor's scores where that processor takes them: left padding not counted."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from lmforge.infer.hf import repetition_penalty

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    scores = torch.randn(3, 50, generator=g)
    pad = torch.tensor([0, 4, 11])
    got = repetition_penalty(ids, scores.clone(), 1.7, pad)
    for i in range(3):  # row by row, the processor's int form (every transformers 5 release has it)
        proc = RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=int(pad[i]))
        want = proc(ids[i:i + 1], scores[i:i + 1].clone())
        assert torch.equal(got[i:i + 1], want)
    assert not torch.equal(got, scores)
    try:  # the batched form, where this transformers takes a tensor
        batched = RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=pad)(ids, scores.clone())
    except (TypeError, ValueError):
        return
    assert torch.equal(got, batched)
