"""Arguments of ``lmforge eval``: what to score (a model, a checkpoint or a server), on what, and how."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.arguments.base import ArgumentError, field
from lmforge.arguments.infer import InferArguments


@dataclass
class EvalArguments(InferArguments):
    """Score a model or an OpenAI-compatible server on datasets: lmforge eval --model M --eval_dataset D."""

    eval_dataset: list[str] = field(
        default_factory=list,
        help="datasets to score on: builtin:arith (its held-out test split), local JSONL/JSON/CSV/parquet, hub ids; "
             "name#N samples N rows. With --eval_backend lm_eval/evalscope: their task names")
    eval_metric: list[str] = field(
        default_factory=list,
        help="metrics per dataset: one value for all datasets or one per dataset; a value is 'auto' or "
             "comma-joined names (numeric, multiple_choice, exact_match, bleu, rouge, or a plugin's)")
    eval_url: Optional[str] = field(None, "score a running OpenAI-compatible server at this base URL "
                                          "(http://host:port or .../v1) instead of loading a model")
    api_key: Optional[str] = field(None, "API key for --eval_url")
    eval_concurrency: int = field(8, "requests in flight at once against --eval_url")
    eval_limit: Optional[int] = field(None, "score only the first N rows of each dataset")
    eval_timeout: float = field(600.0, "seconds one request to --eval_url may take")
    output_dir: Optional[str] = field(None, "where the report and predictions go (default: <ckpt_dir>/eval, or "
                                            "output/eval/<model>); rerunning into it resumes")
    eval_resume: bool = field(True, "reuse answers already in output_dir (false: answer every row again)")
    eval_mc_mode: Literal["auto", "generate", "loglikelihood"] = field(
        "auto", "multiple choice: read the letter from a generated reply, or pick the most likely choice "
                "(local model only); auto = loglikelihood for a local model, generate for --eval_url")
    eval_zh_segmenter: Literal["char", "jieba"] = field("char", "how BLEU/ROUGE split Chinese text: by character, "
                                                                "or into words with jieba (if installed)")
    eval_backend: Literal["native", "lm_eval", "evalscope"] = field(
        "native", "native: lmforge's evaluators; lm_eval / evalscope: run that tool (installed separately) "
                  "against --eval_url or a server started here")
    eval_include_path: Optional[str] = field(None, "lm_eval: a folder of task YAML files (--include_path)")
    eval_backend_args: list[str] = field(default_factory=list,
                                         help="extra command-line arguments passed to lm_eval / evalscope")
    compare: list[str] = field(default_factory=list,
                               help="put eval reports side by side: run folders or eval_report.json files "
                                    "(label=path to name a column); writes compare_report.* into --output_dir")
    plot: bool = field(True, "write a PNG bar chart of the metrics")

    def __post_init__(self) -> None:
        if not self.compare and not self.eval_dataset:
            raise ArgumentError("nothing to score on: pass --eval_dataset (or --compare REPORT ...)")
        if self.eval_metric and len(self.eval_metric) not in (1, len(self.eval_dataset)):
            raise ArgumentError(f"--eval_metric: give one value for all datasets or one per dataset "
                                f"({len(self.eval_dataset)}), got {len(self.eval_metric)}")
        if self.eval_concurrency < 1:
            raise ArgumentError(f"--eval_concurrency must be >= 1, got {self.eval_concurrency}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ArgumentError(f"--eval_limit must be >= 1, got {self.eval_limit}")
        if not self.compare and not self.eval_url and not self.model and not self.ckpt_dir and not self.adapters:
            raise ArgumentError("nothing to score: pass --model / --ckpt_dir (a local model) "
                                "or --eval_url (a running server)")
