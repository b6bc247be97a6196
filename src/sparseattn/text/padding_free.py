"""Padding-free batches: a padded batch's real tokens as one packed row, and the model's outputs back in the padded
shape.

A padded batch makes every layer of the model, not only attention, run over its padding: in real tokens per second
a padded step can be no faster than the same step over an unpadded row, however cheap its attention. ``unpad``
removes the padding before the model runs, as transformers' flattening collator does for lists of examples: the
rows' real tokens one after another in one row, positions kept, ``cu_seq_lens_q`` marking where each example
begins. A model sparsified by sparseattn applies its plan within each example (its layout reads those offsets),
so the outputs at real tokens are those of the padded batch. ``repad`` puts token outputs back in the padded shape.

    padded = tokenizer(texts, padding=True, return_tensors="pt")     # or a padding collator's batch
    packed = sa.unpad(padded, multiple_of=64)                        # on the CPU, before moving it to the GPU
    out = model(**packed.to("cuda"))
    hidden = sa.repad(out.last_hidden_state, packed)                 # (B, L, hidden), zeros at padding

A classifier's logits come from each example's first (or last) token: ``packed.example_starts`` says where. Token
labels pack with the tokens (``model(**sa.unpad(padded_with_labels)).loss`` is the padded batch's for a causal LM).

A model that is not sparsified keeps the examples apart only as transformers does: its flash-attention
implementations read ``cu_seq_lens_q``; SDPA and eager ones find the documents from ``position_ids`` only in a batch
without an attention mask (from transformers 5.25; ``multiple_of`` > 1 adds one), and otherwise attend across them.
``sa.sparsify(model, sa.Plan.dense())`` makes a dense model keep them apart on every implementation.
"""

from __future__ import annotations

import torch

# What unpad packs: per-token model inputs of shape (B, L), taken at the real tokens.
TOKEN_INPUTS = ("input_ids", "token_type_ids", "position_ids")


