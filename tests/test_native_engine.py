"""The native engine's bookkeeping and, on the CPU, its whole generation path against the hf engine.

The engine refuses to start without CUDA; ``allow_cpu=True`` (tests only) runs the same scheduler,
paged cache, model and sampler with the attention reference, in float32, so greedy outputs can be
compared with transformers' token for token. The Triton kernel and CUDA graphs are checked on a GPU
(tests/test_native_gpu.py).
"""
from __future__ import annotations

import pytest
import torch

from lmforge.infer.native.cache import BlockManager, NoFreeBlocks
from lmforge.infer.native.scheduler import SamplingParams, Scheduler, Sequence, Status
from lmforge.infer.protocol import InferRequest, RequestConfig

from tests.test_infer_hf import make_lora_checkpoint


# ---- block manager ---------------------------------------------------------------------------
def test_blocks_allocate_release_and_scratch_block():
    bm = BlockManager(num_blocks=5, block_size=4)
    got = bm.allocate(4)
    assert sorted(got) == [1, 2, 3, 4]  # block 0 is never handed out
    with pytest.raises(NoFreeBlocks):
        bm.allocate(1)
    bm.release(got)
    assert bm.num_available == 4


def test_prefix_cache_shares_full_blocks_and_evicts_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    toks = [1, 2, 3, 4, 5]
    a = bm.allocate(3)
    h0 = bm.register(a[0], None, toks[0:2], -1)
    bm.register(a[1], h0, toks[2:4], -1)
    blocks, hashes = bm.match_prefix(toks, -1, max_tokens=4)
    assert blocks == a[:2] and bm.ref[a[0]] == 2
    assert bm.match_prefix(toks, adapter=0, max_tokens=4)[0] == []  # another adapter: other keys
    bm.release(blocks)
    bm.release(a)
    assert bm.num_available == 3 and len(bm.evictable) == 2
    again, _ = bm.match_prefix(toks, -1, max_tokens=4)
    assert again == a[:2]  # picked up from the evictable pool
    bm.release(again)
    bm.allocate(3)  # takes the free block, then evicts the cached ones
    assert bm.cached == {}


def _seq(prompt, max_tokens=4):
    return Sequence(token_ids=list(prompt), max_tokens=max_tokens, params=SamplingParams())


def test_scheduler_chunks_long_prompts_and_puts_decodes_first():
    bm = BlockManager(num_blocks=64, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = _seq(range(3)), _seq(range(100, 125))
    sch.add(a)
    sch.add(b)
    step = sch.schedule()
    assert [(s.seq_id, n) for s, n in step] == [(a.seq_id, 3), (b.seq_id, 7)]  # b is cut to the budget
    for s, n in step:
        sch.advance(s, n)
    a.token_ids.append(7)  # a was fully prefilled: it sampled a token
    step = sch.schedule()
    assert [(s.seq_id, n) for s, n in step] == [(a.seq_id, 1), (b.seq_id, 9)]


def test_scheduler_holds_new_prompts_back_for_prefill_wait_steps():
    """--prefill_wait_steps k: while others decode, one new prompt waits k steps (so several can share the one
    eager step); it joins at once when nothing decodes, when a step prefills anyway, or when the waiting prompts
    fill every free slot."""
    bm = BlockManager(num_blocks=64, block_size=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32, prefill_wait_steps=2)
    a = _seq(range(3), max_tokens=20)
    sch.add(a)
    assert [s for s, _ in sch.schedule()] == [a]  # nothing decoding: admitted at once
    sch.advance(a, 3)

    def decode_step():
        step = sch.schedule()
        for s, n in step:
            sch.advance(s, n)
            s.token_ids.append(5)
        return step

    a.token_ids.append(7)
    b = _seq(range(10, 14), max_tokens=20)
    sch.add(b)
    assert [(s, n) for s, n in decode_step()] == [(a, 1)]  # held: 1 step
    assert [(s, n) for s, n in decode_step()] == [(a, 1)]  # held: 2 steps
    assert [(s, n) for s, n in decode_step()] == [(a, 1), (b, 4)]  # k steps reached: admitted
    c, d = _seq(range(20, 23)), _seq(range(30, 33))
    sch.add(c)
    assert [s for s, _ in decode_step()] == [a, b]  # c waits (two slots free)
    sch.add(d)
    assert [s for s, _ in decode_step()] == [a, b, c, d]  # two waiting fill the two free slots: at once
    assert not sch.waiting and sch.held == 0
    with pytest.raises(ValueError, match="prefill_wait_steps"):
        Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=32, prefill_wait_steps=-1)


