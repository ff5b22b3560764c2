"""``infer_main``: chat with a model in the terminal, or answer a dataset into a JSONL.

    lmforge infer --model builtin:tiny                          # chat (stdin may be a pipe)
    lmforge infer --ckpt_dir output/.../checkpoint-50           # base + adapter, template from args.json
    lmforge infer --model M --val_dataset test.jsonl            # batch: one JSONL line per row

Batch mode answers each row's conversation minus its last assistant turn (kept as ``reference``);
a row that cannot be answered gets an ``error`` field (and a log line) and the rest go on.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from lmforge.arguments import InferArguments
from lmforge.utils.log import setup_logging

logger = logging.getLogger("lmforge")

# Canonical columns that are not copied to the output when unused (None).
_CANONICAL = ("tools", "images", "videos", "rejected_response", "rejected_messages", "label", "text")
CHAT_HELP = ("Enter sends a message. End a line with \\ to go on with the next one, or put \"\"\" on a line "
             "to start and end a multi-line message.\n'clear' (or 'reset') forgets the conversation, 'exit' or "
             "Ctrl-D quits, Ctrl-C stops a reply.")
IMAGE_HELP = "Put <image> in a message to attach an image: you are asked for its path (or data: URL)."


def build_engine(args: InferArguments) -> Any:
    """The engine ``args`` ask for, loaded with the checkpoint, adapters and template resolved."""
    from lmforge.infer import get_engine
    from lmforge.infer.pooling import checkpoint_task

    task = checkpoint_task(getattr(args, "task_type", None), args.ckpt_dir, args.adapters)
    if task:  # an embedding model, reranker or classifier: its own engine (lmforge.infer.pooling)
        return pooling_engine(args, task)
    kwargs: dict[str, Any] = dict(
        model=args.model, ckpt_dir=args.ckpt_dir, adapters=args.adapters, template=args.template,
        system=args.system, torch_dtype=args.torch_dtype, max_batch_size=args.max_batch_size,
        max_model_len=args.max_model_len, hub=args.hub, revision=args.revision, attn_impl=args.attn_impl,
        device_map=args.device_map, model_kwargs=args.model_kwargs, trust_remote_code=args.trust_remote_code,
        enable_thinking=args.enable_thinking, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        video_fps=args.video_fps, video_max_frames=args.video_max_frames)
    if args.agent_template:
        kwargs["agent_template"] = args.agent_template
    if args.infer_backend == "native":
        kwargs.update(gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                      enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                      stream_interval=args.stream_interval, prefill_wait_steps=args.prefill_wait_steps,
                      async_scheduling=args.async_scheduling)
    elif args.stream_interval != 1:
        raise ValueError(f"--stream_interval {args.stream_interval}: only the native engine groups streamed tokens "
                         "(--infer_backend native); the hf engine streams every token")
    if args.data_parallel_size > 1 or getattr(args, "engine_process", False):
        from lmforge.infer.data_parallel import DataParallelEngine

        return DataParallelEngine(args.infer_backend, replica_devices(args.data_parallel_size),
                                  api_server_count=getattr(args, "api_server_count", 1), **kwargs)
    return get_engine(args.infer_backend, **kwargs)


def pooling_engine(args: InferArguments, task: str) -> Any:
    from lmforge.infer.pooling import PoolingEngine

    if args.data_parallel_size > 1:
        raise ValueError(f"--data_parallel_size is for generation engines; a {task} model runs in one engine")
    if args.infer_backend != "hf":
        logger.info("--infer_backend %s: a %s model runs on the pooling engine (transformers)", args.infer_backend,
                    task)
    return PoolingEngine(args.model, ckpt_dir=args.ckpt_dir, adapters=args.adapters, task_type=task,
                         pooling=args.pooling, query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                         rerank_instruction=args.rerank_instruction, template=args.template, system=args.system,
                         torch_dtype=args.torch_dtype, device_map=args.device_map, max_batch_size=args.max_batch_size,
                         max_model_len=args.max_model_len, hub=args.hub, revision=args.revision,
                         attn_impl=args.attn_impl, model_kwargs=args.model_kwargs,
                         trust_remote_code=args.trust_remote_code)


def replica_devices(size: int) -> list[str]:
    """``cuda:0..size-1``; on a machine without GPUs, ``size`` CPU processes (sharing its cores)."""
    import torch

    if not torch.cuda.is_available():
        if size > 1:
            logger.warning("--data_parallel_size %d without a GPU: %d CPU replicas share this machine's cores", size,
                           size)
        return ["cpu"] * size
    visible = torch.cuda.device_count()
    if size > visible:
        raise ValueError(f"--data_parallel_size {size}: only {visible} GPU(s) are visible (CUDA_VISIBLE_DEVICES)")
    return [f"cuda:{i}" for i in range(size)]


def request_config_from_args(args: InferArguments) -> Any:
    from lmforge.infer import RequestConfig

    return RequestConfig(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=list(args.stop))


def infer_main(args: InferArguments) -> dict[str, Any]:
    """Batch mode when ``--dataset``/``--val_dataset`` is given (returns the summary), chat otherwise."""
    setup_logging()
    import torch

    from lmforge.registry import load_plugins

    load_plugins(args.external_plugins)
    from lmforge.dataset.loader import check_datasets

    check_datasets(args.dataset, args.val_dataset)  # a missing file fails before the model loads
    from lmforge.infer.pooling import checkpoint_task

    task = checkpoint_task(args.task_type, args.ckpt_dir, args.adapters)
    if task:
        raise ValueError(f"lmforge infer chats with a language model, and this is a {task} model: serve it with "
                         "lmforge deploy (/v1/embeddings, /v1/rerank, /v1/classify) or score it with lmforge eval")
    torch.manual_seed(args.seed)  # unseeded sampling is still reproducible run to run
    engine = build_engine(args)
    config = request_config_from_args(args)
    adapter = next(iter(engine.adapters), None)  # --adapters/--ckpt_dir: answer with the (first) adapter
    if len(engine.adapters) > 1:
        logger.info("Several adapters loaded; answering with %r", adapter)
    from lmforge.utils.gc_heap import frozen_heap

    with frozen_heap():  # no full collection of the start-up heap mid-generation
        if args.dataset or args.val_dataset:
            return batch_infer(engine, args, config, adapter=adapter)
        keep = args.keep_history if args.keep_history is not None else sys.stdin.isatty()
        history = chat(engine, config, adapter=adapter, stream=args.stream, keep_history=keep)
    return {"history": history}


# ---------------------------------------------------------------------------------------------- chat


def _read_message(read_line: Callable[[str], str], write: Callable[[str], Any]) -> str | None:
    """One message from the user (None at end of input): ``\\`` continues a line, ``\"\"\"`` brackets a block."""
    try:
        line = read_line("<<< ")
        if line.strip() == '"""':
            lines = []
            while (line := read_line("... ")).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = read_line("... ")
        return "\n".join([*lines, line])
    except EOFError:
        write("\n")
        return None


