"""The native engine's asynchronous scheduling: step k+1 is launched before step k's tokens are read back.

On the CPU (``allow_cpu``) the engine runs the same pipeline as on a GPU: placeholders on the host, the
next step's input tokens gathered from the previous step's sampled tensor, results handed out one step
late. These tests hold it to the synchronous engine (``async_scheduling=False``) reply for reply, and
check what only the pipeline can get wrong: a placeholder seen by a caller, a token sampled for a
sequence that had already stopped, a penalised row sampled before its history is known.
"""
from __future__ import annotations

import threading

import pytest

from lmforge.infer.native.scheduler import SamplingParams, Sequence, Status
from lmforge.infer.protocol import InferRequest, RequestConfig

PROMPTS = ["What is 12+7?", "Tell me a story about a robot who learns to paint.", "hi",
           "List three colours and explain why each one is nice to look at.", "Count to five.",
           "Why is the sky blue?"]


def _native(**kw):
    from lmforge.infer.native import NativeEngine

    kw.setdefault("num_blocks", 256)
    return NativeEngine("builtin:tiny", allow_cpu=True, torch_dtype="float32", block_size=16, max_num_seqs=8, **kw)


@pytest.fixture(scope="module")
def engines():
    on, off = _native(), _native(async_scheduling=False)
    yield on, off
    on.close()
    off.close()


def _reqs(prompts=PROMPTS, **kw):
    return [InferRequest(messages=[{"role": "user", "content": p}], **kw) for p in prompts]


def _replies(responses):
    out = []
    for r in responses:
        for c in r.choices:
            lp = [(e.token, round(e.logprob, 4), [t.token for t in e.top_logprobs or []])
                  for e in c.logprobs.content] if c.logprobs else None
            out.append((c.token_ids, c.message.content, c.finish_reason, lp))
        out.append(r.usage)
    return out


@pytest.mark.parametrize("cfg", [
    RequestConfig(max_tokens=40),  # greedy, stops on end-of-text or at 40
    RequestConfig(max_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=2),
    RequestConfig(max_tokens=20, temperature=0.9, top_p=0.9, top_k=40, seed=7, n=2),
    RequestConfig(max_tokens=20, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5),
], ids=["greedy-stops", "logprobs", "seeded-n2", "penalties"])
def test_async_replies_equal_sync_replies(engines, cfg):
    on, off = engines
    before = dict(on.stats)
    got, want = on.infer(_reqs(), cfg), off.infer(_reqs(), cfg)
    assert _replies(got) == _replies(want)
    assert on.stats["tokens"] - before["tokens"] == sum(r.usage.completion_tokens for r in got)
    if cfg.repetition_penalty == 1.0:
        assert on.stats["overlapped_steps"] > before["overlapped_steps"]  # the pipeline really ran
    assert off.stats["overlapped_steps"] == 0


def test_stop_strings_and_different_lengths_in_one_batch(engines):
    on, off = engines
    probe = off.infer(_reqs(PROMPTS[1:2]), RequestConfig(max_tokens=30, ignore_eos=True))[0].choices[0].message.content
    reqs = _reqs()
    cfgs = [RequestConfig(max_tokens=m, ignore_eos=True, stop=[probe[8:11]]) for m in (5, 30, 9, 17, 30, 1)]
    for eng in (on, off):  # each request with its own settings, all in one running batch (threads)
        got: dict[int, tuple] = {}

        def ask(i: int, eng=eng, got=got) -> None:
            c = eng.infer([reqs[i]], cfgs[i])[0].choices[0]
            got[i] = (c.token_ids, c.message.content, c.finish_reason)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if eng is on:
            async_got = got
    assert async_got == got
    assert async_got[1][2] == "stop" and async_got[0][2] == "length" and len(async_got[5][0]) == 1


