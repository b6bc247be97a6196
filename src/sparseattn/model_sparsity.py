"""Sparsity of a sparsified model on real batches: the layout of a tokenized batch, and ``measure_sparsity``
over batches. ``sparseattn.sparsity`` holds the definition, on layouts; this module applies it to a model."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .layout import TokenLayout
from .sparsity import SparsityReport, measure_plan


def layout_of_batch(batch: Mapping, *, causal: bool = False, special_ids: torch.Tensor | None = None,
                    embeddings: torch.nn.Module | None = None) -> TokenLayout:
    """The layout of a tokenized batch (a dict with input_ids / attention_mask / sparse_structure)."""
    ids = batch.get("input_ids")
    am = batch.get("attention_mask")
    if am is None:
        if ids is None:
            raise ValueError("a batch needs input_ids or attention_mask to measure sparsity")
        am = torch.ones_like(ids)
    real = torch.as_tensor(am).bool()
    structure = batch.get("sparse_structure")
    special = None
    if structure is not None:
        structure = structure.to(real.device)
        special = real & (structure.word_ids < 0)
    elif ids is not None and special_ids is not None:
        special = real & torch.isin(ids, special_ids.to(ids.device))
    vectors = None
    if ids is not None and embeddings is not None:
        def vectors():
            with torch.no_grad():
                return embeddings(ids.to(embeddings.weight.device)).float().to(real.device)
    return TokenLayout(real=real, special=special, structure=structure, input_ids=ids, token_vectors=vectors,
                       causal=causal)


def _state(model):
    state = getattr(model, "_sparseattn", None)
    if state is None:
        raise ValueError("the model is not sparsified; call sparseattn.sparsify(model, plan) first")
    return state


def model_layout(model, batch: Mapping) -> TokenLayout:
    """The layout of a tokenized batch as a sparsified ``model``'s plan sees it: causal for a decoder, its
    tokenizer's special tokens, its embeddings for patterns that compare token vectors."""
    state = _state(model)
    causal = any(bool(getattr(m, "is_causal", False)) for m in state.modules if hasattr(m, "_sparseattn_state"))
    return layout_of_batch(batch, causal=causal, special_ids=state.special_ids, embeddings=state.embeddings)


def measure_sparsity(model, batches: Mapping | Iterable[Mapping], *, block_size: int | None = None) -> SparsityReport:
    """Sparsity of ``model``'s plan (it must be sparsified) over one batch or an iterable of batches."""
    state = _state(model)
    if isinstance(batches, Mapping):
        batches = [batches]
    total = None
    for batch in batches:
        rep = measure_plan(state.layer_plans, model_layout(model, batch), block_size=block_size)
        total = rep if total is None else total + rep
    if total is None:
        raise ValueError("measure_sparsity got no batches")
    return total
