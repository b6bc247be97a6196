"""GLUE tasks: the task table and one loader for local TSVs (original GLUE layout) and the hub.

Public, stable API (other parts of sparseattn import it):

    from sparseattn.training.glue import TASKS, Example, get_task, load_split

    examples = load_split("sst2", "dev")                # list[Example]
    examples[0]                                          # Example(text='...', pair=None, label=1)
    task = get_task("SST-2")                             # GlueTask: fields, labels, metrics, main metric

``load_split(task, split, glue_dir=None, *, source="auto", on_malformed="error") -> list[Example]``

- task: any spelling of a GLUE task ("SST-2", "sst2", "sst-2", "STS-B", "stsb", "MNLI", ...).
- split: "train", "dev" (alias "validation") or "test"; MNLI also "dev_matched", "dev_mismatched",
  "test_matched", "test_mismatched" ("dev" = "dev_matched").
- Source: ``glue_dir`` if given, else the ``GLUE_DIR`` environment variable, else the Hugging Face hub
  (``datasets.load_dataset("nyu-mll/glue", task)``); with none of them, a ``DependencyError`` (the
  command line prints its one line). ``source="local"`` / ``"hub"`` forces one.
- ``Example.label``: the class index for classification tasks (in the hub's label order, whichever
  source), the similarity score (float) for STS-B, None on test splits (GLUE hides their labels).

Local files are the original GLUE TSVs: tab-separated, *not* quoted (read with ``csv.QUOTE_NONE``:
quotes are part of the text), CoLA's train/dev without a header, MRPC's header with a byte-order mark.
A malformed row (wrong number of fields, an empty text, an unknown label, a score that is not a finite
number in the task's range) is a ``DataError`` naming the file and line; ``on_malformed="skip"`` drops
such rows instead, with a warning that counts them (the hub's GLUE build drops QQP's corrupted rows the
same way). A file that cannot be read as a whole (not UTF-8, no header, a train or dev file without its
label column) is always an error.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError, DataError, DependencyError, NotFoundError

log = logging.getLogger("sparseattn")


@dataclass(frozen=True)
class Example:
    """One GLUE example: ``text`` (first segment), ``pair`` (second segment or None), ``label`` (class
    index, STS-B score, or None where the split has no labels)."""

    text: str
    pair: str | None
    label: int | float | None


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its text and labels are, and how it is scored.

    labels: class names in the hub's order (label ids index into it); None for regression (STS-B).
    tsv_columns: header names of (text, pair or None, label) in the local TSVs; CoLA's headerless
        train/dev files use ``headerless_columns`` (field indices) instead.
    metrics: the official metrics, ``main_metric`` the one a sweep ranks by.
    """

    name: str
    folder: str
    description: str
    labels: tuple[str, ...] | None
    tsv_columns: tuple[str, str | None, str]
    hub_fields: tuple[str, str | None]
    metrics: tuple[str, ...]
    main_metric: str
    splits: tuple[str, ...] = ("train", "dev", "test")
    headerless_columns: tuple[int, int | None, int, int] | None = None  # (text, pair, label, number of fields)
    label_range: tuple[float, float] | None = None  # regression: the scores' range

    @property
    def num_labels(self) -> int:
        """The model's output size: the number of classes, or 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def is_pair(self) -> bool:
        return self.tsv_columns[1] is not None


_BINARY_ENT = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", "grammatical acceptability", ("unacceptable", "acceptable"),
             ("sentence", None, "label"), ("sentence", None), ("matthews", "accuracy"), "matthews",
             headerless_columns=(3, None, 1, 4)),
    GlueTask("sst2", "SST-2", "sentiment of movie-review phrases", ("negative", "positive"),
             ("sentence", None, "label"), ("sentence", None), ("accuracy",), "accuracy"),
    GlueTask("mrpc", "MRPC", "paraphrase (news)", ("not_equivalent", "equivalent"),
             ("#1 String", "#2 String", "Quality"), ("sentence1", "sentence2"), ("f1", "accuracy"), "f1"),
    GlueTask("stsb", "STS-B", "semantic similarity score 0-5", None,
             ("sentence1", "sentence2", "score"), ("sentence1", "sentence2"), ("pearson", "spearman"), "pearson",
             label_range=(0.0, 5.0)),
    GlueTask("qqp", "QQP", "duplicate Quora questions", ("not_duplicate", "duplicate"),
             ("question1", "question2", "is_duplicate"), ("question1", "question2"), ("f1", "accuracy"), "f1"),
    GlueTask("mnli", "MNLI", "entailment, 3 classes", ("entailment", "neutral", "contradiction"),
             ("sentence1", "sentence2", "gold_label"), ("premise", "hypothesis"), ("accuracy",), "accuracy",
             splits=("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched")),
    GlueTask("qnli", "QNLI", "does the sentence answer the question", _BINARY_ENT,
             ("question", "sentence", "label"), ("question", "sentence"), ("accuracy",), "accuracy"),
    GlueTask("rte", "RTE", "entailment, 2 classes", _BINARY_ENT,
             ("sentence1", "sentence2", "label"), ("sentence1", "sentence2"), ("accuracy",), "accuracy"),
    GlueTask("wnli", "WNLI", "pronoun resolution as entailment", ("not_entailment", "entailment"),
             ("sentence1", "sentence2", "label"), ("sentence1", "sentence2"), ("accuracy",), "accuracy"),
]}

_SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev"}
_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test", "dev_matched": "validation_matched",
               "dev_mismatched": "validation_mismatched", "test_matched": "test_matched",
               "test_mismatched": "test_mismatched"}


class GlueDataError(DataError):
    """A GLUE file that does not have the expected layout; the message names file and line."""


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def get_task(name: str) -> GlueTask:
    """The task for any common spelling ("SST-2", "sst2", "STS-B", "stsb", "MNLI", ...)."""
    if isinstance(name, GlueTask):
        return name
    key = _norm(str(name))
    for t in TASKS.values():
        if key in (t.name, _norm(t.folder)):
            return t
    raise ConfigError(f"unknown GLUE task {name!r}; expected one of {', '.join(t.folder for t in TASKS.values())}")


def canonical_split(task: GlueTask, split: str) -> str:
    if not isinstance(split, str):
        raise ConfigError(f"split must be a name such as 'dev', got {split!r}")
    s = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if task.name == "mnli" and s in ("dev", "test"):
        s += "_matched"
    if s not in task.splits:
        raise ConfigError(f"unknown split {split!r} for {task.folder}; expected one of {', '.join(task.splits)}")
    return s


def glue_dir_from_env() -> str | None:
    return os.environ.get("GLUE_DIR") or None


def load_split(task: str | GlueTask, split: str, glue_dir: str | os.PathLike | None = None, *,
               source: str = "auto", on_malformed: str = "error") -> list[Example]:
    """The examples of one split of a GLUE task (see the module docstring)."""
    t = get_task(task)
    s = canonical_split(t, split)
    if on_malformed not in ("error", "skip"):
        raise ConfigError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    if source not in ("auto", "local", "hub"):
        raise ConfigError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    root = glue_dir if glue_dir is not None else glue_dir_from_env()
    if source == "hub" or (source == "auto" and root is None):
        return list(_load_hub(t.name, s))
    if root is None:
        raise ConfigError("source='local' needs glue_dir or the GLUE_DIR environment variable")
    path = Path(root) / t.folder / f"{s}.tsv"
    if not path.is_file():
        where = "glue_dir" if glue_dir is not None else "GLUE_DIR"
        raise NotFoundError(f"{path} does not exist ({where}={root}); expected the original GLUE layout "
                            f"<dir>/{t.folder}/{s}.tsv, or load from the hub with source='hub'")
    st = path.stat()
    labeled = not s.startswith("test")  # GLUE hides the labels of test splits only
    return list(_read_tsv_cached(t.name, str(path.resolve()), st.st_mtime_ns, st.st_size, on_malformed, labeled))


@lru_cache(maxsize=32)
def _read_tsv_cached(task: str, path: str, mtime_ns: int, size: int, on_malformed: str,
                     labeled: bool) -> tuple[Example, ...]:
    return tuple(read_tsv(TASKS[task], path, on_malformed=on_malformed, labeled=labeled))


def read_text(path: str | os.PathLike) -> str:
    """A data file's text: UTF-8 (a byte-order mark is dropped). Anything else is a DataError naming the
    file and line: UTF-16, a NUL byte, bytes that are not UTF-8."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path} does not exist") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}:1: the file is UTF-16 (it starts with a UTF-16 byte-order mark); expected UTF-8: "
                        "save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}:{line}: a NUL byte at offset {nul}; expected UTF-8 text (is the file UTF-16, or "
                        "binary?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8; expected UTF-8 "
                        "text (save the file as UTF-8)") from None