def test_scheduler_preempts_newest_when_blocks_run_out():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks = 8 tokens
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    sch.watermark = 0
    a, b = _seq([1, 2, 3]), _seq([4, 5, 6])
    sch.add(a)
    sch.add(b)
    for s, n in sch.schedule():
        sch.advance(s, n)
        s.token_ids.append(9)
    for s, n in sch.schedule():  # both decode into their second block
        sch.advance(s, n)
        s.token_ids.append(9)
    assert bm.num_available == 0
    step = sch.schedule()  # a needs a third block: b (newest) is preempted
    assert [s.seq_id for s, _ in step] == [a.seq_id]
    assert b.status is Status.WAITING and b.num_computed == 0 and sch.num_preempted == 1
    assert b.token_ids == [4, 5, 6, 9, 9]  # its output is kept, to be recomputed


def test_scheduler_finishes_aborted_sequences_wherever_they_are():
    bm = BlockManager(num_blocks=8, block_size=4)
    sch = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=16)
    a, b = _seq([1, 2, 3]), _seq([4, 5, 6])
    sch.add(a)
    sch.add(b)
    sch.schedule()  # a runs, b waits (max_num_seqs 1)
    a.aborted = b.aborted = True
    assert sch.schedule() == []
    assert {s.seq_id for s in sch.dropped} == {a.seq_id, b.seq_id}
    assert all(s.status is Status.FINISHED and s.finish_reason == "abort" for s in (a, b))
    assert not sch.running and not sch.waiting and bm.num_available == 7


def test_scheduler_block_table_mirrors_every_running_sequence():
    """The scheduler's block table (the runner gathers a step's tables from it) holds each running sequence's
    blocks in its own row, through admissions, growth, preemptions (a tight cache) and finishes."""
    import random

    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=2)
    sch = Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=24)
    for i in range(12):
        sch.add(_seq([rng.randrange(100) for _ in range(rng.randrange(1, 15))], max_tokens=rng.randrange(1, 30)))
    preempted, steps = 0, 0
    while sch.has_work():
        steps += 1
        batch = sch.schedule()
        rows = [s.row for s in sch.running]
        assert len(set(rows)) == len(rows) and all(0 <= r < 5 for r in rows)
        for s in sch.running:
            assert sch.table[s.row, :len(s.blocks)].tolist() == s.blocks
        for s, n in batch:
            sch.advance(s, n)
            if s.num_computed == len(s.token_ids):
                s.token_ids.append(rng.randrange(100))
                if s.num_output >= s.max_tokens:
                    sch.finish(s, "length")
        preempted = sch.num_preempted
        assert steps < 2000
    assert preempted > 0 and sch.table.shape[1] > 16  # preemption happened; the table grew where needed
    assert bm.num_available == 39


# ---- the engine on the CPU -------------------------------------------------------------------
PROMPTS = ["What is 12+7?", "Tell me a story about a robot who learns to paint.", "hi",
           "List three colours and explain why each one is nice to look at."]


def _reqs(prompts=PROMPTS, **kw):
    return [InferRequest(messages=[{"role": "user", "content": p}], **kw) for p in prompts]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return str(make_lora_checkpoint(tmp_path_factory.mktemp("run"), seed=3))


@pytest.fixture(scope="module")
def hf(lora_dir):
    from lmforge.infer.hf import HfEngine

    return HfEngine("builtin:tiny", adapters={"calc": lora_dir}, device="cpu", max_batch_size=8,
                    torch_dtype="float32")


def _native(lora_dir=None, **kw):
    from lmforge.infer.native import NativeEngine

    kw.setdefault("num_blocks", 256)
    return NativeEngine("builtin:tiny", adapters={"calc": lora_dir} if lora_dir else {}, allow_cpu=True,
                        torch_dtype="float32", block_size=16, max_num_seqs=8, **kw)


@pytest.fixture(scope="module")
def native(lora_dir):
    eng = _native(lora_dir)
    yield eng
    eng.close()


