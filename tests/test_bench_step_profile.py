"""benchmarks/native_step_profile.py on the native engine (CPU test mode): it times steps from outside
without changing what the engine generates, counts every step, and leaves the engine as it found it."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from common import offline_generate, regular_vocab, token_workload  # noqa: E402
from native_step_profile import StepRecorder  # noqa: E402

from lmforge.infer import RequestConfig  # noqa: E402


def test_recorder_counts_steps_and_leaves_generation_unchanged():
    import lmforge.infer.native.engine as engine_module
    from lmforge.infer.native import NativeEngine

    # no prefix caching: the second run must prefill its prompts again, as the first did
    eng = NativeEngine("builtin:tiny", allow_cpu=True, torch_dtype="float32", max_num_seqs=4, num_blocks=64,
                       max_num_batched_tokens=64, enable_prefix_caching=False)
    try:
        work = token_workload(4, (20, 40), (5, 9), regular_vocab(eng), seed=3)
        cfg = RequestConfig(temperature=0.0, ignore_eos=True)
        plain = [r[0].token_ids for r in offline_generate(eng, work, cfg)]
        steps_before = eng.stats["steps"]
        rec = StepRecorder(eng, phases=True)
        with rec:
            assert "_step" in vars(eng) and engine_module.sample.__module__ != "lmforge.infer.native.sampler"
            profiled = [r[0].token_ids for r in offline_generate(eng, work, cfg)]
        assert profiled == plain and [len(t) for t in plain] == [m for _, m in work]
        # every step the engine took is recorded, with its batch; then the wrappers are gone
        assert len(rec.steps) == eng.stats["steps"] - steps_before
        assert "_step" not in vars(eng) and "schedule" not in vars(eng.scheduler)
        assert engine_module.sample.__module__ == "lmforge.infer.native.sampler"
        assert sum(s["decode_rows"] for s in rec.steps) == sum(m - 1 for _, m in work)  # first token: prefill
        assert sum(s["prefill_tokens"] for s in rec.steps) == sum(len(ids) for ids, _ in work)
        summary = rec.summary()
        full = summary["full_batch_decode"]
        assert full["rows"] == 4 and full["steps"] >= 1
        ph = full["phases_ms"]
        assert ph["execute"] > 0 and ph["schedule"] > 0 and ph["rest"] > -0.01
        assert "forward_device" not in ph  # device times need CUDA
    finally:
        eng.close()


def test_gc_pauses_records_collections_inside_only():
    import gc

    from bench_generate import GcPauses

    with GcPauses() as pauses:
        gc.collect()  # a full collection, as the ones that landed inside timed runs
        gc.collect(0)
    n_callbacks = len(gc.callbacks)
    gc.collect()
    assert pauses.pauses[2][0] == 1 and pauses.pauses[2][1] >= 0 and pauses.pauses[0][0] >= 1
    assert all(cb.__self__ is not pauses for cb in gc.callbacks if hasattr(cb, "__self__"))
    assert len(gc.callbacks) == n_callbacks