def chat(engine: Any, config: Any, *, adapter: str | None = None, stream: bool = True,
         read_line: Callable[[str], str] | None = None, out: TextIO | None = None,
         keep_history: bool = True) -> list[dict]:
    """A terminal chat; returns the conversation. ``read_line`` (default ``input``) raises EOFError at the
    end. ``keep_history=False`` answers each message as a conversation of its own (piped input: one
    question per line, and no answer depends on the lines before it)."""
    from lmforge.infer import InferRequest
    from lmforge.infer.errors import InferRequestError

    out = out or sys.stdout
    if read_line is None:
        read_line = input
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:
                pass

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    each = "" if keep_history else " Each message is answered on its own (--keep_history true keeps the conversation)."
    vision = getattr(getattr(engine, "template", None), "vision", None) is not None
    write(f"Chatting with {engine.model_name}{f' (adapter {adapter})' if adapter else ''}. {CHAT_HELP}{each}\n"
          + (f"{IMAGE_HELP}\n" if vision else ""))
    history: list[dict] = []
    images: list[str] = []  # of the whole conversation, in order
    while True:
        try:
            text = _read_message(read_line, write)
        except KeyboardInterrupt:
            write("\n(Ctrl-D or 'exit' quits)\n")
            continue
        if text is None:
            break
        command = text.strip().lower()
        if not command:
            continue
        if command in ("exit", "quit"):
            break
        if command in ("clear", "reset"):
            history, images = [], []
            write("(conversation cleared)\n")
            continue
        if not keep_history:
            history, images = [], []
        asked = []
        try:
            for k in range(text.count("<image>") if vision else 0):
                asked.append(read_line(f"image {k + 1} path <<< ").strip())
        except EOFError:
            break
        history.append({"role": "user", "content": text})
        images += asked
        request = InferRequest(messages=history, images=images, adapter=adapter)
        write(">>> ")
        reply = ""
        try:
            if stream:
                with closing(engine.infer_stream(request, config)) as chunks:
                    for chunk in chunks:
                        delta = chunk.choices[0].delta.content if chunk.choices else None
                        if delta:
                            reply += delta
                            write(delta)
            else:
                reply = engine.infer([request], config, use_tqdm=False)[0].choices[0].message.content or ""
                write(reply)
            write("\n")
        except KeyboardInterrupt:
            write(" (stopped)\n")
        except InferRequestError as e:
            write(f"\n(error: {e.reason})\n")
            history.pop()
            del images[len(images) - len(asked):]
            continue
        history.append({"role": "assistant", "content": reply})
    return history


