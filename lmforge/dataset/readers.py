"""Local dataset files (.jsonl, .json, .csv, .parquet, .txt, or a folder of them) as ``(where, payload)``
records: ``where`` is "file:line" for error messages; ``payload`` a raw row dict, a :class:`_JsonLine` parsed
where rows are preprocessed (possibly in parallel), or a :class:`_BadRecord` naming why the line was unreadable.
Split from loader.py, which joins these with the built-in and hub sources."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lmforge.dataset.preprocess import DatasetError, utf8_problem

if TYPE_CHECKING:
    from lmforge.dataset.loader import DatasetSpec

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
CHUNK_ROWS = 10_000  # rows preprocessed per task and turned into one Arrow table (and parquet rows read at once)


class _JsonLine(str):
    """An unparsed JSONL line, so that parsing happens in the (possibly parallel) preprocessing step."""


class _BadRecord(str):
    """A record the reader could not turn into a row (its reason), reported where rows are preprocessed."""


def _open_text(path: Path, **kw: Any):
    """A text file whose undecodable bytes become lone surrogates (reported per row by :func:`utf8_problem`)."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", **kw)


Record = tuple[str, Any]


class _LocalSource:
    def __init__(self, spec: DatasetSpec):
        path = Path(os.path.expanduser(spec.name))
        self.display = spec.name
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")
            )
            if not files:
                raise DatasetError(f"dataset {spec.spec!r}: the folder has no {'/'.join(SUFFIXES)} files")
            self.files = [(p, str(p)) for p in files]
        elif path.suffix in SUFFIXES:
            self.files = [(path, spec.name)]
        else:
            raise DatasetError(f"dataset {spec.spec!r}: unsupported file type {path.suffix!r}; expected one of {SUFFIXES}")

    def fingerprint(self) -> str:
        parts = []
        for path, _ in self.files:
            st = path.stat()
            parts.append(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        return "local:" + "|".join(parts)

    def records(self) -> Iterator[Record]:
        for path, display in self.files:
            yield from _READERS[path.suffix](path, display)


def _read_jsonl(path: Path, display: str) -> Iterator[Record]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{display}:{lineno}", _JsonLine(line)


def _read_json(path: Path, display: str) -> Iterator[Record]:
    """A JSON list of rows, or (as many ``.json`` files are) one object per line."""
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):
        yield from _read_jsonl(path, display)
        return
    raw = path.read_bytes()
    try:
        rows = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:  # one JSON document: the whole file fails, naming the line
        line = raw.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{display}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as "
                           "UTF-8", source=display) from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{display}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})", source=display) from None
    for i, row in enumerate(rows):
        yield f"{display}:row {i}", row


def _read_csv(path: Path, display: str) -> Iterator[Record]:
    """Cells are read as text (``label`` and list columns given as JSON text are understood).

    A record with more or fewer fields than the header, or with bytes that are not UTF-8, becomes a
    bad record at its first line (a quoted field may span lines).
    """
    import csv

    csv.field_size_limit(2**31 - 1)  # the default (128 KiB) would fail a long reply
    with _open_text(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DatasetError(f"{display}:1: unreadable CSV header: {e}", source=display) from None
        if not header:
            return
        bad = utf8_problem("".join(header))
        if bad:
            raise DatasetError(f"{display}:1: the header is {bad}", source=display)
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DatasetError(f"{display}:1: the header names column(s) {dupes} more than once", source=display)
        line = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield f"{display}:{line}", _BadRecord(f"malformed CSV: {e}")
                line = reader.line_num + 1
                continue
            where, line = f"{display}:{line}", reader.line_num + 1
            if not fields:  # a blank line
                continue
            bad = utf8_problem("\x00".join(fields))
            if bad:
                yield where, _BadRecord(bad)
            elif len(fields) != len(header):
                extra = f": extra value(s) {fields[len(header):]!r:.80}" if len(fields) > len(header) else ""
                yield where, _BadRecord(f"{len(fields)} fields, but the header has {len(header)} "
                                        f"({', '.join(header)}){extra}; quote values that hold commas")
            else:
                yield where, dict(zip(header, fields))


def _read_parquet(path: Path, display: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
        for row in batch.to_pylist():
            yield f"{display}:row {i}", row
            i += 1


def _read_txt(path: Path, display: str) -> Iterator[Record]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                bad = utf8_problem(line)
                yield f"{display}:{lineno}", _BadRecord(bad) if bad else {"text": line.rstrip("\r\n")}


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}