def _ids(responses):
    return [c.token_ids for r in responses for c in r.choices]


def test_refuses_without_cuda_and_points_to_hf():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    from lmforge.infer.native import NativeEngine

    with pytest.raises(RuntimeError, match="infer_backend hf"):
        NativeEngine("builtin:tiny")


def test_greedy_equals_hf_token_for_token(hf, native):
    cfg = RequestConfig(max_tokens=40, ignore_eos=True)
    want = _ids(hf.infer(_reqs(), cfg))
    got = _ids(native.infer(_reqs(), cfg))
    assert got == want
    assert all(len(t) == 40 for t in got)


def test_greedy_with_repetition_penalty_equals_hf(hf, native):
    """A greedy batch with a penalty must not take the sampler's plain-argmax shortcut."""
    cfg = RequestConfig(max_tokens=30, ignore_eos=True, repetition_penalty=1.5)
    want = _ids(hf.infer(_reqs(), cfg))
    assert want != _ids(hf.infer(_reqs(), RequestConfig(max_tokens=30, ignore_eos=True)))  # the penalty bites
    assert _ids(native.infer(_reqs(), cfg)) == want


def test_greedy_equals_hf_with_stop_tokens_and_text(hf, native):
    cfg = RequestConfig(max_tokens=30)
    want, got = hf.infer(_reqs(), cfg), native.infer(_reqs(), cfg)
    for w, g in zip(want, got):
        assert g.choices[0].token_ids == w.choices[0].token_ids
        assert g.choices[0].message.content == w.choices[0].message.content
        assert g.choices[0].finish_reason == w.choices[0].finish_reason
        assert g.usage == w.usage


def test_lora_per_request_matches_hf(hf, native):
    cfg = RequestConfig(max_tokens=24, ignore_eos=True)
    mixed = [InferRequest(messages=[{"role": "user", "content": p}], adapter=a)
             for p, a in zip(PROMPTS, ["calc", "", "calc", None])]
    want = [_ids(hf.infer([r], cfg))[0] for r in mixed]
    got = _ids(native.infer(mixed, cfg))  # both adapters and the base in one batch
    assert got == want
    assert got[0] != _ids(native.infer(_reqs(PROMPTS[:1]), cfg))[0]  # the adapter changes the output


def test_preemption_and_chunked_prefill_change_nothing(lora_dir, hf):
    cfg = RequestConfig(max_tokens=48, ignore_eos=True)
    want = _ids(hf.infer(_reqs(), cfg))
    # 12 blocks of 16 tokens cannot hold 4 sequences of ~70-110 tokens: the scheduler must preempt;
    # a 24-token step budget cuts every prompt into chunks.
    eng = _native(num_blocks=13, max_num_batched_tokens=24)
    try:
        eng.scheduler.max_num_batched_tokens = 24  # the engine raises the budget to max_num_seqs at least
        got = _ids(eng.infer(_reqs(), cfg))
        assert eng.scheduler.num_preempted > 0
    finally:
        eng.close()
    assert got == want
    assert eng.runner.k_cache == [] and not eng.runner.graphs  # a closed engine gives its KV cache back


