"""Standard benchmarks through lm-evaluation-harness or EvalScope, pointed at an OpenAI-compatible server.

lmforge does not re-implement MMLU, GSM8K and friends: those tools own the task definitions,
prompts and scoring. Both can evaluate any OpenAI-compatible chat endpoint, which is what
``lmforge deploy`` serves, so the hook is small:

1. the server: ``--eval_url`` if given, else the model is loaded here and served on a free
   loopback port for the duration of the run (:class:`lmforge.serve.server.ServerThread`);
2. the tool's command line, built by :func:`lm_eval_command` / :func:`evalscope_command`, run as a
   subprocess whose output is passed through with the API key masked;
3. the tool's result files, read back into an ``eval_report.json`` like the native evaluators write,
   so ``--compare`` works across both.

Neither tool is a dependency: install one (``pip install lm_eval`` or ``pip install evalscope``)
where lmforge runs. Both download their benchmark data on first use unless the task is local
(lm_eval ``--eval_include_path`` with a task YAML over a local file).

The API key never reaches a command line (which any user of the machine can read in ``ps``) or a
log: lm_eval reads it from ``OPENAI_API_KEY``; evalscope accepts it only as ``--api-key``, so it
is started through a few lines of Python (:data:`_EVALSCOPE_SHIM`) that move the key from the
environment into evalscope's own ``sys.argv`` inside the child. Every log line of the run and the
child's output have the key replaced by ``***`` (:func:`lmforge.utils.log.mask_secret`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.utils.errors import SetupError

logger = logging.getLogger("lmforge.eval")

KEY_ENV = "LMFORGE_EVAL_API_KEY"
# Runs evalscope's console script in this interpreter with the key appended to its argv in memory:
# the key travels in the environment (popped at once, so evalscope's own children do not inherit it).
_EVALSCOPE_SHIM = (
    "import os, sys\n"
    "from importlib.metadata import entry_points\n"
    f"key = os.environ.pop({KEY_ENV!r}, '')\n"
    "sys.argv = ['evalscope', *sys.argv[1:], *(['--api-key', key] if key else [])]\n"
    "main = next(iter(entry_points(group='console_scripts', name='evalscope'))).load()\n"
    "sys.exit(main())\n")


def _launcher(module: str, scripts: tuple[str, ...]) -> list[str]:
    if importlib.util.find_spec(module) is not None:
        return [sys.executable, "-m", module]
    for name in scripts:
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise FileNotFoundError(f"{scripts[0]} is not installed here: pip install {scripts[0]}")


def lm_eval_command(base_url: str, model: str, tasks: list[str], *, output_path: str | Path,
                    include_path: str | Path | None = None, limit: int | None = None, num_concurrent: int = 8,
                    max_gen_toks: int | None = None, extra: list[str] | tuple[str, ...] = (),
                    launcher: list[str] | None = None) -> list[str]:
    """The ``lm_eval`` command that scores ``tasks`` through the server's ``/v1/chat/completions``.

    ``local-chat-completions`` sends each prompt as chat messages (``--apply_chat_template``) as strings
    (``tokenized_requests=False``), so the server applies the model's own template. Chat endpoints give
    no prompt log-probabilities, so loglikelihood tasks (most multiple-choice ones) need a completions
    model instead; generate_until tasks (GSM8K, ...) work.
    """
    from lmforge.eval.runner import normalize_base_url

    model_args = [f"model={model}", f"base_url={normalize_base_url(base_url)}/v1/chat/completions",
                  f"num_concurrent={num_concurrent}", "max_retries=3", "tokenized_requests=False"]
    if max_gen_toks:
        model_args.append(f"max_gen_toks={max_gen_toks}")
    cmd = [*(launcher or _launcher("lm_eval", ("lm-eval", "lm_eval"))),
           "--model", "local-chat-completions", "--model_args", ",".join(model_args),
           "--tasks", ",".join(tasks), "--apply_chat_template", "--output_path", str(output_path)]
    if include_path:
        cmd += ["--include_path", str(include_path)]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd + list(extra)


def evalscope_command(base_url: str, model: str, datasets: list[str], *, work_dir: str | Path,
                      limit: int | None = None, extra: list[str] | tuple[str, ...] = (),
                      launcher: list[str] | None = None) -> list[str]:
    """The ``evalscope eval`` command that scores ``datasets`` through the server's OpenAI API."""
    from lmforge.eval.runner import normalize_base_url

    cmd = [*(launcher or _evalscope_launcher()), "eval", "--model", model,
           "--api-url", f"{normalize_base_url(base_url)}/v1", "--eval-type", "openai_api",
           "--datasets", *datasets, "--work-dir", str(work_dir)]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd + list(extra)


def _evalscope_launcher() -> list[str]:
    """``python -c SHIM`` when evalscope is installed in this environment (so the key can be passed privately)."""
    from importlib.metadata import entry_points

    if any(True for _ in entry_points(group="console_scripts", name="evalscope")):
        return [sys.executable, "-c", _EVALSCOPE_SHIM]
    return _launcher("evalscope", ("evalscope",))


