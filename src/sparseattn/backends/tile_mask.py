"""TileMask: a keep-mask compiled to the tiles a block-sparse kernel visits (not to be confused with a
TokenLayout, which describes a batch: its padding, documents and special tokens).

A keep-mask (B, H, Lq, Lk) is cut into block_size x block_size tiles (the last row and column of
tiles padded with "not kept"). Each tile is

- empty:   no kept pair, the kernel skips it;
- full:    every pair kept, the kernel computes it without evaluating any mask;
- partial: some pairs kept, the kernel reads the token mask from a packed bit table.

Only partial tiles store token-level bits, so the layout grows with the number of partial tiles, not with
length squared. Tiles with equal bits are stored once (the diagonal tiles of a sliding window are all
the same), so positional patterns need a handful of tiles whatever the length. Kernels take the layout
in their own form: sparseattn's Triton kernel as per-row and per-column tile lists with a byte table of
the distinct partial tiles (``triton_kernel.TileLists``: nothing L x L); FlexAttention as a BlockMask
whose partial tiles read a bool table over positions (L^2 bytes per distinct example and head; none for
block-aligned layouts such as BigBird's random blocks), which it evaluates 4x faster than packed bits or
a tile index (measured on an H100). Tables beyond the kernels' 32-bit indexing are split by heads (one
FlexAttention call per group of heads). Where the mask is a function of positions, the backend gives
FlexAttention its own mask_mod and no table is made. Compiling goes a slab of query rows at a time
(``TileMask.from_rows``), so a mask that is a function of positions never exists at L x L.

>>> import torch
>>> keep = torch.ones(1, 1, 48, 48, dtype=torch.bool).tril()
>>> bl = TileMask.from_mask(keep, block_size=16)
>>> bl.code[0, 0].tolist()  # FULL=-1 below the diagonal, EMPTY=-2 above, one stored partial tile on it
[[0, -2, -2], [-1, 0, -2], [-1, -1, 0]]
>>> torch.equal(bl.to_dense(), keep)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Tables a compiled kernel indexes must stay under 2**31 elements: the generated index arithmetic is 32-bit
# (a 12-head 16k bool table, 3.2e9 elements, was an illegal memory access on an H100).
MAX_TABLE_ELEMENTS = 2**31 - 1

EMPTY = -2  # code of a tile with no kept pair
FULL = -1  # code of a tile whose pairs are all kept; codes >= 0 index the partial tiles' bits


def _bits_per_word(block_size: int) -> int:
    return 32 if block_size % 32 == 0 else 16


def _distinct_tiles(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct packed tiles of ``words`` (P, bs, bs // W), sorted, and each input tile's index among them."""
    distinct, inverse = torch.unique(words.reshape(words.shape[0], -1), dim=0, return_inverse=True)
    return distinct.reshape(-1, *words.shape[1:]), inverse


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a multiple of 16 (16, 32, 64, 128, ...), got {block_size!r}")
    return block_size


