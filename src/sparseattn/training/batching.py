"""Tokenize a GLUE split once, then serve length-bucketed, dynamically padded batches.

Fine-tuning a small model on short sentences is dominated by per-step host work, so: tokenize every
example once (one fast-tokenizer call over the whole split), keep the ids in one flat array, and pad a
batch with a single vectorized gather. Examples longer than ``max_length`` are cut explicitly
(``longest_first`` for pairs) and counted, never silently.

When the plan has input-dependent patterns (syntax, lexical), each example also keeps its
``ExampleStructure`` (made by ``sparseattn.encode``) and batches carry ``sparse_structure``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from ..text.structure import BatchStructure, encode
from .glue import Example

log = logging.getLogger("sparseattn")


@dataclass
class EncodedSplit:
    """A tokenized split. Token ids of example i are ``ids[offsets[i]:offsets[i] + lengths[i]]``.

    labels: (N,) int64 class ids or float32 scores. structures: per-example ExampleStructure or None.
    truncated: how many examples were longer than max_length and were cut to it.
    """

    ids: np.ndarray  # (total tokens,) int64
    type_ids: np.ndarray | None  # (total tokens,) int64, segment ids (None if the tokenizer has none)
    offsets: np.ndarray  # (N,) int64
    lengths: np.ndarray  # (N,) int64
    labels: np.ndarray
    structures: list | None
    truncated: int
    max_length: int
    pad_id: int
    has_labels: bool = True

    def __len__(self) -> int:
        return len(self.lengths)


def encode_split(tokenizer, examples: list[Example], max_length: int, *, structure: bool = False,
                 parses=None, regression: bool = False, what: str = "data") -> EncodedSplit:
    """Tokenize ``examples`` (text and optional pair) once. ``structure``: also make each example's
    ExampleStructure (with dependency parses from ``parses``, a ParseCache, when given)."""
    if not examples:
        raise DataError(f"{what}: no examples to tokenize")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; load it with use_fast=True")
    texts = [e.text for e in examples]
    has_pair = examples[0].pair is not None
    pairs = [e.pair for e in examples] if has_pair else None
    if any((e.pair is not None) != has_pair for e in examples):
        raise DataError(f"{what}: some examples have a second segment and some do not")
    # One pass without truncation tells which examples are too long; only those are encoded again, cut.
    full = tokenizer(texts, pairs, truncation=False, return_attention_mask=False, verbose=False)
    lengths = np.fromiter((len(x) for x in full["input_ids"]), dtype=np.int64, count=len(texts))
    over = np.flatnonzero(lengths > max_length)
    if len(over):
        log.warning("%s: %d of %d examples are longer than max_length=%d tokens (longest %d) and are truncated "
                    "to it", what, len(over), len(texts), max_length, int(lengths.max()))
    ids_list = full["input_ids"]
    type_list = full.get("token_type_ids")
    if len(over):
        cut = tokenizer([texts[i] for i in over], [pairs[i] for i in over] if pairs else None, truncation=True,
                        max_length=max_length, return_attention_mask=False)
        ids_list, type_list = list(ids_list), (list(type_list) if type_list is not None else None)
        for j, i in enumerate(over):
            ids_list[i] = cut["input_ids"][j]
            if type_list is not None:
                type_list[i] = cut["token_type_ids"][j]
    structures = None
    if structure:
        structures = [None] * len(texts)
        fit = np.flatnonzero(lengths <= max_length)
        for group, cut_it in ((fit, False), (over, True)):
            if not len(group):
                continue
            enc = encode(tokenizer, [texts[i] for i in group], [pairs[i] for i in group] if pairs else None,
                         parses=parses, max_length=max_length, truncation=cut_it, padding=False,
                         return_tensors=None)
            for j, i in enumerate(group):
                if list(enc["input_ids"][j]) != list(ids_list[i]):
                    raise RuntimeError(f"{what}: example {i} tokenized differently with and without structure")
                structures[i] = enc["sparse_structure"][j]
    lengths = np.fromiter((len(x) for x in ids_list), dtype=np.int64, count=len(texts))
    offsets = np.zeros(len(texts), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    ids = np.fromiter((t for x in ids_list for t in x), dtype=np.int64, count=int(lengths.sum()))
    type_ids = None
    if type_list is not None:
        type_ids = np.fromiter((t for x in type_list for t in x), dtype=np.int64, count=int(lengths.sum()))
    unlabeled = sum(e.label is None for e in examples)
    if unlabeled == len(examples):  # a split without labels (GLUE's test splits): predictions only
        labels = np.zeros(len(examples), dtype=np.float32 if regression else np.int64)
        has_labels = False
    else:
        if unlabeled:
            first = next(i for i, e in enumerate(examples) if e.label is None)
            raise DataError(f"{what}: {unlabeled} of {len(examples)} examples have no label (the first is example "
                            f"{first}); expected labels for all or none")
        labels = np.asarray([e.label for e in examples], dtype=np.float32 if regression else np.int64)
        if regression and not np.isfinite(labels).all():
            first = int(np.flatnonzero(~np.isfinite(labels))[0])
            raise DataError(f"{what}: example {first} has the score {examples[first].label!r}; expected a finite "
                            "number")
        has_labels = True
    return EncodedSplit(ids, type_ids, offsets, lengths, labels, structures, int(len(over)), max_length,
                        int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0), has_labels)


def train_batches(split: EncodedSplit, batch_size: int, rng: np.random.Generator,
                  bucket_batches: int = 50) -> list[np.ndarray]:
    """One epoch of index batches: shuffle, sort by length within chunks of ``bucket_batches`` batches
    (so a batch holds examples of similar length and pads little), then shuffle the batch order."""
    idx = rng.permutation(len(split))
    chunk = batch_size * bucket_batches
    batches = []
    for s in range(0, len(idx), chunk):
        part = idx[s:s + chunk]
        part = part[np.argsort(split.lengths[part], kind="stable")]
        batches.extend(part[b:b + batch_size] for b in range(0, len(part), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def eval_batches(split: EncodedSplit, batch_size: int) -> list[np.ndarray]:
    """Batches of examples sorted by length (least padding); predictions are put back by index."""
    idx = np.argsort(split.lengths, kind="stable")
    return [idx[b:b + batch_size] for b in range(0, len(idx), batch_size)]


def collate(split: EncodedSplit, idx: np.ndarray, *, pad_to_multiple_of: int = 1, pin: bool = False) -> dict:
    """Pad the examples ``idx`` into a batch of CPU tensors (B, L): input_ids, attention_mask,
    token_type_ids, labels, and sparse_structure when the split has structures."""
    lens = split.lengths[idx]
    L = int(lens.max())
    if pad_to_multiple_of > 1:
        L = min(-(-L // pad_to_multiple_of) * pad_to_multiple_of, max(L, split.max_length))
    pos = np.arange(L)[None, :]
    real = pos < lens[:, None]
    gather = np.where(real, split.offsets[idx][:, None] + pos, 0)
    ids = np.where(real, split.ids[gather], split.pad_id)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
    if split.type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(np.where(real, split.type_ids[gather], 0))
    batch["labels"] = torch.from_numpy(split.labels[idx])
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    if split.structures is not None:
        batch["sparse_structure"] = BatchStructure.collate([split.structures[i] for i in idx], L)
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v.to(device)
    return out