def parse_lm_eval_results(output_path: str | Path) -> dict[str, dict]:
    """``{task: {"metrics": {...}, "rows": n}}`` from the newest ``results_*.json`` under ``output_path``."""
    files = sorted(Path(output_path).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"lm_eval wrote no results_*.json under {output_path}")
    data = json.loads(files[-1].read_text(encoding="utf-8"))
    out: dict[str, dict] = {}
    for task, values in data.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            name, _, flt = key.partition(",")
            if name == "alias" or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[name if flt in ("", "none") else f"{name}/{flt}"] = float(value)
        samples = data.get("n-samples", {}).get(task, {})
        out[task] = {"metrics": metrics, "metric_names": ["lm_eval"], "rows": samples.get("effective", 0),
                     "errors": 0, "source": f"lm_eval:{task}", "predictions": str(files[-1])}
    return out


def parse_evalscope_results(work_dir: str | Path) -> dict[str, dict]:
    """Best effort over EvalScope's ``reports/<model>/<dataset>.json`` files (their layout varies by version)."""
    out: dict[str, dict] = {}
    for path in sorted(Path(work_dir).rglob("reports/**/*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            continue
        name = data.get("dataset_name") or path.stem
        metrics, rows = {}, 0
        for m in data.get("metrics") or []:
            if isinstance(m, dict) and isinstance(m.get("score"), (int, float)):
                metrics[str(m.get("name", "score"))] = float(m["score"])
                rows = max(rows, int(m.get("num") or 0))
        if not metrics and isinstance(data.get("score"), (int, float)):
            metrics["score"] = float(data["score"])
        out[name] = {"metrics": metrics, "metric_names": ["evalscope"], "rows": rows, "errors": 0,
                     "source": f"evalscope:{name}", "predictions": str(path)}
    if not out:
        raise FileNotFoundError(f"evalscope wrote no report JSON under {work_dir}")
    return out


def _run(cmd: list[str], env_extra: dict[str, str]) -> None:
    """Run ``cmd`` with ``env_extra`` added to the environment, its output passed on with secrets masked."""
    from lmforge.utils.log import masked

    env = {**os.environ, **env_extra}
    shown = ["python -c <evalscope launcher>" if c == _EVALSCOPE_SHIM else c for c in cmd]
    logger.info("running: %s", " ".join(shown))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):  # line by line, so progress shows as it happens
        sys.stderr.write(masked(line.decode("utf-8", "replace")))
        sys.stderr.flush()
    code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{Path(shown[0]).name} {' '.join(shown[1:3])} ... exited with {code}")


def run_harness(args: Any, engine: Any = None) -> dict:
    """Run ``args.eval_backend`` (lm_eval or evalscope) on ``args.eval_dataset`` (its task names)."""
    from contextlib import ExitStack

    from lmforge.eval.report import write_report
    from lmforge.eval.runner import ServerAnswerer, default_output_dir

    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from lmforge.utils.log import mask_secret

    mask_secret(args.api_key)
    with ExitStack() as stack:
        url, api_key = args.eval_url, args.api_key
        if not url:
            from lmforge.pipelines.infer import build_engine
            from lmforge.serve import create_app
            from lmforge.serve.app import ServeConfig
            from lmforge.serve.server import ServerThread

            engine = engine or build_engine(args)
            cfg = ServeConfig(max_concurrency=args.eval_concurrency, max_queue=max(64, 4 * args.eval_concurrency),
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=list(args.stop))
            url, api_key = stack.enter_context(ServerThread(create_app(engine, cfg))).url, None
        model = args.model if args.eval_url and args.model else None
        model = model or ServerAnswerer(url, {}, api_key=api_key).model
        if args.eval_backend == "lm_eval":
            out = output_dir / "lm_eval"
            _run(lm_eval_command(url, model, list(args.eval_dataset), output_path=out,
                                 include_path=args.eval_include_path, limit=args.eval_limit,
                                 num_concurrent=args.eval_concurrency, max_gen_toks=args.max_new_tokens,
                                 extra=args.eval_backend_args), {"OPENAI_API_KEY": api_key or "EMPTY"})
            results = parse_lm_eval_results(out)
        elif args.eval_backend == "evalscope":
            out = output_dir / "evalscope"
            cmd = evalscope_command(url, model, list(args.eval_dataset), work_dir=out, limit=args.eval_limit,
                                    extra=args.eval_backend_args)
            if api_key and _EVALSCOPE_SHIM not in cmd:
                raise SetupError("evalscope takes an API key only on its command line, where other users of this "
                                   "machine could read it; install evalscope in this Python environment "
                                   f"({sys.executable}) so lmforge can hand it the key privately")
            _run(cmd, {KEY_ENV: api_key} if api_key else {})
            results = parse_evalscope_results(out)
        else:
            raise ValueError(f"unknown --eval_backend {args.eval_backend!r}")
    report = {"lmforge_eval_report": 1, "target": model, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "run": {"backend": args.eval_backend}, "seconds": round(time.perf_counter() - start, 3),
              "datasets": results}
    report["files"] = write_report(report, output_dir, plot=args.plot)
    return report