def _submit(eng, prompt_ids, max_tokens, stop_ids=frozenset(), on_token=None):
    done = threading.Event()
    seen: list[list[int]] = []

    def cb(seq: Sequence) -> None:
        seen.append(list(seq.token_ids))
        if on_token is not None:
            on_token(seq)
        if seq.status is Status.FINISHED:
            done.set()

    seq = Sequence(token_ids=list(prompt_ids), max_tokens=max_tokens, params=SamplingParams(),
                   stop_ids=frozenset(stop_ids), on_token=cb)
    eng.submit(seq)
    return seq, done, seen


def test_callers_never_see_a_placeholder_and_stopped_rows_are_dropped(engines):
    """A sequence that stops on a token read back after the next step was launched: that step's row for it
    is wasted, never appended; callbacks (which read every token) never see the -1 placeholder."""
    on, off = engines
    ids = [on.tokenizer.encode(p) for p in PROMPTS]
    # the sync engine's greedy continuations, 12 tokens each
    runs = [_submit(off, i, 12) for i in ids]
    for _, done, _ in runs:
        assert done.wait(60)
    cont = [s.output_ids for s, _, _ in runs]
    # each sequence stops on its own 4th token (unless that token came earlier): they end at different steps
    stops = {c[3] for c in cont}
    results = {}
    for name, eng in (("on", on), ("off", off)):
        before = dict(eng.stats)
        runs = [_submit(eng, i, 12, stops) for i in ids]
        for _, done, _ in runs:
            assert done.wait(60)
        results[name] = [(s.output_ids, s.finish_reason, s.num_pending) for s, _, _ in runs]
        assert all(-1 not in t for _, _, seen in runs for t in seen)
        assert eng.stats["tokens"] - before["tokens"] == sum(len(s.output_ids) for s, _, _ in runs)
    assert results["on"] == results["off"]
    assert all(r[1] == "stop" and len(r[0]) <= 4 and r[2] == 0 for r in results["on"])


def test_cancelled_in_flight_leaves_no_placeholder(engines):
    on, _ = engines
    ids = on.tokenizer.encode(PROMPTS[1])

    def cancel_after_three(seq: Sequence) -> None:
        if seq.num_output == 3:
            seq.aborted = True  # as a client that goes away does; the engine drops it at its next schedule

    seq, done, seen = _submit(on, ids, 50, on_token=cancel_after_three)
    assert done.wait(60)
    assert seq.finish_reason == "abort" and seq.num_pending == 0 and -1 not in seq.token_ids
    assert 3 <= seq.num_output <= 4 and all(-1 not in t for t in seen)
    assert on.infer(_reqs(PROMPTS[:1]), RequestConfig(max_tokens=4))[0].choices[0].token_ids  # still serving


def test_a_penalised_batch_waits_for_its_history(engines):
    """Penalties read every earlier token: such a batch is never launched over a placeholder."""
    on, _ = engines
    before = on.stats["overlapped_steps"]
    on.infer(_reqs(PROMPTS[:2]), RequestConfig(max_tokens=10, ignore_eos=True, frequency_penalty=0.7))
    assert on.stats["overlapped_steps"] == before


@pytest.mark.parametrize("which", ["on", "off"])
def test_a_long_sequence_stopping_beside_a_short_one(engines, which):
    """The longest sequence of a batch stops on a token read back after the next batch was scheduled: that batch's
    block table must still be built (its row dropped or wasted), and the short one goes on."""
    eng = dict(zip(("on", "off"), engines))[which]
    long_ids = eng.tokenizer.encode(" ".join(["paint"] * 70))
    short_ids = eng.tokenizer.encode("hi")
    probe = _submit(eng, long_ids, 2)
    assert probe[1].wait(60)
    first = probe[0].output_ids[0]
    a = _submit(eng, long_ids, 12, {first})  # stops on its first token, known only after the next step is planned
    b = _submit(eng, short_ids, 12)
    assert a[1].wait(60) and b[1].wait(60)
    assert a[0].error is None and b[0].error is None
    assert a[0].finish_reason == "stop" and a[0].output_ids == [first]
    assert b[0].finish_reason == "length" and len(b[0].output_ids) == 12
