"""Rows of the non-generative task types, mapped onto the canonical row.

Retrieval rows (``embedding``, ``reranker``, ``generative_reranker``), as ms-swift takes them::

    {"query": "What is 37 + 45?", "response": "37 + 45 = 77 + 5 = 82",
     "rejected_response": ["37 + 46 = 77 + 6 = 83", "38 + 45 = 78 + 5 = 83"]}

or ``messages`` whose final assistant turn is the positive document, or ms-swift's
``positive_messages`` / ``negative_messages``. They become the canonical row with ``messages``
``[user: query, assistant: positive]``, ``rejected_response`` the *list* of hard negatives and
``label`` an optional relevance score in [0, 1] for the pair (pointwise data: a query, a document
and whether it is relevant).

Classifier rows (``seq_cls``): any conversation format (``messages``, ``text``, ``query`` alone,
...) plus a ``label``: a class id or name, a list of them (multi-label) or a number (regression).

So the canonical columns keep their names, but two change type for these tasks:
``rejected_response`` is a list of strings and ``label`` is a score or a class (:func:`column_types`).
A row that lacks what its task needs fails naming the file, the line and the field.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from lmforge.dataset.preprocess import DatasetError, detect_format, preprocess_row

RETRIEVAL_TASKS = ("embedding", "reranker", "generative_reranker")
TASKS = ("seq_cls", *RETRIEVAL_TASKS)


def is_task(task: str | None) -> bool:
    """True for the task types whose rows are mapped here (not the chat model's ``causal_lm``)."""
    return task in TASKS


def code_version() -> str:
    """Hash of this module and of the built-in task sets: part of a task dataset's fingerprint, so cached
    encodings follow the mapping and the generated rows."""
    h = hashlib.sha256()
    for name in ("tasks.py", "task_data.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def column_types(task: str) -> dict[str, Any]:
    """Arrow types of the canonical columns that differ for ``task`` (None: inferred from the rows)."""
    import pyarrow as pa

    if task in RETRIEVAL_TASKS:
        return {"rejected_response": pa.list_(pa.string()), "label": pa.float64()}
    return {"label": None}  # seq_cls: ids, names, lists or numbers, one kind per dataset


def _fail(source: str, field: str, reason: str) -> DatasetError:
    return DatasetError(f"{source}: field {field!r}: {reason}", source=source, field=field)


def _texts(value: Any, source: str, field: str) -> list[str]:
    """Negatives: a list of non-empty strings (a single string is one negative)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise _fail(source, field, f"expected a list of documents (strings), got {type(value).__name__}")
    out = []
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise _fail(source, f"{field}[{i}]", f"expected a string, got {type(text).__name__}")
        if not text.strip():
            raise _fail(source, f"{field}[{i}]", "empty document")
        out.append(text)
    return out


def _message_docs(value: Any, source: str, field: str) -> list[str]:
    """ms-swift's ``positive_messages`` / ``negative_messages``: a list of conversations; each one's last text."""
    if not isinstance(value, (list, tuple)):
        raise _fail(source, field, f"expected a list of message lists, got {type(value).__name__}")
    out = []
    for i, conv in enumerate(value):
        if not isinstance(conv, (list, tuple)) or not conv or not isinstance(conv[-1], dict):
            raise _fail(source, f"{field}[{i}]", "expected a non-empty list of messages")
        content = conv[-1].get("content")
        if not isinstance(content, str) or not content.strip():
            raise _fail(source, f"{field}[{i}]", "the last message has no text")
        out.append(content)
    return out


def _score(value: Any, source: str) -> float | None:
    """A pair's relevance: a number in [0, 1] (or true/false)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(source, "label", f"expected a relevance score in [0, 1], got {value!r}") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise _fail(source, "label", f"expected a relevance score in [0, 1], got {value!r}")
    return float(value)


def _class_label(value: Any, source: str) -> Any:
    """A class id (int), a class name (str), a list of those (multi-label), or a number (regression)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, str)):
        if isinstance(value, str) and not value.strip():
            raise _fail(source, "label", "empty label")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(source, "label", f"expected a finite number, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
            kinds = sorted({type(v).__name__ for v in value})
            raise _fail(source, "label", f"a list label holds class ids or names, got {', '.join(kinds)}")
        return list(value)
    raise _fail(source, "label", f"expected a class id, a class name, a list of them or a number, "
                                 f"got {type(value).__name__}")


def preprocess_task_row(raw: dict, *, source: str = "<row>", columns: dict | None = None, task: str) -> dict:
    """The canonical row of one raw row for ``task``; :class:`DatasetError` names the source and field."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{source}: expected a row object, got {type(raw).__name__}", source=source)
    row = dict(raw)
    for src, dst in (columns or {}).items():
        if src in row:
            row[dst] = row.pop(src)
    label = row.pop("label", None)
    if task == "seq_cls":
        if label is None:
            raise _fail(source, "label", "a classifier row needs a label (a class id or name, a list of them, "
                                         "or a number)")
        if detect_format(row) is None and isinstance(row.get("query"), str):
            row["messages"] = [{"role": "user", "content": row.pop("query")}]
        out = preprocess_row(row, source=source)
        out["label"] = _class_label(label, source)
        return out
    negatives = _texts(row.pop("rejected_response", None), source, "rejected_response")
    if row.get("negative_messages") is not None:
        negatives += _message_docs(row.pop("negative_messages"), source, "negative_messages")
    positives = row.pop("positive_messages", None)
    if positives is not None:
        docs = _message_docs(positives, source, "positive_messages")
        if len(docs) != 1:
            raise _fail(source, "positive_messages", f"expected one positive document per row, got {len(docs)} "
                                                     "(write one row per positive)")
        row["messages"] = [*(row.get("messages") or []), {"role": "assistant", "content": docs[0]}]
    if isinstance(row.get("query"), str) and row.get("response") is None and row.get("messages") is None:
        raise _fail(source, "response", f"a {task} row needs the document that goes with the query: 'response' "
                                        "(the positive), or 'messages' ending with it")
    out = preprocess_row(row, source=source)
    messages = out.get("messages") or []
    if not messages or messages[-1]["role"] != "assistant":
        raise _fail(source, "messages", f"a {task} row needs a query and its document: the conversation must end "
                                        "with the document as an assistant turn ('response')")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise _fail(source, "messages", f"a {task} row needs a query (a user turn) before its document")
    out["rejected_response"] = negatives or None
    out["label"] = _score(label, source)
    return out


def retrieval_parts(row: dict) -> tuple[str, str, list[str]]:
    """(query, positive document, negatives) of a canonical retrieval row; the query joins every turn before
    the document (a system prompt included) with newlines."""
    messages = row.get("messages") or []
    query = "\n".join(m["content"] for m in messages[:-1] if m.get("content"))
    return query, messages[-1]["content"], list(row.get("rejected_response") or [])


# ---------------------------------------------------------------------------------------- labels


def resolve_labels(labels: list[Any], *, num_labels: int | None = None, problem_type: str | None = None,
                   label_names: list[str] | None = None) -> dict[str, Any]:
    """``{"problem_type", "num_labels", "label_names"}`` for a classifier, from its training labels.

    Flags win; what they leave open is read off the labels: a list label means multi_label, a
    float regression, an int or a name single_label. Names are mapped to ids in sorted order unless
    ``label_names`` gives the order.
    """
    present = [v for v in labels if v is not None]
    if not present:
        raise DatasetError("the classifier's training data has no labels")
    kinds = {"list" if isinstance(v, list) else "float" if isinstance(v, float) else "class" for v in present}
    if problem_type is None:
        problem_type = "multi_label" if "list" in kinds else "regression" if kinds == {"float"} else "single_label"
    names = list(label_names or [])
    flat = [x for v in present for x in (v if isinstance(v, list) else [v])]
    if problem_type == "regression":
        if "list" in kinds or any(isinstance(x, str) for x in flat):
            raise DatasetError("--problem_type regression needs numeric labels")
        width = {len(v) if isinstance(v, list) else 1 for v in present}
        return {"problem_type": problem_type, "num_labels": num_labels or max(width), "label_names": names}
    if any(isinstance(x, float) and not float(x).is_integer() for x in flat):
        raise DatasetError(f"--problem_type {problem_type}: labels must be class ids or names, found a fraction "
                           "(use --problem_type regression for real values)")
    strs = sorted({x for x in flat if isinstance(x, str)})
    if strs and not names:
        if any(not isinstance(x, str) for x in flat):
            raise DatasetError("labels mix class names and class ids; use one kind")
        names = strs
    unknown = [s for s in strs if s not in names]
    if unknown:
        raise DatasetError(f"label names {unknown[:5]} are not in --label_names {names}")
    largest = max((int(x) for x in flat if not isinstance(x, str)), default=-1)
    count = num_labels or len(names) or largest + 1
    if count < max(len(names), largest + 1, 2 if problem_type == "single_label" else 1):
        raise DatasetError(f"--num_labels {count} is too small for the labels (ids up to {largest}, "
                           f"{len(names)} names)")
    return {"problem_type": problem_type, "num_labels": count, "label_names": names}


def encode_label(value: Any, spec: dict[str, Any]) -> Any:
    """A canonical label as the model's target: a class id, a multi-hot list, or a list of floats."""
    kind, n, names = spec["problem_type"], spec["num_labels"], spec["label_names"]

    def class_id(x: Any) -> int:
        if isinstance(x, str):
            if x not in names:
                raise ValueError(f"label {x!r} is not one of the classes {names}")
            return names.index(x)
        i = int(x)
        if not 0 <= i < n:
            raise ValueError(f"label {x!r} is outside 0..{n - 1} (--num_labels {n})")
        return i

    if kind == "regression":
        values = [float(v) for v in (value if isinstance(value, list) else [value])]
        if len(values) != n:
            raise ValueError(f"expected {n} regression targets, got {len(values)}")
        return values
    if kind == "multi_label":
        hot = [0.0] * n
        for x in value if isinstance(value, list) else [value]:
            hot[class_id(x)] = 1.0
        return hot
    if isinstance(value, list):
        raise ValueError("a list label needs --problem_type multi_label")
    return class_id(value)
