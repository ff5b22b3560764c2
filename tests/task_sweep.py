"""Measure the task recipes of test_tasks_e2e.py over seeds (how the bars and the spread in its docstring were set).

    python tests/task_sweep.py --seeds 0 1 2 42 --threads 1 [--tasks embedding seq_cls reranker]

Each run trains builtin:tiny with the recipe and that seed (as --seed and --data_seed: the sample of rows,
their order and any new head) and prints the held-out metric and the training's wall and CPU seconds,
one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 42])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", nargs="+", default=["embedding", "seq_cls", "reranker"])
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from lmforge.arguments.base import load_config_file
    from test_tasks_e2e import CLASSIFIER, RECIPE, RERANKER, evaluate, train

    recipes = {"embedding": ({k: v for k, v in load_config_file(str(RECIPE)).items() if k != "model"},
                             "builtin:arith-retrieval", "recall@1"),
               "seq_cls": (CLASSIFIER, "builtin:intents", "accuracy"),
               "reranker": (RERANKER, "builtin:intent-retrieval", "ndcg@10")}
    for task in a.tasks:
        recipe, dataset, key = recipes[task]
        for seed in a.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime, time.time()
                ckpt = train(Path(tmp) / "run", **{**recipe, "seed": seed, "data_seed": seed})
                cpu, wall = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0, time.time() - t0
                metrics = evaluate(Path(tmp) / "eval", dataset, ckpt_dir=ckpt)
            print(json.dumps({"task": task, "seed": seed, key: metrics[key], "train_wall_s": round(wall),
                              "train_cpu_s": round(cpu), "metrics": metrics}), flush=True)


if __name__ == "__main__":
    main()
