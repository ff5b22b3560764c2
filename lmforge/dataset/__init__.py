"""Datasets: load rows from files, hubs and built-ins, map them to one canonical row, encode them.

``load_dataset`` -> canonical rows (see :mod:`lmforge.dataset.preprocess`);
``encode_dataset`` -> token ids via a template, cached on disk. ``datasets`` itself is imported
only inside these functions, so importing this package stays cheap.
"""
from lmforge.dataset.builtin import BuiltinContext, BuiltinDataset, arith_answer_correct, generate_arith
from lmforge.dataset.encode import encode_dataset
from lmforge.dataset.loader import DatasetSpec, load_dataset, parse_dataset_spec
from lmforge.dataset.preprocess import (CANONICAL_COLUMNS, ORIGIN_COLUMN, ROLES, DatasetError, iter_jsonl_rows,
                                        preprocess_row)

__all__ = [
    "CANONICAL_COLUMNS",
    "ORIGIN_COLUMN",
    "ROLES",
    "BuiltinContext",
    "BuiltinDataset",
    "DatasetError",
    "DatasetSpec",
    "arith_answer_correct",
    "encode_dataset",
    "iter_jsonl_rows",
    "generate_arith",
    "load_dataset",
    "parse_dataset_spec",
    "preprocess_row",
]
