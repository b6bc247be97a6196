"""Where the examples for attention statistics come from: a GLUE task, a text file, or a `datasets` set."""

from __future__ import annotations

from pathlib import Path

from ..training.glue import load_split
from .collect import Example


def load_text_file(path) -> list[Example]:
    """One example per line; a tab separates a second segment. Empty lines are an error (file:line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            parts = line.split("\t")
            if len(parts) > 2:
                raise ValueError(f"{path}:{n}: {len(parts)} tab-separated fields; expected a text, or a text and a "
                                 "second segment")
            if not parts[0].strip() or (len(parts) == 2 and not parts[1].strip()):
                raise ValueError(f"{path}:{n}: empty text; every line must hold an example")
            out.append(Example(parts[0], parts[1] if len(parts) == 2 else None))
    if not out:
        raise ValueError(f"{path} has no examples")
    if len({e.pair is None for e in out}) > 1:
        n = next(i for i, e in enumerate(out, 1) if (e.pair is None) != (out[0].pair is None))
        raise ValueError(f"{path}:{n}: mixes single texts and tab-separated pairs; use one kind per file")
    return out


def load_glue(task: str, split: str = "train", glue_dir=None) -> list[Example]:
    """A GLUE task's split through sparseattn.training.glue (local TSVs, $GLUE_DIR)."""
    return [Example(ex.text, ex.pair) for ex in load_split(task, split, glue_dir=glue_dir)]


def load_hf_dataset(name: str, split: str = "train", text_column: str = "sentence",
                    pair_column: str | None = None) -> list[Example]:
    """A Hugging Face `datasets` set: ``name`` or ``name:config`` (a local path works offline)."""
    try:
        import datasets  # an optional dependency (the hub extra)
    except ImportError:
        raise ValueError("--dataset needs the `datasets` package (pip install 'sparseattn[hub]')") from None
    path, _, config = name.partition(":")
    ds = datasets.load_dataset(path, config or None, split=split)
    for col in (text_column, pair_column):
        if col is not None and col not in ds.column_names:
            raise ValueError(f"dataset {name!r} split {split!r} has no column {col!r}; columns: {ds.column_names}")
    texts = ds[text_column]
    pairs = ds[pair_column] if pair_column else [None] * len(texts)
    out = []
    for i, (t, p) in enumerate(zip(texts, pairs)):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"dataset {name!r} split {split!r} row {i}: empty {text_column!r}")
        out.append(Example(t, p))
    return out
