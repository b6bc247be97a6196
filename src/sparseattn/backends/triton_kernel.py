"""sparseattn's own block-sparse attention kernel, in Triton: forward and backward over a `TileMask`.

The kernel visits only the kept tiles of a layout, per example and head, from index lists:

- forward and dQ: one program per (query tile, example x head) walks that tile row's kept key tiles;
- dK and dV: one program per (key tile, example x head) walks that tile column's kept query tiles;
- a program may own part of its tile instead (ROWS of its query or key rows), the tile's other parts going to the
  programs launched beside it: half-tile programs hold half the accumulators (an autotuned choice).

In the backward pass a list much longer than the layout's mean (a global token's row or column, which
keeps every tile) is split into chunks walked by programs of their own: otherwise one such program runs
alone long after the others end. The chunks add their partial gradients with atomics into an fp32
scratch tile per split list, copied into the gradient afterwards; every other tile row or column stores
its gradient directly. Atomics add in a varying order: under ``torch.use_deterministic_algorithms(True)``
the backward walks every list whole instead. The forward walks a split row in the same chunks, each keeping its
unnormalized output, maxima and sums in fp32 scratch that a merge kernel combines (no atomics, so always
deterministic; ``split_forward``). Optionally (``backward="fused"``) the dK/dV pass also adds
dQ atomically, and the dQ pass is skipped.

Each list comes in two parts: partial tiles first, whose token mask is read from a table of the layout's
distinct partial tiles (a byte a pair, block_size^2 bytes a tile), then full tiles, computed without any mask.
Nothing of size L x L exists at any point, so memory grows with the kept tiles: the lists hold
(rows x the longest row) indices and the table holds the distinct partial tiles.

The math is flash attention's (online softmax in base 2, the log-sum-exp saved for the backward pass, which
recomputes the probabilities tile by tile); rows without a kept key give zero output and zero gradients.
`sparseattn.backends.reference` is the specification it is tested against (outputs and gradients, fp32
reference, odd lengths, padding, per-head layouts, GQA).

Runs on CUDA through Triton; under ``TRITON_INTERPRET=1`` it runs on the CPU (slowly), which the CPU tests
use. Sub-tile shapes, warps and pipeline depth are autotuned per (head size, length class, precision) on the GPU
(a few seconds of compiling per new head size, the timings kept on disk for later processes:
``autotune_cached``); ``SPARSEATTN_TRITON_AUTOTUNE=0`` uses fixed ones instead. Once compiled, each kernel is launched
through its compiled binary (``triton_launch``), not Triton's JIT, whose per-launch work an eager or compiled step at
long lengths waits on.
"""

from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .tile_mask import EMPTY, FULL, TileMask, unpack_bits
from .triton_launch import DirectLaunch, on_device_of_first_input

try:  # an optional dependency: the CPU-only install has no Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is missing
    triton = None

LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None


def supports_block_size(block_size: int) -> bool:
    """Tiles the kernel takes: a power of two of at least 32 (tile rows are whole arange ranges)."""
    return block_size >= 32 and block_size & (block_size - 1) == 0


def is_resource_error(error: BaseException) -> bool:
    """Whether ``error`` is Triton's "out of resource" (a kernel's tiles exceed the GPU's shared memory)."""
    return triton is not None and isinstance(error, triton.runtime.errors.OutOfResources)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _mend_interpreter() -> None:
    """Triton 3.6's interpreter holds scalars as one-element arrays and turns them into loop bounds with
    ``int(array)``, which NumPy >= 2.4 refuses for arrays of one dimension: every loop whose length is read
    from memory (all of this kernel's) fails on the CPU. Take the element instead. Interpreter only."""
    from triton.runtime import interpreter as ti

    original = ti._patch_lang_tensor
    if getattr(original, "_sparseattn_mended", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._sparseattn_mended = True
    ti._patch_lang_tensor = patch_lang_tensor


# -- the layout as index lists ------------------------------------------------------------------------
def _lists(sel: torch.Tensor, code: torch.Tensor | None, capacity: int | None = None):
    """(B', H', N, M) bool -> counts (B', H', N) int32, indices (B', H', N, K) int32 (selected first, in
    ascending order; K = the longest list, at least 1, or ``capacity``: a shape known without reading the counts),
    and the selected tiles' codes (or None)."""
    count = sel.sum(-1, dtype=torch.int32)
    if capacity is not None:
        K = capacity
    else:
        K = max(1, int(count.max())) if count.numel() else 1
    idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True)[..., :K]
    tile = code.gather(-1, idx).to(torch.int32).contiguous() if code is not None else None
    return count.contiguous(), idx.to(torch.int32).contiguous(), tile


def _whole_programs(length: torch.Tensor) -> torch.Tensor:
    """The backward kernels' programs (see ``_programs``) with every list walked whole: one program per tile row or
    column of ``length`` (B', H', N) tiles, longest first, as (tile index, 0, length, no scratch slot); built on the
    device, none of it read back."""
    order = torch.argsort(length, dim=-1, descending=True, stable=True)
    span = length.gather(-1, order).long()
    return torch.stack([order, torch.zeros_like(span), span, torch.full_like(span, -1)], -1).to(torch.int32).contiguous()


