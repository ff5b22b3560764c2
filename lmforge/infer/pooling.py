"""The engine of the non-generative task types: embeddings, rerank scores and class probabilities.

``PoolingEngine(ckpt_dir=D)`` loads a checkpoint as it was trained (``args.json``: task type,
pooling, prompts, labels) or a hub/local model with ``task_type=...``, on any device. Inputs are
encoded by the training code's own :class:`~lmforge.dataset.task_encode.TaskEncoder` and scored by
:func:`lmforge.model.tasks.task_forward`, so a served model computes what it was trained to.

Batching: every call (a request of the server, from any thread) puts its sequences on a queue;
whichever call holds the model takes *everything* queued, sorts it by length and runs it in
batches of ``max_batch_size``, then hands each call its rows. Concurrent requests of one input
each are so batched together, and the model runs one batch at a time. Inputs longer than
``max_model_len`` are refused (:class:`InferRequestError` naming the input), never cut silently.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.infer.errors import InferRequestError

logger = logging.getLogger(__name__)


def checkpoint_task(task_type: str | None = None, ckpt_dir: str | None = None,
                    adapters: Sequence[str] | None = None) -> str | None:
    """The task a command serves: ``--task_type``, else the one ``args.json`` of the checkpoint (or first
    adapter) records; None for a causal LM."""
    task = task_type
    if task is None and (ckpt_dir or adapters):
        from lmforge.arguments.base import read_args_json
        from lmforge.utils.checkpoint import find_last_checkpoint

        folder = Path(ckpt_dir) if ckpt_dir else Path(str(list(adapters)[0]).partition("=")[2] or list(adapters)[0])
        if ckpt_dir and folder.is_dir() and not (folder / "config.json").is_file() \
                and not (folder / "adapter_config.json").is_file():
            folder = find_last_checkpoint(folder) or folder  # a run folder: its last checkpoint
        task = read_args_json(folder).get("task_type")
    return None if task in (None, "causal_lm") else task


@dataclass
class _Call:
    """One caller's sequences and, once run, their outputs (or the error of the batch they were in)."""

    sequences: list[list[int]]
    outputs: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False


