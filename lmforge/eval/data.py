"""Eval datasets: rows -> prompts, references and row keys.

A row is any format ``--dataset`` takes (see :mod:`lmforge.dataset.preprocess`); for eval a row may
also be just a question (``question``/``query``/``problem``/``prompt``/``input`` column, local JSONL).
Its prompt is the conversation minus a final assistant turn; its reference is the ``reference``,
``solution`` or ``answer`` column when there is one, else that final assistant turn. A row with
``choices`` (a list, or a mapping of letters to texts) is a multiple-choice question.

``builtin:arith`` means the held-out split ``builtin:arith:test`` here: evaluating on the training
problems would measure memory, not skill. Name another split explicitly to override this.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_COLUMNS = ("reference", "solution", "answer")
QUESTION_COLUMNS = ("question", "query", "problem", "prompt", "input")
# Built-in datasets whose eval default is their held-out split.
HELD_OUT = {"arith": "test", "arith-preference": "test", "arith-rl": "test", "tool-calls": "test", "shapes": "test",
            "arith-retrieval": "test", "intents": "test", "intent-retrieval": "test"}


@dataclass
class EvalItem:
    """One row to answer and score."""

    index: int
    key: str  # dataset name + index + hash of the prompt: the resume cache's key
    messages: list[dict]  # the prompt
    reference: Any
    row: dict  # the row's other columns (choices, ...), passed to metrics
    error: str | None = None  # the row could not be read; scored as wrong


@dataclass
class EvalSet:
    name: str  # as the user wrote it
    source: str  # what was loaded (builtin:arith -> builtin:arith:test)
    items: list[EvalItem] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    task: str | None = None  # an embedding/reranker/classifier set (lmforge.eval.pooling), else None

    @property
    def slug(self) -> str:
        """File name stem of the predictions: a local file's own stem, else the name made file-safe."""
        spec = self.name.split("#")[0]
        if Path(spec).expanduser().exists():
            suffix = self.name[len(spec):].replace("#", "_")
            return slugify(Path(spec).stem + suffix)
        return slugify(self.name)


def slugify(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "dataset"


def resolve_spec(spec: str) -> str:
    """``builtin:arith[#N]`` -> ``builtin:arith:test[#N]`` (the held-out split); other specs unchanged."""
    m = re.fullmatch(r"builtin:([\w.-]+)(#\d+)?", spec.strip())
    if m and m.group(1) in HELD_OUT and not Path(spec).exists():
        return f"builtin:{m.group(1)}:{HELD_OUT[m.group(1)]}{m.group(2) or ''}"
    return spec


def _question_row(raw: dict) -> dict | None:
    """A row that is only a question plus a reference: ``{"question": ..., "answer": ...}`` -> messages."""
    for col in QUESTION_COLUMNS:
        if isinstance(raw.get(col), str):
            msgs = [{"role": "user", "content": raw[col]}]
            if isinstance(raw.get("system"), str):
                msgs.insert(0, {"role": "system", "content": raw["system"]})
            return {**{k: v for k, v in raw.items() if k not in (col, "system")}, "messages": msgs}
    return None


def load_rows(spec: str, *, columns: dict | None = None, strict: bool = True, seed: int = 42, hub: str = "hf",
              model_name: list[str] | None = None, model_author: list[str] | None = None, task: str | None = None
              ) -> list[tuple[str, dict | None, str | None]]:
    """``(where, canonical row, None)`` or ``(where, None, error)`` for each row of one dataset, in order
    (``task``: rows of an embedding/reranker/classifier set, mapped by ``lmforge.dataset.tasks``)."""
    source = resolve_spec(spec)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".jsonl" and task is None:
        from lmforge.dataset import iter_jsonl_rows

        return list(iter_jsonl_rows(path, source=source, columns=columns, fallback=_question_row))
    from lmforge.dataset import load_dataset

    rows, _ = load_dataset([source], seed=seed, columns=columns or None, strict=strict, hub=hub, shuffle=False,
                           model_name=model_name or None, model_author=model_author or None, task=task)
    from lmforge.dataset import ORIGIN_COLUMN

    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        out.append((row.pop(ORIGIN_COLUMN, None) or f"{source}:row {i}", row, None))
    return out


def row_key(name: str, index: int, messages: list[dict], extra: Any = None) -> str:
    payload = json.dumps([messages, extra], sort_keys=True, ensure_ascii=False, default=str)
    return f"{name}:{index}:{hashlib.sha1(payload.encode('utf-8')).hexdigest()[:12]}"


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def with_listed_choices(messages: list[dict], choices: Any) -> list[dict]:
    """The prompt with ``A. ...`` lines and an instruction added, unless the question already lists every choice."""
    from lmforge.eval.metrics import choice_list

    items = choice_list(choices)
    last = messages[-1]
    text = _message_text(last.get("content"))
    if all(c in text for _, c in items):
        return messages
    listed = "\n".join(f"{k}. {c}" for k, c in items)
    content = f"{text}\n\n{listed}\n\nAnswer with the letter of the correct choice."
    return [*messages[:-1], {**last, "content": content}]


def make_item(name: str, index: int, row: dict, *, mc_generate: bool) -> EvalItem:
    """The prompt, reference and key of one canonical row."""
    messages = [{k: v for k, v in m.items() if k in ("role", "content") and v is not None}
                for m in (row.get("messages") or [])]
    reference = next((row[c] for c in REFERENCE_COLUMNS if row.get(c) is not None), None)
    if messages and messages[-1].get("role") == "assistant":
        last = messages.pop()
        if reference is None:
            reference = last.get("content")
    extra = {k: v for k, v in row.items() if k != "messages" and v is not None}
    error = None
    if not messages:
        error = "nothing to ask: the row has no prompt (only an assistant reply, or no messages)"
    elif row.get("choices"):
        try:
            from lmforge.eval.metrics import choice_list

            choice_list(row["choices"])
            if mc_generate:
                messages = with_listed_choices(messages, row["choices"])
        except (ValueError, TypeError) as e:
            error = f"bad 'choices': {e}"
    if reference is None and error is None:
        error = "no reference: give a final assistant message or a reference/solution/answer column"
    key = row_key(name, index, messages, {"mc": mc_generate} if row.get("choices") else None)
    return EvalItem(index, key, messages, reference, extra, error)


def load_eval_set(name: str, *, mc_generate: bool, limit: int | None = None, task: str | None = None,
                  **load_kwargs: Any) -> EvalSet:
    """Read dataset ``name`` into items (rows that cannot be read become items with an error); ``task``: the set
    of an embedding model, reranker or classifier (:mod:`lmforge.eval.pooling`)."""
    rows = load_rows(name, task=task, **load_kwargs)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"eval dataset {name!r} has no rows")
    if task is not None:
        from lmforge.eval.pooling import task_items

        return EvalSet(name, resolve_spec(name), task_items(name, rows, task), task=task)
    items = []
    for i, (where, row, error) in enumerate(rows):
        if row is None:
            items.append(EvalItem(i, f"{name}:{i}:unreadable", [], None, {}, error))
            continue
        item = make_item(name, i, row, mc_generate=mc_generate)
        if item.error:
            item.error = f"{where}: {item.error}"
        items.append(item)
    return EvalSet(name, resolve_spec(name), items)