def test_prefill_wait_steps_changes_no_output(hf):
    """Prompts held back a few steps (and arriving while others decode) get the very tokens they get at once."""
    import threading

    cfg = RequestConfig(max_tokens=64, ignore_eos=True)
    want = _ids(hf.infer(_reqs(), cfg))
    eng = _native(prefill_wait_steps=3)
    try:
        got: dict[int, list] = {}

        def ask(i: int) -> None:
            got[i] = _ids(eng.infer(_reqs(PROMPTS[i:i + 1]), cfg))[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        threads[0].start()
        while eng.stats["tokens"] < 2:  # the first is decoding: the others arrive while it does
            threads[0].join(0.005)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        held = eng.scheduler.num_held
    finally:
        eng.close()
    assert [got[i] for i in range(len(PROMPTS))] == want
    assert held > 0  # prompts really were held back


def test_prefix_cache_hit_gives_the_same_reply(native):
    cfg = RequestConfig(max_tokens=16, ignore_eos=True)
    long = ["Please read this long instruction carefully and then answer: " * 3 + "what is 2+2?"]
    first = _ids(native.infer(_reqs(long), cfg))
    hits = native.blocks.hits
    second = _ids(native.infer(_reqs(long), cfg))
    assert native.blocks.hits > hits
    assert first == second


def test_seeded_sampling_is_batch_independent(native):
    cfg = RequestConfig(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=123, n=2)
    alone = _ids(native.infer(_reqs(PROMPTS[:1]), cfg))
    together = _ids(native.infer(_reqs(), cfg))[:2]
    assert alone == together
    assert alone[0] != alone[1]  # the n samples differ


def test_logprobs_match_hf(hf, native):
    cfg = RequestConfig(max_tokens=8, logprobs=True, top_logprobs=3, ignore_eos=True)
    w = hf.infer(_reqs(PROMPTS[:2]), cfg)
    g = native.infer(_reqs(PROMPTS[:2]), cfg)
    for a, b in zip(w, g):
        la, lb = a.choices[0].logprobs.content, b.choices[0].logprobs.content
        assert [x.token for x in la] == [x.token for x in lb]
        assert [x.logprob for x in la] == pytest.approx([x.logprob for x in lb], abs=1e-4)
        assert [t.token for t in la[0].top_logprobs] == [t.token for t in lb[0].top_logprobs]


def test_stop_strings_and_stream_pieces_add_up(hf, native):
    cfg = RequestConfig(max_tokens=40, ignore_eos=True)
    full = native.infer(_reqs(PROMPTS[1:2]), cfg)[0].choices[0].message.content
    stop = full[10:14]
    cfg_stop = RequestConfig(max_tokens=40, stop=[stop])
    want = hf.infer(_reqs(PROMPTS[1:2]), cfg_stop)[0].choices[0]
    got = native.infer(_reqs(PROMPTS[1:2]), cfg_stop)[0].choices[0]
    assert got.message.content == want.message.content and got.finish_reason == "stop"
    chunks = list(native.infer_stream(_reqs(PROMPTS[1:2])[0], cfg))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage.completion_tokens == 40


def test_concurrent_requests_from_threads_batch_together(native):
    import concurrent.futures as cf

    cfg = RequestConfig(max_tokens=12, ignore_eos=True)
    want = _ids(native.infer(_reqs(), cfg))
    steps = native.stats["steps"]
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: _ids(native.infer([r], cfg))[0], _reqs()))
    assert got == want
    assert native.stats["steps"] - steps < 4 * 12  # shared steps, not one request after another


def test_stats_time_each_sequence_from_arrival_to_first_token_and_end(native):
    """The engine's per-sequence seconds (what /metrics shows and bench_serve_load splits a server's time to
    first token with): one timed sequence per finished sequence, each interval inside the next."""
    import time

    from lmforge.serve.metrics import engine_lines

    before = dict(native.stats)
    t0 = time.perf_counter()
    native.infer(_reqs(), RequestConfig(max_tokens=6, ignore_eos=True, n=2))
    wall = time.perf_counter() - t0
    d = {k: native.stats[k] - before[k] for k in before}
    assert d["timed_sequences"] == 2 * len(_reqs())
    assert 0 <= d["queue_seconds"] < d["first_token_seconds"] < d["sequence_seconds"]
    assert d["sequence_seconds"] <= d["timed_sequences"] * wall  # none measured longer than the call
    text = "\n".join(engine_lines(native.stats))
    for name in ("timed_sequences", "queue_seconds", "first_token_seconds", "sequence_seconds"):
        assert f"lmforge_engine_{name}_total " in text


