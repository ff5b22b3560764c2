"""Seed/thread/recipe sweep of the arithmetic SFT learning curve (not a test: the evidence behind the
learning tests' bars). Each run trains ``builtin:tiny`` on ``builtin:arith`` and records greedy exact
match on held-out questions every ``--every`` steps, one JSON line per finished run.

    python tests/arith_sweep.py --runs '[{"seed": 1}, {"seed": 2, "learning_rate": 2e-3}]' --procs 2 --out sweep.jsonl

The numbers in arith_probe.py's docstring came from two runs of this script on the H200 machine (16 CPU
cores and the GPU, ``{"device": "cuda"}``) and the runs of the learning tests here.

Runs go to ``--procs`` worker processes, each with ``threads`` intra-op threads (default 1).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arith_probe import RECIPE  # noqa: E402  (the runs override what they vary)


def one_run(spec: dict) -> dict:
    spec = dict(spec)
    run_id = json.dumps({k: v for k, v in spec.items() if k != "progress"}, sort_keys=True)
    threads = spec.pop("threads", 1)
    every = spec.pop("every", 100)
    n_eval = spec.pop("n_eval", 200)
    device = spec.pop("device", "cpu")
    import torch

    torch.set_num_threads(threads)
    if spec.pop("deterministic", False):
        torch.use_deterministic_algorithms(True)
    from transformers import TrainerCallback

    from arith_probe import exact_match
    from lmforge import TrainArguments, sft_main
    from lmforge.dataset import load_dataset
    from lmforge.model import get_model_tokenizer
    from lmforge.registry import CALLBACKS
    from lmforge.template import get_template

    rows = list(load_dataset([f"builtin:arith:test#{n_eval}"], shuffle=False)[0])
    tok = get_model_tokenizer("builtin:tiny", load_model=False)[1]
    tpl = get_template(tok)
    curve: list[tuple[int, float]] = []
    progress = spec.pop("progress", None)

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                curve.append((state.global_step, exact_match(model, tok, tpl, rows)))
                if progress:  # one line per probe, so a run cut short still leaves its curve
                    with open(progress, "a") as fh:
                        fh.write(json.dumps({"run": run_id, "step": curve[-1][0], "acc": curve[-1][1]}) + "\n")

    name = f"probe_{os.getpid()}"
    CALLBACKS.register(name, Probe(), overwrite=True)
    seed = spec.pop("seed", 42)
    kw = {**RECIPE, **spec, "seed": seed, "data_seed": spec.get("data_seed", seed), "callbacks": [name]}
    if device == "cuda":
        kw.update(torch_dtype="float32", fused_ce="false")
    else:
        kw["use_cpu"] = True
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        sft_main(TrainArguments(**kw, output_dir=d))
    return {"spec": {**spec, "seed": seed, "threads": threads, "device": device}, "curve": curve,
            "final": curve[-1][1] if curve else None, "seconds": round(time.time() - t0, 1)}


def _worker(spec: dict) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return json.dumps(one_run(spec))
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
        return json.dumps({"spec": spec, "error": repr(e)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="JSON list of overrides (seed, threads, warmup_ratio, ...)")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--out", default="arith_sweep.jsonl")
    p.add_argument("--progress", default=None, help="also append every probe point here")
    a = p.parse_args()
    runs = [{**r, "progress": a.progress} if a.progress else r for r in json.loads(a.runs)]
    with mp.get_context("spawn").Pool(a.procs) as pool, open(a.out, "a") as fh:
        for line in pool.imap_unordered(_worker, runs):
            fh.write(line + "\n")
            fh.flush()
            print(line, flush=True)


if __name__ == "__main__":
    main()
