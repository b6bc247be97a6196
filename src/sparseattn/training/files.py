"""Labeled examples of a task from a file of any common layout: TSV, CSV or JSON lines.

    from sparseattn.training.files import read_examples
    examples = read_examples("reviews.csv", get_task("sst2"), text_column="review", label_column="stars")

A GLUE TSV of the task (its header, or CoLA's headerless layout) is read as GLUE reads it. Otherwise the
first line of a TSV or CSV names the columns, and each line of a JSON-lines file is an object. Columns
default to the task's (GLUE's TSV and hub names), then to ``text`` / ``sentence`` and ``label``. Labels
are the task's class names or ids, or scores for a regression task. Every problem is a DataError naming
the file and line.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..errors import ConfigError, DataError
from .glue import Example, GlueTask, parse_label, csv_rows, read_text, read_tsv

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def file_format(path: str | os.PathLike) -> str:
    """'tsv', 'csv' or 'jsonl', from the file's suffix."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown data format {Path(path).suffix or '(no suffix)'!r}; expected a file "
                          f"ending in {', '.join(FORMATS)}")
    return fmt


def _records(path: str, fmt: str):
    """(line, {column: value}) of every example, and the columns the file has."""
    text = read_text(path)
    if fmt == "jsonl":
        def rows():
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object a line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i}: a JSON {type(obj).__name__}; expected one object a line, e.g. "
                                    '{"text": "...", "label": 1}')
                yield i, obj
        records = list(rows())
        columns = list(dict.fromkeys(k for _, r in records for k in r))
        return records, columns
    fmt_args = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    rows = csv_rows(path, text, **fmt_args)
    _, header = next(rows, (1, None))
    if not header:
        raise DataError(f"{path}:1: no header; expected the names of the columns on the first line")
    records = []
    for line, row in rows:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields, expected {len(header)} as in the header {header}")
        records.append((line, dict(zip(header, row))))
    return records, header


def _column(given: str | None, candidates: list[str | None], columns: list[str], what: str, path: str,
            required: bool = True) -> str | None:
    if given is not None:
        if given not in columns:
            raise DataError(f"{path}:1: no column {given!r} for the {what}; the file has {columns}")
        return given
    for c in candidates:
        if c is not None and c in columns:
            return c
    if required:
        names = [c for c in dict.fromkeys(candidates) if c]
        raise DataError(f"{path}:1: no {what} column (looked for {names}); the file has {columns}; name it with "
                        f"--{what}-column")
    return None


def read_examples(path: str | os.PathLike, task: GlueTask, *, text_column: str | None = None,
                  pair_column: str | None = None, label_column: str | None = None) -> list[Example]:
    """The labeled examples of ``path`` for ``task`` (see the module docstring)."""
    path = str(path)
    fmt = file_format(path)
    if fmt == "tsv" and text_column is None and pair_column is None and label_column is None:
        first = read_text(path).split("\n", 1)[0].lstrip("\ufeff").split("\t")
        if task.tsv_columns[0] in first or (task.headerless_columns and len(first) == task.headerless_columns[3]):
            return read_tsv(task, path, labeled=True)  # a GLUE TSV of this task
    records, columns = _records(path, fmt)
    if not records:
        raise DataError(f"{path}: no examples")
    tc, pc, lc = task.tsv_columns
    tf, pf = task.hub_fields
    text_col = _column(text_column, [tc, tf, "text", "sentence", "sentence1"], columns, "text", path)
    pair_col = _column(pair_column, [pc, pf, "sentence2", "pair"] if task.is_pair else [], columns, "pair", path,
                       required=task.is_pair)
    label_col = _column(label_column, [lc, "label", "labels", "score"], columns, "label", path)
    if pair_col is not None and not task.is_pair:
        raise ConfigError(f"{task.folder} examples are single texts; --pair-column {pair_col!r} does not fit it")
    out = []
    for line, r in records:
        values = []
        for col in (text_col, pair_col):
            v = r.get(col) if col is not None else None
            if col is not None and (not isinstance(v, str) or not v.strip()):
                raise DataError(f"{path}:{line}: {col!r} is {'missing' if v is None else repr(v)}; expected a "
                                "non-empty text")
            values.append(v)
        raw = r.get(label_col)
        if raw is None or isinstance(raw, (bool, list, dict)):
            raise DataError(f"{path}:{line}: label {label_col!r} is {'missing' if raw is None else repr(raw)}; "
                            f"expected {_expected_label(task)}")
        if isinstance(raw, float) and not task.is_regression and raw.is_integer():
            raw = int(raw)  # JSON's 1.0 is the class 1
        try:
            label = parse_label(task, str(raw))
        except ValueError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        out.append(Example(values[0], values[1], label))
    return out


def _expected_label(task: GlueTask) -> str:
    if task.is_regression:
        return "a score" + (f" from {task.label_range[0]:g} to {task.label_range[1]:g}" if task.label_range else "")
    return f"one of {list(task.labels)} or 0-{len(task.labels) - 1}"