def device_tiles(keep: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A keep-mask (B, H', Lq, Lk) bool (lengths multiples of ``block_size``) as tile codes (B, H', Nq, Nk) int32
    (EMPTY, FULL, or the tile's own index into the table) and the table of every tile's token mask
    (B x H' x Nq x Nk, bs, bs) uint8, made on the device without reading anything back (TileMask.from_mask keeps
    only the distinct partial tiles, which takes a host read to count them). The table is as large as the mask."""
    B, H, Lq, Lk = keep.shape
    bs = block_size
    if Lq % bs or Lk % bs:
        raise ValueError(f"the keep-mask is {Lq} x {Lk} tokens, expected multiples of the block size {bs}")
    if keep.dtype != torch.bool:
        raise ValueError(f"the keep-mask is {keep.dtype}, expected torch.bool")
    N, M = Lq // bs, Lk // bs
    tiled = keep.view(B, H, N, bs, M, bs).transpose(3, 4)  # (B, H', N, M, bs, bs)
    kept = tiled.sum((-1, -2), dtype=torch.int32)
    ids = torch.arange(B * H * N * M, dtype=torch.int32, device=keep.device).view(B, H, N, M)
    code = torch.where(kept == bs * bs, FULL, torch.where(kept == 0, EMPTY, ids)).to(torch.int32)
    # one copy of the mask (the reshape of the transposed tiles), its bools read as bytes in place; traced, a cast
    # instead, which Inductor fuses into that copy (torch 2.11's Inductor cannot lower a bool-to-uint8 view)
    table = tiled.reshape(-1, bs, bs)
    table = table.to(torch.uint8) if torch.compiler.is_compiling() else table.view(torch.uint8)
    return code.contiguous(), table.contiguous()


# Backward lists longer than max(SPLIT_MIN, SPLIT_FACTOR x the mean list) are split into chunks about that long.
SPLIT_MIN = 16
SPLIT_FACTOR = 2


def _programs(length: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The programs for lists of ``length`` (G, N) tiles (the backward's, and the forward's over tile rows).

    Returns (G, P, 4) int32 rows of (tile index, first, end, slot) over the list's concatenated
    partial-then-full entries, longest first per group; groups with fewer programs than P end with
    (-1, 0, 0, -1). A list longer than ``limit`` becomes ceil(length / limit) chunks of near-equal size
    that share a scratch slot (their results add up there); slot -1 marks a list walked whole. Also
    returns the slots' tile indices, (G, S) int32 (-1 where a group has fewer than S split lists); each
    program's chunk number, (G, P) int32: slot x C + its chunk's place in the list, C the most chunks of any
    list (-1 for a list walked whole), where the forward keeps a chunk's partial softmax; the number of
    chunks of each slot, (G, S) int32; and C."""
    G, N = length.shape
    dev = length.device
    length = length.long()
    chunks = torch.where(length > limit, (length + limit - 1) // limit, torch.ones_like(length)).reshape(-1)
    total = chunks.view(G, N).sum(1)
    P = int(total.max())
    n = int(chunks.sum())
    group = torch.arange(G, device=dev).repeat_interleave(N).repeat_interleave(chunks)
    block = torch.arange(N, device=dev).repeat(G).repeat_interleave(chunks)
    size = length.reshape(-1).repeat_interleave(chunks)
    parts = chunks.repeat_interleave(chunks)
    index = torch.arange(n, device=dev)
    part = index - (torch.cumsum(chunks, 0) - chunks).repeat_interleave(chunks)  # chunk number within its list
    slot = index - (torch.cumsum(total, 0) - total)[group]  # position within its group
    # scratch slots: the split lists of each group, numbered in tile order
    split = (chunks > 1).view(G, N)
    slot_of = torch.cumsum(split.long(), 1) - 1  # (G, N): a split list's slot within its group
    S = int(split.sum(1).max()) if G else 0
    slots = torch.full((G, S), -1, dtype=torch.long, device=dev)
    g_idx, n_idx = split.nonzero(as_tuple=True)
    slots[g_idx, slot_of[g_idx, n_idx]] = n_idx
    C = int(chunks.max()) if n else 1
    slot_chunks = torch.zeros((G, S), dtype=torch.long, device=dev)
    slot_chunks[g_idx, slot_of[g_idx, n_idx]] = chunks.view(G, N)[g_idx, n_idx]
    table = torch.zeros(G, P, 5, dtype=torch.long, device=dev)
    table[..., 0] = -1
    table[..., 3:] = -1
    table[group, slot] = torch.stack([block, part * size // parts, (part + 1) * size // parts,
                                      torch.where(parts > 1, slot_of[group, block], -1),
                                      torch.where(parts > 1, slot_of[group, block] * C + part, -1)], dim=-1)
    span = torch.where(table[..., 0] >= 0, table[..., 2] - table[..., 1], torch.full_like(table[..., 0], -1))
    order = torch.argsort(span, dim=1, descending=True, stable=True)
    table = table.gather(1, order[..., None].expand(-1, -1, 5)).to(torch.int32)
    return (table[..., :4].contiguous(), slots.to(torch.int32).contiguous(), table[..., 4].contiguous(),
            slot_chunks.to(torch.int32).contiguous(), C)


@dataclass
class TileLists:
    """A TileMask in the form the kernel walks: per tile row (forward, dQ) and per tile column (dK, dV),
    the partial tiles with their entries in ``tiles``, then the full tiles."""

    row_full: tuple  # (count (B',H',Nq), index (B',H',Nq,K))
    row_part: tuple  # (count, index, partial tile id into ``tiles``)
    col_full: tuple  # (count (B',H',Nk), index (B',H',Nk,K))
    col_part: tuple
    tiles: torch.Tensor  # (P, bs, bs) uint8: the distinct partial tiles' token masks, a byte a pair
    row_order: torch.Tensor  # (B', H', Nq) int32: tile rows, longest list first (the forward's program order)
    row_prog: torch.Tensor  # (B', H', P, 4) int32: dQ programs (row, first, end, scratch slot), `_programs`
    col_prog: torch.Tensor  # (B', H', P', 4) int32: dK/dV programs over tile columns
    row_slots: torch.Tensor  # (B', H', S) int32: the split rows' tile indices (-1: unused slot)
    col_slots: torch.Tensor  # (B', H', S') int32: the split columns'
    block_size: int
    num_q_blocks: int
    num_kv_blocks: int
    batch_broadcast: bool  # B' == 1: every example shares the layout
    head_broadcast: bool  # H' == 1: every head shares the layout
    heads: int  # H' (1 or the number of query heads)
    unsplit: "TileLists | None" = None  # the same lists with no backward list split, where some are (see `whole`)
    # the forward walks split rows in the dQ programs' chunks, each keeping its partial softmax in its own scratch
    # (merged by a second kernel): (B', H', P) chunk numbers of row_prog (`_programs`), (B', H', S) chunks a slot
    row_chunk: torch.Tensor | None = None
    row_slot_chunks: torch.Tensor | None = None
    row_max_chunks: int = 0  # C of `_programs` over the rows: chunk numbers are slot x this + place

    @property
    def whole(self) -> "TileLists":
        """These lists with every backward list walked whole by one program: no atomics (deterministic)."""
        return self.unsplit if self.unsplit is not None else self

    def group_strides(self, t: torch.Tensor) -> tuple[int, int]:
        """The (example, head) strides of one of these lists' (B', H', ...) tensors: 0 where the layout is shared."""
        return 0 if self.batch_broadcast else t.stride(0), 0 if self.head_broadcast else t.stride(1)

    @property
    def split_rows(self) -> bool:
        """Some dQ program covers part of a row (its chunks add up in fp32 scratch)."""
        return self.row_slots.shape[-1] > 0

    @property
    def split_cols(self) -> bool:
        return self.col_slots.shape[-1] > 0

    @classmethod
    def from_layout(cls, layout: TileMask, *, split: bool = True) -> "TileLists":
        """split=False: the backward walks every list whole, one program each, however long (for comparison)."""
        bs = layout.block_size
        if not supports_block_size(bs):
            raise ValueError(f"the Triton kernel needs a power-of-two block size of at least 32, got {bs}")
        # a byte a pair: rows of a tile load as contiguous runs (packed bits made partial tiles 2x slower
        # than full ones on an H100); still one entry per distinct partial tile, none for full or empty ones
        tiles = unpack_bits(layout.bits, bs).to(torch.uint8).contiguous()
        code = layout.code
        full, part = code == FULL, code >= 0
        codeT = code.transpose(-1, -2)
        rf = _lists(full, None)[:2]
        rp = _lists(part, code)
        cf = _lists(full.transpose(-1, -2), None)[:2]
        cp = _lists(part.transpose(-1, -2), codeT)
        # Longest lists first: a row or column that keeps many tiles (a global token's) starts early instead of
        # running alone at the end of the launch; ties keep their order, so neighbouring rows run together
        # and share their key/value tiles in L2.
        row_len, col_len = rf[0] + rp[0], cf[0] + cp[0]
        row_order = torch.argsort(row_len, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
        # the backward's long lists are split (the mean over all lists: each tile is in one row and one column)
        limit = max(SPLIT_MIN, SPLIT_FACTOR * -(-int(row_len.sum()) // max(1, row_len.numel())))
        no_limit = max(1, layout.num_q_blocks, layout.num_kv_blocks)

        def programs(length, limit):
            Bp, Hp, N = length.shape
            table, slots, chunk, slot_chunks, most = _programs(length.reshape(Bp * Hp, N), limit)
            return (table.view(Bp, Hp, *table.shape[1:]), slots.view(Bp, Hp, -1), chunk.view(Bp, Hp, -1),
                    slot_chunks.view(Bp, Hp, -1), most)

        def build(limit, unsplit=None):
            row_prog, row_slots, row_chunk, row_slot_chunks, row_max_chunks = programs(row_len, limit)
            col_prog, col_slots = programs(col_len, limit)[:2]
            return cls(row_full=rf, row_part=rp, col_full=cf, col_part=cp, tiles=tiles,
                       row_order=row_order, row_prog=row_prog, col_prog=col_prog, row_slots=row_slots,
                       col_slots=col_slots, block_size=bs, num_q_blocks=layout.num_q_blocks,
                       num_kv_blocks=layout.num_kv_blocks, batch_broadcast=code.shape[0] == 1,
                       head_broadcast=code.shape[1] == 1, heads=code.shape[1], unsplit=unsplit,
                       row_chunk=row_chunk, row_slot_chunks=row_slot_chunks, row_max_chunks=row_max_chunks)

        whole = build(no_limit)
        if not split:
            return whole
        lists = build(limit, whole)
        # built now, not at a deterministic backward pass: that may run inside a CUDA graph capture
        return lists if lists.split_rows or lists.split_cols else whole

    @classmethod
    def from_codes(cls, code: torch.Tensor, tiles: torch.Tensor) -> "TileLists":
        """Lists of a layout given as tile codes and a tile table (``device_tiles``), built on the device without
        reading anything back, so that a traced or captured step can build them from each batch: every list has
        room for all the tiles of its row or column (the kernels loop to the count they read from memory), and
        the backward walks each list whole, one program per tile row or column (no split lists, no atomics)."""
        bs = tiles.shape[-1]
        full, part = code == FULL, code >= 0
        N, M = code.shape[-2:]
        rf = _lists(full, None, M)[:2]
        rp = _lists(part, code, M)
        cf = _lists(full.transpose(-1, -2), None, N)[:2]
        cp = _lists(part.transpose(-1, -2), code.transpose(-1, -2), N)
        row_len, col_len = rf[0] + rp[0], cf[0] + cp[0]
        row_order = torch.argsort(row_len, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
        no_slots = torch.empty(*code.shape[:2], 0, dtype=torch.int32, device=code.device)
        return cls(row_full=rf, row_part=rp, col_full=cf, col_part=cp, tiles=tiles, row_order=row_order,
                   row_prog=_whole_programs(row_len), col_prog=_whole_programs(col_len), row_slots=no_slots,
                   col_slots=no_slots, block_size=bs, num_q_blocks=N, num_kv_blocks=M,
                   batch_broadcast=code.shape[0] == 1, head_broadcast=code.shape[1] == 1, heads=code.shape[1])

    def tile_lists(self, length: int, device) -> "TileLists":
        """These lists, as the source of `register_source` (they serve any length up to theirs)."""
        if length > self.num_q_blocks * self.block_size:
            raise ValueError(f"the layout covers {self.num_q_blocks * self.block_size} x "
                             f"{self.num_kv_blocks * self.block_size} tokens, the input has {length}")
        return self

    def nbytes(self) -> int:
        ts = [*self.row_full, *self.row_part, *self.col_full, *self.col_part, self.tiles, self.row_order,
              self.row_prog, self.col_prog, self.row_slots, self.col_slots,
              *(t for t in (self.row_chunk, self.row_slot_chunks) if t is not None)]
        extra = 0 if self.unsplit is None else sum(t.numel() * t.element_size() for t in
                                                   (self.unsplit.row_prog, self.unsplit.col_prog))
        return extra + sum(t.numel() * t.element_size() for t in ts)


if triton is not None:

    @triton.jit
    def tile_keep(TILES, tile, rows, cols, BS: tl.constexpr):
        """keep[r, c] for rows/cols within partial tile ``tile`` (any broadcastable shapes). In 64 bits: a table of
        every tile (``device_tiles``) holds more than 2**31 bytes at long lengths."""
        return tl.load(TILES + tile.to(tl.int64) * (BS * BS) + rows * BS + cols) != 0

    @triton.jit
    def segment_of(SEG, sh, H, N_CTX, VARLEN: tl.constexpr):
        """(row, head, first token, token count) of a program's ``sh`` = segment x H + head. Without VARLEN a
        segment is a whole row; with it, SEG holds (row, first token, token count) per segment (an example
        of a padded batch, or a document of a packed row), and positions count from its first token."""
        s = sh // H
        h = (sh % H).to(tl.int64)
        if VARLEN:
            b = tl.load(SEG + s * 3).to(tl.int64)
            start = tl.load(SEG + s * 3 + 1).to(tl.int64)
            n = tl.load(SEG + s * 3 + 2)
        else:
            b = s.to(tl.int64)
            start = tl.zeros([], tl.int64)
            n = N_CTX
        return b, h, start, n

    @triton.jit
    def entries_below(IDX, lo, hi, bound):
        """The end of the entries lo..hi-1 of an ascending list that are below ``bound``. A segment walks its
        bucket's lists, whose entries past the segment's end are cut off here rather than skipped inside the
        loop: Triton does not pipeline the loads of a loop body behind a branch. One read where nothing is cut
        (the usual case), a binary search otherwise."""
        if hi > lo:
            if tl.load(IDX + hi - 1) >= bound:
                while lo < hi:
                    mid = (lo + hi) // 2
                    if tl.load(IDX + mid) < bound:
                        lo = mid + 1
                    else:
                        hi = mid
        return hi

    @triton.jit
    def _delta_kernel(O, DO, DELTA, sob, soh, sol, sdob, sdoh, sdol, H, N_CTX,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """delta[b, h, i] = sum_d o * do in fp32, without materializing the product."""
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        inside = offs < N_CTX
        o = tl.load(O + b * sob + h * soh + offs[:, None] * sol + offs_d[None, :], mask=inside[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs[:, None] * sdol + offs_d[None, :], mask=inside[:, None],
                     other=0.0)
        tl.store(DELTA + bh.to(tl.int64) * N_CTX + offs, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=inside)

    @triton.jit
    def _fwd_step(acc, l_i, m_i, q, kbase, vbase, stride_kl, stride_vl, TILE, TILES, t, blk, col0, r0, n, qk_scale,
                  HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                  MASKED: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        offs_j = tl.arange(0, BLOCK_N)
        rows = r0 + tl.arange(0, ROWS)  # this program's rows within the tile
        offs_n = blk * BS + col0 + offs_j
        if VARLEN:  # keys past the segment's end load as zeros and are dropped from the softmax
            inside = offs_n < n
            kT = tl.load(kbase + offs_n[None, :] * stride_kl + offs_d[:, None], mask=inside[None, :], other=0.0)
        else:
            kT = tl.load(kbase + offs_n[None, :] * stride_kl + offs_d[:, None])
        qk = tl.dot(q, kT, input_precision=PREC)
        if MASKED:
            keep = tile_keep(TILES, tl.load(TILE + t // (BS // BLOCK_N)), rows[:, None], (col0 + offs_j)[None, :], BS)
            qk = tl.where(keep, qk, float("-inf"))
        if VARLEN:
            qk = tl.where(inside[None, :], qk, float("-inf"))
        # the scale (> 0) goes on the row maxima and into the exponent's multiply-add, not on every score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if VARLEN:
            v = tl.load(vbase + offs_n[:, None] * stride_vl + offs_d[None, :], mask=inside[:, None], other=0.0)
        else:
            v = tl.load(vbase + offs_n[:, None] * stride_vl + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        return acc, l_i, m_new

    @triton.jit
    def _fwd_tiles(acc, l_i, m_i, q, kbase, vbase, stride_kl, stride_vl, IDX, TILE, TILES, count, r0, n, qk_scale,
                   HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                   MASKED: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
        SUB: tl.constexpr = BS // BLOCK_N
        if VARLEN:  # the tiles wholly past the segment's end; sub-tiles past it in the last tile load as masked
            count = entries_below(IDX, count * 0, count, (n + BS - 1) // BS)
        for t in range(0, count * SUB):
            blk = tl.load(IDX + t // SUB)
            col0 = (t % SUB) * BLOCK_N
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, kbase, vbase, stride_kl, stride_vl, TILE, TILES, t,
                                      blk, col0, r0, n, qk_scale, HEAD_DIM, BS, BLOCK_N, ROWS, MASKED, PREC, VARLEN)
        return acc, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, SEG,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                    FCNT, FIDX, PCNT, PIDX, PTILE, TILES, ORDER,
                    scb, sch, K_FULL, K_PART,
                    PROG, CHUNK, SCR_O, SCR_M, SCR_L, spb, sph, skcb, skch, C,
                    H, REP, N_CTX, TUNE_LEN, qk_scale,
                    HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                    PREC: tl.constexpr, SPLIT: tl.constexpr, VARLEN: tl.constexpr):
        """Without SPLIT, one program per tile row (ORDER: longest lists first). With it, the dQ pass's programs
        (PROG, longest first), where a long row's list is cut into chunks: a chunk keeps its unnormalized output,
        row maxima and sums in fp32 scratch (C chunks per segment x head, its number from CHUNK), which
        ``_fwd_merge`` turns into the row's output. A global token's row is otherwise walked by one program
        through the whole launch, which then lasts as long as that row (docs/benchmarks.md, twenty-third and
        twenty-fourth rounds)."""
        sh = tl.program_id(0)
        b, h, start, n = segment_of(SEG, sh, H, N_CTX, VARLEN)
        PARTS: tl.constexpr = BS // ROWS  # programs per tile row, ROWS query rows each (neighbours: same row)
        p = tl.program_id(1) // PARTS
        r0 = (tl.program_id(1) % PARTS) * ROWS
        chunk = -1
        if SPLIT:
            m_blk, first, end, _slot = read_program(PROG, b, h, spb, sph, p)
            chunk = tl.load(CHUNK + b * skcb + h * skch + p)
            if m_blk < 0:  # groups with fewer programs than the table's rows
                return
        else:
            m_blk = tl.load(ORDER + b * scb + h * sch + p)
        if m_blk * BS + r0 >= n:  # rows past the segment's end (they belong to others, or are padding)
            return
        offs_m = m_blk * BS + r0 + tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_DIM)
        rows_in = offs_m < n
        if VARLEN:
            q = tl.load(Q + b * sqb + h * sqh + (start + offs_m)[:, None] * sql + offs_d[None, :],
                        mask=rows_in[:, None], other=0.0)
        else:
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :])
        kbase = K + b * skb + (h // REP) * skh + start * skl
        vbase = V + b * svb + (h // REP) * svh + start * svl
        cnt = b * scb + h * sch + m_blk
        if SPLIT:  # this program's range of the row's partial-then-full list
            p0, p1, f0, f1 = list_ranges(first, end, tl.load(PCNT + cnt))
        else:
            p0, p1, f0, f1 = 0, tl.load(PCNT + cnt), 0, tl.load(FCNT + cnt)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kbase, vbase, skl, svl, PIDX + cnt * K_PART + p0,
                                   PTILE + cnt * K_PART + p0, TILES, p1 - p0, r0, n, qk_scale,
                                   HEAD_DIM, BS, BLOCK_N, ROWS, True, PREC, VARLEN)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kbase, vbase, skl, svl, FIDX + cnt * K_FULL + f0,
                                   FIDX, TILES, f1 - f0, r0, n, qk_scale,
                                   HEAD_DIM, BS, BLOCK_N, ROWS, False, PREC, VARLEN)
        if chunk >= 0:  # a chunk of a split row: its partial softmax, merged by _fwd_merge
            at = sh.to(tl.int64) * C + chunk
            rows = r0 + tl.arange(0, ROWS)
            tl.store(SCR_O + (at * BS + rows)[:, None] * HEAD_DIM + offs_d[None, :], acc)
            tl.store(SCR_M + at * BS + rows, m_i)
            tl.store(SCR_L + at * BS + rows, l_i)
        else:
            _fwd_store(O, LSE, acc, l_i, m_i, b, h, start, offs_m, rows_in, sob, soh, sol, H, N_CTX, HEAD_DIM,
                       VARLEN)

    @triton.jit
    def _fwd_store(O, LSE, acc, l_i, m_i, b, h, start, offs_m, rows_in, sob, soh, sol, H, N_CTX,
                   HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr):
        """The output and log-sum-exp (base 2) of rows ``offs_m`` from their accumulated softmax (rows that keep
        nothing: zero output, lse = inf)."""
        offs_d = tl.arange(0, HEAD_DIM)
        empty = l_i == 0.0
        l_use = tl.where(empty, 1.0, l_i)
        o = acc / l_use[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_use))
        if VARLEN:
            tl.store(O + b * sob + h * soh + (start + offs_m)[:, None] * sol + offs_d[None, :],
                     o.to(O.dtype.element_ty), mask=rows_in[:, None])
            tl.store(LSE + (b * H + h) * N_CTX + start + offs_m, lse, mask=rows_in)
        else:
            tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], o.to(O.dtype.element_ty))
            tl.store(LSE + (b * H + h) * N_CTX + offs_m, lse)

    @triton.jit
    def _fwd_merge(O, LSE, SEG, SCR_O, SCR_M, SCR_L, SLOTS, SLOT_CHUNKS, sob, soh, sol, ssb, ssh, H, MAXC, C, N_CTX,
                   HEAD_DIM: tl.constexpr, BS: tl.constexpr, VARLEN: tl.constexpr):
        """A split row's output from its chunks' partial softmax (grid: segments x H, slots): chunks slot x MAXC
        .. + its chunk count, each (unnormalized output, row maxima, sums), rescaled to their common maximum."""
        sh = tl.program_id(0)
        b, h, start, n = segment_of(SEG, sh, H, N_CTX, VARLEN)
        blk = tl.load(SLOTS + b * ssb + h * ssh + tl.program_id(1))
        if blk >= 0:
            count = tl.load(SLOT_CHUNKS + b * ssb + h * ssh + tl.program_id(1))
            rows = tl.arange(0, BS)
            offs_d = tl.arange(0, HEAD_DIM)
            m_i = tl.full([BS], float("-inf"), tl.float32)
            l_i = tl.zeros([BS], tl.float32)
            acc = tl.zeros([BS, HEAD_DIM], tl.float32)
            first = sh.to(tl.int64) * C + tl.program_id(1) * MAXC
            offs_m = blk * BS + rows
            rows_in = offs_m < n  # a chunk's rows past the segment's end were never written
            for c in range(0, count):
                at = first + c
                m_c = tl.load(SCR_M + at * BS + rows, mask=rows_in, other=float("-inf"))
                l_c = tl.load(SCR_L + at * BS + rows, mask=rows_in, other=0.0)
                a_c = tl.load(SCR_O + (at * BS + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=rows_in[:, None],
                              other=0.0)
                m_new = tl.maximum(m_i, m_c)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
                alpha = tl.math.exp2(m_i - m_use)
                beta = tl.math.exp2(m_c - m_use)
                l_i = l_i * alpha + l_c * beta
                acc = acc * alpha[:, None] + a_c * beta[:, None]
                m_i = m_new
            _fwd_store(O, LSE, acc, l_i, m_i, b, h, start, offs_m, rows_in, sob, soh, sol, H, N_CTX, HEAD_DIM,
                       VARLEN)

    @triton.jit
    def read_program(PROG, b, h, spb, sph, p):
        """Row ``p`` of the table ``_programs`` made: (tile, first, end, scratch slot); programs start longest
        first."""
        prog = PROG + b * spb + h * sph + p * 4
        return tl.load(prog), tl.load(prog + 1), tl.load(prog + 2), tl.load(prog + 3)

    @triton.jit
    def list_ranges(first, end, n_part):
        """Entries first..end-1 of a partial-then-full list, as ranges into its partial list (which holds
        n_part) and into its full list."""
        return (tl.minimum(first, n_part), tl.minimum(end, n_part),
                tl.maximum(first, n_part) - n_part, tl.maximum(end, n_part) - n_part)

    @triton.jit
    def _write(ptrs, value, rows_in, SCRATCH, sh, slot, S, r0, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
               ROWS: tl.constexpr, SPLIT: tl.constexpr, VARLEN: tl.constexpr):
        """Store a program's (ROWS, HEAD_DIM) result, rows r0.. of its tile (those where ``rows_in``); the chunks of
        a split list (slot >= 0) add theirs atomically into their fp32 scratch tile instead (SCRATCH: (segments x
        H, S, BS, HEAD_DIM))."""
        if SPLIT:
            if slot >= 0:
                tile = SCRATCH + (sh.to(tl.int64) * S + slot) * (BS * HEAD_DIM) + r0 * HEAD_DIM
                offs = tl.arange(0, ROWS)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
                tl.atomic_add(tile + offs, value, sem="relaxed")
            elif VARLEN:
                tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=rows_in[:, None])
            else:
                tl.store(ptrs, value.to(ptrs.dtype.element_ty))
        elif VARLEN:
            tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=rows_in[:, None])
        else:
            tl.store(ptrs, value.to(ptrs.dtype.element_ty))

    @triton.jit
    def _scratch_copy(SCRATCH, OUT, SLOTS, sh, slot, b, h, start, n, sob, soh, sol, ssb, ssh, S,
                      HEAD_DIM: tl.constexpr, BS: tl.constexpr):
        """Copy one slot's summed scratch tile into its gradient rows (a slot of -1 is unused)."""
        blk = tl.load(SLOTS + b * ssb + h * ssh + slot)
        if blk >= 0:
            rows = tl.arange(0, BS)
            offs_d = tl.arange(0, HEAD_DIM)
            tile = SCRATCH + (sh.to(tl.int64) * S + slot) * (BS * HEAD_DIM)
            x = tl.load(tile + rows[:, None] * HEAD_DIM + offs_d[None, :])
            pos = blk * BS + rows
            tl.store(OUT + b * sob + h * soh + (start + pos[:, None]) * sol + offs_d[None, :],
                     x.to(OUT.dtype.element_ty), mask=(pos < n)[:, None])

    @triton.jit
    def _scratch_kernel(SCR_K, SCR_V, SCR_Q, DK, DV, DQ, COL_SLOTS, ROW_SLOTS, SEG, skb, skh, skl, sqb, sqh, sql,
                        scb, sch, srb, srh, H, SK, SQ, N_CTX, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
                        VARLEN: tl.constexpr, FIRST: tl.constexpr):
        """Copy the split lists' summed scratch tiles into the gradients: dK, dV and dQ in one launch, where an
        eager backward would otherwise pay a launch's host time for each (grid: segments x H, slots, copies; copy
        FIRST + program_id(2) of dK, dV, dQ, so that FIRST = 2 copies dQ alone)."""
        sh = tl.program_id(0)
        slot = tl.program_id(1)
        which = FIRST + tl.program_id(2)
        b, h, start, n = segment_of(SEG, sh, H, N_CTX, VARLEN)
        if which == 0:
            if slot < SK:
                _scratch_copy(SCR_K, DK, COL_SLOTS, sh, slot, b, h, start, n, skb, skh, skl, scb, sch, SK,
                              HEAD_DIM, BS)
        elif which == 1:
            if slot < SK:
                _scratch_copy(SCR_V, DV, COL_SLOTS, sh, slot, b, h, start, n, skb, skh, skl, scb, sch, SK,
                              HEAD_DIM, BS)
        elif slot < SQ:
            _scratch_copy(SCR_Q, DQ, ROW_SLOTS, sh, slot, b, h, start, n, sqb, sqh, sql, srb, srh, SQ, HEAD_DIM, BS)

    @triton.jit
    def _dkdv_step(dk, dv, k, v, qbase, dobase, stride_ql, stride_dol, LSE_bh, DELTA_bh, DQ_bh, TILE, TILES, t,
                   blk, row0, c0, n, qk_scale, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                   ROWS: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr,
                   VARLEN: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        offs_i = tl.arange(0, BLOCK_M)
        kcols = c0 + tl.arange(0, ROWS)  # this program's keys within the tile
        offs_m = blk * BS + row0 + offs_i
        if VARLEN:  # queries past the segment's end: zero q and dO, and lse = inf makes their probabilities 0
            inside = offs_m < n
            qT = tl.load(qbase + offs_m[None, :] * stride_ql + offs_d[:, None], mask=inside[None, :], other=0.0)
            lse = tl.load(LSE_bh + offs_m, mask=inside, other=float("inf"))
        else:
            qT = tl.load(qbase + offs_m[None, :] * stride_ql + offs_d[:, None])
            lse = tl.load(LSE_bh + offs_m)
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=PREC) * qk_scale - lse[None, :])
        if MASKED:
            keep = tile_keep(TILES, tl.load(TILE + t // (BS // BLOCK_M)), (row0 + offs_i)[None, :], kcols[:, None], BS)
            pT = tl.where(keep, pT, 0.0)
        if VARLEN:
            do = tl.load(dobase + offs_m[:, None] * stride_dol + offs_d[None, :], mask=inside[:, None], other=0.0)
            delta = tl.load(DELTA_bh + offs_m, mask=inside, other=0.0)
        else:
            do = tl.load(dobase + offs_m[:, None] * stride_dol + offs_d[None, :])
            delta = tl.load(DELTA_bh + offs_m)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
        if FUSED:  # keys past the segment's end hold zeros, so they add nothing to dQ
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC)
            if VARLEN:
                tl.atomic_add(DQ_bh + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=inside[:, None],
                              sem="relaxed")
            else:
                tl.atomic_add(DQ_bh + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, sem="relaxed")
        return dk, dv

    @triton.jit
    def _dkdv_tiles(dk, dv, k, v, qbase, dobase, stride_ql, stride_dol, LSE_bh, DELTA_bh, DQ_bh, IDX, TILE, TILES,
                    lo, hi, c0, n, qk_scale, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                    ROWS: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr,
                    VARLEN: tl.constexpr):
        """Entries lo..hi-1 of a column's list. FUSED: also add each sub-tile's dQ (unscaled) atomically into
        the fp32 rows at DQ_bh ((L, HEAD_DIM), contiguous), so no second pass recomputes the probabilities."""
        SUB: tl.constexpr = BS // BLOCK_M
        if VARLEN:  # query tiles wholly past the segment's end (see entries_below)
            hi = entries_below(IDX, lo, hi, (n + BS - 1) // BS)
        for t in range(lo * SUB, hi * SUB):
            blk = tl.load(IDX + t // SUB)
            row0 = (t % SUB) * BLOCK_M
            dk, dv = _dkdv_step(dk, dv, k, v, qbase, dobase, stride_ql, stride_dol, LSE_bh, DELTA_bh, DQ_bh,
                                TILE, TILES, t, blk, row0, c0, n, qk_scale, HEAD_DIM, BS, BLOCK_M, ROWS, MASKED,
                                PREC, FUSED, VARLEN)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, DK, DV, SCR_K, SCR_V, S, LSE, DELTA, DQ_ACC, SEG,
                     sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sdkb, sdkh, sdkl,
                     FIDX, PCNT, PIDX, PTILE, TILES, PROG,
                     scb, sch, spb, sph, K_FULL, K_PART,
                     H, REP, N_CTX, TUNE_LEN, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                     PREC: tl.constexpr, SPLIT: tl.constexpr, FUSED: tl.constexpr, VARLEN: tl.constexpr):
        sh = tl.program_id(0)
        b, h, start, n = segment_of(SEG, sh, H, N_CTX, VARLEN)
        PARTS: tl.constexpr = BS // ROWS  # programs per tile column (or chunk), ROWS keys each
        # a tile column, or a chunk of its list
        n_blk, first, end, slot = read_program(PROG, b, h, spb, sph, tl.program_id(1) // PARTS)
        c0 = (tl.program_id(1) % PARTS) * ROWS
        if n_blk < 0:  # this example and head have fewer programs than the launch
            return
        if n_blk * BS + c0 >= n:
            return
        offs_n = n_blk * BS + c0 + tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_DIM)
        keys_in = offs_n < n
        if VARLEN:
            k = tl.load(K + b * skb + (h // REP) * skh + (start + offs_n)[:, None] * skl + offs_d[None, :],
                        mask=keys_in[:, None], other=0.0)
            v = tl.load(V + b * svb + (h // REP) * svh + (start + offs_n)[:, None] * svl + offs_d[None, :],
                        mask=keys_in[:, None], other=0.0)
        else:
            k = tl.load(K + b * skb + (h // REP) * skh + offs_n[:, None] * skl + offs_d[None, :])
            v = tl.load(V + b * svb + (h // REP) * svh + offs_n[:, None] * svl + offs_d[None, :])
        qbase = Q + b * sqb + h * sqh + start * sql
        dobase = DO + b * sdob + h * sdoh + start * sdol
        row = (b * H + h) * N_CTX + start
        LSE_bh = LSE + row
        DELTA_bh = DELTA + row
        DQ_bh = DQ_ACC + row * HEAD_DIM
        dk = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        dv = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        cnt = b * scb + h * sch + n_blk
        p_lo, p_hi, f_lo, f_hi = list_ranges(first, end, tl.load(PCNT + cnt))
        dk, dv = _dkdv_tiles(dk, dv, k, v, qbase, dobase, sql, sdol, LSE_bh, DELTA_bh, DQ_bh, PIDX + cnt * K_PART,
                             PTILE + cnt * K_PART, TILES, p_lo, p_hi, c0, n, qk_scale, HEAD_DIM, BS, BLOCK_M, ROWS,
                             True, PREC, FUSED, VARLEN)
        dk, dv = _dkdv_tiles(dk, dv, k, v, qbase, dobase, sql, sdol, LSE_bh, DELTA_bh, DQ_bh, FIDX + cnt * K_FULL,
                             FIDX, TILES, f_lo, f_hi, c0, n, qk_scale, HEAD_DIM, BS, BLOCK_M, ROWS, False, PREC,
                             FUSED, VARLEN)
        out = b * sdkb + h * sdkh + (start + offs_n)[:, None] * sdkl + offs_d[None, :]
        _write(DK + out, dk * sm_scale, keys_in, SCR_K, sh, slot, S, c0, HEAD_DIM, BS, ROWS, SPLIT, VARLEN)
        _write(DV + out, dv, keys_in, SCR_V, sh, slot, S, c0, HEAD_DIM, BS, ROWS, SPLIT, VARLEN)

    @triton.jit
    def _dq_step(dq, q, do, lse, delta, kbase, vbase, stride_kl, stride_vl, TILE, TILES, t, blk, col0, r0, n,
                 qk_scale, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                 MASKED: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
        offs_d = tl.arange(0, HEAD_DIM)
        offs_j = tl.arange(0, BLOCK_N)
        rows = r0 + tl.arange(0, ROWS)  # this program's rows within the tile
        offs_n = blk * BS + col0 + offs_j
        if VARLEN:  # keys past the segment's end: zero k and v, so their (meaningless) probabilities add nothing
            inside = offs_n < n
            kT = tl.load(kbase + offs_n[None, :] * stride_kl + offs_d[:, None], mask=inside[None, :], other=0.0)
            vT = tl.load(vbase + offs_n[None, :] * stride_vl + offs_d[:, None], mask=inside[None, :], other=0.0)
        else:
            kT = tl.load(kbase + offs_n[None, :] * stride_kl + offs_d[:, None])
            vT = tl.load(vbase + offs_n[None, :] * stride_vl + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, kT, input_precision=PREC) * qk_scale - lse[:, None])
        if MASKED:
            keep = tile_keep(TILES, tl.load(TILE + t // (BS // BLOCK_N)), rows[:, None], (col0 + offs_j)[None, :], BS)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)

    @triton.jit
    def _dq_tiles(dq, q, do, lse, delta, kbase, vbase, stride_kl, stride_vl, IDX, TILE, TILES, lo, hi, r0, n,
                  qk_scale, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                  MASKED: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr):
        """Entries lo..hi-1 of a row's list."""
        SUB: tl.constexpr = BS // BLOCK_N
        if VARLEN:  # key tiles wholly past the segment's end (see entries_below)
            hi = entries_below(IDX, lo, hi, (n + BS - 1) // BS)
        for t in range(lo * SUB, hi * SUB):
            blk = tl.load(IDX + t // SUB)
            col0 = (t % SUB) * BLOCK_N
            dq = _dq_step(dq, q, do, lse, delta, kbase, vbase, stride_kl, stride_vl, TILE, TILES, t, blk, col0,
                          r0, n, qk_scale, HEAD_DIM, BS, BLOCK_N, ROWS, MASKED, PREC, VARLEN)
        return dq

    @triton.jit
    def _dq_kernel(Q, K, V, DO, DQ, SCR_Q, S, LSE, DELTA, SEG,
                   sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sdqb, sdqh, sdql,
                   FIDX, PCNT, PIDX, PTILE, TILES, PROG,
                   scb, sch, spb, sph, K_FULL, K_PART,
                   H, REP, N_CTX, TUNE_LEN, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                   PREC: tl.constexpr, SPLIT: tl.constexpr, VARLEN: tl.constexpr):
        sh = tl.program_id(0)
        b, h, start, n = segment_of(SEG, sh, H, N_CTX, VARLEN)
        PARTS: tl.constexpr = BS // ROWS  # programs per tile row (or chunk), ROWS query rows each
        # a tile row, or a chunk of its list
        m_blk, first, end, slot = read_program(PROG, b, h, spb, sph, tl.program_id(1) // PARTS)
        r0 = (tl.program_id(1) % PARTS) * ROWS
        if m_blk < 0:
            return
        if m_blk * BS + r0 >= n:
            return
        offs_m = m_blk * BS + r0 + tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_DIM)
        rows_in = offs_m < n
        row = (b * H + h) * N_CTX + start
        if VARLEN:
            q = tl.load(Q + b * sqb + h * sqh + (start + offs_m)[:, None] * sql + offs_d[None, :],
                        mask=rows_in[:, None], other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + (start + offs_m)[:, None] * sdol + offs_d[None, :],
                         mask=rows_in[:, None], other=0.0)
            lse = tl.load(LSE + row + offs_m, mask=rows_in, other=float("inf"))
            delta = tl.load(DELTA + row + offs_m, mask=rows_in, other=0.0)
        else:
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :])
            do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :])
            lse = tl.load(LSE + row + offs_m)
            delta = tl.load(DELTA + row + offs_m)
        kbase = K + b * skb + (h // REP) * skh + start * skl
        vbase = V + b * svb + (h // REP) * svh + start * svl
        dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        cnt = b * scb + h * sch + m_blk
        p_lo, p_hi, f_lo, f_hi = list_ranges(first, end, tl.load(PCNT + cnt))
        dq = _dq_tiles(dq, q, do, lse, delta, kbase, vbase, skl, svl, PIDX + cnt * K_PART, PTILE + cnt * K_PART,
                       TILES, p_lo, p_hi, r0, n, qk_scale, HEAD_DIM, BS, BLOCK_N, ROWS, True, PREC, VARLEN)
        dq = _dq_tiles(dq, q, do, lse, delta, kbase, vbase, skl, svl, FIDX + cnt * K_FULL, FIDX,
                       TILES, f_lo, f_hi, r0, n, qk_scale, HEAD_DIM, BS, BLOCK_N, ROWS, False, PREC, VARLEN)
        _write(DQ + b * sdqb + h * sdqh + (start + offs_m)[:, None] * sdql + offs_d[None, :], dq * sm_scale, rows_in,
               SCR_Q, sh, slot, S, r0, HEAD_DIM, BS, ROWS, SPLIT, VARLEN)


# -- launch configurations ------------------------------------------------------------------------------
# A program owns ROWS rows of a layout tile (query rows: forward, dQ; key rows: dK/dV; the tile's other programs are
# its launch neighbours, so they share what they load in L2), and each step of its loop computes one sub-tile:
# BLOCK_N keys (forward, dQ) or BLOCK_M queries (dK/dV). Fixed choices (SPARSEATTN_TRITON_AUTOTUNE=0, and the
# interpreter: INTERPRETER_ROWS) and the autotuner's candidates, (sub-tile, warps, stages, rows), rows capped at the
# tile (None: the whole tile).
_SUB = {"fwd": "BLOCK_N", "dkdv": "BLOCK_M", "dq": "BLOCK_N"}
_ZEROED = {"dkdv": ["SCR_K", "SCR_V", "DQ_ACC"], "dq": ["SCR_Q"]}
_FIXED = {"fwd": (64, 4, 3, None), "dkdv": (32, 4, 3, None), "dq": (32, 4, 3, None)}
INTERPRETER_ROWS = None  # the rows a program owns under the interpreter (tests set it to cover split tiles)
# The last whole-tile candidate of each is small enough for GPUs with ~100 KiB of shared memory at head size 128
# (consumer cards); the autotuner skips candidates that do not fit.
# (32, 8, 3): the one three-stage whole-tile dK/dV candidate that spills no register at head size 128, where the
# 4-warp ones spill 896-1,272 bytes (benchmarks/kernel_resources.py); dQ's at 122-128 registers. Half-tile programs
# (rows 64) hold half the accumulators: at 4 warps and head size 128 they spill nothing but 72 bytes (dK/dV with
# 64-query sub-tiles), where most whole-tile ones spill 88-1,272; the autotuner chose them for dK/dV at head size 128
# and for the forward and dQ at 32 (docs/benchmarks.md, twenty-second round).
_CANDIDATES = {"fwd": [(64, 4, 3, None), (64, 8, 3, None), (128, 8, 3, None), (128, 4, 2, None), (32, 4, 2, None),
                       (64, 4, 3, 64), (128, 4, 3, 64)],
               "dkdv": [(32, 4, 3, None), (64, 4, 3, None), (64, 8, 3, None), (32, 8, 3, None), (32, 8, 2, None),
                        (64, 8, 2, None), (16, 4, 2, None), (32, 4, 3, 64), (64, 4, 3, 64)],
               "dq": [(32, 4, 3, None), (64, 4, 3, None), (64, 8, 3, None), (32, 8, 3, None), (32, 8, 2, None),
                      (64, 8, 2, None), (16, 4, 2, None), (32, 4, 3, 64), (64, 4, 3, 64)]}


def _rows(rows, bs: int) -> int:
    return bs if rows is None else min(rows, bs)


def _parts_grid(programs, tiles: int):
    """A launch grid of ``programs`` x (``tiles`` x the programs per tile, from the configuration's ROWS)."""
    return lambda meta: (programs, tiles * (meta["BS"] // meta["ROWS"]))


def autotuning() -> bool:
    return os.environ.get("SPARSEATTN_TRITON_AUTOTUNE", "1") != "0"


def split_forward() -> bool:
    """Whether the forward walks long rows (a global token's) in the dQ pass's chunks and merges their partial
    softmax (the default), or one program per row (SPARSEATTN_TRITON_SPLIT_FORWARD=0). One program walking a
    global token's row set the forward's time; in chunks the layer's forward ends with its other rows
    (docs/benchmarks.md, twenty-fourth round). Only layouts with split rows take this path."""
    return os.environ.get("SPARSEATTN_TRITON_SPLIT_FORWARD", "1") != "0"


def autotune_cached() -> bool:
    """Whether the autotuner's timings are kept on disk (Triton's cache directory, keyed by the GPU target, the
    kernel's source and the tuning key), so that a new process skips re-timing what an earlier one timed: the
    first prefill of a generate() call would otherwise pay it in every process. SPARSEATTN_TRITON_AUTOTUNE_CACHE=0
    re-times in every process (after a change of hardware under the same target, say), whatever Triton's own
    TRITON_CACHE_AUTOTUNING says."""
    return os.environ.get("SPARSEATTN_TRITON_AUTOTUNE_CACHE", "1") != "0"


_TUNED: dict = {}


_LAUNCHERS: dict = {}


def _launcher(fn):
    """The JIT function ``fn`` launched through its compiled binary once compiled (``triton_launch``); ``fn`` itself
    under the interpreter."""
    if interpreted():
        return fn
    if fn not in _LAUNCHERS:
        _LAUNCHERS[fn] = DirectLaunch(fn)
    return _LAUNCHERS[fn]


def tune_length(n_tiles: int) -> int:
    """The length class the autotuner keys on: tile rows rounded up to a power of two. Re-timing the candidates
    costs several calls' worth of time, which a generate() call at a new prompt length would pay each time if
    every length bucket were its own key; within a factor of two the best sub-tile shape does not change much."""
    return 1 << max(0, int(n_tiles) - 1).bit_length()


def _kernel(name: str, bs: int):
    """(kernel, launch keywords): autotuned per (head size, length class, precision) on the GPU, where each new
    head size compiles the candidates once and each new length class (``tune_length``) re-times them; the fixed
    choice under the interpreter or with SPARSEATTN_TRITON_AUTOTUNE=0."""
    raw = {"fwd": _fwd_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}[name]
    if interpreted():
        _mend_interpreter()
        return raw, {_SUB[name]: min(32, bs), "ROWS": _rows(INTERPRETER_ROWS, bs)}
    if not autotuning():
        sub, warps, stages, rows = _FIXED[name]
        return _launcher(raw), {_SUB[name]: min(sub, bs), "ROWS": _rows(rows, bs), "num_warps": warps,
                                "num_stages": stages}
    key = (name, bs)
    if key not in _TUNED:
        seen = {(min(sub, bs), w, st, _rows(rows, bs)) for sub, w, st, rows in _CANDIDATES[name]}
        configs = [triton.Config({_SUB[name]: sub, "ROWS": rows}, num_warps=w, num_stages=st)
                   for sub, w, st, rows in sorted(seen)]
        # the scratch that split lists add into starts from zero, also after the autotuner's trial runs
        _TUNED[key] = triton.autotune(configs=configs, key=["HEAD_DIM", "TUNE_LEN", "PREC", "SPLIT", "FUSED", "VARLEN"],
                                      reset_to_zero=_ZEROED.get(name), cache_results=autotune_cached())(raw)
        # Triton ORs cache_results with its own TRITON_CACHE_AUTOTUNING knob: sparseattn's setting is the one said
        _TUNED[key].cache_results = autotune_cached()
        _TUNED[key] = _Chosen(_TUNED[key])
    return _TUNED[key], {}


class _Chosen:
    """An autotuned kernel that launches the configuration chosen for a call's tuning key without the autotuner, once
    it has chosen (through the kernel's compiled binary: ``_launcher``). Triton's ``Autotuner.run`` rebuilds its key
    from every argument at each launch, a large share of the launch's host time (docs/benchmarks.md, twentieth
    round); an eager step makes three such launches a layer. The key here is the length class, the query's dtype and the
    compile-time constants, which decide the autotuner's key at every call site of this module (the other tensors'
    dtypes follow from the query's). A key coarser than the autotuner's could only pick another candidate's
    configuration, never a wrong result: every candidate computes the same attention, and the launch specializes
    on the arguments it is given."""

    def __init__(self, tuner):
        self.tuner = tuner
        self.fn = tuner.fn
        self.launch = _launcher(tuner.fn)
        self._len_at = tuner.arg_names.index("TUNE_LEN")
        self._chosen: dict = {}

    @property
    def cache(self) -> dict:  # the autotuner's own record of its choices (``tuned_configs``)
        return self.tuner.cache

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        key = (args[self._len_at], args[0].dtype, *kwargs.items())
        chosen = self._chosen.get(key)
        if chosen is None:  # the autotuner times its candidates (or reads Triton's cache of its timings)
            out = self.tuner[grid](*args, **kwargs)
            self._chosen[key] = self.tuner.best_config.all_kwargs()
            return out
        return self.launch[grid](*args, **kwargs, **chosen)


def tuned_configs() -> dict:
    """What the autotuner chose so far: {kernel name: {tuning key: config}} (for benchmark reports)."""
    out = {}
    for (name, bs), tuner in _TUNED.items():
        out[f"{name} (block {bs})"] = {str(k): str(c) for k, c in getattr(tuner, "cache", {}).items()}
    return out


def list_args(lists: TileLists, full: tuple, part: tuple):
    """Pointers and strides of the rows' lists for the forward. Counts are (B', H', N) and index arrays
    (B', H', N, K), so one (example, head) stride in rows serves both (0 where the layout is shared)."""
    fc, fi = full
    pc, pi, pt = part
    scb, sch = lists.group_strides(fc)
    return (fc, fi, pc, pi, pt, lists.tiles, lists.row_order, scb, sch, fi.shape[-1], pi.shape[-1])


def program_args(lists: TileLists, full: tuple, part: tuple, prog: torch.Tensor):
    """The backward kernels' list arguments: index arrays, partial counts, the program table and strides
    (full counts are not needed: a program's range ends within its list)."""
    fc, fi = full
    pc, pi, pt = part
    scb, sch = lists.group_strides(fc)
    spb, sph = lists.group_strides(prog)
    return (fi, pc, pi, pt, lists.tiles, prog, scb, sch, spb, sph, fi.shape[-1], pi.shape[-1])


def check_inputs(q, k, v, lists: TileLists, segments: torch.Tensor | None) -> None:
    """Shapes the kernel takes; errors name what was given and what was expected."""
    B, H, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != L or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}: expected "
                         "(B, H, L, D) and two (B, H_kv, L, D) with H a multiple of H_kv")
    Lp = lists.num_q_blocks * lists.block_size
    if L > Lp or lists.num_kv_blocks != lists.num_q_blocks:
        raise ValueError(f"the layout covers {Lp} x {lists.num_kv_blocks * lists.block_size} tokens, the input "
                         f"has {L}")
    if not lists.head_broadcast and lists.heads != H:
        raise ValueError(f"the layout has {lists.heads} heads, the query {H}")
    if not lists.batch_broadcast and lists.row_full[0].shape[0] != B:
        raise ValueError(f"the layout has {lists.row_full[0].shape[0]} examples, the batch {B}")
    if segments is not None:
        if segments.dim() != 2 or segments.shape[1] != 3 or segments.dtype != torch.int32:
            raise ValueError(f"segments must be an (S, 3) int32 tensor of (row, first token, token count), got "
                             f"{segments.dtype} {tuple(segments.shape)}")
        if segments.device != q.device:
            raise ValueError(f"segments are on {segments.device}, the query on {q.device}")
    elif L != Lp:
        raise ValueError(f"length {L} is not the layout's padded length {Lp}; pass segments")


def whole_rows(batch: int, length: int, device) -> torch.Tensor:
    """Segments (row, 0, length) for every row of a batch: attention over whole rows shorter than the layout."""
    seg = torch.zeros(batch, 3, dtype=torch.int32, device=device)
    seg[:, 0] = torch.arange(batch, dtype=torch.int32, device=device)
    seg[:, 2] = length
    return seg


def _prec(dtype):
    """fp32 inputs get exact fp32 products (Triton's default for them would be tf32); 16-bit ones the default."""
    return "ieee" if dtype == torch.float32 else None


def forward_launch(q, k, v, lists: TileLists, scale: float, segments: torch.Tensor | None = None):
    """The forward's launches, unlaunched: (kernel, grid, arguments, constants, o, lse, merge), with merge None or
    the split rows' merge as (grid, arguments, constants) for ``_fwd_merge``. ``forward_pass`` launches them; the
    host-time benchmark times the same launch rather than a hand-copied twin of its argument list."""
    B, H, L, D = q.shape
    varlen = segments is not None
    S = segments.shape[0] if varlen else B
    o = torch.zeros_like(q) if varlen else torch.empty_like(q)
    # rows outside every segment keep nothing: lse = inf, as for a row with no kept key
    lse = torch.full((B, H, L), float("inf"), device=q.device, dtype=torch.float32) \
        if varlen else torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    bs = lists.block_size
    seg = segments if varlen else q  # a placeholder pointer where there are no segments
    split = lists.split_rows and lists.row_chunk is not None and split_forward()
    merge = None
    if split:  # long rows in chunks, as the dQ pass walks them; their partial softmax in scratch, merged after
        maxc = lists.row_max_chunks
        C = lists.row_slots.shape[-1] * maxc
        scr_o = torch.empty(S * H, C, bs, D, device=q.device, dtype=torch.float32)
        scr_m, scr_l = torch.empty(2, S * H, C, bs, device=q.device, dtype=torch.float32)
        prog, chunk, programs = lists.row_prog, lists.row_chunk, lists.row_prog.shape[2]
        (spb, sph), (skcb, skch) = lists.group_strides(prog), lists.group_strides(chunk)
        slots = lists.row_slots
        ssb, ssh = lists.group_strides(slots)
        merge = ((S * H, slots.shape[-1]),
                 (o, lse, seg, scr_o, scr_m, scr_l, slots, lists.row_slot_chunks, *o.stride()[:3], ssb, ssh, H, maxc, C,
                  L), dict(HEAD_DIM=D, BS=bs, VARLEN=varlen))
    else:  # placeholders: these arguments are read only with split rows
        C, scr_o, scr_m, scr_l = 0, lse, lse, lse
        prog, chunk, programs = lists.row_order, lists.row_order, lists.num_q_blocks
        spb = sph = skcb = skch = 0
    kernel, extra = _kernel("fwd", bs)
    args = (q, k, v, o, lse, seg, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            *list_args(lists, lists.row_full, lists.row_part), prog, chunk, scr_o, scr_m, scr_l, spb, sph, skcb, skch,
            C, H, H // k.shape[1], L, tune_length(lists.num_q_blocks), scale * LOG2E)
    constants = dict(HEAD_DIM=D, BS=bs, PREC=_prec(q.dtype), SPLIT=split, VARLEN=varlen, **extra)
    return kernel, _parts_grid(S * H, programs), args, constants, o, lse, merge


@on_device_of_first_input
def forward_pass(q, k, v, lists: TileLists, scale: float, segments: torch.Tensor | None = None):
    """(output, log-sum-exp in base 2 (B, H, L) fp32) of attention over the kept tiles. q: (B, H, L, D) with D a
    power of two >= 16; segments: see ``block_sparse_attention_triton``. Rows outside every segment are zero."""
    kernel, grid, args, constants, o, lse, merge = forward_launch(q, k, v, lists, scale, segments)
    kernel[grid](*args, **constants)
    if merge is not None:
        grid, args, constants = merge
        _launcher(_fwd_merge)[grid](*args, **constants)
    return o, lse


BACKWARDS = ("auto", "fused", "two-pass")


def backward_mode(backward: str) -> str:
    """"auto": two passes, over whole lists where torch.use_deterministic_algorithms is on (split lists and the
    fused pass add up with atomics, whose order varies from run to run). Fused is not the default: it was slower
    than two passes at head size 64 and within 1% at 32 on the encoder step, and its fp32 dQ costs memory
    (docs/benchmarks.md, fifth and twenty-fifth rounds)."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r}: expected one of {', '.join(BACKWARDS)}")
    if backward == "auto":
        return "deterministic" if torch.are_deterministic_algorithms_enabled() else "two-pass"
    return backward


def _zeroed(shapes, dtype, device) -> list:
    """Zeroed tensors of these shapes, views of one buffer: one fill launched instead of one each (an eager
    backward pays each launch's host time). Each view starts 16-byte aligned, as the kernels' pointers are assumed
    to be: every shape here ends in a head size of at least 16. For internal scratch only: an operator's outputs
    must not share storage."""
    if not shapes:  # no split list: nothing to allocate on this hot path
        return []
    sizes = [torch.Size(shape).numel() for shape in shapes]
    return [part.view(shape) for part, shape in zip(torch.zeros(sum(sizes), dtype=dtype, device=device).split(sizes),
                                                     shapes)]


@on_device_of_first_input
def backward_pass(do, q, k, v, o, lse, lists: TileLists, scale: float, mode: str = "two-pass",
             segments: torch.Tensor | None = None):
    """(dq, dk, dv). mode "fused": one pass over tile columns computes dK and dV and adds dQ atomically (fp32);
    "two-pass": a second pass over tile rows computes dQ (recomputing the probabilities); "deterministic": two
    passes over whole lists, no atomics."""
    if mode == "deterministic":
        lists, mode = lists.whole, "two-pass"
    fused = mode == "fused"
    varlen = segments is not None
    seg = segments if varlen else q  # a placeholder pointer where there are no segments
    B, H, L, D = q.shape
    S = segments.shape[0] if varlen else B
    Hk = k.shape[1]
    rep = H // Hk
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    bs = lists.block_size
    _launcher(_delta_kernel)[(triton.cdiv(L, bs), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, L,
                                                         HEAD_DIM=D, BLOCK=bs)
    # fused: dQ is added atomically in fp32; with segments, rows outside every segment get zero gradients. The
    # gradients are separate tensors, not views of one zeroed buffer: the operator may not return aliased outputs.
    # They take their inputs' memory layout (``_fake_grads`` states the rule for tracing): a model's (B, L, H, D)
    # projections then read them without a transposing copy each
    alloc, like = (torch.zeros, torch.zeros_like) if varlen else (torch.empty, torch.empty_like)
    if rep > 1:  # a gradient per query head, summed over each group below
        dk, dv = (alloc((B, H, L, D), device=q.device, dtype=t.dtype) for t in (k, v))
    else:  # one stride set for both (the kernels take dK's): v's gradient in k's layout
        dk, dv = like(k), like(k, dtype=v.dtype)
    # split lists add their chunks into an fp32 scratch tile per list (S x H, slots, bs, D), copied in afterwards;
    # the fused pass's fp32 dQ is zeroed with them (one fill)
    Sk, Sq = lists.col_slots.shape[-1], 0 if fused else lists.row_slots.shape[-1]
    scr = _zeroed([(B, H, L, D)] * fused + [(S * H, n, bs, D) for n in (Sk, Sk, Sq) if n], torch.float32, q.device)
    dq = scr.pop(0) if fused else like(q)
    scr_k, scr_v = (scr.pop(0), scr.pop(0)) if Sk else (dk, dk)
    scr_q = scr.pop(0) if Sq else dq
    kernel, extra = _kernel("dkdv", bs)
    kernel[_parts_grid(S * H, lists.col_prog.shape[2])](
        q, k, v, do, dk, dv, scr_k, scr_v, Sk, lse, delta, dq, seg, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
        *program_args(lists, lists.col_full, lists.col_part, lists.col_prog), H, rep, L,
        tune_length(lists.num_q_blocks),
        scale * LOG2E, scale, HEAD_DIM=D, BS=bs, PREC=_prec(q.dtype), SPLIT=lists.split_cols, FUSED=fused,
        VARLEN=varlen, **extra)
    if fused:  # scaled and cast in one launch
        dq = torch.mul(dq, scale, out=torch.empty_like(q))
    else:
        kernel, extra = _kernel("dq", bs)
        kernel[_parts_grid(S * H, lists.row_prog.shape[2])](
            q, k, v, do, dq, scr_q, Sq, lse, delta, seg, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *do.stride()[:3], *dq.stride()[:3], *program_args(lists, lists.row_full, lists.row_part, lists.row_prog),
            H, rep, L, tune_length(lists.num_q_blocks), scale * LOG2E, scale, HEAD_DIM=D, BS=bs, PREC=_prec(q.dtype),
            SPLIT=lists.split_rows, VARLEN=varlen, **extra)
    if Sk or Sq:  # one launch copies every split list's scratch into its gradient
        # an unused kind's slots point at the other kind's (int32 either way; its branch never runs)
        col, row = lists.col_slots if Sk else lists.row_slots, lists.row_slots if Sq else lists.col_slots
        (scb, sch), (srb, srh) = lists.group_strides(col), lists.group_strides(row)
        _launcher(_scratch_kernel)[(S * H, max(Sk, Sq), (2 if Sk else 0) + (1 if Sq else 0))](
            scr_k, scr_v, scr_q, dk, dv, dq, col, row, seg, *dk.stride()[:3], *dq.stride()[:3], scb, sch, srb, srh,
            H, Sk, Sq, L, HEAD_DIM=D, BS=bs, VARLEN=varlen, FIRST=0 if Sk else 2)
    if rep > 1:  # query heads that share a key/value head add their gradients
        dk = dk.view(B, Hk, rep, L, D).sum(2, dtype=torch.float32).to(k.dtype)
        dv = dv.view(B, Hk, rep, L, D).sum(2, dtype=torch.float32).to(v.dtype)
    return dq, dk, dv


# -- the operator: what torch.compile and autograd see ------------------------------------------------------
# The kernel runs as the custom operators sparseattn::block_attention and sparseattn::block_attention_backward,
# so that torch.compile traces a model through them (no graph break) and CUDA graphs capture them. Tile lists are
# not tensors a graph can hold (their sizes depend on the layout), so an operator names them by an integer
# handle and finds them at run time: a registered `TileLists`, or a source that builds lists for a length on
# first use (a static plan's layer: built once per length bucket, outside any trace).
# They are opaque ``custom_op``s, launched by their own Python under torch.compile, not ``triton_op``s (whose kernels
# Inductor would launch itself): a triton_op's body is traced with fake tensors, so lists found by handle inside it
# fail to trace (every list tensor would have to be an argument of the operator), and ``wrap_triton`` refuses the
# interpreter's kernels, so the CPU suite could not run one.
_SOURCES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_next_handle = itertools.count(1)
_WHOLE_ROWS: dict = {}


def register_source(source) -> int:
    """A handle for ``source``, an object with ``tile_lists(length, device) -> TileLists`` (lists over at least
    ``length`` tokens). Held weakly: the handle is valid while the source lives. A `TileLists` is its own source."""
    handle = getattr(source, "_sparseattn_handle", None)
    if handle is None or _SOURCES.get(handle) is not source:
        handle = next(_next_handle)
        _SOURCES[handle] = source
        source._sparseattn_handle = handle
    return handle


def lists_source(handle: int):
    source = _SOURCES.get(handle)
    if source is None:
        raise RuntimeError(f"no tile lists are registered under handle {handle} (their owner was freed); "
                           "register them with triton_kernel.register_source")
    return source


def lists_for(handle: int, length: int, device) -> TileLists:
    return lists_source(handle).tile_lists(length, device)


def _whole_rows_cached(batch: int, length: int, device) -> torch.Tensor:
    key = (batch, length, str(device))
    if key not in _WHOLE_ROWS:
        _WHOLE_ROWS[key] = whole_rows(batch, length, device)
    return _WHOLE_ROWS[key]


def _padded_head(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _pad_head(t: torch.Tensor, Dp: int) -> torch.Tensor:
    return F.pad(t, (0, Dp - t.shape[-1])) if Dp > t.shape[-1] else t


def _stride_ready(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention_forward(q, k, v, segments, lists: int, scale: float):
    return _forward_over(q, k, v, segments, lists_for(lists, q.shape[2], q.device), scale)


def _forward_over(q, k, v, segments, tl_: TileLists, scale: float):
    B, H, L, D = q.shape
    Dp = _padded_head(D)
    qp, kp, vp = (_stride_ready(_pad_head(t, Dp)) for t in (q, k, v))
    if segments is None and L != tl_.num_q_blocks * tl_.block_size:
        segments = _whole_rows_cached(B, L, q.device)
    check_inputs(qp, kp, vp, tl_, segments)
    o, lse = forward_pass(qp, kp, vp, tl_, scale, segments)
    return (o[..., :D].contiguous() if Dp > D else o), lse


@torch.library.custom_op("sparseattn::block_attention", mutates_args=())
def block_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Optional[torch.Tensor],
                       lists: int, scale: float, backward: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, L, D), log-sum-exp (B, H, L) fp32) over the kept tiles of the lists registered as ``lists``;
    ``backward`` is the backward pass's mode (see ``block_sparse_attention_triton``)."""
    return _attention_forward(q, k, v, segments, lists, scale)


def _fake_attention(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The operators' output and log-sum-exp as their computation makes them (``_forward_over``), for tracing."""
    B, H, L, D = q.shape
    o = torch.empty_like(q) if _padded_head(D) == D and q.stride(-1) == 1 else q.new_empty(q.shape)
    return o, q.new_empty((B, H, L), dtype=torch.float32)


def _fake_grads(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients as ``_backward_over`` makes them: in the layout of the inputs the kernels read (``backward_pass``:
    dV in dK's), contiguous where the head is padded, the input was copied for its strides, or heads share keys."""
    D = q.shape[-1]
    if _padded_head(D) > D:
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    dq = torch.empty_like(q) if q.stride(-1) == 1 else q.new_empty(q.shape)
    if q.shape[1] != k.shape[1]:
        return dq, k.new_empty(k.shape), v.new_empty(v.shape)
    if k.stride(-1) == 1:
        return dq, torch.empty_like(k), torch.empty_like(k, dtype=v.dtype)
    return dq, k.new_empty(k.shape), v.new_empty(v.shape)


@block_attention_op.register_fake
def _(q, k, v, segments, lists, scale, backward="auto"):
    return _fake_attention(q)


def _attention_backward(do, q, k, v, o, lse, segments, lists: int, scale: float, backward: str):
    return _backward_over(do, q, k, v, o, lse, segments, lists_for(lists, q.shape[2], q.device), scale, backward)


def _backward_over(do, q, k, v, o, lse, segments, tl_: TileLists, scale: float, backward: str):
    B, H, L, D = q.shape
    Dp = _padded_head(D)
    if segments is None and L != tl_.num_q_blocks * tl_.block_size:
        segments = _whole_rows_cached(B, L, q.device)
    dq, dk, dv = backward_pass(*(_stride_ready(_pad_head(t, Dp)) for t in (do, q, k, v, o)), lse, tl_, scale,
                          backward_mode(backward), segments)
    if Dp > D:
        dq, dk, dv = (g[..., :D].contiguous() for g in (dq, dk, dv))
    return dq, dk, dv


@torch.library.custom_op("sparseattn::block_attention_backward", mutates_args=())
def block_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                o: torch.Tensor, lse: torch.Tensor, segments: Optional[torch.Tensor], lists: int,
                                scale: float, backward: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, for the output gradient ``do`` of ``block_attention_op``."""
    return _attention_backward(do, q, k, v, o, lse, segments, lists, scale, backward)


@block_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, segments, lists, scale, backward):
    return _fake_grads(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, segments, lists, scale, backward = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, segments)
    ctx.lists, ctx.scale, ctx.mode = lists, scale, backward


def _grads(ctx, do, run_backward):
    q, k, v, o, lse, segments = ctx.saved_tensors
    dq, dk, dv = run_backward(do, q, k, v, o, lse, segments, ctx.lists, ctx.scale, ctx.mode)
    return dq, dk, dv, None, None, None, None


def _backward_rule(ctx, do, dlse):
    return _grads(ctx, do, block_attention_backward_op)


block_attention_op.register_autograd(_backward_rule, setup_context=_setup_context)


class _EagerBlockAttention(torch.autograd.Function):
    """The operator's computation without the dispatcher, for eager calls (its dispatch costs tens of
    microseconds of host time a call, which eager training steps at long lengths are bound by)."""

    @staticmethod
    def forward(ctx, q, k, v, segments, lists, scale, backward):
        o, lse = _attention_forward(q, k, v, segments, lists, scale)
        _setup_context(ctx, (q, k, v, segments, lists, scale, backward), (o, lse))
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return _grads(ctx, do, _attention_backward)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor | None, lists: int,
                    scale: float, backward: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``sparseattn::block_attention``: the operator where torch.compile traces, the same computation through a
    plain autograd function eagerly."""
    if torch.compiler.is_compiling():
        return block_attention_op(q, k, v, segments, lists, scale, backward)
    return _EagerBlockAttention.apply(q, k, v, segments, lists, scale, backward)


# -- the operator over lists built from each batch ------------------------------------------------------------
# Layouts that change with every batch (input-dependent patterns; padded batches of patterns that are not
# prefix-stable, under tracing) come to the operator as tensors: tile codes and the table of every tile
# (``device_tiles``), from which it builds its lists on the device (``TileLists.from_codes``), forward and
# backward alike. Nothing is read back from the GPU, so torch.compile traces it and CUDA graphs capture it.
@torch.library.custom_op("sparseattn::block_attention_tiles", mutates_args=())
def block_attention_tiles_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, code: torch.Tensor,
                             tiles: torch.Tensor, scale: float, backward: str = "auto"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, L, D), log-sum-exp (B, H, L) fp32) over the kept tiles of ``code`` (B or 1, H or 1, N, N)
    int32 and ``tiles`` (T, bs, bs) uint8 (``device_tiles``), a layout over N x bs >= L tokens."""
    return _forward_over(q, k, v, None, TileLists.from_codes(code, tiles), scale)


@block_attention_tiles_op.register_fake
def _(q, k, v, code, tiles, scale, backward="auto"):
    return _fake_attention(q)


@torch.library.custom_op("sparseattn::block_attention_tiles_backward", mutates_args=())
def block_attention_tiles_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      o: torch.Tensor, lse: torch.Tensor, code: torch.Tensor, tiles: torch.Tensor,
                                      scale: float, backward: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, for the output gradient ``do`` of ``block_attention_tiles_op``."""
    return _backward_over(do, q, k, v, o, lse, None, TileLists.from_codes(code, tiles), scale, backward)


@block_attention_tiles_backward_op.register_fake
def _(do, q, k, v, o, lse, code, tiles, scale, backward):
    return _fake_grads(q, k, v)


def _setup_tiles_context(ctx, inputs, output):
    q, k, v, code, tiles, scale, backward = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, code, tiles)
    ctx.scale, ctx.mode = scale, backward


def _tiles_grads(ctx, do, run_backward):
    q, k, v, o, lse, code, tiles = ctx.saved_tensors
    dq, dk, dv = run_backward(do, q, k, v, o, lse, code, tiles, ctx.scale, ctx.mode)
    return dq, dk, dv, None, None, None, None


def _tiles_backward_rule(ctx, do, dlse):
    return _tiles_grads(ctx, do, block_attention_tiles_backward_op)


def _tiles_backward_eager(do, q, k, v, o, lse, code, tiles, scale, mode):
    return _backward_over(do, q, k, v, o, lse, None, TileLists.from_codes(code, tiles), scale, mode)


block_attention_tiles_op.register_autograd(_tiles_backward_rule, setup_context=_setup_tiles_context)


class _EagerTilesAttention(torch.autograd.Function):
    """``block_attention_tiles_op`` without the dispatcher, for eager calls (as ``_EagerBlockAttention``)."""

    @staticmethod
    def forward(ctx, q, k, v, code, tiles, scale, backward):
        o, lse = _forward_over(q, k, v, None, TileLists.from_codes(code, tiles), scale)
        _setup_tiles_context(ctx, (q, k, v, code, tiles, scale, backward), (o, lse))
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        return _tiles_grads(ctx, do, _tiles_backward_eager)


def block_attention_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, code: torch.Tensor,
                          tiles: torch.Tensor, scale: float, backward: str = "auto") -> torch.Tensor:
    """Attention (B, H, L, D) over the kept tiles of a layout made on the device (``device_tiles``), differentiable:
    the operator ``sparseattn::block_attention_tiles`` where torch.compile traces, the same computation through a
    plain autograd function eagerly. No host read at any point (the lists' sizes are the layout's, not its counts)."""
    if torch.compiler.is_compiling():
        return block_attention_tiles_op(q, k, v, code, tiles, scale, backward)[0]
    return _EagerTilesAttention.apply(q, k, v, code, tiles, scale, backward)[0]


def block_sparse_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  lists: TileLists, *, scale: float | None = None, backward: str = "auto",
                                  segments: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over the kept tiles of a layout, with sparseattn's Triton kernel (differentiable; the operator
    ``sparseattn::block_attention``, which torch.compile traces without a graph break).

    query: (B, H, L, D); key, value: (B, H_kv, L, D), H a multiple of H_kv; lists: ``TileLists.from_layout`` of a
    layout over L' >= L tokens (the extra positions are padding, never kept). Any head size: heads that are not a
    power of two are zero-padded for the kernel. Returns (B, H, L, D); rows without a kept key are 0.

    segments: None (every row is one sequence of L tokens), or (S, 3) int32 rows of (row, first token, token
    count), the sequences the rows hold: the examples of a padded batch (first token 0 for right padding, the
    first real token for left padding) or the documents of a packed row. Each segment is attended to on its own,
    its tokens numbered from 0 in the layout of its row (a per-example layout applies to every segment of its
    row); tokens outside every segment get zero outputs and gradients.

    backward: "two-pass" (dK/dV over tile columns, then dQ over tile rows, recomputing the probabilities),
    "fused" (one pass over the columns computes dK and dV and adds dQ atomically into an fp32 copy), or "auto":
    two passes, and with no atomics at all (bitwise reproducible) where ``torch.use_deterministic_algorithms(True)``.
    """
    backward_mode(backward)  # a bad name fails here, not in the backward pass
    if triton is None:
        raise RuntimeError("the Triton block kernel needs the triton package (pip install triton; it comes with "
                           "CUDA builds of PyTorch)")
    if query.device.type != "cuda" and not interpreted():
        raise ValueError(f"the Triton block kernel runs on CUDA tensors, got {query.device.type} ones (on the CPU "
                         "it runs only in Triton's interpreter: TRITON_INTERPRET=1 before sparseattn is imported)")
    if lists.tiles.device != query.device:
        raise ValueError(f"the tile lists are on {lists.tiles.device}, the query on {query.device}")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = block_attention(query, key, value, segments, register_source(lists), scale, backward)
    return out