def pack_bits(tiles: torch.Tensor) -> torch.Tensor:
    """(P, bs, bs) bool -> (P, bs, bs // W) int32 with bit j of word w = tiles[..., w * W + j]
    (W = 32 bits per word, or 16 when bs is not a multiple of 32)."""
    P, bs, _ = tiles.shape
    W = _bits_per_word(bs)
    weights = (1 << torch.arange(W, device=tiles.device, dtype=torch.int64))
    words = (tiles.reshape(P, bs, bs // W, W).to(torch.int64) * weights).sum(-1)
    # int64 -> int32 keeping the low 32 bits (two's complement), the same on every device
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)


def unpack_bits(words: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of pack_bits: (P, bs, bs // W) int32 -> (P, bs, bs) bool."""
    W = _bits_per_word(block_size)
    shifts = torch.arange(W, device=words.device, dtype=torch.int32)
    return ((words[..., None] >> shifts) & 1).bool().reshape(words.shape[0], block_size, block_size)


def kv_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., Nq, Nk) bool -> (count (..., Nq) int32, indices (..., Nq, Nk) int32): for each query tile row
    the number of selected key tiles and their indices in ascending order first (the rest is filler),
    the format of FlexAttention's BlockMask."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return count, order.to(torch.int32)


@dataclass
class TileMask:
    """A keep-mask over (B', H', q_len, kv_len) tokens as tiles of block_size x block_size.

    code: (B', H', Nq, Nk) int32: EMPTY, FULL, or (>= 0) the index of a partial tile in ``bits``.
        B' and H' are 1 where the mask is the same for every example or head.
    bits: (P, block_size, block_size // W) int32: packed keep bits of the distinct partial tiles
        (W = 32, or 16 when block_size is not a multiple of 32); P >= 1 (a zero tile pads an empty table).
    q_len, kv_len: the token lengths the mask covers; Nq = ceil(q_len / block_size), same for Nk.
    """

    code: torch.Tensor
    bits: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_mask(cls, keep: torch.Tensor, block_size: int = 128, *, dedupe: bool = True,
                  pad_tiles_to_pow2: bool = False) -> "TileMask":
        """Compile a keep-mask (B', H', Lq, Lk) bool into tiles.

        pad_tiles_to_pow2: round the bit table's length up to a power of two, so that kernels compiled for
        one table size serve many layouts without recompiling.
        """
        check_block_size(block_size)
        if keep.dtype != torch.bool or keep.dim() != 4:
            raise ValueError(f"keep-mask must be a 4-D bool tensor (B, H, Lq, Lk), got {keep.dtype} {tuple(keep.shape)}")
        return cls.from_rows(lambda start, stop: keep[:, :, start:stop], keep.shape[2], keep.shape[3], block_size,
                             dedupe=dedupe, pad_tiles_to_pow2=pad_tiles_to_pow2)

    @classmethod
    def from_rows(cls, rows, q_len: int, kv_len: int, block_size: int = 128, *, dedupe: bool = True,
                  pad_tiles_to_pow2: bool = False, slab_pairs: int = 2**24) -> "TileMask":
        """Compile a keep-mask given a slab of query rows at a time: ``rows(start, stop)`` returns the
        (B', H', stop - start, kv_len) bool mask of queries start..stop-1 (slabs of whole tile rows, about
        ``slab_pairs`` pairs each). Only one slab exists at a time, so a mask computed from positions never
        exists at L x L. Codes and distinct partial tiles are those of ``from_mask`` on the whole mask."""
        check_block_size(block_size)
        bs = block_size
        Nq, Nk = -(-q_len // bs), -(-kv_len // bs)
        step = max(1, slab_pairs // (bs * bs * max(1, Nk)))  # tile rows per slab
        codes, words, shape, stored = [], [], None, 0
        for t0 in range(0, max(1, Nq), step):  # one (empty) slab for an empty mask
            start, stop = t0 * bs, min(q_len, (t0 + step) * bs)
            keep = rows(start, stop)
            if keep.dtype != torch.bool or keep.dim() != 4 or keep.shape[2:] != (stop - start, kv_len):
                raise ValueError(f"rows({start}, {stop}) gave {keep.dtype} {tuple(keep.shape)}, expected a bool "
                                 f"(B, H, {stop - start}, {kv_len}) mask")
            if shape is not None and keep.shape[:2] != shape:
                raise ValueError(f"rows({start}, {stop}) gave {tuple(keep.shape[:2])} examples x heads, earlier "
                                 f"slabs {tuple(shape)}")
            shape = keep.shape[:2]
            B, H = shape
            n = -(-(stop - start) // bs)
            keep = torch.nn.functional.pad(keep, (0, Nk * bs - kv_len, 0, n * bs - (stop - start)))
            tiles = keep.view(B, H, n, bs, Nk, bs)
            n_kept = tiles.sum(dim=(3, 5), dtype=torch.int32)
            full = n_kept == bs * bs
            partial = (n_kept > 0) & ~full
            code = torch.full((B, H, n, Nk), EMPTY, dtype=torch.int32, device=keep.device)
            code[full] = FULL
            w = pack_bits(tiles.permute(0, 1, 2, 4, 3, 5)[partial])  # (P, bs, bs // W), row-major order of `partial`
            if dedupe and w.shape[0] > 1:
                w, inverse = _distinct_tiles(w)
                code[partial] = inverse.to(torch.int32) + stored
            else:
                code[partial] = torch.arange(w.shape[0], dtype=torch.int32, device=keep.device) + stored
            stored += w.shape[0]
            codes.append(code)
            words.append(w)
        code, words = torch.cat(codes, dim=2), torch.cat(words)
        if dedupe and len(codes) > 1 and words.shape[0] > 1:  # tiles that recur in several slabs: stored once
            words, inverse = _distinct_tiles(words)
            code = torch.where(code >= 0, inverse.to(torch.int32)[code.clamp(min=0).long()], code)
        P = words.shape[0]
        target = max(1, P) if not pad_tiles_to_pow2 else 1 << max(0, (max(1, P) - 1).bit_length())
        if target > P:
            words = torch.cat([words, words.new_zeros(target - P, *words.shape[1:])])
        return cls(code=code, bits=words.contiguous(), block_size=bs, q_len=q_len, kv_len=kv_len)

    # -- what it holds ------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return self.code.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.code.shape[3]

    @property
    def full(self) -> torch.Tensor:
        """(B', H', Nq, Nk) bool: tiles computed without a mask."""
        return self.code == FULL

    @property
    def partial(self) -> torch.Tensor:
        """(B', H', Nq, Nk) bool: tiles whose token mask is evaluated."""
        return self.code >= 0

    @property
    def kept(self) -> torch.Tensor:
        """(B', H', Nq, Nk) bool: tiles the kernel visits (full or partial)."""
        return self.code != EMPTY

    def kept_blocks(self) -> torch.Tensor:
        """(H',) int64: kept tiles per head, summed over the examples."""
        return self.kept.sum(dim=(0, 2, 3))

    def density(self, allowed_blocks: int | torch.Tensor | None = None) -> float:
        """Kept tiles over ``allowed_blocks`` (default: all Nq x Nk tiles of every example and head).

        For sparseattn's reported block density pass the allowed tile count of
        ``sparseattn.sparsity.block_counts``; the default is what a kernel pays relative to dense attention
        over the padded length."""
        kept = self.kept.sum().item()
        if allowed_blocks is None:
            allowed_blocks = self.code.numel()
        allowed_blocks = int(allowed_blocks.sum()) if isinstance(allowed_blocks, torch.Tensor) else int(allowed_blocks)
        return kept / max(1, allowed_blocks)

    def to_dense(self) -> torch.Tensor:
        """(B', H', q_len, kv_len) bool: the keep-mask back (for tests and drawings)."""
        B, H, Nq, Nk = self.code.shape
        bs = self.block_size
        tiles = unpack_bits(self.bits, bs)[self.code.clamp(min=0)]  # (B, H, Nq, Nk, bs, bs)
        tiles = torch.where(self.full[..., None, None], True, tiles & self.partial[..., None, None])
        dense = tiles.permute(0, 1, 2, 4, 3, 5).reshape(B, H, Nq * bs, Nk * bs)
        return dense[:, :, :self.q_len, :self.kv_len]

    def nbytes(self) -> int:
        """Bytes of the tiles (codes and bits), without the kernel's mask table."""
        return self.code.numel() * 4 + self.bits.numel() * 4

    def mask_table_nbytes(self) -> int:
        """Bytes of ``mask_table`` as the kernel holds it (0 for layouts without partial tiles)."""
        B, H, Nq, Nk = self.code.shape
        return B * H * Nq * Nk * self.block_size ** 2 if self.has_partial() else 0

    def __repr__(self) -> str:
        B, H, Nq, Nk = self.code.shape
        return (f"TileMask({B}x{H} of {Nq}x{Nk} tiles of {self.block_size}, {int(self.full.sum())} full, "
                f"{int(self.partial.sum())} partial ({self.bits.shape[0]} distinct), density {self.density():.1%})")

    # -- FlexAttention ------------------------------------------------------------------------
    def mask_table(self) -> torch.Tensor:
        """(B', H', Nq * bs, Nk * bs) bool: the keep-mask over the padded positions, filled from the tiles (full
        tiles True, empty ones False), for kernels that evaluate partial tiles. Addressed by position, so a
        kernel loads it like the dense mask it is; one byte a pair, only for layouts with partial tiles.
        (Measured on an H100, FlexAttention forward, 8k tokens: reading the same mask as packed bits, or
        through a tile index, made partial tiles 4x slower than this table.)"""
        B, H, Nq, Nk = self.code.shape
        bs = self.block_size
        table = torch.zeros(B, H, Nq * bs, Nk * bs, dtype=torch.bool, device=self.code.device)
        by_tile = table.view(B, H, Nq, bs, Nk, bs).permute(0, 1, 2, 4, 3, 5)  # a view: writes go through
        by_tile[self.full] = True
        partial = self.partial
        if partial.any():
            by_tile[partial] = unpack_bits(self.bits, bs)[self.code[partial].long()]
        return table

    def bit_table(self) -> torch.Tensor:
        """(B', H', Nq * bs, Nk * bs / 8) uint8: ``mask_table`` packed eight pairs a byte (bit k % 8 of byte
        k // 8): for layouts whose bool table would exceed the kernels' 32-bit indexing; partial tiles read
        from it run about 4x slower than from the bool table (measured on an H100)."""
        B, H, Nq, Nk = self.code.shape
        bs = self.block_size
        table = torch.zeros(B, H, Nq * bs, Nk * bs // 8, dtype=torch.uint8, device=self.code.device)
        by_tile = table.view(B, H, Nq, bs, Nk, bs // 8).permute(0, 1, 2, 4, 3, 5)
        by_tile[self.full] = 255
        partial = self.partial
        if partial.any():
            tiles = unpack_bits(self.bits, bs).view(-1, bs, bs // 8, 8).to(torch.uint8)
            weights = (1 << torch.arange(8, device=tiles.device)).to(torch.uint8)
            by_tile[partial] = (tiles * weights).sum(-1, dtype=torch.uint8)[self.code[partial].long()]
        return table

    def has_partial(self) -> bool:
        return bool(self.partial.any())

    def head_groups(self, multiple: int = 1) -> list[tuple[int, int]]:
        """Ranges of heads whose bool mask tables each stay within ``MAX_TABLE_ELEMENTS``, so that the kernel
        reads partial tiles from the fast bool table instead of packed bits: [(0, H')] when the whole table
        fits (or the heads share one layout, H' = 1); otherwise consecutive groups of whole multiples of
        ``multiple`` heads (the query heads that share a key/value head). Where even one such group would not
        fit, [(0, H')]: ``mask_mod`` then reads bits."""
        B, H, Nq, Nk = self.code.shape
        per_head = B * Nq * Nk * self.block_size ** 2
        if H == 1 or not self.has_partial() or per_head * H <= MAX_TABLE_ELEMENTS:
            return [(0, H)]
        size = MAX_TABLE_ELEMENTS // per_head // multiple * multiple
        if size == 0:
            return [(0, H)]
        return [(h, min(H, h + size)) for h in range(0, H, size)]

    def select_heads(self, start: int, stop: int) -> "TileMask":
        """The layout of heads start..stop-1 (the partial tiles' bits are shared, not copied)."""
        if self.code.shape[1] == 1:
            return self
        return TileMask(code=self.code[:, start:stop].contiguous(), bits=self.bits, block_size=self.block_size,
                           q_len=self.q_len, kv_len=self.kv_len)

    def mask_mod(self):
        """The token mask as a FlexAttention ``mask_mod``, exact at every pair, so it is right wherever it is
        evaluated; the kernel, told which tiles are full, evaluates it only on partial tiles. Layouts without
        partial tiles need no token table: a lookup of the tile kinds serves.

        Partial tiles read ``mask_table``: a plain position-addressed load (see there for what was slower), or
        ``bit_table`` where the bool table would exceed 2**31 elements (``MAX_TABLE_ELEMENTS``)."""
        bs = self.block_size
        per_example, per_head = self.code.shape[0] > 1, self.code.shape[1] > 1
        if not self.has_partial():
            full = self.full
            shift = bs.bit_length() - 1
            if 1 << shift != bs:  # not a power of two: never evaluated on full-tile-only layouts by a kernel
                def full_tiles_mask(b, h, q_idx, kv_idx):
                    return full[b if per_example else 0, h if per_head else 0, q_idx // bs, kv_idx // bs]
            else:
                def full_tiles_mask(b, h, q_idx, kv_idx):
                    return full[b if per_example else 0, h if per_head else 0, q_idx >> shift, kv_idx >> shift]

            return full_tiles_mask
        B, H, Nq, Nk = self.code.shape
        pairs = B * H * Nq * Nk * bs * bs
        if pairs > MAX_TABLE_ELEMENTS:
            if pairs // 8 > MAX_TABLE_ELEMENTS:
                raise ValueError(f"a {B}x{H}x{Nq * bs}x{Nk * bs} mask table exceeds the kernels' 32-bit indexing even "
                                 "as bits; use fewer examples per batch or a pattern shared by the heads")
            bits = self.bit_table()

            def bit_table_mask(b, h, q_idx, kv_idx):
                byte = bits[b if per_example else 0, h if per_head else 0, q_idx, kv_idx >> 3]
                return ((byte >> (kv_idx & 7)) & 1) != 0

            return bit_table_mask
        table = self.mask_table()
        if not per_example:
            table = table[0]

            def mask_table_mask(b, h, q_idx, kv_idx):
                return table[h if per_head else 0, q_idx, kv_idx]
        else:
            def mask_table_mask(b, h, q_idx, kv_idx):
                return table[b, h if per_head else 0, q_idx, kv_idx]

        return mask_table_mask

    def flex_block_masks(self, multiple: int = 1) -> list[tuple[int, int, object]]:
        """[(first head, end head, BlockMask)] over ``head_groups(multiple)``: one BlockMask for all heads
        unless the bool mask table must be split to stay within the kernels' 32-bit indexing."""
        groups = self.head_groups(multiple)
        if len(groups) == 1:
            return [(*groups[0], self.flex_block_mask())]
        return [(a, b, self.select_heads(a, b).flex_block_mask()) for a, b in groups]

    def flex_block_mask(self, mask_mod=None):
        """A FlexAttention BlockMask built directly from the tiles (no per-element mask evaluation):
        full tiles go to full_kv_*, partial tiles to kv_* with ``mask_mod`` (default: this layout's,
        reading the stored bits) evaluated on them. A given mask_mod must agree with the layout on every
        partial tile (see ``agrees_on_partial_tiles``)."""
        from torch.nn.attention.flex_attention import BlockMask

        num, idx = kv_lists(self.partial)
        full_num, full_idx = kv_lists(self.full)
        bs = self.block_size
        return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=bs,
                                        mask_mod=mask_mod if mask_mod is not None else self.mask_mod(),
                                        seq_lengths=(self.num_q_blocks * bs, self.num_kv_blocks * bs))

    def agrees_on_partial_tiles(self, mask_mod) -> bool:
        """Whether ``mask_mod(b, h, q, kv)`` gives this layout's bits on every partial tile (the only pairs
        a kernel evaluates it on): O(partial tiles x block_size^2), no L x L tensor."""
        where = self.partial.nonzero()  # (P, 4): example, head, query tile, key tile
        if where.shape[0] == 0:
            return True
        bs = self.block_size
        r = torch.arange(bs, device=self.code.device)
        b, h = where[:, 0, None, None], where[:, 1, None, None]
        q = where[:, 2, None, None] * bs + r[None, :, None]
        kv = where[:, 3, None, None] * bs + r[None, None, :]
        want = unpack_bits(self.bits, bs)[self.code[self.partial].long()]
        return bool(torch.equal(mask_mod(b, h, q, kv).expand_as(want), want))
