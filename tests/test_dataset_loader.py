"""Loading files, folders, built-ins and hubs; sampling, splitting, streaming, bad rows."""
from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

from lmforge.dataset import CANONICAL_COLUMNS, ORIGIN_COLUMN, DatasetError, load_dataset, parse_dataset_spec

ROWS = [{"query": f"q{i}", "response": f"r{i}", "solution": str(i)} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def queries(ds):
    return [r["messages"][0]["content"] for r in ds]


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


def test_jsonl_gives_canonical_rows(data):
    train, val = load_dataset([data], shuffle=False)
    assert val is None
    assert len(train) == 10
    assert train.column_names == [*CANONICAL_COLUMNS, ORIGIN_COLUMN, "solution"]
    assert train[3][ORIGIN_COLUMN] == f"{data}:4"
    assert train[3]["messages"] == [{"role": "user", "content": "q3", "loss": None},
                                    {"role": "assistant", "content": "r3", "loss": None}]
    assert train[3]["solution"] == "3"


def test_shuffle_is_seeded(data):
    a, _ = load_dataset([data], seed=1)
    b, _ = load_dataset([data], seed=1)
    c, _ = load_dataset([data], seed=2)
    assert queries(a) == queries(b) != queries(c)
    assert sorted(queries(a)) == sorted(queries(load_dataset([data], shuffle=False)[0]))
    assert a._fingerprint == b._fingerprint != c._fingerprint


def test_other_file_types_and_folders(tmp_path):
    import pandas as pd

    (tmp_path / "d").mkdir()
    pd.DataFrame(ROWS[:3]).to_csv(tmp_path / "d" / "a.csv", index=False)
    pd.DataFrame(ROWS[3:5]).to_parquet(tmp_path / "d" / "b.parquet")
    (tmp_path / "d" / "c.json").write_text(json.dumps(ROWS[5:7]))  # a JSON list
    (tmp_path / "d" / "e.json").write_text("\n".join(json.dumps(r) for r in ROWS[7:]))  # one object per line
    (tmp_path / "d" / "notes.md").write_text("ignored")
    (tmp_path / "t.txt").write_text("first line\n\n  second line  \n")

    csv, _ = load_dataset([str(tmp_path / "d" / "a.csv")], shuffle=False)
    assert queries(csv) == ["q0", "q1", "q2"] and csv[0]["solution"] == "0"
    folder, _ = load_dataset([str(tmp_path / "d")], shuffle=False)
    assert queries(folder) == [f"q{i}" for i in range(10)]
    text, _ = load_dataset([str(tmp_path / "t.txt")], shuffle=False)
    assert text["text"] == ["first line", "  second line  "]
    assert text[0]["messages"] is None


def test_sample_n_fewer_and_more_than_size(data):
    few, _ = load_dataset([f"{data}#4"], shuffle=False)
    assert len(few) == 4 and len(set(queries(few))) == 4
    again, _ = load_dataset([f"{data}#4"], shuffle=False)
    assert queries(few) == queries(again)  # seeded
    many, _ = load_dataset([f"{data}#25"])
    counts = Counter(queries(many))
    assert len(many) == 25 and set(counts) == {f"q{i}" for i in range(10)}
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # every row twice, half of them once more


def test_split_ratio(data):
    train, val = load_dataset([data], split_dataset_ratio=0.2)
    assert len(train) == 8 and len(val) == 2
    assert not set(queries(train)) & set(queries(val))
    train2, val2 = load_dataset([data], split_dataset_ratio=0.2)
    assert queries(val) == queries(val2) and queries(train) == queries(train2)
    with pytest.raises(DatasetError, match="leaves no training rows"):
        load_dataset([f"{data}#1"], split_dataset_ratio=0.5)


def test_val_dataset_and_concatenation(tmp_path, data):
    other = write_jsonl(tmp_path / "other.jsonl", [{"messages": [{"role": "user", "content": "m"}, {"role": "assistant", "content": "n"}], "score": 1.5}])
    val_file = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "p", "completion": "c"}])
    train, val = load_dataset([data, other], val_dataset=[val_file], split_dataset_ratio=0.5, shuffle=False)
    assert len(train) == 11  # the ratio is not used when val_dataset is given
    assert queries(val) == ["p"]
    # columns missing in one source are None
    assert train[0]["score"] is None and train[10]["score"] == 1.5
    assert train[10]["solution"] is None and train[0]["solution"] == "0"


