"""Sparsity accounting, the one definition used everywhere in sparseattn.

    sparsity = removed pairs / allowed pairs = 1 - kept pairs / allowed pairs

An *allowed* pair is a (query, key) pair that could carry attention before sparsification: both tokens
real (padding never counts) and, for decoders, the key not in the query's future. Counts are summed
over the examples of a batch or a data set (so long examples weigh more, as they cost more), and
reported per layer, per head and overall; dense layers and heads count with sparsity 0 in the overall
figure, and ``applied`` is the figure over only the (layer, head) units a pattern applies to.

Block density, reported separately, is what a block-sparse kernel pays: among the block x block tiles of
each example's allowed region that hold at least one allowed pair, the fraction that hold a kept pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import TokenLayout


# Counting visits the query rows in chunks of about this many pairs: a whole (B, H, L, L) count at 32k tokens
# materializes tens of GiB (the masked pairs, then their int64 copy for the sum).
CHUNK_PAIRS = 1 << 26


def _distinct_heads(keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the mask over its distinct heads, the head count to expand the counts back to): a mask expanded over heads
    (stride 0) is counted once."""
    heads = keep.shape[1]
    return (keep[:, :1], heads) if heads > 1 and keep.stride(1) == 0 else (keep, heads)


def _query_chunks(keep: torch.Tensor, multiple: int = 1):
    """Slices of query rows, each a multiple of ``multiple`` rows, holding about CHUNK_PAIRS pairs."""
    B, H, L, Lk = keep.shape
    rows = max(multiple, CHUNK_PAIRS // max(1, B * H * Lk) // multiple * multiple)
    return [slice(s, min(s + rows, L)) for s in range(0, L, rows)]


def _chunked_counts(keep: torch.Tensor, layout: TokenLayout, counts, multiple: int = 1) -> list:
    """[(kept, allowed) per head, summed over the batch] for each function of ``counts``, each the per-head count of
    a (B, H, rows, L) mask, over the kept and the allowed pairs: one pass over the query rows, a chunk at a time
    (``_query_chunks``; chunks of whole multiples of ``multiple`` rows), the allowed pairs made a chunk at a time."""
    k, heads = _distinct_heads(keep)
    sums = [(torch.zeros(k.shape[1], dtype=torch.long, device=keep.device),
             torch.zeros(1, dtype=torch.long, device=keep.device)) for _ in counts]
    for rows in _query_chunks(k, multiple):
        a = layout.allowed_rows(torch.arange(rows.start, rows.stop, device=layout.device))
        both = k[:, :, rows] & a
        for (kept, total), count in zip(sums, counts):
            kept += count(both)
            total += count(a)
    return [(kept.expand(heads), total.expand(heads)) for kept, total in sums]


def _pairs(m: torch.Tensor) -> torch.Tensor:
    return m.sum(dim=(0, 2, 3))


def _tiles(length: int, block_size: int):
    """The per-head count of block_size x block_size tiles holding a pair, for masks of a chunk of whole tile rows
    (the last one padded) over ``length`` keys."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = -(-length // block_size)
    pad = n * block_size - length

    def tiles(m):
        m = torch.nn.functional.pad(m, (0, pad, 0, (-m.shape[2]) % block_size))
        t = m.reshape(m.shape[0], m.shape[1], -1, block_size, n, block_size).any(dim=5).any(dim=3)
        return t.sum(dim=(0, 2, 3))
    return tiles


def pair_counts(keep: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, allowed) pair counts per head, summed over the batch: two (H',) int64 tensors."""
    return _chunked_counts(keep, layout, [_pairs])[0]


def block_counts(keep: torch.Tensor, layout: TokenLayout, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, allowed) block counts per head for block_size x block_size tiles, summed over the batch."""
    return _chunked_counts(keep, layout, [_tiles(keep.shape[-1], block_size)], block_size)[0]


def pair_and_block_counts(keep: torch.Tensor, layout: TokenLayout, block_size: int) -> tuple[tuple, tuple]:
    """``pair_counts`` and ``block_counts`` of one mask in one pass over it."""
    return tuple(_chunked_counts(keep, layout, [_pairs, _tiles(keep.shape[-1], block_size)], block_size))


def mask_sparsity(keep: torch.Tensor, layout: TokenLayout) -> float:
    """Sparsity of one keep-mask (B, H', L, L) over the layout's allowed pairs."""
    kept, allowed = pair_counts(keep, layout)
    return 1.0 - kept.sum().item() / max(1, allowed.sum().item())


@dataclass
class SparsityReport:
    """Pair counts per (layer, head), accumulated over batches.

    kept, allowed: (layers, heads) int64. applied: (layers, heads) bool, True where a pattern applies.
    block_kept, block_allowed: the same for tiles of ``block_size`` (None if not measured).
    """

    kept: torch.Tensor
    allowed: torch.Tensor
    applied: torch.Tensor
    block_size: int | None = None
    block_kept: torch.Tensor | None = None
    block_allowed: torch.Tensor | None = None
    examples: int = 0

    @staticmethod
    def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num.double() / den.double().clamp(min=1)

    @property
    def per_head(self) -> torch.Tensor:
        """(layers, heads) sparsity."""
        return 1 - self._ratio(self.kept, self.allowed)

    @property
    def per_layer(self) -> torch.Tensor:
        """(layers,) sparsity."""
        return 1 - self._ratio(self.kept.sum(1), self.allowed.sum(1))

    @property
    def overall(self) -> float:
        return float(1 - self._ratio(self.kept.sum(), self.allowed.sum()))

    @property
    def applied_sparsity(self) -> float:
        """Sparsity over only the (layer, head) units a pattern applies to (0 if none)."""
        if not self.applied.any():
            return 0.0
        return float(1 - self._ratio(self.kept[self.applied].sum(), self.allowed[self.applied].sum()))

    @property
    def block_density(self) -> float | None:
        if self.block_kept is None:
            return None
        return float(self._ratio(self.block_kept.sum(), self.block_allowed.sum()))

    @property
    def block_density_per_layer(self) -> torch.Tensor | None:
        if self.block_kept is None:
            return None
        return self._ratio(self.block_kept.sum(1), self.block_allowed.sum(1))

    def __add__(self, other: "SparsityReport") -> "SparsityReport":
        if self.block_size != other.block_size:
            raise ValueError(f"cannot add sparsity reports of block sizes {self.block_size} and {other.block_size}")
        add = (lambda a, b: None if a is None else a + b)
        return SparsityReport(self.kept + other.kept, self.allowed + other.allowed, self.applied | other.applied,
                              self.block_size, add(self.block_kept, other.block_kept),
                              add(self.block_allowed, other.block_allowed), self.examples + other.examples)

    def to_dict(self) -> dict:
        d = {
            "definition": "1 - kept/allowed query-key pairs; allowed = real (non-padding) pairs, causal-valid "
                          "for decoders",
            "overall": self.overall,
            "applied": self.applied_sparsity,
            "per_layer": [round(float(x), 6) for x in self.per_layer],
            "per_head": [[round(float(x), 6) for x in row] for row in self.per_head],
            "examples": self.examples,
            "allowed_pairs": int(self.allowed.sum()),
            "kept_pairs": int(self.kept.sum()),
        }
        if self.block_kept is not None:
            d["block_size"] = self.block_size
            d["block_density"] = self.block_density
            d["block_density_per_layer"] = [round(float(x), 6) for x in self.block_density_per_layer]
        return d

    def summary(self) -> str:
        lines = [f"sparsity overall {self.overall:.1%}, in sparsified heads {self.applied_sparsity:.1%}"
                 + (f", block density ({self.block_size}x{self.block_size}) {self.block_density:.1%}"
                    if self.block_kept is not None else "")]
        for i, s in enumerate(self.per_layer):
            lines.append(f"  layer {i}: {float(s):.1%}" + ("" if self.applied[i].any() else " (dense)"))
        return "\n".join(lines)


def measure_plan(layer_plans, layout: TokenLayout, *, block_size: int | None = None) -> SparsityReport:
    """Sparsity of resolved layer plans (``Plan.resolve``) on one batch."""
    cache: dict = {}
    kept, allowed, bk, ba, applied = [], [], [], [], []
    for lp in layer_plans:
        keep = lp.mask(layout, cache).expand(-1, lp.num_heads, -1, -1)
        if block_size:
            (k, a), (kb, ab) = pair_and_block_counts(keep, layout, block_size)
            bk.append(kb)
            ba.append(ab)
        else:
            k, a = pair_counts(keep, layout)
        kept.append(k)
        allowed.append(a)
        covered = torch.zeros(lp.num_heads, dtype=torch.bool)
        for heads, _ in lp.entries:
            covered[list(range(lp.num_heads)) if heads is None else list(heads)] = True
        applied.append(covered)
    st = lambda xs: torch.stack([x.cpu() for x in xs]).long()
    return SparsityReport(st(kept), st(allowed), torch.stack(applied), block_size,
                          st(bk) if block_size else None, st(ba) if block_size else None, layout.batch_size)
