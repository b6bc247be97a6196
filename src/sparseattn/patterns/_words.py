"""Helpers for input-dependent patterns: per-token word tables from a layout's structure."""

from __future__ import annotations

import torch

from ..layout import TokenLayout


def structure_of(layout: TokenLayout, who: str):
    s = layout.structure
    if s is None:
        raise ValueError(f"{who} needs per-example word structure: make inputs with sparseattn.encode(...) and "
                         "pass its `sparse_structure` to the model")
    if tuple(s.word_ids.shape) != (layout.batch_size, layout.length):
        raise ValueError(f"{who}: the structure covers {tuple(s.word_ids.shape)} (batch, tokens) but the batch is "
                         f"{(layout.batch_size, layout.length)}; structure and input_ids must be padded alike")
    if s.word_ids.device != layout.device:
        s = layout.structure = s.to(layout.device)
    return s


def special_handling(rel: torch.Tensor, layout: TokenLayout, has_word: torch.Tensor, special: str) -> torch.Tensor:
    """Tokens without a word (special tokens): 'self' keeps only their diagonal, 'global' connects them both
    ways to every token."""
    if special == "global":
        glob = layout.special if layout.special is not None else (layout.real & ~has_word)
        rel = rel | glob[:, None, :, None] | glob[:, None, None, :]
    return rel


def check_special(special: str) -> str:
    if special not in ("self", "global"):
        raise ValueError(f"special must be 'self' or 'global', got {special!r}")
    return special


def gather_pairs(table: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """table (B, W, W) indexed at (word_ids[i], word_ids[j]) -> (B, L, L)."""
    B, W, _ = table.shape
    L = word_ids.shape[1]
    idx = word_ids.clamp(min=0)
    rows = table.gather(1, idx[:, :, None].expand(B, L, W))
    return rows.gather(2, idx[:, None, :].expand(B, L, L))