def test_columns_rename(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    train, _ = load_dataset([path], columns={"question": "query", "answer": "response"})
    assert train[0]["messages"][1]["content"] == "a"


def test_bad_rows_fail_with_file_line_and_field(tmp_path):
    good = json.dumps(ROWS[0])
    bot = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]})
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, bot])
    with pytest.raises(DatasetError, match=r"data\.jsonl:3: field 'messages\[1\]\.role': unknown role 'bot' \(expected one of"):
        load_dataset([path])
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, good, '{"query": "q" "response": "r"}'])
    with pytest.raises(DatasetError, match=r"data\.jsonl:4: invalid JSON: Expecting ',' delimiter"):
        load_dataset([path])
    path = write_jsonl(tmp_path / "data.jsonl", [good, '{"foo": 1, "bar": 2}'])
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: cannot detect the format; columns are \['bar', 'foo'\]"):
        load_dataset([path])
    path = write_jsonl(tmp_path / "data.jsonl", ["[1, 2]"])
    with pytest.raises(DatasetError, match=r"data\.jsonl:1: expected a JSON object"):
        load_dataset([path])


def test_bad_rows_skipped_and_counted_when_not_strict(tmp_path, caplog):
    lines = [json.dumps(r) for r in ROWS[:5]] + ["{oops", json.dumps({"messages": [{"role": "bot", "content": "y"}]})]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="lmforge.dataset"):
        train, _ = load_dataset([path], strict=False)
    assert len(train) == 5
    assert "skipped 2 of 7 rows" in caplog.text
    assert "data.jsonl:6: invalid JSON" in caplog.text and "data.jsonl:7: field 'messages[0].role'" in caplog.text
    # all rows bad: an error, not an empty dataset
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(DatasetError, match="no usable rows: all 1 rows were skipped"):
        load_dataset([path], strict=False)


def test_num_proc_gives_the_same_rows(data):
    assert queries(load_dataset([data], num_proc=2)[0]) == queries(load_dataset([data])[0])


def test_streaming(tmp_path, data):
    from datasets import IterableDataset

    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "plain"}])
    train, val = load_dataset([data, other], val_dataset=[f"{data}#2"], streaming=True, shuffle=False)
    assert isinstance(train, IterableDataset) and isinstance(val, IterableDataset)
    rows = list(train)
    assert [r["messages"][0]["content"] for r in rows[:10]] == [f"q{i}" for i in range(10)]
    assert rows[10]["text"] == "plain" and rows[10]["solution"] is None  # columns aligned
    assert all(set(CANONICAL_COLUMNS) <= set(r) for r in rows)
    assert len(list(val)) == 2
    repeated, _ = load_dataset([f"{data}#15"], streaming=True)
    assert len(list(repeated)) == 15
    with pytest.raises(DatasetError, match="unknown role"):
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "y"}]}])
        list(load_dataset([bad, data], streaming=True)[0])


def test_specifier_parsing(tmp_path):
    assert parse_dataset_spec("org/name:sub#10").__dict__ == {
        "spec": "org/name:sub#10", "kind": "hub", "name": "org/name", "subset": "sub", "split": None, "n": 10}
    assert parse_dataset_spec("org/name:test").split == "test"
    spec = parse_dataset_spec("org/name:sub:validation")
    assert (spec.subset, spec.split) == ("sub", "validation")
    spec = parse_dataset_spec("builtin:arith:test#5")
    assert (spec.kind, spec.name, spec.split, spec.n) == ("builtin", "arith", "test", 5)
    weird = tmp_path / "odd:name#3.jsonl"  # an existing path wins over the syntax
    weird.write_text(json.dumps(ROWS[0]) + "\n")
    assert parse_dataset_spec(str(weird)).kind == "local"
    with pytest.raises(DatasetError, match="no such file"):
        parse_dataset_spec(str(tmp_path / "missing.jsonl"))


def test_hub_offline_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the flags are read when the libraries are imported: make sure this test cannot reach the network
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match=r"'someorg/some-dataset'.*Hugging Face hub: the hub is offline"):
        load_dataset(["someorg/some-dataset"])


def test_modelscope_missing_says_how_to_install():
    try:
        import modelscope  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetError, match="pip install modelscope"):
            load_dataset(["someorg/some-dataset"], hub="modelscope")
    else:
        pytest.skip("modelscope is installed")