class PoolingEngine:
    """See the module docstring. ``task``: embedding, reranker, generative_reranker or seq_cls."""

    def __init__(self, model: str | None = None, *, ckpt_dir: str | None = None, adapters: Any = None,
                 task_type: str | None = None, pooling: str | None = None, query_prompt: str | None = None,
                 document_prompt: str | None = None, rerank_instruction: str | None = None,
                 template: str | None = None, system: str | None = None, torch_dtype: str | None = "auto",
                 device: str | None = None, device_map: str | None = None, max_batch_size: int = 16,
                 max_model_len: int | None = None, hub: str = "hf", revision: str | None = None,
                 attn_impl: str | None = None, model_kwargs: dict | None = None, trust_remote_code: bool = False,
                 model_name: str | None = None, **_: Any):
        from types import SimpleNamespace

        from lmforge.infer.checkpoint import attach_adapters, resolve_model_source
        from lmforge.model import get_model_tokenizer, resolve_model_dir
        from lmforge.dataset.task_encode import TaskEncoder
        from lmforge.model.tasks import default_pooling, is_decoder_config, task_load_kwargs, yes_no_token_ids
        from lmforge.template import get_template

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        src = resolve_model_source(model, ckpt_dir=ckpt_dir, adapters=adapters, template=template, system=system)
        trained = src.train_args
        task = task_type or trained.get("task_type")
        if task in (None, "causal_lm"):
            raise ValueError("PoolingEngine serves embedding, reranker, generative_reranker or seq_cls models; "
                             "pass --task_type (the checkpoint's args.json names none)")
        if len(src.adapters) > 1:
            raise ValueError(f"a {task} model is served with one adapter at most; got {', '.join(src.adapters)}")
        labels = SimpleNamespace(task_type=task, num_labels=trained.get("num_labels"),
                                 problem_type=trained.get("problem_type"), label_names=trained.get("label_names"))
        auto_class, kwargs = task_load_kwargs(labels)
        if task == "seq_cls" and not src.adapters:
            kwargs = {}  # a full classifier's config.json already holds its labels
        model_obj, tokenizer = get_model_tokenizer(
            src.model, hub=hub, revision=revision, torch_dtype=torch_dtype, attn_impl=attn_impl,
            device_map=device_map, model_kwargs={**kwargs, **(model_kwargs or {})},
            trust_remote_code=trust_remote_code, device=device, auto_class=auto_class)
        if src.adapters:  # one adapter: merged into the weights, so serving costs what the base costs
            model_obj = attach_adapters(model_obj, src.adapters).merge_and_unload()
        if task in ("seq_cls", "reranker") and model_obj.config.pad_token_id is None:
            model_obj.config.pad_token_id = tokenizer.pad_token_id
        self.task, self.model, self.tokenizer = task, model_obj.eval(), tokenizer
        self.device = next(self.model.parameters()).device
        self.adapters: dict[str, str] = {}
        self.model_name = model_name or (Path(src.model).name if Path(src.model).exists() else src.model)
        self.max_batch_size = max_batch_size
        config = self.model.config
        self.max_model_len = int(max_model_len or getattr(config, "max_position_embeddings", None) or 512)
        self.pooling = pooling or trained.get("pooling") or default_pooling(
            config, resolve_model_dir(src.model, hub=hub, revision=revision))
        self.yes_no = yes_no_token_ids(tokenizer) if task == "generative_reranker" else None
        self.label_names = self._label_names(config) if task == "seq_cls" else []
        self.problem_type = str(getattr(config, "problem_type", None) or "single_label_classification")
        tpl = get_template(tokenizer, src.template, system=src.system, max_length=None)
        prompts = dict(query_prompt=query_prompt, document_prompt=document_prompt,
                       rerank_instruction=rerank_instruction)
        prompts = {k: v if v is not None else trained.get(k) for k, v in prompts.items()}  # flags win over args.json
        self.encoder = TaskEncoder(task, tokenizer, tpl, decoder=is_decoder_config(config),
                                   max_length=self.max_model_len, truncation_strategy="raise", **prompts)
        self.forward_batches = 0  # batches the model has run (concurrent calls share them)
        self._queue: list[_Call] = []
        self._queue_lock = threading.Lock()
        self._model_lock = threading.Lock()
        logger.info("%s engine: %s on %s (%s), max_model_len %d", task, self.model_name, self.device,
                    f"{self.pooling} pooling" if task == "embedding" else f"{len(self.label_names) or 1} outputs"
                    if task == "seq_cls" else "relevance scores", self.max_model_len)

    @staticmethod
    def _label_names(config: Any) -> list[str]:
        """Class names from the config; transformers' placeholders (``LABEL_0``) become ``"0"``."""
        names = [str(config.id2label[i]) for i in range(config.num_labels)] if getattr(config, "id2label", None) \
            else [str(i) for i in range(config.num_labels)]
        return [str(i) if n == f"LABEL_{i}" else n for i, n in enumerate(names)]

    # ------------------------------------------------------------------------------------ encoding

    def _encode(self, fn: Any, items: Sequence[Any], what: str) -> list[list[int]]:
        """Token ids of each item, or an :class:`InferRequestError` naming the first one that cannot be encoded."""
        out = []
        for i, item in enumerate(items):
            try:
                ids = fn(item)
            except ValueError as e:
                raise InferRequestError(f"{what} {i}: {e}", index=i) from None
            if not ids:
                raise InferRequestError(f"{what} {i} is empty", index=i)
            out.append(ids)
        return out

    def _token_ids(self, ids: Sequence[int], index: int) -> list[int]:
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InferRequestError(f"input {index} holds token ids outside the vocabulary (0..{vocab - 1}): "
                                    f"{bad[:5]}", index=index)
        if len(ids) > self.max_model_len:
            raise InferRequestError(f"input {index} is {len(ids)} tokens, over max_model_len {self.max_model_len}",
                                    index=index)
        return list(ids)

    # ------------------------------------------------------------------------------------ the tasks

    def embed(self, inputs: Sequence[str | Sequence[int]], *, input_type: str | None = None,
              dimensions: int | None = None) -> tuple[torch.Tensor, int]:
        """L2-normalised vectors [n, D] (float32, CPU) and the tokens read. ``input_type`` ``query`` or
        ``document`` puts that prompt (as trained) before each text; None embeds the texts as given.
        ``dimensions`` keeps the first D dimensions and normalises again (Matryoshka)."""
        self._require("embedding")
        kind = {"query": "query", "document": "document"}.get(input_type or "", None)
        seqs = [self._token_ids(x, i) if not isinstance(x, str) else self._encode(
            lambda t: self._text_ids(t, kind), [x], "input")[0] for i, x in enumerate(inputs)]
        vectors = torch.stack(self._run(seqs)).float()
        if dimensions is not None:
            if not 0 < dimensions <= vectors.shape[1]:
                raise InferRequestError(f"dimensions must be between 1 and {vectors.shape[1]}, got {dimensions}")
            vectors = vectors[:, :dimensions]
        return torch.nn.functional.normalize(vectors, dim=-1), sum(len(s) for s in seqs)

    def _text_ids(self, text: str, kind: str | None) -> list[int]:
        if kind is None:
            return self.encoder._fit(list(self.tokenizer(text, add_special_tokens=True)["input_ids"]), "the input")
        return self.encoder.text_ids(text, kind)

    def rerank(self, query: str, documents: Sequence[str]) -> tuple[list[float], int]:
        """Relevance of each document to ``query`` in [0, 1] (the sigmoid of its score) and the tokens read.

        An embedding model reranks too: its score is the cosine of query and document (as trained: the
        query and document prompts are applied)."""
        if self.task == "embedding":
            vectors, tokens = self._embed_pair(query, documents)
            return (vectors[1:] @ vectors[0]).tolist(), tokens
        self._require("reranker", "generative_reranker")
        seqs = self._encode(lambda d: self.encoder.pair_ids(query, d), documents, "document")
        scores = torch.stack(self._run(seqs)).float()
        return torch.sigmoid(scores).tolist(), sum(len(s) for s in seqs)

    def _embed_pair(self, query: str, documents: Sequence[str]) -> tuple[torch.Tensor, int]:
        q = self._encode(lambda t: self.encoder.text_ids(t, "query"), [query], "query")
        d = self._encode(lambda t: self.encoder.text_ids(t, "document"), documents, "document")
        vectors = torch.nn.functional.normalize(torch.stack(self._run(q + d)).float(), dim=-1)
        return vectors, sum(len(s) for s in q + d)

    def classify(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Class probabilities [n, num_labels] (softmax; per-class sigmoid for multi-label; raw values for
        regression) and the tokens read."""
        self._require("seq_cls")
        seqs = self._encode(lambda t: self.encoder.classify_ids([{"role": "user", "content": t}]), texts, "input")
        logits = torch.stack(self._run(seqs)).float()
        if self.problem_type == "multi_label_classification":
            return torch.sigmoid(logits), sum(len(s) for s in seqs)
        if self.problem_type == "regression":
            return logits, sum(len(s) for s in seqs)
        return logits.softmax(-1), sum(len(s) for s in seqs)

    def _require(self, *tasks: str) -> None:
        if self.task not in tasks:
            raise InferRequestError(f"this is a {self.task} model; it cannot do what {'/'.join(tasks)} models do")

    # ------------------------------------------------------------------------------------ batching

    def _run(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """One output row per sequence, computed in batches shared with concurrent callers."""
        call = _Call(sequences)
        with self._queue_lock:
            self._queue.append(call)
        with self._model_lock:
            if not call.done:
                with self._queue_lock:
                    calls, self._queue = self._queue, []
                self._run_calls(calls)
        if call.error is not None:
            raise call.error
        return call.outputs

    def _run_calls(self, calls: list[_Call]) -> None:
        from lmforge.model.tasks import pad_sequences, task_forward

        flat = [(c, i, seq) for c in calls for i, seq in enumerate(c.sequences)]
        for c in calls:
            c.outputs = [None] * len(c.sequences)
        order = sorted(range(len(flat)), key=lambda k: len(flat[k][2]))  # similar lengths share a batch
        side = "left" if self.task == "generative_reranker" else "right"
        try:
            with torch.inference_mode():
                for lo in range(0, len(order), self.max_batch_size):
                    chunk = [flat[k] for k in order[lo:lo + self.max_batch_size]]
                    batch = pad_sequences([seq for _, _, seq in chunk], self.tokenizer.pad_token_id, side)
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    out = task_forward(self.model, batch, self.task, pooling=self.pooling, yes_no=self.yes_no)
                    self.forward_batches += 1
                    for (c, i, _), row in zip(chunk, out.float().cpu()):
                        c.outputs[i] = row
        except BaseException as e:  # noqa: BLE001 - every caller of this round gets the error
            for c in calls:
                c.error = e
        for c in calls:
            c.done = True
