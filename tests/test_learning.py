"""Real learning on two CPU cores: the tiny model learns arithmetic and its new name.

These are the slowest CPU tests (a few minutes): they train ``builtin:tiny`` with the commands the
README shows, then measure with greedy generation through the ``hf`` engine.
"""
from __future__ import annotations

import pytest

from lmforge import TrainArguments, sft_main
from lmforge.dataset import arith_answer_correct, load_dataset
from lmforge.infer import InferRequest, RequestConfig

pytestmark = pytest.mark.slow

ARITH_RECIPE = dict(model="builtin:tiny", dataset=["builtin:arith#20000"], train_type="full", learning_rate=2e-3,
                    num_train_epochs=6, per_device_train_batch_size=64, gradient_accumulation_steps=1,
                    save_steps=10_000, logging_steps=100, report_to=["none"])


def exact_match(engine, rows) -> float:
    reqs = [InferRequest(messages=[m for m in r["messages"] if m["role"] != "assistant"]) for r in rows]
    out = engine.infer(reqs, RequestConfig(max_tokens=8, temperature=0), use_tqdm=False)
    return sum(arith_answer_correct(o.choices[0].message.content, r["solution"]) for o, r in zip(out, rows)) / len(rows)


def test_arith_sft_reaches_90_percent(tmp_path):
    from lmforge.infer.hf import HfEngine

    test_rows = list(load_dataset(["builtin:arith:test#300"], shuffle=False)[0])
    before = exact_match(HfEngine("builtin:tiny", device="cpu", max_batch_size=100), test_rows)
    result = sft_main(TrainArguments(**ARITH_RECIPE, output_dir=str(tmp_path)))
    after = exact_match(HfEngine(ckpt_dir=result["last_checkpoint"], device="cpu", max_batch_size=100), test_rows)
    print(f"held-out exact match on builtin:arith:test (300 rows): before {before:.1%}, after {after:.1%}")
    assert before < 0.05
    assert after >= 0.90


def test_self_cognition_learns_its_name(tmp_path):
    from lmforge.infer.hf import HfEngine

    result = sft_main(TrainArguments(
        model="builtin:tiny", dataset=["builtin:self-cognition#400"], model_name=["Forge"], model_author=["Lab"],
        train_type="full", learning_rate=2e-3, num_train_epochs=6, per_device_train_batch_size=16,
        gradient_accumulation_steps=1, save_steps=10_000, logging_steps=20, report_to=["none"],
        output_dir=str(tmp_path)))
    engine = HfEngine(ckpt_dir=result["last_checkpoint"], device="cpu")
    reply = engine.infer([InferRequest(messages=[{"role": "user", "content": "Who are you?"}])],
                         RequestConfig(max_tokens=40))[0].choices[0].message.content
    print("Who are you? ->", reply)
    assert "Forge" in reply
