"""Broken data as a careless user makes it: each shape fails naming file:line (strict) or is skipped and
counted (--strict false), and nothing empty or undecodable is ever trained on."""
from __future__ import annotations

import json
import logging

import pytest

from lmforge.dataset import DatasetError, iter_jsonl_rows, load_dataset


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _pairs(ds) -> list[tuple[str, str]]:
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in ds]


def _line(q: str, r: str) -> bytes:
    return json.dumps({"query": q, "response": r}).encode() + b"\n"


# (name, file name, bytes, the line named, words in the message, rows left under --strict false)
SHAPES = [
    ("jsonl-not-utf8", "d.jsonl", _line("q1", "r1") + _line("q2", "r2")[:-3] + b'\xff\xfe"}\n' + _line("q3", "r3"),
     2, "not valid UTF-8 (byte 0xff", 2),
    ("csv-extra-field", "d.csv", b"query,response\nq1,r1\nq2,r2,oops\nq3,r3\n", 3,
     "3 fields, but the header has 2 (query, response): extra value(s) ['oops']", 2),
    ("csv-missing-field", "d.csv", b"query,response\nq1,r1\nq2\nq3,r3\n", 3, "1 fields, but the header has 2", 2),
    ("csv-empty-response", "d.csv", b"query,response\nq1,r1\nq2,\nq3,r3\n", 3, "field 'response': empty response", 2),
    ("csv-empty-query", "d.csv", b"query,response\nq1,r1\n,r3\nq3,r3\n", 3, "field 'query': empty query", 2),
    ("csv-not-utf8", "d.csv", b"query,response\nq1,r1\nq2,r\xe92\nq3,r3\n", 3, "not valid UTF-8 (byte 0xe9", 2),
    ("jsonl-empty-assistant", "d.jsonl", _line("q1", "r1") + json.dumps({"messages": [
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "  "}]}).encode() + b"\n", 2,
     "field 'messages[1].content': empty assistant message", 1),
    ("jsonl-empty-user", "d.jsonl", json.dumps({"messages": [
        {"role": "user", "content": ""}, {"role": "assistant", "content": "r"}]}).encode() + b"\n" + _line("q", "r"),
     1, "field 'messages[0].content': empty user message", 1),
    ("alpaca-empty-output", "d.jsonl", json.dumps({"instruction": "i", "output": ""}).encode() + b"\n"
     + _line("q", "r"), 1, "field 'output': empty output", 1),
]


@pytest.mark.parametrize("name,file,data,line,words,left", SHAPES, ids=[s[0] for s in SHAPES])
def test_broken_row_names_file_and_line_or_is_skipped(tmp_path, caplog, name, file, data, line, words, left):
    path = _write(tmp_path / file, data)
    with pytest.raises(DatasetError) as e:
        load_dataset([path], shuffle=False)
    assert str(e.value).startswith(f"{path}:{line}: ") and words in str(e.value), str(e.value)
    with caplog.at_level(logging.WARNING, logger="lmforge.dataset"):
        train, _ = load_dataset([path], shuffle=False, strict=False)
    assert len(train) == left
    assert f"skipped 1 of {left + 1} rows" in caplog.text and f"{path}:{line}: " in caplog.text
    for query, reply in _pairs(train):  # nothing empty or undecodable reaches training
        assert query.strip() and reply.strip()
        query.encode("utf-8"), reply.encode("utf-8")


def test_csv_records_spanning_lines_keep_their_first_line(tmp_path):
    path = _write(tmp_path / "d.csv", b'query,response\n"a question\nover two lines",r1\nq2,\n')
    with pytest.raises(DatasetError, match=rf"{path}:4: field 'response'"):
        load_dataset([path], shuffle=False)
    train, _ = load_dataset([path], shuffle=False, strict=False)
    assert _pairs(train) == [("a question\nover two lines", "r1")] and train[0]["_origin"] == f"{path}:2"


def test_other_readers_name_bad_bytes(tmp_path):
    txt = _write(tmp_path / "t.txt", b"fine line\nbad \xc3\x28 line\n")
    with pytest.raises(DatasetError, match=rf"{txt}:2: not valid UTF-8 \(byte 0xc3"):
        load_dataset([txt], shuffle=False)
    assert [r["text"] for r in load_dataset([txt], shuffle=False, strict=False)[0]] == ["fine line"]
    arr = _write(tmp_path / "a.json", b'[\n{"query": "q", "response": "r"},\n{"query": "\xff", "response": "r"}\n]')
    with pytest.raises(DatasetError, match=rf"{arr}:3: not valid UTF-8 \(byte 0xff\)"):
        load_dataset([arr], shuffle=False, strict=False)  # one JSON document: the file cannot be read at all


def test_batch_inference_rows_report_bad_bytes_and_go_on(tmp_path):
    path = _write(tmp_path / "d.jsonl", _line("q1", "r1") + b'{"query": "\xff"}\n' + _line("q3", "r3"))
    rows = list(iter_jsonl_rows(path))
    assert [r[2] is None for r in rows] == [True, False, True]
    assert rows[1][2].startswith(f"{path}:2: not valid UTF-8")


def test_streaming_skips_broken_rows_too(tmp_path, caplog):
    path = _write(tmp_path / "d.csv", b"query,response\nq1,r1\nq2,\nq3,r3,x\nq4,r4\n")
    with caplog.at_level(logging.WARNING, logger="lmforge.dataset"):
        train, _ = load_dataset([path], streaming=True, shuffle=False, strict=False)
        assert [q for q, _ in _pairs(train)] == ["q1", "q4"]
    assert "skipped 2 of 4 rows" in caplog.text
