"""GRPO variants on the arithmetic task, on CPU: do DAPO and GSPO each lift a half-trained SFT start?

The start is the ``arith_warm_ckpt`` fixture (tests/conftest.py: a builtin:tiny SFT checkpoint on
builtin:arith, copied at the first probe at or past ``WARM_LOW``, 0.5); without it, the checkpoint named by
``LMFORGE_ARITH_WARM_CKPT``; without either the tests skip. Each variant then trains full-parameter on
``builtin:arith-rl`` with the strict ``accuracy`` reward, ``--beta 0``, lr 1e-4 constant, 16 prompts x 8
samples per optimizer step, and is scored by greedy exact match on 400 held-out ``builtin:arith:test``
questions before and after (the same rows and the same bar, ``LIFT``, as tests/test_grpo_arith.py):

- ``dapo``: DAPO's token-level loss over the whole step (two micro-batches of 8 prompts) with clip-higher
  (epsilon_high 0.28), 60 steps. With one update per batch of rollouts the ratio is 1, so the clip never
  acts, and a token-level loss over a step of two micro-batches is the same objective as bnpo over one of
  16: the two runs train alike (measured: the same held-out answers on every start tried). The test covers
  dapo's path (the step's token count gathered before the first backward), not a different optimum.
- ``gspo``: the sequence-level ratio with GSPO's clip range (3e-4 / 4e-4) and two updates per batch of
  rollouts (``--num_iterations 2``: with one, the ratio is always 1 and GSPO is plain GRPO), 60 steps.

Measured over eleven seeds (tests/test_grpo_arith.py's docstring has the table): from a start past 0.5,
bnpo/DAPO lift 6 to 26 points and GSPO 9 to 26; issue #18's 10-point figure holds on the default seed
(bnpo 12.0, GSPO 10.5) and on most others, and is reported rather than asserted. The training reward is
not asserted either: over a 10-step window it moved by less than its noise on some starts whose held-out
score rose 10 points (seed 42, GSPO: 0.389 -> 0.348 while held-out rose 0.54 -> 0.64). Each variant's
GRPO part runs in about 1 minute on 2 cores. Run: ``pytest -m slow tests/test_grpo_variants_arith.py -s``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_grpo_arith import LIFT  # noqa: E402 - the same bar and the same held-out questions as the bnpo test
SEED = int(os.environ.get("LMFORGE_TEST_SEED", "42"))  # the flakiness check varies it (the warm start's seed too)

VARIANTS: dict[str, dict[str, Any]] = {
    "dapo": dict(grpo_loss_type="dapo", epsilon_high=0.28, per_device_train_batch_size=8,
                 gradient_accumulation_steps=2),
    "gspo": dict(grpo_loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4,
                 num_iterations=2, per_device_train_batch_size=16, gradient_accumulation_steps=1),
}


def held_out_rows(n_eval: int = 400) -> list[dict]:
    from test_grpo_arith import held_out

    return held_out(n_eval)[0]


def score(ckpt_or_model: Any, rows: list[dict], tokenizer: Any = None, template: Any = None) -> float:
    from lmforge.model import get_model_tokenizer
    from lmforge.template import get_template
    from test_grpo_arith import exact_match

    if isinstance(ckpt_or_model, (str, Path)):
        model, tokenizer = get_model_tokenizer(str(ckpt_or_model), device="cpu")
        template = get_template(tokenizer)
    else:
        model = ckpt_or_model
    return exact_match(model, tokenizer, template, rows)


def run_variant(ckpt: str, variant: str, workdir: str | Path, seed: int = 0, steps: int = 60,
                rows: list[dict] | None = None, before: float | None = None, lr: float = 1e-4,
                temperature: float = 1.0) -> dict[str, Any]:
    """GRPO with ``VARIANTS[variant]`` from ``ckpt``; held-out exact match before and after."""
    import torch

    from lmforge import RlhfArguments, rlhf_main

    rows = rows if rows is not None else held_out_rows()
    before = before if before is not None else score(ckpt, rows)
    t0 = time.time()
    result = rlhf_main(RlhfArguments(
        model=ckpt, rlhf_type="grpo", dataset=["builtin:arith-rl#4000"], reward_funcs=["accuracy"],
        reward_kwargs={"accuracy": {"strict": True}}, train_type="full", learning_rate=lr,
        lr_scheduler_type="constant", warmup_ratio=0.0, beta=0.0, num_generations=8, max_completion_length=8,
        temperature=temperature, max_steps=steps, save_steps=10 ** 6, logging_steps=10, seed=seed, data_seed=seed,
        output_dir=str(Path(workdir) / f"{variant}-{seed}"), add_version=False, report_to=["none"], plot=False,
        **VARIANTS[variant]))
    seconds = time.time() - t0
    trainer = result["trainer"]
    torch.manual_seed(0)
    after = score(trainer.model, rows, trainer.processing_class, trainer.template)
    logs = [h for h in result["log_history"] if "reward" in h]
    return {"variant": variant, "seed": seed, "steps": steps, "lr": lr, "temperature": temperature, "before": before, "after": after,
            "lift": round(after - before, 3), "reward_first": logs[0]["reward"], "reward_last": logs[-1]["reward"],
            "grpo_seconds": round(seconds, 1)}


@pytest.fixture(scope="module")
def warm_ckpt(request):
    try:
        return request.getfixturevalue("arith_warm_ckpt")
    except pytest.FixtureLookupError:
        path = os.environ.get("LMFORGE_ARITH_WARM_CKPT")
        if not path:
            pytest.skip("no arith_warm_ckpt fixture and no LMFORGE_ARITH_WARM_CKPT checkpoint")
        return path


@pytest.fixture(scope="module")
def rows_and_before(warm_ckpt):
    rows = held_out_rows()
    return rows, score(warm_ckpt, rows)


@pytest.mark.slow
@pytest.mark.xdist_group("arith")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_lifts_the_warm_start(tmp_path, warm_ckpt, rows_and_before, variant):
    rows, before = rows_and_before
    report = run_variant(warm_ckpt, variant, tmp_path, seed=SEED, rows=rows, before=before)
    print(json.dumps(report))
    assert 0.2 <= before <= 0.8
    assert report["after"] >= before + LIFT


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=os.environ.get("LMFORGE_ARITH_WARM_CKPT"), required=False)
    p.add_argument("--workdir", default="/tmp/lmforge-grpo-variants")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = held_out_rows()
    before = score(a.ckpt, rows)
    for v in a.variants:
        for s in a.seeds:
            print(json.dumps(run_variant(a.ckpt, v, a.workdir, s, a.steps, rows, before, a.lr, a.temperature)), flush=True)
