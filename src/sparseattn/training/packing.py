"""Packed batches for sequence classification (``finetune --pack``): several examples per row, one prediction
per example.

A packed batch is laid out as transformers' flattening collator lays documents out: the examples one after
another in rows of at most ``row_length`` tokens, ``position_ids`` and ``token_type_ids`` restarting at 0 in each
example (BERT's absolute positions, as if each ran alone), ``cu_seq_lens_q`` marking where each example (and each
row's trailing padding) begins. A model sparsified by sparseattn reads those offsets into its layout, so every
layer, dense ones too, attends within each example only, on every backend.

The classifier reads one token per example, not per row: the model's base runs over the packed rows, the hidden
state of each example's readout token is gathered ([CLS], its first token, for BERT-style heads; its last token for
decoders' ``score`` heads), and the model's own head (pooler, dropout, classifier) turns it into that example's
logits. Which examples make a step does not change with packing: only how they are laid out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError
from .batching import EncodedSplit, collate
from .loop import model_inputs

# What a packed batch gives the model (example_starts / example_lengths are the classifier's, not the model's).
PACKED_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "cu_seq_lens_q")


def place(lengths: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-fit decreasing: examples of ``lengths`` tokens, longest first, each into the first row with room.
    Returns each example's row and first token in it, and each row's used tokens."""
    if len(lengths) and int(lengths.max()) > row_length:
        raise ValueError(f"an example of {int(lengths.max())} tokens does not fit in packed rows of {row_length}")
    row = np.empty(len(lengths), dtype=np.int64)
    at = np.empty(len(lengths), dtype=np.int64)
    used = np.zeros(0, dtype=np.int64)
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(used + lengths[i] <= row_length)
        r = int(fits[0]) if len(fits) else len(used)
        if r == len(used):
            used = np.append(used, 0)
        row[i], at[i] = r, used[r]
        used[r] += lengths[i]
    return row, at, used


