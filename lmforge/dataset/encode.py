"""Encode canonical rows into token ids with a template, cached on disk.

Encoding a large dataset takes minutes and is the same on every run with the same data and
template, so the result is saved under ``$LMFORGE_CACHE/datasets/<key>`` (default
``~/.cache/lmforge``) where the key hashes the data's fingerprint, ``template.cache_key()`` and
this module's code. A second run loads the Arrow files (memory-mapped) instead of encoding.

The output holds the template's keys (``input_ids``, ``labels``, ``loss_scale``, ``length``, ...)
plus the row's *extra* columns (``solution`` and the like, which reward functions and metrics
need and which cost little) and ``label`` where set (KTO). The other canonical columns
(``messages``, ``tools``, ...) are dropped: they are the bulk of the data and trainers need only
tokens; keep them with ``keep_columns``. A streamed dataset keeps the same columns (``label``
only through ``keep_columns``). A row that fails to encode, or is dropped as too long, is named by
where it came from (the loader's ``_origin`` column: ``file:line``), not by its shuffled index.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

from lmforge.dataset.preprocess import CANONICAL_COLUMNS, ORIGIN_COLUMN, DatasetError

__all__ = ["cache_root", "encode_dataset"]

logger = logging.getLogger(__name__)

_STATUS, _ERROR = "__lmforge_status", "__lmforge_error"
_OK, _TOO_LONG, _FAILED = 0, 1, 2
_PROBE_ROWS = 16
_STANDARD_KEYS = ("input_ids", "labels", "loss_scale", "length")
MAX_REASONS = 5


def cache_root() -> Path:
    """``$LMFORGE_CACHE``, else ``~/.cache/lmforge``."""
    return Path(os.environ.get("LMFORGE_CACHE") or "~/.cache/lmforge").expanduser()


@functools.cache
def _code_version() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _feature_for(key: str, sample: Any):
    """Fixed types for the usual keys, so that batches and worker shards agree (a first batch of
    ``loss_scale=None`` must not make the column null-typed); inferred types for the rest."""
    import pyarrow as pa
    from datasets import Json, List, Value
    from datasets.features.features import generate_from_arrow_type

    if key.endswith(("input_ids", "labels", "attention_mask", "position_ids", "token_type_ids")):
        return List(Value("int32"))
    if key.endswith("loss_scale"):
        return List(Value("float32"))
    if key.endswith("length"):
        return Value("int32")
    if key.endswith("images"):  # image references (template/vision.py); [] in a first batch must not type it as null
        return List(Value("string"))
    if key.endswith("videos"):  # each video a list of frame references, or [a video file]
        return List(List(Value("string")))
    if sample is None:
        return Json()
    return generate_from_arrow_type(pa.array([sample]).type)


def _where(row: dict, idx: int) -> str:
    """Where a row came from (``file:line``), else its index in this dataset."""
    return row.get(ORIGIN_COLUMN) or f"row {idx}"


def _describe(row: dict, idx: int) -> str:
    """Where a failing row is and the start of its first message."""
    first = next((m["content"] for m in row.get("messages") or [] if m.get("content")), None) or row.get("text") or ""
    return f"{_where(row, idx)} ({first[:40]!r}...)" if first else _where(row, idx)


class _Encoder:
    """The batched map function: template.encode on each row, plus a status per row.

    Statuses are returned as a column rather than counted in Python so that counts are right
    when ``num_proc`` runs this in worker processes.
    """

    def __init__(self, template, encoded_keys: Sequence[str], keep: Sequence[str], strict: bool):
        self.template, self.encoded_keys, self.keep, self.strict = template, tuple(encoded_keys), tuple(keep), strict

    def encode_one(self, row: dict, idx: int) -> tuple[int, str | None, dict]:
        try:
            enc = self.template.encode(row)
        except ValueError as e:
            reason = f"{_describe(row, idx)}: {type(e).__name__}: {e}"
            if self.strict:
                raise DatasetError(f"cannot encode {reason}") from e
            return _FAILED, reason, {}
        if enc is None:
            return _TOO_LONG, _where(row, idx), {}
        return _OK, None, enc

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in (*self.encoded_keys, *self.keep, _STATUS, _ERROR)}
        for i, idx in enumerate(indices):
            row = {k: v[i] for k, v in batch.items()}
            status, reason, enc = self.encode_one(row, idx)
            unknown = set(enc) - set(self.encoded_keys)
            if unknown:
                raise DatasetError(
                    f"template.encode returned keys {sorted(unknown)} for {_where(row, idx)} that the first rows did not have "
                    f"({list(self.encoded_keys)}); every row must return the same keys"
                )
            for k in self.encoded_keys:
                out[k].append(enc.get(k))
            for k in self.keep:
                out[k].append(row.get(k))
            out[_STATUS].append(status)
            out[_ERROR].append(reason)
        return out


def _probe_keys(ds, template) -> dict[str, Any]:
    """The template's output keys (in order) with a sample value each, from the first rows."""
    keys: dict[str, Any] = {}
    for i in range(min(len(ds), _PROBE_ROWS)):
        try:
            enc = template.encode(ds[i])
        except ValueError:
            continue  # the real pass reports it
        for k, v in (enc or {}).items():
            if keys.get(k) is None:
                keys[k] = v
    return keys or dict.fromkeys(_STANDARD_KEYS)


def _keep_columns(ds, keep_columns: Sequence[str] | None) -> list[str]:
    """Extra columns, ``label`` where it is set (KTO needs it after encoding), and ``keep_columns``."""
    column_names = ds.column_names
    keep = [c for c in column_names if c not in CANONICAL_COLUMNS and c != ORIGIN_COLUMN]
    if "label" in column_names and ds.data.column("label").null_count < ds.data.num_rows:
        keep.append("label")
    for c in keep_columns or ():
        if c not in column_names:
            raise DatasetError(f"keep_columns: the dataset has no column {c!r}; columns: {list(column_names)}")
        if c not in keep:
            keep.append(c)
    return keep


