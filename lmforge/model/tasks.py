"""Models of the non-generative task types and the one forward pass training and serving share.

- ``embedding``: the transformer body (``AutoModel``); token states are pooled into one vector,
  then L2-normalised. Pooling is ``last`` (the last real token: decoder models, Qwen3-Embedding
  style), ``mean`` (over real tokens) or ``cls`` (the first token: BERT family).
- ``seq_cls`` and ``reranker``: ``AutoModelForSequenceClassification``, whose own head pools (the
  last non-padding token for decoders, [CLS] for encoders); a reranker has one output, the
  relevance logit of a query/document pair.
- ``generative_reranker``: a causal LM; a pair's score is ``logit("yes") - logit("no")`` at the
  next-token position after the prompt (Qwen3-Reranker), so ``sigmoid(score)`` is P(yes | yes or no).

:func:`task_forward` is what both the trainer and the serving engine run, so a served model scores
exactly as it was trained.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASK_AUTO_CLASS = {
    "causal_lm": None,  # the loader's choice: a causal LM, or a vision-language model's own class
    "generative_reranker": "AutoModelForCausalLM",
    "embedding": "AutoModel",
    "seq_cls": "AutoModelForSequenceClassification",
    "reranker": "AutoModelForSequenceClassification",
}
HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}
# sentence-transformers' pooling config keys for each pooling mode
ST_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                   "last": "pooling_mode_lasttoken"}
POSITIVE_TOKEN, NEGATIVE_TOKEN = "yes", "no"


def task_auto_class(task: str | None) -> str | None:
    """The transformers class that loads a model of ``task`` (None: the loader's default for a chat model)."""
    try:
        return TASK_AUTO_CLASS[task or "causal_lm"]
    except KeyError:
        raise ValueError(f"unknown task type {task!r}; expected one of {', '.join(TASK_AUTO_CLASS)}") from None


def is_decoder_config(config: Any) -> bool:
    """A decoder-only language model (Qwen, Llama, ...) rather than an encoder (BERT, RoBERTa, ModernBERT, ...).

    Encoders are the architectures transformers can load as masked language models; a few of them
    can also be loaded as causal LMs, so that list alone does not tell.
    """
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def sentence_transformers_pooling(model_dir: str | Path) -> str | None:
    """The pooling mode a sentence-transformers folder declares (``modules.json`` -> its Pooling module), if any."""
    folder = Path(model_dir)
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    for module in json.loads(modules.read_text(encoding="utf-8")):
        if str(module.get("type", "")).endswith("Pooling"):
            config = folder / module.get("path", "") / "config.json"
            if config.is_file():
                values = json.loads(config.read_text(encoding="utf-8"))
                for mode, key in ST_POOLING_KEYS.items():
                    if values.get(key):
                        return mode
    return None


def default_pooling(config: Any, model_dir: str | Path | None = None) -> str:
    """A sentence-transformers folder's own pooling, else ``last`` for decoders and ``mean`` for encoders."""
    declared = sentence_transformers_pooling(model_dir) if model_dir else None
    return declared or ("last" if is_decoder_config(config) else "mean")


def label_config(spec: dict[str, Any] | None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that give a classifier its labels (``num_labels``, names)."""
    if not spec or not spec.get("num_labels"):  # nothing known: the model's own config decides
        return {}
    out: dict[str, Any] = {"num_labels": spec["num_labels"]}
    if spec.get("problem_type"):
        out["problem_type"] = HF_PROBLEM_TYPES[spec["problem_type"]]
    names = spec.get("label_names") or []
    if names:
        out["id2label"] = dict(enumerate(names))
        out["label2id"] = {n: i for i, n in enumerate(names)}
    return out


def task_load_kwargs(args: Any) -> tuple[str, dict[str, Any]]:
    """The transformers class and the ``from_pretrained`` config overrides that load a model for ``args.task_type``
    (labels for a classifier, one output for a cross-encoder reranker)."""
    task = getattr(args, "task_type", None) or "causal_lm"
    if task == "seq_cls":
        return task_auto_class(task), label_config({"num_labels": args.num_labels, "problem_type": args.problem_type,
                                                    "label_names": args.label_names})
    if task == "reranker":
        return task_auto_class(task), {"num_labels": 1}
    return task_auto_class(task), {}


def yes_no_token_ids(tokenizer: Any) -> tuple[int, int]:
    """The token ids whose logits a generative reranker compares: the first token of "yes" and of "no"."""
    ids = []
    for word in (POSITIVE_TOKEN, NEGATIVE_TOKEN):
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if not pieces:
            raise ValueError(f"the tokenizer encodes {word!r} to nothing")
        if len(pieces) > 1:
            logger.info("generative reranker: %r is %d tokens here; its first token (%r) is scored", word,
                        len(pieces), tokenizer.decode(pieces[:1]))
        ids.append(int(pieces[0]))
    if ids[0] == ids[1]:
        raise ValueError("the tokenizer's first tokens of 'yes' and 'no' are the same; a generative reranker cannot "
                         "tell them apart")
    return ids[0], ids[1]


def pool(hidden: Any, attention_mask: Any, mode: str) -> Any:
    """One vector per row from ``hidden`` [B, T, H]; padding may be on either side."""
    import torch

    mask = attention_mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    if mode == "cls":
        index = (attention_mask * (hidden.shape[1] - positions)).argmax(1)  # the first real token
    elif mode == "last":
        index = (attention_mask * (positions + 1)).argmax(1)  # the last real token
    else:
        raise ValueError(f"unknown pooling {mode!r}; expected last, mean or cls")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def pad_sequences(sequences: list[list[int]], pad_token_id: int, side: str = "right") -> dict[str, Any]:
    """``input_ids`` and ``attention_mask`` of ``sequences`` padded on ``side`` to the longest."""
    import torch

    n = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), n), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), n), dtype=torch.long)
    for i, s in enumerate(sequences):
        cut = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
        ids[i, cut] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cut] = 1
    return {"input_ids": ids, "attention_mask": mask}


def task_forward(model: Any, batch: dict[str, Any], task: str, *, pooling: str = "last",
                 yes_no: tuple[int, int] | None = None) -> Any:
    """``batch`` (``input_ids``, ``attention_mask``) through ``model``: unnormalised embeddings [B, H] for
    ``embedding``, logits [B, num_labels] for ``seq_cls``, scores [B] for the rerankers (float32 where scored).

    Generative rerankers take left-padded batches (the next-token logits sit at the last position for
    every row) with positions counted from each row's first real token.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task == "embedding":
        out = model(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return pool(hidden, batch["attention_mask"], pooling)
    if task in ("seq_cls", "reranker"):
        logits = model(**inputs).logits.float()
        return logits[:, 0] if task == "reranker" else logits
    if task == "generative_reranker":
        if yes_no is None:
            raise ValueError("generative_reranker needs the 'yes' and 'no' token ids")
        mask = batch["attention_mask"]
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("generative_reranker batches must be left-padded")
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(**inputs, position_ids=positions, logits_to_keep=1, use_cache=False).logits[:, -1].float()
        return logits[:, yes_no[0]] - logits[:, yes_no[1]]
    raise ValueError(f"task_forward: unknown task {task!r}")
