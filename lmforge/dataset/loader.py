"""Load datasets named on the command line into canonical rows.

A dataset specifier is ``<name>[:<subset or split>][#N]`` where ``name`` is a local file or
folder (``.jsonl .json .csv .parquet .txt``), ``builtin:NAME`` or a hub id (Hugging Face, or
ModelScope with ``hub="modelscope"``). ``#N`` sub-samples N rows, repeating rows when N exceeds
the dataset. A local path that exists always wins over this parsing.

Local files are read here rather than by ``datasets``' JSON/CSV builders: raw rows of real data
are heterogeneous (a ``tool_calls`` key in one row and not the next, ``arguments`` as an object
here and a string there), which Arrow schema inference rejects with messages that name neither
the line nor the field. Reading rows ourselves lets every error say ``file:line: field``, and
gives one code path for streaming and in-memory loading: sources yield raw rows, one
preprocessing function maps them, and only canonical rows (whose Arrow schema is fixed) become
Arrow tables. Each row keeps where it came from (``file:line``) in the ``_origin`` column through
shuffling and sub-sampling, so that later stages (encoding, too-long rows) name the file and line too.

Bytes that are not UTF-8 and CSV rows of the wrong width are bad *rows*, not bad files: they fail
with ``file:line`` or, under ``strict=False``, are skipped and counted like any malformed row.
Files are therefore decoded with ``surrogateescape`` (an undecodable byte becomes a lone
surrogate, found per row) and CSV is read with the standard ``csv`` module, whose records carry
their line numbers, rather than pandas, which fails the whole file without naming it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from lmforge.dataset.preprocess import CANONICAL_COLUMNS, ORIGIN_COLUMN, DatasetError, preprocess_row, utf8_problem
from lmforge.dataset.readers import CHUNK_ROWS, SUFFIXES, Record, _BadRecord, _JsonLine, _LocalSource

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

    from lmforge.dataset.builtin import BuiltinContext

__all__ = ["DatasetSpec", "check_datasets", "load_dataset", "parse_dataset_spec", "sample_indices"]

logger = logging.getLogger(__name__)

SPLIT_NAMES = frozenset({"train", "test", "validation", "valid", "val", "dev", "eval"})
MAX_REASONS = 5  # skipped-row reasons shown in the warning
STREAM_SHUFFLE_BUFFER = 10_000


# ----------------------------------------------------------------------------- specifiers


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset specifier."""

    spec: str  # as the user wrote it
    kind: str  # "local" | "builtin" | "hub"
    name: str  # path, built-in name or hub id
    subset: str | None = None
    split: str | None = None
    n: int | None = None  # "#N"


