"""``eval_main``: score a model or a server on datasets and write a report, or compare reports.

    lmforge eval --model builtin:tiny --eval_dataset builtin:arith            # the held-out arith split
    lmforge eval --ckpt_dir output/.../checkpoint-150 --eval_dataset test.jsonl --eval_metric bleu,rouge
    lmforge eval --eval_url http://127.0.0.1:8000 --eval_dataset builtin:arith --eval_concurrency 16
    lmforge eval --compare base=out/base sft=out/sft dpo=out/dpo --output_dir out/compare
    lmforge eval --model M --eval_backend lm_eval --eval_dataset gsm8k       # lm-evaluation-harness

See docs/eval.md.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge.arguments import EvalArguments
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")


def compare_main(args: EvalArguments) -> dict[str, Any]:
    from lmforge.eval.report import compare_markdown, compare_reports, write_compare

    cmp = compare_reports(list(args.compare))
    out = Path(args.output_dir) if args.output_dir else Path("output") / "eval" / "compare"
    files = write_compare(cmp, out, plot=args.plot)
    print(compare_markdown(cmp))
    print(f"compare: {', '.join(files.values())}")
    return {k: v for k, v in cmp.items() if not k.startswith("_")} | {"files": files}


def eval_main(args: EvalArguments, engine: Any = None) -> dict[str, Any]:
    """Run the eval ``args`` describe and return the report (``engine``: an already loaded one to use)."""
    setup_logging()
    if args.compare:
        return compare_main(args)
    if args.eval_backend != "native":
        from lmforge.eval.harness import run_harness

        report = run_harness(args, engine)
    else:
        from lmforge.eval.runner import run_eval

        report = run_eval(args, engine)
    from lmforge.eval.report import report_markdown

    print(report_markdown(report))
    print(f"eval: {', '.join(report['files'].values())}")
    return report