# ---------------------------------------------------------------------------------------------- batch


@dataclass
class _Item:
    """One dataset row on its way to the output file."""

    index: int
    where: str
    out: dict[str, Any]
    request: Any = None
    error: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


def _local_jsonl(spec: str) -> Path | None:
    """The file behind ``spec`` when it is a plain local JSONL file (read row by row here)."""
    p = Path(spec).expanduser()
    return p if p.is_file() and p.suffix == ".jsonl" else None


def iter_rows(args: InferArguments) -> Iterator[tuple[str, dict | None, str | None]]:
    """``(where, canonical row, None)`` or ``(where, None, error)`` for each row to answer.

    Local ``.jsonl`` files are read row by row so that a malformed row becomes an error line in the
    output rather than failing the run; other sources go through ``load_dataset`` (``--strict``).
    """
    from lmforge.dataset import iter_jsonl_rows, load_dataset

    specs = args.val_dataset or args.dataset
    use_split = not args.val_dataset and args.split_dataset_ratio > 0
    if not use_split and all(_local_jsonl(s) for s in specs):
        for spec in specs:
            yield from iter_jsonl_rows(_local_jsonl(spec), source=spec, columns=args.columns or None)
        return
    common = dict(seed=args.data_seed, columns=args.columns or None, strict=args.strict, hub=args.hub,
                  model_name=args.model_name or None, model_author=args.model_author or None, shuffle=False)
    if args.val_dataset:
        rows, _ = load_dataset(args.val_dataset, **common)
    else:
        train, val = load_dataset(args.dataset, split_dataset_ratio=args.split_dataset_ratio, **common)
        rows = val if val is not None else train
    from lmforge.dataset import ORIGIN_COLUMN

    name = "+".join(specs)
    for i, row in enumerate(rows):
        row = dict(row)
        yield row.pop(ORIGIN_COLUMN, None) or f"{name}:row {i}", row, None


