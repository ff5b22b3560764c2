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
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.arguments import EvalArguments
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")


def compare_main(args: EvalArguments) -> dict[str, Any]:
    from lmforge.eval.report import compare_markdown, compare_reports, write_compare

    from lmforge.utils.command import print_output

    cmp = compare_reports(list(args.compare))
    out = Path(args.output_dir) if args.output_dir else Path("output") / f"eval-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    files = write_compare(cmp, out, plot=args.plot)
    print(compare_markdown(cmp))
    print_output("eval", f"comparison ({', '.join(Path(f).name for f in files.values())})", out)
    return {k: v for k, v in cmp.items() if not k.startswith("_")} | {"files": files}


def eval_main(args: EvalArguments, engine: Any = None) -> dict[str, Any]:
    """Run the eval ``args`` describe and return the report (``engine``: an already loaded one to use)."""
    setup_logging()
    if args.compare:
        return compare_main(args)
    from lmforge.eval.runner import default_output_dir
    from lmforge.utils.command import rerun_command

    args.output_dir = args.output_dir or str(default_output_dir(args))  # fixed now: the resume hint names it
    try:
        if args.eval_backend != "native":
            from lmforge.eval.harness import run_harness

            report = run_harness(args, engine)
        else:
            from lmforge.eval.runner import run_eval

            report = run_eval(args, engine)
    except KeyboardInterrupt:
        if Path(args.output_dir, "predictions").is_dir():
            print(f"eval: interrupted; the answers so far are kept in {args.output_dir}. Continue with:\n  "
                  + rerun_command({"--output_dir": args.output_dir}), file=sys.stderr)
        raise
    from lmforge.eval.report import report_markdown
    from lmforge.utils.command import print_output

    print(report_markdown(report))
    folder = Path(report["files"]["json"]).parent
    print_output("eval", f"report and predictions ({', '.join(Path(f).name for f in report['files'].values())})",
                 folder)
    return report