def test_update_weights_takes_new_weights(lora_dir):
    from lmforge.model import get_model_tokenizer

    eng = _native()
    try:
        cfg = RequestConfig(max_tokens=12, ignore_eos=True)
        before = _ids(eng.infer(_reqs(PROMPTS[:2]), cfg))
        other, _ = get_model_tokenizer("builtin:tiny", device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        eng.update_weights(other.named_parameters())
        after = _ids(eng.infer(_reqs(PROMPTS[:2]), cfg))
        from lmforge.infer.hf import HfEngine

        ref = HfEngine(model_obj=other, tokenizer=eng.tokenizer, device="cpu")
        assert after == _ids(ref.infer(_reqs(PROMPTS[:2]), cfg))
        assert after != before
    finally:
        eng.close()


# ---- architectures: by structure, not by name ------------------------------------------------
def _random_model_dir(tmp_path, kind: str):
    import transformers

    from lmforge.model import load_tokenizer
    from lmforge.model.builtin import TOKENIZER_DIR

    tok = load_tokenizer(TOKENIZER_DIR)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    if kind == "qwen3":  # q/k RMSNorm, explicit head_dim
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "llama3":  # llama3 RoPE scaling, untied head
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = transformers.LlamaForCausalLM
    else:  # mistral: sliding window shorter than the prompts
        cfg = transformers.MistralConfig(**common, sliding_window=24, tie_word_embeddings=False)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg)
    out = tmp_path / kind
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("kind", ["qwen3", "llama3", "mistral"])
def test_other_architectures_match_hf(tmp_path, kind):
    from lmforge.infer.hf import HfEngine
    from lmforge.infer.native import NativeEngine

    path = _random_model_dir(tmp_path, kind)
    cfg = RequestConfig(max_tokens=24, ignore_eos=True)
    want = _ids(HfEngine(path, device="cpu", torch_dtype="float32", template="chatml").infer(_reqs(), cfg))
    eng = NativeEngine(path, allow_cpu=True, torch_dtype="float32", template="chatml", num_blocks=64)
    try:
        assert _ids(eng.infer(_reqs(), cfg)) == want
    finally:
        eng.close()


def test_unsupported_architecture_is_named(tmp_path):
    import transformers

    from lmforge.infer.native.model import UnsupportedModelError, check_architecture

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*infer_backend hf"):
        check_architecture(model)


