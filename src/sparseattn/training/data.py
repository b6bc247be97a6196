"""The examples a run uses: a fixed subset of a GLUE split, tokenized once per process and shared by the
runs of a sweep."""

from __future__ import annotations

import numpy as np

from .batching import EncodedSplit, encode_split
from .glue import Example, GlueTask, load_split


def subset(n: int, limit: int | None) -> np.ndarray:
    """Indices of a fixed random subset (seeded apart from the run's seed, so every run of a sweep sees
    the same examples), in file order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(1234).permutation(n)[:limit])


def load_examples(task: str | GlueTask, split: str, limit: int | None, glue_dir=None, *,
                  on_malformed: str = "error") -> list[Example]:
    """The examples of ``split`` a run with ``limit`` uses (``subset`` of them; all when limit is None)."""
    examples = load_split(task, split, glue_dir, on_malformed=on_malformed)
    return [examples[i] for i in subset(len(examples), limit)]


_ENCODED: dict = {}  # (model, task, split, ...) -> EncodedSplit, the few most recent


def encoded(tokenizer, examples: list[Example], key: tuple, *, max_length: int, structure: bool = False,
            parses=None, regression: bool = False, what: str = "data") -> EncodedSplit:
    """``encode_split`` of ``examples``, kept for the next run with the same ``key`` (model, task, split and
    every option that changes the tokens): the runs of a sweep tokenize their data once per process."""
    key = (*key, max_length, structure, hash(tuple(examples)))
    if key not in _ENCODED:
        _ENCODED[key] = encode_split(tokenizer, examples, max_length, structure=structure, parses=parses,
                                     regression=regression, what=what)
        while len(_ENCODED) > 4:
            _ENCODED.pop(next(iter(_ENCODED)))
    return _ENCODED[key]