def pack_rows(split: EncodedSplit, idx: np.ndarray, row_length: int, *, pad_to_multiple_of: int = 1,
              pin: bool = False) -> dict:
    """The examples ``idx`` packed into rows (``place``) as CPU tensors: input_ids, attention_mask (1 on real
    tokens), position_ids and token_type_ids restarting at 0 in each example, cu_seq_lens_q (int32 offsets over the
    flattened rows; a row's padding is a segment of its own); labels (N,), and example_starts / example_lengths
    (N,): where each example of ``idx`` begins in the flattened rows, and its tokens. Rows are as wide as the
    fullest one (rounded up to ``pad_to_multiple_of``, not beyond ``row_length`` unless an example needs it)."""
    lens = split.lengths[idx]
    row, at, used = place(lens, row_length)
    R, W = len(used), int(used.max())
    if pad_to_multiple_of > 1:
        W = min(-(-W // pad_to_multiple_of) * pad_to_multiple_of, max(W, row_length))
    starts = row * W + at  # each example's first token in the flattened rows
    inside = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)  # token index within its example
    target = np.repeat(starts, lens) + inside
    source = np.repeat(split.offsets[idx], lens) + inside
    ids = np.full(R * W, split.pad_id, dtype=np.int64)
    ids[target] = split.ids[source]
    pos = np.zeros(R * W, dtype=np.int64)
    pos[target] = inside
    real = np.zeros(R * W, dtype=np.int64)
    real[target] = 1
    pads = np.flatnonzero(used < W)
    bounds = np.sort(np.concatenate([starts, pads * W + used[pads], [R * W]]))
    batch = {"input_ids": torch.from_numpy(ids.reshape(R, W)),
             "attention_mask": torch.from_numpy(real.reshape(R, W)),
             "position_ids": torch.from_numpy(pos.reshape(R, W)),
             "cu_seq_lens_q": torch.from_numpy(bounds.astype(np.int32))}
    if split.type_ids is not None:
        types = np.zeros(R * W, dtype=np.int64)
        types[target] = split.type_ids[source]
        batch["token_type_ids"] = torch.from_numpy(types.reshape(R, W))
    batch["labels"] = torch.from_numpy(split.labels[idx])
    batch["example_starts"] = torch.from_numpy(starts)
    batch["example_lengths"] = torch.from_numpy(lens.astype(np.int64))
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def make_batch(split: EncodedSplit, idx: np.ndarray, *, pack: int | None, pad_to_multiple_of: int = 1,
               pin: bool = False) -> dict:
    """``pack_rows`` into rows of ``pack`` tokens, or (pack None) ``collate``: one padded row per example."""
    if pack:
        return pack_rows(split, idx, pack, pad_to_multiple_of=pad_to_multiple_of, pin=pin)
    return collate(split, idx, pad_to_multiple_of=pad_to_multiple_of, pin=pin)


def token_slots(split: EncodedSplit, batches: list[np.ndarray], *, pack: int | None, pad_to_multiple_of: int = 1
                ) -> int:
    """How many token positions (real and padding) ``batches`` of ``split`` take, packed or padded as
    ``make_batch`` lays them out (without making them)."""
    total = 0
    for idx in batches:
        lens = split.lengths[idx]
        if pack:
            _, _, used = place(lens, pack)
            width, rows = int(used.max()), len(used)
            limit = max(width, pack)
        else:
            width, rows = int(lens.max()), len(idx)
            limit = max(width, split.max_length)
        if pad_to_multiple_of > 1:
            width = min(-(-width // pad_to_multiple_of) * pad_to_multiple_of, limit)
        total += rows * width
    return total


@dataclass(frozen=True)
class Readout:
    """Which token of an example a classifier reads (its first, [CLS]; or its last, for decoders) and the model's
    head that turns that token's hidden state (N, hidden) into logits (N, labels)."""

    first: bool
    head: Callable[[torch.Tensor], torch.Tensor]


def readout(model) -> Readout:
    """The classifier head of ``model`` (a transformers ``*ForSequenceClassification``), applied to one token per
    example: BERT-style (the base model's pooler on [CLS], dropout, a linear classifier: BERT, ALBERT, MiniLM),
    RoBERTa-style (a classification head reading [CLS] of the sequence it is given: RoBERTa, XLM-R, ELECTRA), or a
    decoder's ``score`` on the last token (Llama, Mistral, Qwen, ...)."""
    score = getattr(model, "score", None)
    if isinstance(score, torch.nn.Linear):
        return Readout(first=False, head=score)
    classifier = getattr(model, "classifier", None)
    pooler = getattr(model.base_model, "pooler", None)
    dropout = getattr(model, "dropout", None)
    if isinstance(classifier, torch.nn.Linear) and isinstance(pooler, torch.nn.Linear) and dropout is not None:
        # ALBERT's pooler is a bare Linear over [CLS]; its base model applies the tanh apart
        activation = getattr(model.base_model, "pooler_activation", None) or torch.nn.Identity()
        return Readout(first=True, head=lambda h: classifier(dropout(activation(pooler(h)))))
    if isinstance(classifier, torch.nn.Linear) and pooler is not None and dropout is not None:
        return Readout(first=True, head=lambda h: classifier(dropout(pooler(h[:, None]))))
    if classifier is not None and hasattr(classifier, "out_proj"):
        return Readout(first=True, head=lambda h: classifier(h[:, None]))
    raise ConfigError(f"pack: {type(model).__name__}'s classifier head is none that packed batches know (a BERT-style "
                      "pooler + classifier, a RoBERTa-style classification head, or a decoder's score); leave pack out")


def first_position(model) -> int:
    """The position id of a sequence's first token: 0, or pad_token_id + 1 for models that count positions from
    the padding index (RoBERTa, XLM-R, CamemBERT: embeddings that make their own from ``input_ids``)."""
    embeddings = getattr(model.base_model, "embeddings", None)
    if hasattr(embeddings, "create_position_ids_from_input_ids") and embeddings.padding_idx is not None:
        return int(embeddings.padding_idx) + 1
    return 0


def packed_logits(model, batch: dict) -> torch.Tensor:
    """(N, labels) logits of the N examples of a packed batch (``pack_rows``), in its order. ``model`` may be
    wrapped (DistributedDataParallel); it is called as a whole, so that sparseattn's hook reads the batch's layout,
    and the hidden states of its base model are taken on the way (the head's outputs on each row's first or last
    token are not used). The batch's positions, 0 at each example's start, are shifted to the model's first
    position (``first_position``)."""
    inner = getattr(model, "module", model)
    read = readout(inner)
    inputs = {k: batch[k] for k in PACKED_INPUTS if k in batch}
    inputs["position_ids"] = inputs["position_ids"] + first_position(inner)
    hidden = []
    hook = inner.base_model.register_forward_hook(lambda module, args, out: hidden.append(out[0]))
    try:
        model(**inputs)
    finally:
        hook.remove()
    h = hidden[-1].flatten(0, 1)  # (rows x width, hidden)
    at = batch["example_starts"] if read.first else batch["example_starts"] + batch["example_lengths"] - 1
    return read.head(h[at])


def batch_logits(model, batch: dict, pass_structure: bool) -> torch.Tensor:
    """One row of logits per example: the model's own output on a padded batch, ``packed_logits`` on a packed
    one."""
    if "example_starts" in batch:
        return packed_logits(model, batch)
    return model(**model_inputs(batch, pass_structure)).logits