def _report(total: int, too_long: int, failed: int, reasons: list[str], desc: str,
            long_rows: Sequence[str] = ()) -> None:
    if too_long or failed:
        msg = f"{desc}: dropped {too_long + failed} of {total} rows: {too_long} too long"
        if too_long:
            more = f" and {too_long - len(long_rows)} more" if too_long > len(long_rows) else ""
            msg += f" ({', '.join(long_rows) or 'template returned None'}{more}; raise --max_length or shorten them)"
        if failed:
            msg += f", {failed} failed (strict=False). First reasons:\n  " + "\n  ".join(reasons)
        logger.warning(msg)


def encode_dataset(
    ds,
    template,
    *,
    num_proc: int = 1,
    strict: bool = True,
    cache: bool = True,
    desc: str = "Encoding",
    keep_columns: Sequence[str] | None = None,
):
    """Apply ``template.encode(row)`` to every row; drop (and count) rows it returns None for.

    ``template.encode`` may raise ValueError (TemplateError, MaxLengthError): with ``strict`` that
    fails the run naming the row, otherwise the row is skipped and counted. A ``Dataset`` is cached
    on disk (``cache=False`` turns that off); an ``IterableDataset`` is encoded lazily, uncached.
    Extra (non-canonical) columns and ``keep_columns`` are kept next to the template's keys.
    """
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        return _encode_stream(ds, template, strict=strict, keep_columns=keep_columns, desc=desc)

    keep = _keep_columns(ds, keep_columns)
    key = hashlib.sha256(
        json.dumps([_code_version(), ds._fingerprint, template.cache_key(), strict, keep]).encode()
    ).hexdigest()[:32]
    path = cache_root() / "datasets" / key
    if cache and (path / "state.json").exists():
        logger.info("%s: using the cached encoding %s", desc, path)
        return datasets.load_from_disk(str(path))

    probe = _probe_keys(ds, template)
    fixed = getattr(template, "features", None) or {}  # an encoder may fix the types of its own keys
    probe.update((k, None) for k in fixed if k not in probe)
    features = datasets.Features(
        {
            **{k: fixed.get(k) or _feature_for(k, v) for k, v in probe.items()},
            **{k: ds.features[k] for k in keep if k not in probe},
            _STATUS: datasets.Value("int8"),
            _ERROR: datasets.Value("string"),
        }
    )
    keep = [k for k in keep if k not in probe]  # the template's own key wins a name clash
    out = ds.map(
        _Encoder(template, list(probe), keep, strict),
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=key,
        desc=desc,
    )
    status = out.data.column(_STATUS).to_numpy()
    dropped = (status != _OK).nonzero()[0]
    failed = (status == _FAILED).nonzero()[0]
    too_long = (status == _TOO_LONG).nonzero()[0]
    reasons = out.select(failed[:MAX_REASONS])[_ERROR] if len(failed) else []
    long_rows = out.select(too_long[:MAX_REASONS])[_ERROR] if len(too_long) else []
    _report(len(status), len(too_long), len(failed), list(reasons), desc, list(long_rows))
    if len(dropped) == len(status):
        raise DatasetError(f"{desc}: no rows left after encoding (all {len(status)} were dropped)")
    if len(dropped):
        out = out.select((status == _OK).nonzero()[0])
    out = out.remove_columns([_STATUS, _ERROR])
    if not cache:
        return out
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    out.save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process saved the same encoding first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s: saved the encoding to %s", desc, path)
    return datasets.load_from_disk(str(path))


def _encode_stream(ds, template, *, strict: bool, keep_columns: Sequence[str] | None, desc: str):
    """Lazy encoding of a stream; drops are logged as they happen (the total is not known)."""
    counts = {"seen": 0, "too_long": 0, "failed": 0}
    encoder = _Encoder(template, (), (), strict)
    keep = set(keep_columns or ())

    def passed(k: str) -> bool:  # extra columns and keep_columns travel with the tokens
        return (k not in CANONICAL_COLUMNS and k != ORIGIN_COLUMN) or k in keep

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        keys = list(batch)
        # passed-through columns are returned even when every row is dropped, so no stale input remains
        out: dict[str, list] = {k: [] for k in keys if passed(k)}
        kept = 0
        for i, idx in enumerate(indices):
            row = {k: batch[k][i] for k in keys}
            status, reason, enc = encoder.encode_one(row, idx)
            counts["seen"] += 1
            if status != _OK:
                counts["too_long" if status == _TOO_LONG else "failed"] += 1
                dropped = counts["too_long"] + counts["failed"]
                if dropped & (dropped - 1) == 0:  # 1st, 2nd, 4th, 8th, ... drop: say so without flooding
                    logger.warning(
                        "%s: dropped %d of %d rows so far (%d too long, %d failed)%s",
                        desc, dropped, counts["seen"], counts["too_long"], counts["failed"],
                        f"; latest: {reason}" + (" (too long)" if status == _TOO_LONG else "") if reason else "",
                    )
                continue
            values = {**{k: row[k] for k in keys if passed(k)}, **enc}
            for k in set(out) | set(values):
                out.setdefault(k, [None] * kept).append(values.get(k))
            kept += 1
        return out

    # a stream's columns are often unknown until read; removing a column it lacks is harmless
    return ds.map(encode_batch, batched=True, with_indices=True, remove_columns=[*CANONICAL_COLUMNS, ORIGIN_COLUMN])