def test_update_weights_never_writes_into_a_callers_model():
    from lmforge.infer.native import NativeEngine
    from lmforge.model import get_model_tokenizer

    model, tok = get_model_tokenizer("builtin:tiny", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng = NativeEngine(model_obj=model, tokenizer=tok, allow_cpu=True, num_blocks=32)
    try:
        eng.update_weights((n, torch.zeros_like(p)) for n, p in model.named_parameters())
    finally:
        eng.close()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_server_on_native_answers_openai_client_concurrently(native):
    """The deploy path: the native engine behind the server, the official client, parallel requests."""
    import concurrent.futures as cf

    from openai import OpenAI

    from lmforge.arguments import DeployArguments
    from lmforge.serve import create_app
    from lmforge.serve.server import ServerThread

    app = create_app(native, DeployArguments(model="builtin:tiny"))
    assert app.state.lmforge.limiter.max_concurrency == native.max_num_seqs  # not the hf default of 8
    with ServerThread(app) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none")
        want = [r.choices[0].message.content for r in native.infer(_reqs(), RequestConfig(max_tokens=16))]

        def ask(prompt: str) -> str:
            out = client.chat.completions.create(model=native.model_name, max_tokens=16,
                                                 messages=[{"role": "user", "content": prompt}])
            return out.choices[0].message.content

        with cf.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, PROMPTS))
        assert got == want
        stream = client.chat.completions.create(model=native.model_name, max_tokens=16, stream=True,
                                                messages=[{"role": "user", "content": PROMPTS[0]}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[0]


def test_cli_without_cuda_is_one_clear_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    from lmforge.cli.main import main

    assert main(["infer", "--model", "builtin:tiny", "--infer_backend", "native", "--val_dataset",
                 "builtin:arith#2"]) == 2
    err = capsys.readouterr().err
    assert "lmforge infer: error:" in err and "--infer_backend hf" in err and "Traceback" not in err


def test_n_samples_share_the_prompt_blocks(native):
    long = ["Please read this long instruction carefully and then answer the question at the end: " * 2
            + "what is 2+2?"]
    cfg = RequestConfig(max_tokens=12, temperature=0.8, seed=7, n=4)
    hits, prefill = native.blocks.hits, native.stats["prefill_tokens"]
    out = native.infer(_reqs(long), cfg)[0]
    prompt = out.usage.prompt_tokens
    full_blocks = (prompt - 1) // native.blocks.block_size
    assert native.blocks.hits - hits >= 3 * full_blocks * native.blocks.block_size  # samples 2-4 reuse them
    assert native.stats["prefill_tokens"] - prefill < 2 * prompt  # not 4 prompts' worth of prefill
    again = native.infer(_reqs(long), cfg)[0]
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in out.choices]  # seeded: same samples
    assert len({tuple(c.token_ids) for c in out.choices}) > 1


def _prepare_reference(rows, bs):
    """The step's inputs token by token (what ModelRunner._prepare_raw computes with numpy)."""
    ids, pos, slots, lora, qsl, lens = [], [], [], [], [0], []
    for start, n, blocks, toks, slot, delta in rows:
        ids += toks
        pos += [p + delta for p in range(start, start + n)]
        slots += [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
        lora += [slot] * n
        qsl.append(qsl[-1] + n)
        lens.append(start + n)
    width = max(len(r[2]) for r in rows)
    tables = [r[2] + [0] * (width - len(r[2])) for r in rows]
    return ids, pos, slots, lora, qsl, lens, tables


@pytest.mark.parametrize("lora", [False, True])
def test_step_inputs_equal_a_token_by_token_reference(lora):
    import random
    from types import SimpleNamespace

    from lmforge.infer.native.runner import ModelRunner

    runner = object.__new__(ModelRunner)  # only the input builder: no model, no cache
    runner.block_size, runner.device = 16, torch.device("cpu")
    runner.model = SimpleNamespace(lora_slots={"calc": 0} if lora else {})
    rng = random.Random(0)
    for n_tokens in ([256] * 4, [1] * 9, [1, 57, 1, 1, 300, 1]):  # prefill chunks, decode, mixed
        rows = []
        for n in n_tokens:
            start = rng.randrange(0, 600)
            blocks = rng.sample(range(1, 4000), -(-(start + n) // 16))
            rows.append((start, n, blocks, [rng.randrange(1000) for _ in range(n)], rng.randrange(-1, 3),
                         rng.randrange(0, 4)))
        meta, ids, pos, last = runner._prepare_raw(rows)
        r_ids, r_pos, r_slots, r_lora, r_qsl, r_lens, r_tables = _prepare_reference(rows, 16)
        assert ids.tolist() == r_ids and pos.tolist() == r_pos and meta.slot_mapping.tolist() == r_slots
        assert meta.query_start_loc.tolist() == r_qsl and meta.seq_lens.tolist() == r_lens
        assert meta.block_tables.tolist() == r_tables and meta.max_query_len == max(n_tokens)
        assert last == [q - 1 for q in r_qsl[1:]]
        assert (meta.lora_idx.tolist() == r_lora) if lora else meta.lora_idx is None
        assert (ids.dtype, pos.dtype, meta.slot_mapping.dtype, meta.block_tables.dtype, meta.seq_lens.dtype,
                meta.query_start_loc.dtype) == (torch.int64, torch.int64, torch.int64, torch.int32, torch.int32,
                                                torch.int32)


def test_graph_replay_fills_its_static_inputs_like_the_reference():
    """The decode graph's static buffers get the step's rows and inert padding (slot -1, length 1) after them."""
    import random
    from types import SimpleNamespace

    from lmforge.infer.native.runner import ModelRunner

    replays = []
    runner = object.__new__(ModelRunner)
    runner.block_size, runner.device, runner.max_blocks_per_seq = 16, torch.device("cpu"), 64
    runner.model = SimpleNamespace(lora_slots={})
    buf = runner._static_inputs(8)
    out = torch.arange(8.0)[:, None]
    runner.graphs, runner.graph_sizes = {8: (SimpleNamespace(replay=lambda: replays.append(1)), buf, out)}, [8]
    rng = random.Random(1)
    rows = []
    for _ in range(5):
        start = rng.randrange(0, 500)
        rows.append((start, 1, rng.sample(range(1, 900), start // 16 + 1), [rng.randrange(1000)], rng.randrange(-1, 2),
                     rng.randrange(0, 3)))
    got = runner._replay(rows)
    ids, pos, slots, lora, _, lens, tables = _prepare_reference(rows, 16)
    assert replays == [1] and got.tolist() == out[:5].tolist()
    assert buf["ids"].tolist() == ids + [0] * 3 and buf["pos"].tolist() == pos + [0] * 3
    assert buf["slots"].tolist() == slots + [-1] * 3 and buf["lens"].tolist() == lens + [1] * 3
    assert buf["lora"].tolist() == lora + [-1] * 3
    width = len(tables[0])
    assert buf["tables"][:, :width].tolist() == tables + [[0] * width] * 3