def row_to_request(row: dict, adapter: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The request for a canonical row (its last assistant turn removed) and the output line's fields."""
    from lmforge.infer.convert import parse_request

    messages = [{k: v for k, v in m.items() if k in ("role", "content") and v is not None}
                for m in (row.get("messages") or [])]
    reference = None
    if messages and messages[-1].get("role") == "assistant":
        reference = messages.pop()["content"]
        if not messages:
            from lmforge.infer.errors import InferRequestError

            raise InferRequestError("nothing to answer: the row's only message is an assistant reply")
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else None
    out: dict[str, Any] = {"messages": messages, "response": None, "reference": reference}
    out.update({k: v for k, v in row.items()
                if k != "messages" and not (k in _CANONICAL and v is None)})
    request = parse_request({"messages": messages, "tools": tools, "images": row.get("images") or [],
                             "videos": row.get("videos") or [], "adapter": adapter})
    return request, out


def _default_result_path(args: InferArguments, engine: Any, command: str = "infer") -> Path:
    """``<command>-<time>.jsonl`` in the run folder of the checkpoint (or first adapter) that answered, else
    in ``output/<model>/`` (the output rule of :mod:`lmforge.utils.command`)."""
    from lmforge.utils.command import default_output

    adapter_dir = next(iter(engine.adapters.values()), None)
    return default_output(command, args.ckpt_dir or adapter_dir or args.model, ".jsonl")


def _generate_chunk(engine: Any, items: list[_Item], config: Any) -> None:
    """Answer ``items`` in one engine call; a request the engine rejects is marked and the rest retried."""
    from lmforge.infer.base import infer_each
    from lmforge.infer.errors import InferRequestError

    pending = [it for it in items if it.error is None]
    if not pending:
        return
    try:
        results = infer_each(engine, [it.request for it in pending], config)
    except InferRequestError:
        raise  # it names no request: not one row's fault
    except Exception as e:  # noqa: BLE001 - one bad row must not sink the chunk: isolate it
        if len(pending) == 1:
            pending[0].error = f"{type(e).__name__}: {e}"
            return
        logger.warning("a batch failed (%s: %s); retrying its rows one by one", type(e).__name__, e)
        for it in pending:
            _generate_chunk(engine, [it], config)
        return
    for it, resp in zip(pending, results):
        if isinstance(resp, InferRequestError):
            it.error = resp.reason
            continue
        choice = resp.choices[0]
        it.out["response"] = choice.message.content
        if choice.message.tool_calls:
            it.out["tool_calls"] = [c.model_dump() for c in choice.message.tool_calls]
        it.out["finish_reason"] = choice.finish_reason
        it.usage = resp.usage.model_dump()
        it.out["usage"] = it.usage


def batch_infer(engine: Any, args: InferArguments, config: Any, *, adapter: str | None = None) -> dict[str, Any]:
    """Answer every row of ``--val_dataset`` (or ``--dataset``) into ``--result_path``; returns the summary."""
    from tqdm.auto import tqdm

    from lmforge.infer.errors import InferRequestError

    result_path = Path(args.result_path) if args.result_path else _default_result_path(args, engine)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    items: list[_Item] = []
    for i, (where, row, error) in enumerate(iter_rows(args)):
        item = _Item(i, where, {"messages": None, "response": None}, error=error)
        if row is not None:
            try:
                item.request, item.out = row_to_request(row, adapter)
            except (InferRequestError, ValueError) as e:
                item.out = {"messages": row.get("messages"), "response": None, "reference": None}
                item.error = getattr(e, "reason", str(e))
        items.append(item)
    if not items:
        raise ValueError("the dataset has no rows to answer")
    logger.info("Answering %d rows into %s", len(items), result_path)
    chunk_size = max(1, args.max_batch_size) * 4
    start, stats = time.perf_counter(), {"prompt_tokens": 0, "completion_tokens": 0, "errors": 0}
    with open(result_path, "w", encoding="utf-8") as f, \
            tqdm(total=len(items), desc="Inferring", unit="row", dynamic_ncols=True) as bar:
        for lo in range(0, len(items), chunk_size):
            chunk = items[lo:lo + chunk_size]
            _generate_chunk(engine, chunk, config)
            for it in chunk:
                if it.error:
                    stats["errors"] += 1
                    it.out["error"] = it.error if it.error.startswith(it.where) else f"{it.where}: {it.error}"
                    logger.warning("row %d: %s", it.index, it.out["error"])
                stats["prompt_tokens"] += it.usage.get("prompt_tokens", 0)
                stats["completion_tokens"] += it.usage.get("completion_tokens", 0)
                f.write(json.dumps(it.out, ensure_ascii=False, default=str) + "\n")
            f.flush()
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    summary = {"result_path": str(result_path), "rows": len(items), "answered": len(items) - stats["errors"],
               **stats, "seconds": round(seconds, 3),
               "tokens_per_second": round(stats["completion_tokens"] / seconds, 2) if seconds > 0 else 0.0,
               "rows_per_second": round(len(items) / seconds, 3) if seconds > 0 else 0.0}
    print(f"infer: {summary['rows']} rows ({summary['errors']} errors) in {seconds:.1f} s; "
          f"{summary['completion_tokens']} tokens generated, {summary['tokens_per_second']:.1f} tokens/s, "
          f"{summary['rows_per_second']:.2f} rows/s -> {result_path}")
    return summary
