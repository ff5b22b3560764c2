"""Real learning on two CPU cores: the tiny model learns arithmetic and its new name.

The arithmetic model is the session's shared ``arith_sft`` (conftest.py): the README's recipe, trained
once for every learning test. Its bar (>= 90% on 300 held-out questions) sits under the lowest final
accuracy of 24 measured runs (0.925; median 1.0: see tests/arith_probe.py).
"""
from __future__ import annotations

import pytest

from arith_probe import SEED, held_out_rows
from lmforge import TrainArguments, sft_main
from lmforge.dataset import arith_answer_correct, load_dataset
from lmforge.infer import InferRequest, RequestConfig

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("arith")]


def exact_match(engine, rows) -> float:
    reqs = [InferRequest(messages=[m for m in r["messages"] if m["role"] != "assistant"]) for r in rows]
    out = engine.infer(reqs, RequestConfig(max_tokens=8, temperature=0), use_tqdm=False)
    return sum(arith_answer_correct(o.choices[0].message.content, r["solution"]) for o, r in zip(out, rows)) / len(rows)


def test_arith_sft_reaches_90_percent(arith_sft):
    from lmforge.infer.hf import HfEngine

    test_rows = held_out_rows(300)
    before = exact_match(HfEngine("builtin:tiny", device="cpu", max_batch_size=100), test_rows)
    after = exact_match(HfEngine(ckpt_dir=arith_sft["final"], device="cpu", max_batch_size=100), test_rows)
    print(f"held-out exact match on builtin:arith:test (300 rows): before {before:.1%}, after {after:.1%} "
          f"({arith_sft['seconds']} s of training; warm-start probes {arith_sft['history']})")
    assert before < 0.05
    assert after >= 0.90


def test_self_cognition_learns_its_name(tmp_path):
    """The set's English questions (43), answered greedily, name the model: an aggregate over every
    question rather than one sampled reply (the bar allows 4 misses)."""
    from lmforge.infer.hf import HfEngine

    result = sft_main(TrainArguments(
        model="builtin:tiny", dataset=["builtin:self-cognition#400"], model_name=["Forge"], model_author=["Lab"],
        train_type="full", learning_rate=2e-3, num_train_epochs=6, per_device_train_batch_size=16,
        gradient_accumulation_steps=1, save_steps=10_000, logging_steps=20, report_to=["none"], plot=False,
        seed=SEED, data_seed=SEED, output_dir=str(tmp_path)))
    rows = list(load_dataset(["builtin:self-cognition"], shuffle=False, model_name=["Forge"], model_author=["Lab"])[0])
    questions = sorted({r["messages"][0]["content"] for r in rows if r["messages"][0]["content"].isascii()})
    engine = HfEngine(ckpt_dir=result["last_checkpoint"], device="cpu")
    replies = [o.choices[0].message.content for o in engine.infer(
        [InferRequest(messages=[{"role": "user", "content": q}]) for q in questions],
        RequestConfig(max_tokens=40, temperature=0), use_tqdm=False)]
    missing = [(q, r) for q, r in zip(questions, replies) if "Forge" not in r]
    print(f"{len(questions) - len(missing)}/{len(questions)} replies name the model; misses: {missing}")
    assert len(missing) <= len(questions) // 10
