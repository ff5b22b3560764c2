"""encode_dataset: real tokenization, dropped rows counted, results cached on disk."""
from __future__ import annotations

import json
import re
import logging
from pathlib import Path

import pytest

from lmforge.dataset import DatasetError, encode_dataset, load_dataset

TOKENIZER = str(Path(__file__).resolve().parents[1] / "lmforge" / "model" / "builtin" / "tokenizer")


class ChatEncoder:
    """A small real template: renders with the built-in tokenizer's chat template and trains on
    the last assistant reply. Used so these tests do not depend on lmforge.template's progress."""

    def __init__(self, tokenizer, max_length: int | None = None):
        self.tokenizer, self.max_length = tokenizer, max_length

    def cache_key(self) -> str:
        return f"chat-encoder:{self.tokenizer.name_or_path}:{self.max_length}"

    def encode(self, row: dict) -> dict | None:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        if any(m["role"] not in ("system", "user", "assistant") for m in msgs):
            raise ValueError(f"unsupported role in {[m['role'] for m in msgs]}")
        prompt = self.tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
        if self.max_length and len(ids) > self.max_length:
            return None
        return {"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:], "loss_scale": None, "length": len(ids)}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(params=["test-encoder", "lmforge-template"])
def template(request, tokenizer):
    """The same tests against the small encoder above and, once it is importable, lmforge's Template."""
    if request.param == "test-encoder":
        return ChatEncoder(tokenizer, max_length=64)
    try:
        from lmforge.template.base import Template
    except ImportError:
        pytest.skip("lmforge.template is not importable yet")
    return Template(tokenizer, max_length=64, truncation_strategy="delete")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def count_calls(template):
    """Wrap the real encode to count calls (num_proc=1 keeps them in this process)."""
    calls = {"n": 0}
    real = template.encode

    def encode(row):
        calls["n"] += 1
        return real(row)

    template.encode = encode
    return calls


def test_encode_and_cache_hit(template, tokenizer, cache):
    train, _ = load_dataset(["builtin:arith#40"])
    calls = count_calls(template)
    first = encode_dataset(train, template)
    assert calls["n"] >= 40
    assert set(first.column_names) >= {"input_ids", "labels", "length", "solution"}
    assert "messages" not in first.column_names and "_origin" not in first.column_names
    row = first[0]
    trained = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
    assert tokenizer.decode(trained).startswith(row["solution"])  # the answer is what is trained on
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    assert len(list((cache / "datasets").iterdir())) == 1

    calls["n"] = 0
    again_train, _ = load_dataset(["builtin:arith#40"])  # a new run: same data, same fingerprint
    second = encode_dataset(again_train, template)
    assert calls["n"] == 0  # cache hit: nothing encoded
    assert second["input_ids"] == first["input_ids"] and second["solution"] == first["solution"]

    other, _ = load_dataset(["builtin:arith#41"])  # different data: encoded again
    encode_dataset(other, template)
    assert calls["n"] >= 41
    calls["n"] = 0
    encode_dataset(train, template, cache=False)
    assert calls["n"] >= 40


def test_too_long_rows_are_dropped_and_counted(template, cache, tmp_path, caplog):
    rows = [{"query": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(6)]
    rows[2]["response"] = "a very long answer " * 20
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, _ = load_dataset([str(path)], seed=3)  # shuffled: the message still names the file and line
    with caplog.at_level(logging.WARNING, logger="lmforge.dataset"):
        out = encode_dataset(train, template)
    assert len(out) == 5
    assert f"dropped 1 of 6 rows: 1 too long ({path}:3; raise --max_length" in caplog.text


def test_template_errors_fail_or_are_skipped(cache, tokenizer, tmp_path, caplog):
    rows = [{"query": "q", "response": "r"}, {"messages": [{"role": "user", "content": "x"}, {"role": "tool_response", "content": "y"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, _ = load_dataset([str(path)], seed=1)
    encoder = ChatEncoder(tokenizer)
    with pytest.raises(DatasetError, match=rf"cannot encode {re.escape(str(path))}:2 \('x'...\): ValueError: "
                                           "unsupported role"):
        encode_dataset(train, encoder)
    with caplog.at_level(logging.WARNING, logger="lmforge.dataset"):
        out = encode_dataset(train, encoder, strict=False)
    assert len(out) == 1
    assert "1 failed (strict=False)" in caplog.text and "unsupported role" in caplog.text


def test_num_proc(cache, tokenizer):
    train, _ = load_dataset(["builtin:arith#30"])
    one = encode_dataset(train, ChatEncoder(tokenizer), cache=False)
    two = encode_dataset(train, ChatEncoder(tokenizer), num_proc=2, cache=False)
    assert one["input_ids"] == two["input_ids"]


def test_streaming_encode(cache, tokenizer):
    train, _ = load_dataset(["builtin:arith#10"], streaming=True)
    out = list(encode_dataset(train, ChatEncoder(tokenizer)))
    assert len(out) == 10
    assert {"input_ids", "labels", "solution"} <= set(out[0]) and "messages" not in out[0]
    assert "_origin" not in out[0]  # where a row came from serves error messages, not training


def test_kept_columns(cache, tokenizer, tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": True, "solution": "s"}, {"prompt": "p2", "completion": "c2", "label": False}]
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, _ = load_dataset([str(path)], shuffle=False)
    out = encode_dataset(train, ChatEncoder(tokenizer), keep_columns=["messages"])
    assert out["label"] == [True, False] and out["solution"] == ["s", None]
    assert out[0]["messages"][1]["content"] == "c"
    arith, _ = load_dataset(["builtin:arith#3"])
    assert "label" not in encode_dataset(arith, ChatEncoder(tokenizer)).column_names  # all null: not kept