def _looks_like_path(s: str) -> bool:
    return s.endswith(SUFFIXES) or s.startswith(("/", "./", "../", "~", ".")) or s.count("/") > 1 or "\\" in s


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parse ``<name>[:<subset or split>][#N]``; an existing local path is taken as it is.

    For hub ids a single suffix that is a split name (train, test, validation, ...) is the split,
    anything else is the subset; ``id:subset:split`` names both.
    """
    text = spec.strip()
    if os.path.exists(text):
        return DatasetSpec(spec, "local", text)
    n = None
    m = re.fullmatch(r"(.+)#(\d+)", text)
    if m:
        text, n = m.group(1), int(m.group(2))
        if n <= 0:
            raise DatasetError(f"dataset {spec!r}: #N must be a positive number of rows")
    if os.path.exists(text):
        return DatasetSpec(spec, "local", text, n=n)
    if text.startswith("builtin:"):
        name, _, split = text[len("builtin:") :].partition(":")
        return DatasetSpec(spec, "builtin", name, split=split or None, n=n)
    if _looks_like_path(text):
        raise DatasetError(f"dataset {spec!r}: no such file or directory {text!r}")
    name, *rest = text.split(":")
    if len(rest) > 2 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise DatasetError(
            f"dataset {spec!r}: not an existing file or folder, not builtin:NAME, and not a hub id "
            "of the form 'org/name[:subset][:split][#N]'"
        )
    subset = split = None
    if len(rest) == 2:
        subset, split = rest
    elif rest:
        if rest[0] in SPLIT_NAMES or "[" in rest[0]:
            split = rest[0]
        else:
            subset = rest[0]
    return DatasetSpec(spec, "hub", name, subset=subset or None, split=split or None, n=n)


# ----------------------------------------------------------------------------- sources
# A source yields (where, payload) pairs: ``where`` is "file:line" (or "name:row i") for error
# messages; ``payload`` is a raw row dict, or a _JsonLine parsed where it is preprocessed.


class _BuiltinSource:
    def __init__(self, spec: DatasetSpec, context: BuiltinContext):
        from lmforge.registry import DATASETS

        if spec.name not in DATASETS:
            raise DatasetError(f"dataset {spec.spec!r}: {DATASETS.unknown_message(spec.name)}")
        self.entry = DATASETS.get(spec.name)
        self.split = spec.split or self.entry.splits[0]
        if self.split not in self.entry.splits:
            raise DatasetError(
                f"dataset {spec.spec!r}: builtin:{spec.name} has no split {self.split!r}; splits: {', '.join(self.entry.splits)}"
            )
        self.context = context
        self.display = f"builtin:{spec.name}:{self.split}"

    def fingerprint(self) -> str:
        return f"{self.display}:v{self.entry.version}:{self.context!r}"

    def records(self) -> Iterator[Record]:
        for i, row in enumerate(self.entry.load(self.split, self.context)):
            yield f"{self.display}:row {i}", row


class _HubSource:
    """A hub dataset, opened eagerly so that a missing or unreachable dataset fails at load time."""

    def __init__(self, spec: DatasetSpec, hub: str, streaming: bool):
        self.split = spec.split or "train"
        self.display = spec.name + (f":{spec.subset}" if spec.subset else "") + f"[{self.split}]"
        if hub == "hf":
            self.ds = _open_hf(spec, self.split, streaming)
        elif hub == "modelscope":
            self.ds = _open_modelscope(spec, self.split, streaming)
        else:
            raise DatasetError(f"unknown hub {hub!r}; expected 'hf' or 'modelscope'")
        self.hub = hub

    def fingerprint(self) -> str:
        return f"{self.hub}:{self.display}:{getattr(self.ds, '_fingerprint', None)}"

    def records(self) -> Iterator[Record]:
        rows: Iterable[dict]
        if hasattr(self.ds, "iter") and hasattr(self.ds, "__len__"):  # map-style: read in batches, it is faster
            rows = (dict(zip(b, vals)) for b in self.ds.iter(batch_size=1000) for vals in zip(*b.values()))
        else:
            rows = iter(self.ds)
        for i, row in enumerate(rows):
            yield f"{self.display}:row {i}", row


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _open_hf(spec: DatasetSpec, split: str, streaming: bool) -> Any:
    import datasets

    try:
        return datasets.load_dataset(spec.name, spec.subset, split=split, streaming=streaming)
    except Exception as e:  # the hub raises many types; all mean "could not get it"
        why = (
            "the hub is offline (HF_HUB_OFFLINE=1) and no cached copy was found"
            if _hub_offline() or datasets.config.HF_HUB_OFFLINE
            else "check the id, subset and split, and that the hub is reachable"
        )
        raise DatasetError(
            f"dataset {spec.spec!r}: cannot load {spec.name!r} (subset={spec.subset!r}, split={split!r}) "
            f"from the Hugging Face hub: {why}. {type(e).__name__}: {e}"
        ) from e


def _open_modelscope(spec: DatasetSpec, split: str, streaming: bool) -> Any:
    try:
        from modelscope import MsDataset
    except ImportError:
        raise DatasetError(
            f"dataset {spec.spec!r}: hub='modelscope' needs the modelscope package: pip install modelscope"
        ) from None
    try:
        ds = MsDataset.load(spec.name, subset_name=spec.subset or "default", split=split, use_streaming=streaming)
    except Exception as e:
        raise DatasetError(
            f"dataset {spec.spec!r}: cannot load {spec.name!r} (subset={spec.subset!r}, split={split!r}) "
            f"from ModelScope: {type(e).__name__}: {e}"
        ) from e
    return ds.to_hf_dataset() if not streaming and hasattr(ds, "to_hf_dataset") else ds


def _open_source(spec: DatasetSpec, hub: str, streaming: bool, context: BuiltinContext):
    if spec.kind == "local":
        return _LocalSource(spec)
    if spec.kind == "builtin":
        return _BuiltinSource(spec, context)
    return _HubSource(spec, hub, streaming)


# ----------------------------------------------------------------------------- preprocessing


def _to_canonical(where: str, payload: Any, columns: dict | None, task: str | None = None) -> dict:
    if isinstance(payload, _BadRecord):
        raise DatasetError(f"{where}: {payload}", source=where)
    if isinstance(payload, _JsonLine):
        bad = utf8_problem(payload)
        if bad:
            raise DatasetError(f"{where}: {bad}", source=where)
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: invalid JSON: {e.msg} (column {e.colno})", source=where) from None
        if not isinstance(payload, dict):
            raise DatasetError(f"{where}: expected a JSON object per line, got {type(payload).__name__}", source=where)
    if task is not None:  # embedding, reranker and classifier rows (lmforge.dataset.tasks)
        from lmforge.dataset.tasks import preprocess_task_row

        return preprocess_task_row(payload, source=where, columns=columns, task=task)
    return preprocess_row(payload, source=where, columns=columns)


def _process_chunk(records: list[Record], columns: dict | None, strict: bool,
                   task: str | None = None) -> tuple[list[dict], list[str], int]:
    """Canonical rows, reasons of skipped rows, rows read. Module-level so worker processes can run it."""
    rows, errors = [], []
    for where, payload in records:
        try:
            row = _to_canonical(where, payload, columns, task)
            row[ORIGIN_COLUMN] = where
            rows.append(row)
        except DatasetError as e:
            if strict:
                raise
            errors.append(str(e))
    return rows, errors, len(records)


class _SkipLog:
    """Counts skipped rows of one source and says so once, with the first reasons."""

    def __init__(self, display: str):
        self.display, self.total, self.skipped, self.reasons = display, 0, 0, []

    def add(self, n_read: int, errors: list[str]) -> None:
        self.total += n_read
        self.skipped += len(errors)
        self.reasons.extend(errors[: MAX_REASONS - len(self.reasons)])

    def report(self) -> None:
        if self.skipped:
            logger.warning(
                "%s: skipped %d of %d rows that could not be read (strict=False). First reasons:\n  %s",
                self.display, self.skipped, self.total, "\n  ".join(self.reasons),
            )

    def no_rows(self) -> DatasetError:
        why = f"all {self.total} rows were skipped, e.g. {self.reasons[0]}" if self.skipped else "it is empty"
        return DatasetError(f"dataset {self.display!r} has no usable rows: {why}")


# ----------------------------------------------------------------------------- Arrow tables


@functools.cache
def _canonical_types() -> dict[str, pa.DataType]:
    import pyarrow as pa

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("loss", pa.bool_())]))
    return {
        "messages": message,
        "tools": pa.string(),
        "images": pa.list_(pa.string()),
        "videos": pa.list_(pa.list_(pa.string())),
        "rejected_response": pa.string(),
        "rejected_messages": message,
        "label": pa.bool_(),
        "text": pa.string(),
        ORIGIN_COLUMN: pa.string(),
    }


def _rows_to_table(rows: list[dict], display: str, task: str | None = None) -> pa.Table:
    """Canonical columns get their fixed types (a task's own where it changes them: ``dataset/tasks.py``);
    extra columns are inferred (a missing value is null)."""
    import pyarrow as pa

    types = dict(_canonical_types())
    if task is not None:
        from lmforge.dataset.tasks import column_types

        types.update(column_types(task))
    arrays = {}
    for k, t in types.items():
        try:
            arrays[k] = pa.array([r[k] for r in rows], type=t)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DatasetError(f"{display}: column {k!r} holds values of different types ({e}); make them one type") from None
    extras = dict.fromkeys(k for r in rows for k in r if k not in arrays)
    for k in extras:
        try:
            arrays[k] = pa.array([r.get(k) for r in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DatasetError(f"{display}: column {k!r} holds values of different types ({e}); make them one type") from None
    return pa.table(arrays)


def _concat_tables(tables: list[pa.Table], names: list[str]) -> pa.Table:
    """Concatenate, filling a column missing from one table with nulls; explain type clashes."""
    import pyarrow as pa

    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        seen: dict[str, tuple[str, pa.DataType]] = {}
        for table, name in zip(tables, names):
            for fld in table.schema:
                if pa.types.is_null(fld.type):
                    continue
                if fld.name in seen and seen[fld.name][1] != fld.type:
                    first, first_type = seen[fld.name]
                    raise DatasetError(
                        f"column {fld.name!r} is {first_type} in {first} but {fld.type} in {name}; make them one type"
                    ) from None
                seen.setdefault(fld.name, (name, fld.type))
        raise DatasetError(f"cannot concatenate datasets {names}: {e}") from None


def sample_indices(size: int, n: int, seed: int) -> list[int]:
    """``#N``: N distinct rows shuffled by seed, or whole repeats plus a random remainder when N > size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if n <= size:
        return rng.permutation(size)[:n].tolist()
    repeats, rest = divmod(n, size)
    idx = np.concatenate([np.tile(np.arange(size), repeats), rng.permutation(size)[:rest]])
    rng.shuffle(idx)
    return idx.tolist()


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while chunk := list(islice(records, size)):
        yield chunk


def _load_table(source, columns: dict | None, strict: bool, pool, task: str | None = None) -> pa.Table:
    from datasets.utils.tqdm import tqdm

    log = _SkipLog(source.display)
    work = functools.partial(_process_chunk, columns=columns, strict=strict, task=task)
    chunks = _chunks(source.records(), CHUNK_ROWS)
    tables = []
    with tqdm(desc=f"Preprocessing {source.display}", unit=" rows") as bar:
        for rows, errors, n_read in pool.imap(work, chunks) if pool else map(work, chunks):
            bar.update(n_read)
            log.add(n_read, errors)
            if rows:
                tables.append(_rows_to_table(rows, source.display, task))
    log.report()
    if not tables:
        raise log.no_rows()
    return _concat_tables(tables, [source.display] * len(tables))


@functools.cache
def _code_version() -> str:
    """Changes to the mapping code must invalidate fingerprints (and so cached encodings)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("preprocess.py", "loader.py", "builtin.py", "media.py", "shapes.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([_code_version(), *parts], default=repr).encode()).hexdigest()[:32]


def _build(
    specs: list[DatasetSpec], sources: list, *, columns, strict, seed, num_proc, task=None
) -> tuple[pa.Table, list[str]]:
    """Load, sub-sample and concatenate ``specs`` into one table; also the parts of its fingerprint."""
    import contextlib
    import multiprocessing

    # The pool's exit terminates the workers, so a strict error does not wait for the rest of the file.
    with multiprocessing.Pool(num_proc) if num_proc > 1 else contextlib.nullcontext() as pool:
        tables = []
        for spec, source in zip(specs, sources):
            table = _load_table(source, columns, strict, pool, task)
            if spec.n is not None:
                if spec.n > table.num_rows:
                    _log_upsampling(spec, source.display, table.num_rows)
                table = table.take(sample_indices(table.num_rows, spec.n, seed))
            tables.append(table)
    prints = [[s.spec, s.n, src.fingerprint()] for s, src in zip(specs, sources)]
    if task is not None:  # the task's mapping (and its code) is part of what the rows are
        from lmforge.dataset.tasks import code_version

        prints.append(["task", task, code_version()])
    return _concat_tables(tables, [s.spec for s in specs]), prints


def _log_upsampling(spec: DatasetSpec, display: str, size: int) -> None:
    """``name#N`` beyond the source's size repeats rows (see ``sample_indices``): say so and by how much,
    since the preprocessing bar above counts the source's rows, not the N asked for."""
    repeats, rest = divmod(spec.n, size)
    times = {1: "once", 2: "twice"}
    how = f"every row used {times.get(repeats, f'{repeats} times')}"
    if rest:
        how += f" and {rest:,} of them {times.get(repeats + 1, f'{repeats + 1} times')}"
    logger.info("%s: %s has %s rows, fewer than the %s asked for, so %s rows are repeats (%s)",
                spec.spec, display, f"{size:,}", f"{spec.n:,}", f"{spec.n - size:,}", how)


def _to_dataset(table: pa.Table, fingerprint: str) -> datasets.Dataset:
    import datasets

    return datasets.Dataset(table, fingerprint=fingerprint)


# ----------------------------------------------------------------------------- streaming


def _stream_rows(plan: tuple) -> Iterator[dict]:
    """All sources of ``plan`` one after another; ``#N`` takes the first N rows, cycling if needed."""
    sources, ns, columns, strict, extras = plan
    for source, n in zip(sources, ns):
        log = _SkipLog(source.display)
        produced, first_pass = 0, True
        try:
            while True:
                before = produced
                for where, payload in source.records():
                    rows, errors, _ = _process_chunk([(where, payload)], columns, strict)
                    if first_pass:
                        log.add(1, errors)
                    for row in rows:
                        yield {**row, **{k: row.get(k) for k in extras}}
                        produced += 1
                    if n is not None and produced >= n:
                        break
                if produced == before:
                    raise log.no_rows()
                if n is None or produced >= n:
                    break
                first_pass = False
        finally:
            log.report()


def _first_row(source, columns: dict | None, limit: int = 1000) -> dict:
    """The first readable row among the first ``limit`` (errors are reported when streaming)."""
    for where, payload in islice(source.records(), limit):
        try:
            return _to_canonical(where, payload, columns)
        except DatasetError:
            continue
    return {}


def _stream(specs: list[DatasetSpec], sources: list, *, columns, strict, seed, shuffle) -> datasets.IterableDataset:
    import datasets

    # Align columns as concatenation does in memory: extra columns of each source's first row
    # appear (as None where missing) in every row.
    extras: dict[str, None] = {}
    for source in sources:
        first = _first_row(source, columns)
        extras.update((k, None) for k in first if k not in CANONICAL_COLUMNS)
    plan = (tuple(sources), tuple(s.n for s in specs), columns, strict, tuple(extras))
    ds = datasets.IterableDataset.from_generator(_stream_rows, gen_kwargs={"plan": plan})
    return ds.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER) if shuffle else ds


# ----------------------------------------------------------------------------- entry point


def check_datasets(*spec_lists: str | list[str] | None) -> None:
    """Fail now on a dataset that cannot be opened (a missing file, an unknown built-in or split, a bad
    specifier), before a command loads its model; hub ids are only checked when they are loaded."""
    from lmforge.dataset.builtin import BuiltinContext

    for specs in spec_lists:
        for s in _as_list(specs):
            spec = parse_dataset_spec(s)
            if spec.kind == "local":
                _LocalSource(spec)
            elif spec.kind == "builtin":
                _BuiltinSource(spec, BuiltinContext(None, None))


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def load_dataset(
    datasets: list[str],
    *,
    val_dataset: list[str] | None = None,
    split_dataset_ratio: float = 0.0,
    seed: int = 42,
    columns: dict | None = None,
    strict: bool = True,
    streaming: bool = False,
    num_proc: int = 1,
    model_name: str | list[str] | None = None,
    model_author: str | list[str] | None = None,
    hub: str = "hf",
    shuffle: bool = True,
    task: str | None = None,
) -> tuple[Any, Any]:
    """Load ``datasets`` (concatenated) and the validation set, as canonical rows.

    Returns ``(train, val)``: ``val`` comes from ``val_dataset``, else is split off ``train`` by
    ``split_dataset_ratio``, else is None. With ``streaming`` both are ``IterableDataset`` (no split
    ratio: give ``val_dataset``; ``#N`` takes the first N rows, cycling when the source is shorter,
    and shuffling is a buffer shuffle). ``strict=False`` skips unreadable rows, counts them and warns.
    ``num_proc`` preprocesses chunks of rows in that many processes. ``model_name``/``model_author``
    fill ``builtin:self-cognition``. ``task`` (seq_cls, embedding, reranker, generative_reranker) maps rows as
    :mod:`lmforge.dataset.tasks` describes (not with ``streaming``).
    """
    from lmforge.dataset.builtin import BuiltinContext

    train_specs = [parse_dataset_spec(s) for s in _as_list(datasets)]
    val_specs = [parse_dataset_spec(s) for s in _as_list(val_dataset)]
    if not train_specs:
        raise DatasetError("no dataset given (--dataset)")
    if not 0.0 <= split_dataset_ratio < 1.0:
        raise DatasetError(f"split_dataset_ratio must be in [0, 1), got {split_dataset_ratio}")
    if val_specs and split_dataset_ratio > 0:
        logger.info("val_dataset is given, so split_dataset_ratio=%s is not used", split_dataset_ratio)
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    context = BuiltinContext(as_tuple(model_name), as_tuple(model_author))
    train_sources = [_open_source(s, hub, streaming, context) for s in train_specs]
    val_sources = [_open_source(s, hub, streaming, context) for s in val_specs]

    if streaming:
        if task is not None:
            raise DatasetError(f"--streaming is not supported with --task_type {task}; drop --streaming")
        if split_dataset_ratio > 0 and not val_specs:
            logger.warning("streaming: split_dataset_ratio=%s is ignored; give --val_dataset for validation", split_dataset_ratio)
        common = dict(columns=columns, strict=strict, seed=seed)
        train = _stream(train_specs, train_sources, shuffle=shuffle, **common)
        val = _stream(val_specs, val_sources, shuffle=False, **common) if val_specs else None
        return train, val

    common = dict(columns=columns, strict=strict, seed=seed, num_proc=num_proc, task=task)
    table, prints = _build(train_specs, train_sources, **common)
    n = table.num_rows
    val = None
    if val_specs:
        val_table, val_prints = _build(val_specs, val_sources, **common)
        val = _to_dataset(val_table, _fingerprint("val", val_prints, columns, strict, seed))
        n_val = 0
    else:
        n_val = max(1, round(n * split_dataset_ratio)) if split_dataset_ratio > 0 else 0
        if n_val >= n:
            raise DatasetError(f"split_dataset_ratio={split_dataset_ratio} leaves no training rows out of {n}")
    order = None
    if shuffle or n_val:
        import numpy as np

        order = np.random.default_rng(seed).permutation(n)
        if n_val:
            val_table = table.take(np.sort(order[:n_val]))
            val = _to_dataset(val_table, _fingerprint("split-val", prints, columns, strict, seed, split_dataset_ratio))
            order = order[n_val:] if shuffle else np.sort(order[n_val:])
        table = table.take(order)
    train = _to_dataset(table, _fingerprint("train", prints, columns, strict, seed, split_dataset_ratio, shuffle))
    logger.info("loaded %d training rows%s", len(train), f" and {len(val)} validation rows" if val is not None else "")
    return train, val