def unpad(batch, *, multiple_of: int = 1, pad_id: int = 0):
    """The real tokens of a padded batch as one packed row (a transformers ``BatchEncoding``, as
    ``sa.encode(..., pack=True)`` makes them): ``input_ids`` (1, T) and, where the batch has them, ``token_type_ids``
    and ``position_ids`` at the real tokens; ``position_ids`` as the padded batch numbers them otherwise (0 to L-1 in
    each row: right padding starts each example at 0; a left-padded BERT needs its own, as it does padded);
    ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 offsets of the examples), ``max_length_q`` / ``max_length_k``.

    batch: a mapping with ``input_ids`` (B, L) and ``attention_mask`` (B, L), each row's real tokens one run (right
    or left padding), at least one per row; optionally token ``labels`` (B, L), packed as transformers' flattening
    collator packs them: the first label of every example is -100, so that a causal LM's shifted loss never asks the
    last token of one example to predict the first of the next (a token classifier's first token is [CLS], whose
    label is -100 anyway), and -100 on the padding segment. Other keys are refused, and so are one label per
    example (a sequence classifier's): a packed row's pooled output is one, not one per example (compute that loss
    per example from ``example_starts``).
    multiple_of: round T up to a multiple of this with a padding segment at the end (``attention_mask`` 0 there):
    fewer distinct shapes for ``torch.compile`` and CUDA graphs, which record one graph per shape.
    pad_id: the token id of that segment.

    Attributes of the result, not model inputs: ``example_starts`` and ``example_lengths`` (B,) (each example's
    first token in the packed row, and its tokens), ``padded_index`` (T,) (each packed token's index in the padded
    batch, flattened) and ``padded_shape`` (B, L), which ``repad`` reads. The lengths are read from the mask: on the
    GPU that is one wait for it, so unpad on the CPU where the batch is made."""
    from transformers import BatchEncoding

    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"unpad: multiple_of must be a whole number >= 1, got {multiple_of!r}")
    unknown = sorted(k for k in batch.keys() if k not in (*TOKEN_INPUTS, "attention_mask", "labels"))
    if unknown:
        raise ValueError(f"unpad: the batch has {', '.join(map(repr, unknown))}, which a packed row does not take; "
                         f"it packs {', '.join(TOKEN_INPUTS)} and token labels by attention_mask")
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"unpad: input_ids must be a (batch, length) tensor, got {_what(ids)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(f"unpad: attention_mask must be a tensor of input_ids' shape {tuple(ids.shape)}, got "
                         f"{_what(mask)}")
    B, L = ids.shape
    if B == 0 or L == 0:
        raise ValueError(f"unpad: the batch has no tokens (input_ids of shape {tuple(ids.shape)})")
    real = mask.detach().to("cpu").bool()
    lengths = real.sum(1)
    runs = (real & ~torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)).sum(1)
    for b in range(B):
        if int(lengths[b]) == 0:
            raise ValueError(f"unpad: row {b} of attention_mask has no real token; every example needs at least one")
        if int(runs[b]) > 1:
            raise ValueError(f"unpad: row {b} of attention_mask has {int(runs[b])} runs of real tokens (holes "
                             "inside the example); a padded row is one run, padding to its right or left")
    index = real.flatten().nonzero().squeeze(1)  # (T,) in row order, each row's run in order
    T = int(index.numel())
    width = -(-T // multiple_of) * multiple_of
    tail = width - T
    device = ids.device
    on = index.to(device)

    def packed(values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return torch.cat([values.flatten()[on], fill.to(values.dtype)])[None]

    data = {"input_ids": packed(ids, torch.full((tail,), pad_id, device=device))}
    if batch.get("token_type_ids") is not None:
        data["token_type_ids"] = packed(batch["token_type_ids"], torch.zeros(tail, dtype=torch.long, device=device))
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(L, device=device).expand(B, L)
    elif pos.shape != ids.shape:
        raise ValueError(f"unpad: position_ids must have input_ids' shape {tuple(ids.shape)}, got "
                         f"{tuple(pos.shape)}")
    data["position_ids"] = packed(pos, torch.arange(tail, device=device))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    labels = batch.get("labels")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
            raise ValueError(f"unpad: labels must be token labels of input_ids' shape {tuple(ids.shape)}, got "
                             f"{_what(labels)}; one label per example (a sequence classifier's) does not pack: "
                             "its pooled output would be the packed row's, not each example's (compute that loss "
                             "per example from packed.example_starts)")
        data["labels"] = packed(labels, torch.full((tail,), -100, device=device))
        data["labels"][0, offsets[:-1].to(device)] = -100
    bounds = offsets if tail == 0 else torch.cat([offsets, torch.tensor([width])])
    cu = bounds.to(device=device, dtype=torch.int32)
    longest = int(lengths.max())
    data.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if tail:
        data["attention_mask"] = (torch.arange(width, device=device) < T).long()[None]
    out = BatchEncoding(data)
    out.example_starts = offsets[:-1].clone()
    out.example_lengths = lengths.clone()
    out.padded_index = index
    out.padded_shape = (B, L)
    return out


def repad(x: torch.Tensor, packed) -> torch.Tensor:
    """Token outputs of the packed row ``unpad`` made (x: (1, T', ...), as the model returns them) in the padded
    batch's shape (B, L, ...), zeros at its padding; differentiable."""
    index, shape = getattr(packed, "padded_index", None), getattr(packed, "padded_shape", None)
    if index is None or shape is None:
        raise ValueError("repad needs the batch sparseattn.unpad made (it carries padded_index and padded_shape)")
    width = packed["input_ids"].shape[1]
    if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != width:
        raise ValueError(f"repad: the outputs have shape {tuple(x.shape)}; the packed row's token outputs have shape "
                         f"(1, {width}, ...)")
    B, L = shape
    out = x.new_zeros(B * L, *x.shape[2:])
    out = out.index_copy(0, index.to(x.device), x[0, :index.numel()])
    return out.view(B, L, *x.shape[2:])


def _what(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "nothing" if value is None else type(value).__name__