def csv_rows(path: str, text: str, **fmt):
    """(line, row) of ``text`` read by ``csv.reader(**fmt)``; a row the csv module refuses (a field over its
    size limit, a stray quote) is a DataError naming the file and line."""
    reader = csv.reader(io.StringIO(text, newline=""), **fmt)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e} (expected one example a line)") from None
        yield reader.line_num, row


def _misnamed(name: str, header: list[str]) -> str:
    close = difflib.get_close_matches(name, header, n=1, cutoff=0.6)
    return f" (is {close[0]!r} it, misspelt?)" if close else ""


def read_tsv(task: GlueTask, path: str | os.PathLike, *, on_malformed: str = "error",
             labeled: bool | None = None) -> list[Example]:
    """Read one GLUE TSV of ``task`` (train, dev or test layout, told apart by its header). ``labeled``: True
    when the file must have labels (train and dev), False when it has none to read (test), None to read
    them when the header names the label column."""
    path = str(path)
    bad: list[str] = []

    def malformed(line: int, why: str):
        msg = f"{path}:{line}: {why}"
        if on_malformed == "error":
            raise GlueDataError(msg + " (pass on_malformed='skip' / --skip-malformed to drop such rows)")
        bad.append(msg)

    out: list[Example] = []
    # MRPC starts with a byte-order mark (read_text drops it)
    rows = csv_rows(path, read_text(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    first_line, first = next(rows, (1, None))
    if first is None:
        raise GlueDataError(f"{path}:1: the file is empty; expected a GLUE {task.folder} TSV")
    text_col, pair_col, label_col = task.tsv_columns
    if text_col in first:  # a header names the columns
        header = first
        n_fields = len(header)
        if pair_col is not None and pair_col not in header:
            raise GlueDataError(f"{path}:1: header {header} has no column {pair_col!r} for "
                                f"{task.folder}{_misnamed(pair_col, header)}")
        if labeled and label_col not in header:
            raise GlueDataError(f"{path}:1: header {header} has no label column {label_col!r} for {task.folder}"
                                f"{_misnamed(label_col, header)}; a train or dev file needs its labels")
        ti = header.index(text_col)
        pi = header.index(pair_col) if pair_col is not None else None
        li = header.index(label_col) if label_col in header and labeled is not False else None
        pending = []
    elif task.headerless_columns is not None:  # CoLA train/dev: source, label, original label, sentence
        ti, pi, li, n_fields = task.headerless_columns
        pending = [(first_line, first)]
    else:
        raise GlueDataError(f"{path}:1: expected a header with the column {text_col!r} for {task.folder}, "
                            f"got {first[:6]}")

    def rows_with_lines():
        yield from pending
        yield from rows

    for line, row in rows_with_lines():
        if not row:  # a blank line
            malformed(line, "blank line")
            continue
        if len(row) != n_fields:
            malformed(line, f"{len(row)} tab-separated fields, expected {n_fields} "
                            f"(a tab or line break inside a text?)")
            continue
        text = row[ti]
        pair = row[pi] if pi is not None else None
        if not text.strip() or (pair is not None and not pair.strip()):
            malformed(line, "empty text")
            continue
        label = None
        if li is not None:
            try:
                label = parse_label(task, row[li])
            except ValueError as e:
                malformed(line, str(e))
                continue
        out.append(Example(text, pair, label))
    if bad:
        log.warning("skipped %d malformed rows of %s, e.g. %s", len(bad), path, bad[0])
    return out


def parse_label(task: GlueTask, value: str):
    v = value.strip()
    if task.labels is None:
        return parse_score(value, task.label_range)
    if v in task.labels:
        return task.labels.index(v)
    if v.isdigit() and int(v) < len(task.labels):
        return int(v)
    raise ValueError(f"label {value!r} is not one of {list(task.labels)} or 0-{len(task.labels) - 1}")


def parse_score(value: str, label_range: tuple[float, float] | None = None) -> float:
    """A regression label: a finite number, within ``label_range`` when given (ValueError says why not)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"label {value!r} is not a number (expected a similarity score)") from None
    if not math.isfinite(x):
        raise ValueError(f"label {value!r} is not a finite number (expected a similarity score)")
    if label_range is not None and not label_range[0] <= x <= label_range[1]:
        lo, hi = label_range
        raise ValueError(f"score {value!r} is outside {lo:g}-{hi:g} (expected a similarity score from {lo:g} to "
                         f"{hi:g})")
    return x


@lru_cache(maxsize=16)
def _load_hub(task: str, split: str) -> tuple[Example, ...]:
    try:
        import datasets
    except ImportError:
        raise DependencyError(
            "no GLUE data: set GLUE_DIR (or pass --glue-dir) to a folder in the original GLUE layout "
            "(<dir>/SST-2/train.tsv, ...), or install 'datasets' to load GLUE from the hub "
            "(pip install 'sparseattn[hub]')") from None
    t = TASKS[task]
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task, split=_HUB_SPLITS[split])
    except (OSError, ValueError) as e:  # offline, no such cached dataset
        raise DataError(f"cannot load GLUE {t.folder} {split} from the hub (nyu-mll/glue): {type(e).__name__}: {e}; "
                        "set GLUE_DIR / --glue-dir to a local copy in the original GLUE layout") from None
    return tuple(examples_from_records(t, ds))


def examples_from_records(task: GlueTask, records) -> list[Example]:
    """Examples from hub records (dicts with the hub's field names; label -1 = hidden)."""
    tf, pf = task.hub_fields
    out = []
    for r in records:
        label = r["label"]
        if label is None or (not task.is_regression and int(label) < 0):
            label = None
        elif task.is_regression:
            label = float(label)
        else:
            label = int(label)
        out.append(Example(r[tf], r[pf] if pf else None, label))
    return out


def available_tasks(glue_dir: str | os.PathLike | None = None) -> list[str]:
    """Tasks whose folder exists under ``glue_dir`` (or GLUE_DIR)."""
    root = glue_dir if glue_dir is not None else glue_dir_from_env()
    if root is None:
        return []
    return [t.name for t in TASKS.values() if (Path(root) / t.folder).is_dir()]
