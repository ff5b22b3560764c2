"""``run_eval``: answer every row of every eval dataset (an engine, or a server), score, report.

Answers are appended to ``output_dir/predictions/<dataset>.jsonl`` as they come, one line per row
under its key (dataset name + index + hash of the prompt); a rerun into the same folder skips the
rows already answered, so an interrupted eval continues where it stopped. When every row is
answered the file is rewritten in row order with each row's scores. ``eval_run.json`` records what
answered (model or server, generation settings) so that answers of two different models are never
mixed: a rerun with other settings stops and says so.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterable

from lmforge.eval.data import EvalItem, EvalSet, load_eval_set
from lmforge.eval.metrics import auto_metrics, choice_list, get_eval_metric

logger = logging.getLogger("lmforge.eval")

REPORT_VERSION = 1
OnResult = Callable[[EvalItem, dict], None]


# ------------------------------------------------------------------------------------ answering


class EngineAnswerer:
    """Answers with a local engine, ``max_batch_size`` rows per call; a row the engine rejects is isolated."""

    def __init__(self, engine: Any, request_config: Any, *, batch_size: int, adapter: str | None = None):
        self.engine, self.config, self.batch_size, self.adapter = engine, request_config, max(1, batch_size), adapter

    @property
    def supports_loglikelihood(self) -> bool:
        return all(hasattr(self.engine, a) for a in ("model", "tokenizer", "encode"))

    def _request(self, item: EvalItem) -> Any:
        from lmforge.infer.convert import parse_request

        return parse_request({"messages": item.messages, "images": item.row.get("images") or [],
                              "videos": item.row.get("videos") or [], "adapter": self.adapter})

    def _generate(self, items: list[EvalItem]) -> dict[int, dict]:
        from lmforge.infer.errors import InferRequestError

        out: dict[int, dict] = {}
        pending = list(items)
        while pending:
            try:
                responses = self.engine.infer([self._request(it) for it in pending], self.config, use_tqdm=False)
            except InferRequestError as e:
                if e.index is None or not 0 <= e.index < len(pending):
                    raise
                out[pending.pop(e.index).index] = {"error": e.reason}
                continue
            except Exception as e:  # noqa: BLE001 - one bad row must not sink the batch
                if len(pending) == 1:
                    out[pending[0].index] = {"error": f"{type(e).__name__}: {e}"}
                    return out
                logger.warning("a batch failed (%s: %s); answering its rows one by one", type(e).__name__, e)
                for it in pending:
                    out.update(self._generate([it]))
                return out
            for it, resp in zip(pending, responses):
                choice = resp.choices[0]
                out[it.index] = {"response": choice.message.content or "", "finish_reason": choice.finish_reason,
                                 "usage": resp.usage.model_dump()}
            return out

    def answer(self, items: list[EvalItem], on_result: OnResult) -> None:
        for lo in range(0, len(items), self.batch_size):
            chunk = items[lo:lo + self.batch_size]
            results = self._generate(chunk)
            for it in chunk:
                on_result(it, results[it.index])

    def score_choices(self, items: list[EvalItem], on_result: OnResult) -> None:
        """Multiple choice by log-likelihood: the reply is the letter of the choice the model finds most likely."""
        from lmforge.eval.loglikelihood import continuation_logprobs

        for it in items:
            choices = choice_list(it.row["choices"])
            if it.row.get("images") or it.row.get("videos"):
                on_result(it, {"error": "log-likelihood scoring of image or video rows is not supported; "
                                        "use --eval_mc_mode generate"})
                continue
            try:
                lps = continuation_logprobs(self.engine, self._request(it), [text for _, text in choices],
                                            adapter=self.adapter)
            except Exception as e:  # noqa: BLE001 - recorded on the row, the rest go on
                on_result(it, {"error": f"{type(e).__name__}: {e}"})
                continue
            best = max(range(len(lps)), key=lps.__getitem__)
            on_result(it, {"response": choices[best][0], "choice_logprobs": lps})


class ServerAnswerer:
    """Answers through an OpenAI-compatible ``/v1/chat/completions``, ``concurrency`` requests in flight."""

    RETRY_STATUS = (408, 429, 500, 502, 503, 504)

    def __init__(self, url: str, payload: dict, *, api_key: str | None = None, model: str | None = None,
                 concurrency: int = 8, timeout: float = 600.0, retries: int = 4):
        self.base = normalize_base_url(url)
        self.api_key, self.concurrency, self.timeout, self.retries = api_key, concurrency, timeout, retries
        self.model = model or self.served_models()[0]
        self.payload = {**payload, "model": self.model}

    supports_loglikelihood = False

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(f"{self.base}{path}", data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def served_models(self) -> list[str]:
        try:
            models = [m["id"] for m in self._call("GET", "/v1/models").get("data", [])]
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ConnectionError(f"--eval_url {self.base}: cannot list models ({_http_reason(e)})") from None
        if not models:
            raise ValueError(f"--eval_url {self.base}: the server lists no models; pass --model NAME")
        return models

    def _one(self, item: EvalItem) -> dict:
        messages = item.messages
        if item.row.get("images") or item.row.get("videos"):
            from lmforge.dataset.media import openai_messages

            messages = openai_messages(messages, item.row.get("images") or [], item.row.get("videos"))
        body = {**self.payload, "messages": messages}
        for attempt in range(self.retries + 1):
            try:
                data = self._call("POST", "/v1/chat/completions", body)
                choice = data["choices"][0]
                return {"response": choice["message"].get("content") or "", "finish_reason": choice.get("finish_reason"),
                        "usage": data.get("usage") or {}}
            except urllib.error.HTTPError as e:
                if e.code not in self.RETRY_STATUS or attempt == self.retries:
                    return {"error": f"HTTP {e.code}: {_http_reason(e)}"}
            except (urllib.error.URLError, OSError) as e:
                if attempt == self.retries:
                    return {"error": f"request failed: {_http_reason(e)}"}
            except (KeyError, IndexError, ValueError) as e:
                return {"error": f"unexpected response: {type(e).__name__}: {e}"}
            time.sleep(min(8.0, 0.5 * 2 ** attempt))
        return {"error": "unreachable"}

    def answer(self, items: list[EvalItem], on_result: OnResult) -> None:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="lmforge-eval") as pool:
            futures = {pool.submit(self._one, it): it for it in items}
            try:
                for fut in as_completed(futures):
                    on_result(futures[fut], fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def normalize_base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or ``.../v1/chat/completions`` -> ``http://h:p``."""
    base = url.strip().rstrip("/")
    for suffix in ("/chat/completions", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if not base.startswith(("http://", "https://")):
        base = f"http://{base}"
    return base


def _http_reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        try:
            body = json.loads(e.read().decode("utf-8"))
            return str(body.get("error", {}).get("message") or body)
        except Exception:  # noqa: BLE001
            return e.reason
    return str(getattr(e, "reason", e))


# ------------------------------------------------------------------------------ cache and files


def read_cache(path: Path) -> dict[str, dict]:
    """Answered rows by key; a torn last line (a run killed mid-write) is ignored."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("key") and not rec.get("error") and rec.get("response") is not None:
                out[rec["key"]] = rec
    return out


def _generation_settings(args: Any) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "stop": list(args.stop),
            "seed": args.seed, "system": args.system, "template": args.template}


def _target(args: Any) -> dict:
    if args.eval_url:
        return {"eval_url": normalize_base_url(args.eval_url), "model": args.model}
    return {"model": args.model, "ckpt_dir": args.ckpt_dir, "adapters": list(args.adapters),
            "infer_backend": args.infer_backend}


def default_output_dir(args: Any) -> Path:
    """``eval-<time>`` where the output rule of :mod:`lmforge.utils.command` puts a command's output (for a
    server: under ``output/<host-port[-model]>/``). Pass ``--output_dir`` to continue an interrupted eval."""
    from lmforge.utils.command import default_output

    if args.eval_url:
        name = normalize_base_url(args.eval_url).split("://", 1)[1] + (f"-{args.model}" if args.model else "")
        return default_output("eval", re_slug(name) or "server")
    return default_output("eval", args.ckpt_dir or (args.adapters or [None])[0] or args.model)


def re_slug(name: str) -> str:
    from lmforge.eval.data import slugify

    return slugify(name)


def _check_run(output_dir: Path, run: dict, resume: bool) -> None:
    """Refuse to mix answers of different models or settings in one output_dir."""
    from lmforge.utils.io import atomic_write_text

    path = output_dir / "eval_run.json"
    if resume and path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in run.items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{output_dir} holds answers from another run ({detail}). Pass another --output_dir, "
                             "or --eval_resume false to answer every row again")
    atomic_write_text(path, json.dumps(run, indent=2, ensure_ascii=False, default=str))


# ---------------------------------------------------------------------------------------- scoring


def score_set(ds: EvalSet, cache: dict[str, dict], *, segmenter: str = "char") -> tuple[dict, list[dict]]:
    """(dataset summary, per-row records in order) for one answered dataset."""
    metrics = [get_eval_metric(m, segmenter=segmenter) for m in ds.metrics]
    records, predictions, references, rows, row_scores = [], [], [], [], []
    errors = 0
    for it in ds.items:
        rec = cache.get(it.key) or {}
        error = it.error or rec.get("error") or (None if rec.get("response") is not None else "not answered")
        prediction = rec.get("response") or ""
        row = {**it.row, **({"choice_logprobs": rec["choice_logprobs"]} if rec.get("choice_logprobs") else {})}
        scores: dict[str, float] = {}
        extracted: dict[str, Any] = {}
        if error:
            errors += 1
        for m in metrics:
            if error:
                continue
            scores.update(m.score_row(prediction, it.reference, row))
            value = m.extract(prediction, row)
            if value is not None:
                extracted[m.name] = value
        out = {"index": it.index, "key": it.key, "messages": it.messages, "response": rec.get("response"),
               "reference": it.reference, "scores": scores}
        if extracted:
            out["extracted"] = extracted
        for k in ("choice_logprobs", "finish_reason", "usage"):
            if rec.get(k) is not None:
                out[k] = rec[k]
        if error:
            out["error"] = error
        records.append(out)
        predictions.append(prediction)
        references.append(it.reference)
        rows.append(row)
        row_scores.append(scores)
    values: dict[str, float] = {}
    keys = list(dict.fromkeys(k for s in row_scores for k in s))
    filled = [{k: s.get(k, 0.0) for k in keys} for s in row_scores]  # a row not answered is wrong on every key
    for m in metrics:
        agg = m.aggregate(filled, predictions, references, rows)
        values.update({k: round(float(v), 6) for k, v in agg.items()})
    summary = {"metrics": values, "metric_names": list(ds.metrics), "rows": len(ds.items), "errors": errors,
               "source": ds.source}
    return summary, records


# --------------------------------------------------------------------------------------- the run


def _choose_metrics(ds: EvalSet, spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if (not names or names == ["auto"]) and ds.task:
        from lmforge.eval.task_metrics import default_metric

        return [default_metric(ds.task)]
    if not names or names == ["auto"]:
        ok = [it for it in ds.items if not it.error]
        return auto_metrics([it.row for it in ok], [it.reference for it in ok])
    from lmforge.registry import EVAL_METRICS

    for n in names:
        if n not in EVAL_METRICS:
            raise KeyError(EVAL_METRICS.unknown_message(n))
    if "multiple_choice" in names and not all(it.row.get("choices") for it in ds.items if not it.error):
        raise ValueError(f"--eval_metric multiple_choice: some rows of {ds.name} have no 'choices' column")
    return names


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="row", dynamic_ncols=True)


def run_eval(args: Any, engine: Any = None) -> dict:
    """Score ``args.eval_dataset`` with an engine (built from args unless given) or ``args.eval_url``.

    Returns the report (also written to ``output_dir/eval_report.{json,md,png}``).
    """
    from lmforge.eval.report import write_report
    from lmforge.registry import load_plugins

    load_plugins(args.external_plugins)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args)
    pred_dir = output_dir / "predictions"

    answerer: Any
    if args.eval_url and args.task_type not in (None, "causal_lm"):
        raise ValueError(f"--eval_url scores chat servers; to score a {args.task_type} model, pass its --ckpt_dir or "
                         "--model with --task_type (ranking over a server's /v1/embeddings is not built in)")
    if args.eval_url:
        payload = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                   "seed": args.seed}
        if args.top_k != -1:
            payload["top_k"] = args.top_k
        if args.repetition_penalty != 1.0:
            payload["repetition_penalty"] = args.repetition_penalty
        if args.stop:
            payload["stop"] = list(args.stop)
        payload = {k: v for k, v in payload.items() if v is not None}
        answerer = ServerAnswerer(args.eval_url, payload, api_key=args.api_key, model=args.model,
                                  concurrency=args.eval_concurrency, timeout=args.eval_timeout)
        target_name = f"{answerer.model} @ {answerer.base}"
    else:
        from lmforge.pipelines.infer import build_engine, request_config_from_args

        if engine is None:
            import torch

            torch.manual_seed(args.seed)
            engine = build_engine(args)
        adapter = next(iter(engine.adapters), None) if getattr(engine, "adapters", None) else None
        if getattr(engine, "task", None):  # an embedding model, reranker or classifier: it ranks or classifies
            from lmforge.eval.pooling import PoolingAnswerer

            answerer = PoolingAnswerer(engine, batch_size=args.max_batch_size)
        else:
            answerer = EngineAnswerer(engine, request_config_from_args(args), batch_size=args.max_batch_size,
                                      adapter=adapter)
        target_name = str(args.ckpt_dir or engine.model_name)
    mc_ll = args.eval_mc_mode == "loglikelihood" or (args.eval_mc_mode == "auto" and answerer.supports_loglikelihood)
    if mc_ll and not answerer.supports_loglikelihood:
        raise ValueError("--eval_mc_mode loglikelihood needs a local model (not --eval_url)")

    pred_dir.mkdir(parents=True, exist_ok=True)  # the answerer is ready: a failed start leaves no empty folder
    # a task model (embedding, reranker, classifier) generates nothing: its settings are what it was loaded as
    task = getattr(answerer, "task", None)
    settings = {"task": task, "pooling": engine.pooling if task == "embedding" else None} if task else \
        _generation_settings(args)
    _check_run(output_dir, {"target": _target(args), "generation": settings}, args.eval_resume)

    load_kwargs = dict(columns=args.columns or None, strict=args.strict, seed=args.data_seed, hub=args.hub,
                       model_name=args.model_name, model_author=args.model_author)
    metric_specs = args.eval_metric or ["auto"]
    sets: list[EvalSet] = []
    for i, name in enumerate(args.eval_dataset):
        ds = load_eval_set(name, mc_generate=not mc_ll, limit=args.eval_limit, task=getattr(answerer, "task", None),
                           **load_kwargs)
        ds.metrics = _choose_metrics(ds, metric_specs[i] if len(metric_specs) > 1 else metric_specs[0])
        sets.append(ds)
    slugs = [ds.slug for ds in sets]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--eval_dataset names two datasets that map to the same file name: {slugs}")

    results: dict[str, dict] = {}
    start = time.perf_counter()
    for ds in sets:
        path = pred_dir / f"{ds.slug}.jsonl"
        if not args.eval_resume:
            path.unlink(missing_ok=True)
        cache = read_cache(path)
        todo = [it for it in ds.items if not it.error and it.key not in cache]
        done = len(ds.items) - len(todo)
        logger.info("eval %s: %d rows, metrics %s%s", ds.name, len(ds.items), ", ".join(ds.metrics),
                    f"; {done} already answered in {path}" if done else "")
        if todo:
            with open(path, "a", encoding="utf-8") as f, _progress(len(ds.items), done, f"eval {ds.name}") as bar:
                def on_result(it: EvalItem, rec: dict) -> None:
                    rec = {"key": it.key, "index": it.index, **rec}
                    if rec.get("error"):
                        logger.warning("%s row %d: %s", ds.name, it.index, rec["error"])
                    else:
                        cache[it.key] = rec
                    f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                    f.flush()
                    bar.update(1)

                failed: dict[str, dict] = {}

                def remember(it: EvalItem, rec: dict) -> None:
                    if rec.get("error"):
                        failed[it.key] = rec
                    on_result(it, rec)

                if hasattr(answerer, "prepare"):  # an embedding model embeds the set's corpus first
                    answerer.prepare(ds)
                ll_items = [it for it in todo if mc_ll and it.row.get("choices")]
                gen_items = [it for it in todo if not (mc_ll and it.row.get("choices"))]
                if ll_items:
                    answerer.score_choices(ll_items, remember)
                if gen_items:
                    answerer.answer(gen_items, remember)
                for key, rec in failed.items():  # errors are kept for the report, not cached as answers
                    cache.setdefault(key, {**rec, "response": None})
        summary, records = score_set(ds, cache, segmenter=args.eval_zh_segmenter)
        _write_jsonl(path, records)
        summary["predictions"] = str(path.relative_to(output_dir))
        if "multiple_choice" in ds.metrics:
            summary["mc_mode"] = "loglikelihood" if mc_ll else "generate"
        results[ds.name] = summary
        shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
        logger.info("eval %s: %s (%d rows, %d errors)", ds.name, shown, summary["rows"], summary["errors"])

    report = {"lmforge_eval_report": REPORT_VERSION, "target": target_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "run": {"target": _target(args), "generation": settings},
              "seconds": round(time.perf_counter() - start, 3), "datasets": results}
    report["files"] = write_report(report, output_dir, plot=args.plot)
    return report


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    from lmforge.utils.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


__all__ = ["EngineAnswerer", "ServerAnswerer", "default_output_dir", "normalize_base_url", "read_cache", "run_eval",
           "score_set"]
