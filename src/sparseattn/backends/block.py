"""The ``block`` backend: any plan as block-sparse attention on the GPU, dense attention where that is faster.

This module chooses; the kernels compute: ``triton_kernel`` (sparseattn's own, the default where Triton is
installed; also a torch.library operator) and ``flex_kernel`` (FlexAttention). Semantics are the reference
backend's for real queries; padding queries get zero outputs and no gradient.

How a sparsified layer runs, in order:

- the reference path (SDPA with the boolean mask) for attention weights, dropout, devices other than CUDA,
  sequences under ``min_length`` and layers whose block density is over ``max_density_for(L)``;
- incremental decoding (a KV cache): ``decode_kernel`` over the plan's rows for the new queries, reading only
  the cache tiles they keep (on CUDA from ``min_length`` keys; else SDPA over the same rows, the cache read in
  place, off cuDNN eagerly: ``_incremental_sdpa``);
- dense SDPA without a mask for layers the plan leaves dense, on unpadded batches;
- the Triton operator for layers whose patterns depend on positions only, when the model passes no mask of its
  own: tile lists are built once per layer and length bucket and found by the operator at run time, so the
  call has no host work per batch, traces under torch.compile (fullgraph) and captures in CUDA graphs. Padded
  batches and packed rows are segments the kernel walks in each sequence's own positions, for patterns that
  are prefix-stable (``Pattern.prefix_stable``);
- layouts built from each batch's keep-mask: for the Triton kernel, input-dependent patterns (and, under
  torch.compile or CUDA graph capture, padded or packed batches of patterns that are not prefix-stable) get tile
  codes made on the device, from which the operator ``sparseattn::block_attention_tiles`` builds lists of fixed
  shape: no host read, no graph break, capturable; otherwise, eagerly (a graph break under torch.compile), a
  layout cached by the batch's padding (padded or packed batches of patterns that are not prefix-stable) or
  built for FlexAttention.

Each decision is logged once per backend (eagerly; not while torch.compile traces).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections import Counter, OrderedDict

import torch
import torch.nn.functional as F

from . import decode_kernel, triton_kernel
from .base import AttentionCall, Backend, sdpa_without_cudnn
from .tile_mask import TileMask, check_block_size
from .flex_kernel import block_sparse_attention
from .reference import ReferenceBackend
from .registry import register_backend
from ..layout import TokenLayout
from ..plans.plan import LayerPlan

log = logging.getLogger("sparseattn")

# Below this many key tokens SDPA with the mask is faster than either sparse kernel (launch and setup costs).
MIN_LENGTH = 1024
# Above this block density a sparse kernel saves too little to beat SDPA with a mask (FlexAttention at any
# length, the Triton kernel below DENSE_TILES_LENGTH tokens).
MAX_DENSITY = 0.9
# From this many tokens the Triton kernel beats SDPA with a mask at every density, so no layer falls back.
DENSE_TILES_LENGTH = 4096
# Heads of at most this many dimensions get tiles of 64 when no block_size is given, larger heads tiles of 128.
SMALL_HEAD_DIM = 32


def default_block_size(head_dim: int, kernel: str = "triton") -> int:
    """The block backend's tile where none is given. The Triton kernel: 64 for heads of at most SMALL_HEAD_DIM
    dimensions, else 128. A small head does little work per pair, so the tiles' fixed costs weigh less than the pairs
    finer tiles skip (docs/benchmarks.md: MiniLM's encoder step, head size 32, was faster with tiles of 64 in every
    round that timed both); at head sizes 64 and 128 the kernel's configurations were tuned and measured with tiles
    of 128. FlexAttention: 128, since its default kernel tiles of 128 must divide the layout's."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    return 64 if kernel == "triton" and head_dim <= SMALL_HEAD_DIM else 128


def bucket_length(n: int, block_size: int) -> int:
    """n rounded up to a multiple of max(block_size, 2**floor(log2 n) / 8): at most 8 buckets per octave,
    at most 12.5% padding beyond a whole block."""
    granule = max(block_size, (1 << max(0, n.bit_length() - 1)) // 8)
    return -(-n // granule) * granule


class _Entry:
    """A compiled layer layout: the tiles, what the kernel takes (FlexAttention BlockMasks, or the Triton
    kernel's tile lists) and what they were made for."""

    __slots__ = ("layout", "block_mask", "density", "pins", "lists")

    def __init__(self, layout: TileMask, block_mask, density: float, pins, lists=None):
        self.layout, self.block_mask, self.density, self.pins = layout, block_mask, density, pins
        self.lists = lists


def _no_sync_while_capturing(call: AttentionCall, why: str) -> None:
    """Raise a clear error where the next step reads a GPU value back (a sync) during CUDA graph capture,
    which would otherwise fail with CUDA's "operation not permitted when stream is capturing"."""
    if call.query.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"block backend under CUDA graph capture: {why}")


def _layer_key(lp: LayerPlan):
    """What a layer's keep-mask depends on besides the batch: its patterns (and the layer for per-layer
    draws). Tensors of stored masks are keyed by identity and pinned by the cache entry."""
    per_layer = any(p.per_layer for p in lp.patterns)
    entries = tuple((heads, p.spec(), tuple(id(t) for t in p.tensors().values())) for heads, p in lp.entries)
    return (lp.num_heads, lp.layer if per_layer else None, entries)


class BlockSparseBackend(Backend):
    """Block-sparse attention (FlexAttention over compiled block layouts) with automatic dense fallback.

    block_size: tile size, a multiple of 16 (powers of two from 32 for the Triton kernel). None (default): for the
        Triton kernel, chosen by the model's head size (``default_block_size``: 64 up to 32 dimensions, else 128)
        when ``sparsify`` prepares the backend or at its first call, and kept from then on (``block_size`` says
        which); 128 for FlexAttention.
    min_length: sequences shorter than this (key tokens) run dense.
    max_density: layers whose kept-tile fraction is above this run dense (SDPA with the mask). Default: 0.9, except
        for the Triton kernel on sequences of at least 4096 tokens, where no density falls back (it beats SDPA
        with a mask at every density measured there); ``max_density_for(length)`` says which applies.
    force: always run the block kernel where it can express the call (tests; benchmarks of the kernel).
    compile: compile FlexAttention (default: on CUDA only; eager FlexAttention is a slow reference).
    cache_size: how many compiled layer layouts to keep (least recently used go first).
    kernel_options: passed to FlexAttention (tile shapes, warps, stages).
    kernel: "triton" (sparseattn's own Triton kernel, ``backends.triton_kernel``: partial tiles read a table of
        the distinct partial tiles, so no layout holds an L x L table; faster than FlexAttention in most of
        docs/benchmarks.md, by 2-4x on arbitrary per-head layouts), "flex" (FlexAttention over the layout's
        BlockMask), or "auto" (default): triton where the triton package is installed, else flex.
    backward: the Triton kernel's backward pass (``triton_kernel.block_sparse_attention_triton``): "auto"
        (default: two passes, over tile columns for dK and dV, then over tile rows for dQ, and without atomics
        where ``torch.use_deterministic_algorithms(True)``), "two-pass", or "fused" (the column pass also adds dQ
        atomically into an fp32 copy: the probabilities are computed once instead of twice, at the atomics' cost).
    """

    KERNELS = ("flex", "triton")

    name = "block"

    def __init__(self, block_size: int | None = None, *, min_length: int = MIN_LENGTH, max_density: float | None = None,
                 force: bool = False, compile: bool | None = None, cache_size: int = 64,
                 kernel_options: dict | None = None, kernel: str = "auto", backward: str = "auto"):
        self._block_size = None if block_size is None else check_block_size(block_size)
        triton_kernel.backward_mode(backward)  # a bad name fails here, not at the first backward pass
        self.backward = backward
        if kernel not in (*self.KERNELS, "auto"):
            raise ValueError(f"kernel must be one of {', '.join(self.KERNELS)} or auto, got {kernel!r}")

        # both tiles default_block_size chooses suit the Triton kernel
        tile = 128 if block_size is None else block_size
        if kernel == "auto":
            kernel = "triton" if triton_kernel.available() and triton_kernel.supports_block_size(tile) else "flex"
        if kernel == "triton":
            if not triton_kernel.available():
                raise ValueError("kernel='triton' needs the triton package, which is not installed")
            if not triton_kernel.supports_block_size(tile):
                raise ValueError(f"kernel='triton' needs a power-of-two block_size >= 32, got {block_size}")
        self.kernel = kernel
        if min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {min_length}")
        if max_density is not None and not 0.0 <= max_density <= 1.0:
            raise ValueError(f"max_density must be in [0, 1] or None (the measured default), got {max_density}")
        self.min_length, self.max_density, self.force = min_length, max_density, force
        self.compile, self.cache_size, self.kernel_options = compile, cache_size, kernel_options
        self.reference = ReferenceBackend()
        self.stats: Counter = Counter()  # calls per path, layout builds and cache hits
        self._layouts: OrderedDict = OrderedDict()
        self._static_layers: dict = {}
        self._said: set = set()

    @property
    def block_size(self) -> int:
        """The tile of this backend's layouts."""
        if self._block_size is None:
            raise RuntimeError("this BlockSparseBackend's block_size is chosen by head size (block_size=None), and "
                               "no head size has reached it yet: sparsify a model with it, run it once, or pass "
                               "block_size")
        return self._block_size

    def choose_block_size(self, head_dim: int) -> int:
        """The tile for heads of ``head_dim`` dimensions: the one given or chosen already, else
        ``default_block_size(head_dim, self.kernel)``, kept from now on."""
        if self._block_size is None:
            self._block_size = default_block_size(head_dim, self.kernel)
        return self._block_size

    def max_density_for(self, length: int) -> float:
        """The block density above which a layer of ``length`` tokens runs dense (SDPA with the mask)."""
        if self.max_density is not None:
            return self.max_density
        return 1.0 if self.kernel == "triton" and length >= DENSE_TILES_LENGTH else MAX_DENSITY

    def tile_density(self, layer_plan, length: int, *, causal: bool, device="cpu") -> float | None:
        """The block density the Triton kernel runs ``layer_plan`` at over one unpadded sequence of ``length`` tokens:
        kept tiles among the tiles holding allowed pairs (causal ones where ``causal``), from the tile lists it
        builds (and caches) for that length. None for a layer whose patterns depend on the input, which has no
        layout before a batch."""
        if layer_plan.is_dense:
            return 1.0
        if not _static(layer_plan):
            return None
        return self._static_layer(layer_plan, causal).entry(length, torch.device(device)).density

    def prepare(self, layer_plans, *, head_dim: int | None = None) -> None:
        """Called by ``sparsify`` with the model's layer plans and head size: chooses the tile where none was given,
        and registers, for each layer whose patterns depend on positions only, the source of its tile lists (built
        on first use), so that a traced model finds them by a constant handle."""
        if head_dim is not None:
            self.choose_block_size(head_dim)
        for lp in layer_plans:
            if not lp.is_dense and self.kernel == "triton" and _static(lp):
                for causal in (False, True):
                    self._static_layer(lp, causal)

    # -- entry point ----------------------------------------------------------------------------
    def attention(self, call: AttentionCall):
        if self._block_size is None:  # used without sparsify: this call's head size chooses the tile
            self.choose_block_size(int(call.query.shape[-1]))
        lp = call.layer_plan
        where = f"layer {lp.layer}"
        if call.need_weights:
            return self._run_reference(call, "weights", f"{where}: attention weights were asked for; the block "
                                       "kernel does not form them, so the reference path runs")
        if call.dropout_p > 0 and not lp.is_dense:
            return self._run_reference(call, "dropout", f"{where}: attention dropout {call.dropout_p} is not "
                                       "supported by the block kernel; the reference path runs (set the model's "
                                       "attention dropout to 0 for speed)", level=logging.WARNING)
        if call.incremental:
            return self._incremental(call)
        if lp.is_dense:
            return self._dense(call)
        L = call.q_len
        if not self.force:
            if call.query.device.type != "cuda":
                return self._run_reference(call, "device", f"the block kernel runs on CUDA; on "
                                           f"{call.query.device.type} the reference path runs")
            if L < self.min_length:
                return self._run_reference(call, ("short", L), f"{L} tokens < min_length {self.min_length}: "
                                           "dense SDPA with the mask runs (faster at this length)")
        static = self._static_layer_for(call)
        if static is not None:
            segments = self._segments(call)
            if segments is not _UNSUPPORTED:
                return self._triton_operator(call, static, segments)
        if self.kernel == "triton" and (not _static(lp) or _tracing(call)):
            return self._device_tiles(call)
        return self._per_batch(call)

    def _device_tiles(self, call: AttentionCall):
        """A layout that changes with the batch (input-dependent patterns; under torch.compile or capture also
        padded or packed batches of patterns that are not prefix-stable) for the Triton kernel, made on the device
        from the batch's keep-mask: tile codes and a table of every tile (``triton_kernel.device_tiles``), from
        which the operator builds its lists of fixed shape. Nothing is read back from the GPU, so it traces under
        torch.compile (fullgraph), captures in CUDA graphs and never waits for the GPU eagerly; the price is a
        table as large as the mask, and no fallback to SDPA at high block density (reading the density would
        sync). Made once per forward pass and shared by the layers with the same patterns, unless the model passes
        masks of its own, which may differ from layer to layer (sliding windows in some)."""
        lay, L, bs = call.layout, call.q_len, self.block_size
        key = ("block.device_tiles", _layer_key(call.layer_plan), bs)
        made = call.cache.get(key) if call.model_mask is None else None
        if made is None:
            self._count("layout_builds")
            # the keep-mask (B x H' x L x L, a new tensor: changed in place) padded to whole tiles
            keep = call.keep_mask()
            Lp = -(-L // bs) * bs
            if Lp > L:
                keep = F.pad(keep, (0, Lp - L, 0, Lp - L))
            keep[..., :L, :L] &= lay.real[:, None, -L:, None]  # padding queries attend to nothing
            made = triton_kernel.device_tiles(keep, bs)
            if call.model_mask is None:
                call.cache[key] = made
        code, tiles = made
        self._count("block")
        out = triton_kernel.block_attention_tiles(call.query, call.key, call.value, code, tiles, float(call.scale),
                                                  self.backward)
        return out, None

    @torch.compiler.disable
    def _per_batch(self, call: AttentionCall):
        """Layouts built from each batch's keep-mask with host work (so it runs eagerly between compiled regions):
        FlexAttention's, and, eagerly, the Triton kernel's for padded or packed batches of patterns that are not
        prefix-stable or models that pass their own masks, cached by the batch's padding (input-dependent layers
        and traced calls take ``_device_tiles``)."""
        lp, L = call.layer_plan, call.q_len
        where = f"layer {lp.layer}"
        try:
            entry = self._entry(call)
        except ValueError as e:  # a mask table beyond the kernel's indexing: say why, stay correct
            return self._run_reference(call, ("too-large", lp.layer), f"{where}: {e}; the reference path runs",
                                       level=logging.WARNING)
        limit = self.max_density_for(L)
        if not self.force and entry.density > limit:
            return self._run_reference(call, ("dense-tiles", lp.layer),
                                       f"{where}: block density {entry.density:.0%} > max_density "
                                       f"{limit:.0%} at {L} tokens: dense SDPA with the mask runs")
        if entry.lists is not None:
            try:
                out = triton_kernel.block_sparse_attention_triton(call.query, call.key, call.value, entry.lists,
                                                                  scale=call.scale, backward=self.backward)
            except Exception as e:  # no candidate fits this GPU's shared memory: FlexAttention from now on
                if not triton_kernel.is_resource_error(e):
                    raise
                self._say("triton-resources", f"the Triton kernel does not fit this GPU ({e}); switching to "
                          "kernel='flex'", level=logging.WARNING)
                self.kernel = "flex"
                self._layouts.clear()  # entries hold tile lists, not BlockMasks
                return self.attention(call)
            self.stats["block"] += 1
            return out, None
        self.stats["block"] += 1
        compiled = self.compile if self.compile is not None else call.query.device.type == "cuda"
        out = block_sparse_attention(call.query, call.key, call.value, entry.layout, scale=call.scale,
                                     block_mask=entry.block_mask, compiled=compiled,
                                     kernel_options=self.kernel_options)
        return out, None

    # -- the Triton operator over static layouts -------------------------------------------------------
    def _static_layer(self, lp, causal: bool) -> "_StaticLayer":
        key = (lp.layer, causal)
        layer = self._static_layers.get(key)
        if layer is None or layer.lp is not lp:
            layer = self._static_layers[key] = _StaticLayer(self, lp, causal)
        return layer

    def _static_layer_for(self, call: AttentionCall) -> "_StaticLayer | None":
        """The tile-list source of a call the operator can run: the Triton kernel, patterns of positions only,
        and no mask of the model's own (the layout knows the padding, documents and causality). Under
        torch.compile only a source registered beforehand (``prepare``) is used: registering is host work."""
        lp, lay = call.layer_plan, call.layout
        if self.kernel != "triton" or call.model_mask is not None or not _static(lp):
            return None
        layer = self._static_layers.get((lp.layer, lay.causal))
        if layer is None or layer.lp is not lp:
            if torch.compiler.is_compiling():
                return None
            layer = self._static_layer(lp, lay.causal)
        if (not lay.unpadded or lay.packed) and not layer.prefix_stable:
            return None  # each example's or document's mask differs from the cropped bucket's
        return layer

    def _segments(self, call: AttentionCall):
        """The operator's segments (row, first token, token count) for this batch, shared by the layers: None for
        an unpadded batch; the examples of a padded one, the documents of packed rows; _UNSUPPORTED where they
        cannot be had without reading the GPU under tracing or capture, or where padding is not one run per row."""
        lay = call.layout
        key = ("block.segments", lay.length)
        if key in call.cache:
            return call.cache[key]
        if lay.documents is not None:
            seg = lay.documents
        elif lay.packed:  # document ids without offsets: finding the documents reads the GPU
            seg = _UNSUPPORTED if _tracing(call) else _documents_of(lay)
        elif lay.unpadded:
            seg = None
        else:
            real = lay.real
            count = real.sum(-1)
            first = real.to(torch.int8).argmax(-1)  # the first real token (0 for a row without any)
            seg = torch.stack([torch.arange(lay.batch_size, device=real.device), first, count], 1).to(torch.int32)
            idx = torch.arange(lay.length, device=real.device)
            runs = (idx >= first[:, None]) & (idx < (first + count)[:, None])
            if not _tracing(call):  # eagerly, one read per batch: all real (the faster unsegmented kernel), or holes
                state = int(torch.where((runs == real).all(), 1 + (count == lay.length).all().int(), 0))
                seg = _UNSUPPORTED if state == 0 else (None if state == 2 else seg)
            else:
                # Traced, the segments cannot wait for that read: a row whose real tokens are not one run (a mask
                # with holes) would attend across its holes, so its outputs are made NaN instead (_triton_operator)
                call.cache[("block.segments_hole", lay.length)] = ~(runs == real).all(-1)
        call.cache[key] = seg
        return seg

    def _triton_operator(self, call: AttentionCall, layer: "_StaticLayer", segments):
        lp, L = call.layer_plan, call.q_len
        if not torch.compiler.is_compiling():
            density = layer.entry(L, call.query.device).density
        elif isinstance(L, int):  # a static length: the layout is built while tracing, so its density is known
            density = _traced_density(layer.handle, L, str(call.query.device))
        else:  # a dynamic length: the kernel runs whatever the density
            density = 0.0
        limit = self.max_density_for(L)
        if not self.force and density > limit:
            return self._run_reference(call, ("dense-tiles", lp.layer),
                                       f"layer {lp.layer}: block density {density:.0%} > max_density {limit:.0%} at "
                                       f"{L} tokens: dense SDPA with the mask runs")

        self._count("block")
        out, _ = triton_kernel.block_attention(call.query, call.key, call.value, segments, layer.handle,
                                                  float(call.scale), self.backward)
        hole = call.cache.get(("block.segments_hole", call.layout.length))
        if hole is not None:  # loud, not silently wrong: see _segments
            out = out.masked_fill(hole[:, None, None, None], float("nan"))
        return out, None

    def _build_positions(self, lp, causal: bool, n: int, length: int, device) -> _Entry:
        """Tile lists of ``lp`` on one unpadded sequence of ``n`` real tokens, over ``length`` >= n positions (a
        bucket; the rest are never kept)."""
        self.stats["layout_builds"] += 1
        rel = _index_relation(lp)
        if rel is not None and self._relation_agrees(lp, rel, causal, min(n, self.POSITION_CHECK), device):
            self.stats["position_builds"] += 1

            def rows(start, stop):
                q = torch.arange(start, stop, device=device)[:, None]
                kv = torch.arange(length, device=device)[None, :]
                return torch.broadcast_to(_keep_from_positions(rel, q, kv, n, causal), (stop - start, length))[None, None]

            layout = TileMask.from_rows(rows, length, length, self.block_size, pad_tiles_to_pow2=True)
        else:
            keep = lp.mask(TokenLayout.from_lengths([n], causal=causal, device=device))
            keep = F.pad(keep, (0, length - n, 0, length - n))
            layout = TileMask.from_mask(keep, self.block_size, pad_tiles_to_pow2=True)
            del keep
        nb = -(-n // self.block_size)
        allowed = (nb * (nb + 1) // 2 if causal else nb * nb) * layout.code.shape[1]
        density = layout.kept.sum().item() / max(1, allowed)
        return _Entry(layout, None, density, pins=lp.patterns, lists=triton_kernel.TileLists.from_layout(layout))

    # positions a pattern's index_relation is checked on against its mask before the layout is built from it
    POSITION_CHECK = 512

    def _relation_agrees(self, lp, rel, causal: bool, n: int, device) -> bool:
        """The pattern's index_relation against its own mask on ``n`` tokens (a disagreement is logged and the mask
        is used)."""
        q = torch.arange(n, device=device)
        got = _keep_from_positions(rel, q[:, None], q[None, :], n, causal)[None, None]
        if torch.equal(got, lp.mask(TokenLayout.from_lengths([n], causal=causal, device=device))):
            return True
        self._say(("position-mismatch", lp.layer), f"layer {lp.layer}: {lp.entries[0][1].spec()}'s index_relation "
                  f"disagrees with its mask on {n} tokens; the layout is built from the mask", level=logging.WARNING)
        return False

    def _cached(self, key, build):
        entry = self._layouts.get(key)
        if entry is not None:
            self._layouts.move_to_end(key)
            self.stats["cache_hits"] += 1
            return entry
        entry = self._layouts[key] = build()
        while len(self._layouts) > self.cache_size:
            self._layouts.popitem(last=False)
        return entry

    # -- paths -------------------------------------------------------------------------------------
    def _say(self, key, message: str, level=logging.INFO):
        if torch.compiler.is_compiling():  # logged by the eager calls; a traced log call would break the graph
            return
        if key not in self._said:
            self._said.add(key)
            log.log(level, "block backend: %s", message)

    def _run_reference(self, call, key, message, level=logging.INFO):
        self._say(key, message, level)
        self._count("reference")
        return self.reference.attention(call)

    def _count(self, what: str) -> None:
        if not torch.compiler.is_compiling():
            self.stats[what] += 1

    # -- incremental decoding (a KV cache) ---------------------------------------------------------
    def _incremental(self, call: AttentionCall):
        """Decoding with a KV cache: the decode kernel over the plan's rows for the new queries (it reads only the
        cache tiles they keep; ``decode_kernel``), on CUDA from ``min_length`` keys, for a few queries per step;
        otherwise SDPA over the same rows (``_incremental_sdpa``, which reads the whole cache). Neither builds
        anything Lk x Lk."""
        lp, Lq, Lk = call.layer_plan, call.q_len, call.key.shape[2]
        where = f"layer {lp.layer}"
        if (isinstance(call.q_offset, int) and call.q_offset == 0 and not call.layout.packed
                and (call.model_mask is None or call.model_mask.shape[-2] == 1)):  # no mask, or the slots' row
            return self.attention(self._first_slots(call))
        if lp.is_dense or not decode_kernel.supports(call.query, call.key):
            self._say("incremental", f"{where}: {Lq} queries over {Lk} keys (incremental decoding) run through "
                      "SDPA over the plan's rows (a dense layer, no Triton, or more than "
                      f"{decode_kernel.MAX_ROWS} query rows per key head)")
            return self._incremental_sdpa(call)
        if not self.force and (call.query.device.type != "cuda" or Lk < self.min_length):
            self._say(("incremental-short", call.query.device.type), f"{where}: decoding over {Lk} keys on "
                      f"{call.query.device.type} runs through SDPA over the plan's rows (the decode kernel: CUDA, "
                      f"from {self.min_length} keys)")
            return self._incremental_sdpa(call)
        self._count("decode")
        # Eagerly, the layers of one step with the same patterns share the rows and their tile lists, told apart by
        # the model mask's identity (one mask object per pass and attention type). Traced, a mask made inside the
        # graph (a static cache's slots row, when the caller passes no attention mask) has no identity Dynamo
        # can guard on (id() breaks the graph in torch 2.11, and with it CUDA graph capture), so each layer
        # builds its own: a few kernels in the captured step, no host work
        if call.model_mask is None:
            mask_key = None
        elif torch.compiler.is_compiling():
            mask_key = ("layer", lp.layer)
        else:
            mask_key = id(call.model_mask)
        key = ("block.decode", _layer_key(lp), Lk, Lq, call.key.shape[1], mask_key)
        if key not in call.cache:
            keep = call.keep_mask()
            # the entry holds the mask too: while the pass's cache lives, no other tensor can take its id()
            call.cache[key] = keep, decode_kernel.tile_lists(keep, call.key.shape[1]), call.model_mask
        keep, lists, _ = call.cache[key]
        return decode_kernel.decode_attention(call.query, call.key, call.value, keep, call.scale, lists), None

    def _incremental_sdpa(self, call: AttentionCall):
        """A decoding step through SDPA over the plan's rows for the new queries (``call.keep_mask()``, O(Lq x Lk)),
        which reads the whole cache: the reference's computation without its copy of the cache. The reference
        repeats the cache's key/value heads to the query's (a copy of the cache per layer and step); here the G
        query heads that share a key/value head become G x Lq query rows of it, so the cache is read in place
        (SDPA's own ``enable_gqa`` would do the same, but with a mask it leaves the fused kernels for the math one,
        fp32 scores over every pair). Eagerly on CUDA, SDPA stays off cuDNN attention, which builds a new plan for
        every key length, and a growing cache changes it at every step (docs/generation.md); captured steps have
        one key length (a static cache), and tracing keeps PyTorch's choice."""
        self._count("reference")
        q, k, v = call.query, call.key, call.value
        keep = call.keep_mask()
        B, H, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        G = H // Hkv
        if G > 1:  # query head h reads key/value head h // G: its rows are (h % G) x Lq + i of that head
            q = q.reshape(B, Hkv, G * Lq, D)
            keep = (keep.reshape(B, Hkv, G * Lq, Lk) if keep.shape[1] == H
                    else keep.expand(B, G, Lq, Lk).reshape(B, 1, G * Lq, Lk))
        with sdpa_without_cudnn() if q.is_cuda and not _tracing(call) else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=call.dropout_p, scale=call.scale)
        return out.reshape(B, H, Lq, D), None

    def _first_slots(self, call: AttentionCall) -> AttentionCall:
        """A static cache's prefill (queries in its first Lq slots, the slots after them hold no token yet) as the
        full pass it is: the call over the first Lq keys, whose layout is the first Lq tokens' (the padding the
        model's slot row gave), so it runs wherever a prefill runs (the block kernel, at long lengths)."""
        Lq, lay = call.q_len, call.layout
        key = ("block.first_slots", lay.length, Lq, lay.causal)
        if key not in call.cache:
            call.cache[key] = TokenLayout(real=lay.real[:, :Lq], causal=lay.causal,
                                          special=None if lay.special is None else lay.special[:, :Lq])
        return dataclasses.replace(call, key=call.key[:, :, :Lq], value=call.value[:, :, :Lq],
                                   layout=call.cache[key], model_mask=None, q_offset=None)

    def _dense(self, call: AttentionCall):
        """A layer the plan leaves dense: SDPA without a mask when the batch has no padding and the model's
        mask is the plain padding/causal one; otherwise the reference (SDPA with the model's mask)."""
        lay = call.layout
        plain = call.model_mask is None and lay.unpadded and not lay.packed
        if not plain and (_tracing(call) or lay.packed or not (self._mask_is_layout(call) and self._all_real(call))):
            self._count("reference")
            return self.reference.attention(call)
        self._count("dense")
        q, k, v = call.query, call.key, call.value
        kw = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=call.dropout_p, is_causal=call.layout.causal,
                                             scale=call.scale, **kw)
        return out, None

    # -- per-forward-pass facts (cached in call.cache, shared by the layers) -------------------------
    def _all_real(self, call) -> bool:
        key = ("block.all_real", call.layout.length)
        if key not in call.cache:
            if call.layout.unpadded:
                call.cache[key] = True
            else:
                _no_sync_while_capturing(call, "the batch came with an attention mask, and whether it holds "
                                         "padding is read from the GPU; capture unpadded batches without an "
                                         "attention_mask")
                call.cache[key] = bool(call.layout.real.all())
        return call.cache[key]

    def _mask_is_layout(self, call) -> bool:
        """True if the model's mask is exactly the layout's allowed pairs on real queries (padding and
        causality only), so layouts made from the layout alone are right."""
        mm = call.model_mask
        if mm is None:
            return True
        key = ("block.mask_is_layout", mm.data_ptr(), tuple(mm.shape))
        if key not in call.cache:
            _no_sync_while_capturing(call, "the model passed its own attention mask, which is compared with "
                                     "the batch's padding on the GPU; capture unpadded batches without an "
                                     "attention_mask")
            lay = call.layout
            allowed = lay.allowed()[:, :, -call.q_len:, :]
            real_q = lay.real[:, None, -call.q_len:, None]
            call.cache[key] = bool(((mm == allowed) | ~real_q).all())
        return call.cache[key]

    def _padding_key(self, call):
        """A key for the batch's padding and causality: None-free, hashable, cheap to compare."""
        lay = call.layout
        key = ("block.padding_key", lay.length)
        if key not in call.cache:
            if self._all_real(call):
                call.cache[key] = ("no-padding", lay.length, lay.causal)
            else:
                real = lay.real.to("cpu").numpy()
                digest = hashlib.sha1(real.tobytes()).hexdigest()
                call.cache[key] = ("padding", real.shape, digest, lay.causal)
        return call.cache[key]

    # -- layouts ---------------------------------------------------------------------------------
    def _entry(self, call: AttentionCall) -> _Entry:
        lp = call.layer_plan
        # packed rows: documents are not part of the padding key, so their layouts are built per batch
        static = _static(lp) and not call.layout.packed and self._mask_is_layout(call)
        layer_key = _layer_key(call.layer_plan)
        if not static:  # input-dependent: per forward pass, shared by layers with the same patterns
            key = ("block.layout", layer_key, self.block_size)
            if key not in call.cache:
                _no_sync_while_capturing(call, f"layer {lp.layer}'s patterns depend on the input, so its block "
                                         "layout is built from every batch on the GPU")
                call.cache[key] = self._build(call, batch_invariant=False)
            return call.cache[key]
        key = (layer_key, self._padding_key(call), self.block_size, str(call.query.device))
        entry = self._layouts.get(key)
        if entry is not None:
            self._layouts.move_to_end(key)
            self.stats["cache_hits"] += 1
            return entry
        _no_sync_while_capturing(call, f"layer {lp.layer}'s block layout for {call.q_len} tokens is not built "
                                 "yet (building reads the GPU); run one step with the same shapes before capture")
        entry = self._build(call, batch_invariant=self._all_real(call))
        self._layouts[key] = entry
        while len(self._layouts) > self.cache_size:
            self._layouts.popitem(last=False)
        return entry

    def _build(self, call: AttentionCall, *, batch_invariant: bool) -> _Entry:
        """Compile the layer's keep-mask on real queries. batch_invariant: every example is the same (no
        padding, positional patterns), so one example's mask serves the batch."""
        lp, lay, L = call.layer_plan, call.layout, call.q_len
        Lp = bucket_length(L, self.block_size)
        if batch_invariant and self.kernel == "triton":  # one unpadded sequence's lists serve the batch
            return self._build_positions(lp, lay.causal, L, Lp, call.query.device)
        self.stats["layout_builds"] += 1
        if batch_invariant:
            keep = lp.mask(TokenLayout(real=lay.real[:1], causal=lay.causal))
        else:
            keep = call.keep_mask() & lay.real[:, None, :, None]  # padding queries attend to nothing
        if Lp > L:
            keep = F.pad(keep, (0, Lp - L, 0, Lp - L))
        layout = TileMask.from_mask(keep, self.block_size, pad_tiles_to_pow2=True)
        del keep
        # density over the tiles that hold allowed pairs: what dense attention over the real tokens pays
        density = layout.kept.sum().item() / max(1, self._allowed_tiles(lay, layout))
        if self.kernel == "triton":  # tile lists and the distinct partial tiles: nothing more to build
            return _Entry(layout, None, density, pins=lp.patterns,
                          lists=triton_kernel.TileLists.from_layout(layout))
        analytic = self._analytic_mask(call, layout) if batch_invariant and layout.has_partial() else None
        if analytic is not None:  # partial tiles evaluate positions: no L x L table
            self.stats["analytic_masks"] += 1
            return _Entry(layout, [(0, layout.code.shape[1], layout.flex_block_mask(analytic))], density,
                          pins=lp.patterns)
        rep = call.query.shape[1] // call.key.shape[1]
        return _Entry(layout, layout.flex_block_masks(rep), density, pins=lp.patterns)

    def _analytic_mask(self, call: AttentionCall, layout: TileMask):
        """For a layer whose one pattern (on every head) is a function of positions (``index_relation``),
        on a batch without padding: a mask_mod computing the keep-mask from the indices, checked against
        the layout on every partial tile. None where that does not hold."""
        lp = call.layer_plan
        rel = _index_relation(lp)
        if rel is None:
            return None
        # a tensor, not a Python int, so that lengths within one bucket share one compiled kernel
        length = torch.tensor(call.q_len, device=layout.code.device)
        causal = call.layout.causal

        def position_mask(b, h, q_idx, kv_idx):
            return _keep_from_positions(rel, q_idx, kv_idx, length, causal)

        if not layout.agrees_on_partial_tiles(position_mask):
            self._say(("analytic-mismatch", lp.layer), f"layer {lp.layer}: {lp.entries[0][1].spec()}'s "
                      "index_relation disagrees with its mask; partial tiles read the stored table",
                      level=logging.WARNING)
            return None
        return position_mask

    def _allowed_tiles(self, lay: TokenLayout, layout: TileMask) -> int:
        """Tiles holding at least one allowed pair, counted like sparseattn.sparsity.block_counts but from
        the lengths (O(B x N^2) instead of O(B x L^2)); exact for right-padded batches, an upper bound
        otherwise."""
        bs = layout.block_size
        n = (lay.lengths + bs - 1) // bs  # (B,) tiles per example (right padding)
        i = torch.arange(layout.num_q_blocks, device=n.device)
        rows = i[None, :] < n[:, None]  # (B, N)
        tiles = rows[:, :, None] & rows[:, None, :]
        if lay.causal:
            tiles = tiles & (i[None, None, :] <= i[None, :, None])
        heads = layout.code.shape[1]
        return int(tiles.sum()) * heads * (lay.batch_size if layout.code.shape[0] > 1 else 1) // lay.batch_size


_UNSUPPORTED = object()  # segments that cannot be had here: the per-batch path runs


class _StaticLayer:
    """The tile lists of one layer whose patterns depend on positions only, for one causality: the source the
    Triton operator finds by ``handle`` (``triton_kernel.register_source``). Lists are built on first use per
    length (per length bucket for prefix-stable patterns, whose lists serve every shorter sequence) and kept in
    the backend's cache."""

    def __init__(self, backend: "BlockSparseBackend", lp, causal: bool):

        self.backend, self.lp, self.causal = backend, lp, causal
        self.prefix_stable = all(p.prefix_stable(causal) for p in lp.patterns)
        self.key = _layer_key(lp)
        self.handle = triton_kernel.register_source(self)

    def entry(self, length: int, device) -> _Entry:
        b = self.backend
        bucket = bucket_length(length, b.block_size)
        n = bucket if self.prefix_stable else length
        key = ("static", self.key, self.causal, n, bucket, b.block_size, str(device))
        return b._cached(key, lambda: b._build_positions(self.lp, self.causal, n, bucket, device))

    def tile_lists(self, length: int, device):
        return self.entry(length, device).lists


@torch._dynamo.assume_constant_result
def _traced_density(handle: int, length: int, device: str) -> float:
    """A static layer's block density at ``length`` tokens, computed (and its lists built) while torch.compile
    traces, so the choice between the kernel and dense attention is made once, as eagerly."""

    return triton_kernel.lists_source(handle).entry(length, torch.device(device)).density


def _static(lp) -> bool:
    return not any(p.input_dependent for p in lp.patterns)


def _tracing(call: AttentionCall) -> bool:
    """Under torch.compile or CUDA graph capture, where nothing may be read back from the GPU."""
    return torch.compiler.is_compiling() or (call.query.is_cuda and torch.cuda.is_current_stream_capturing())


def _documents_of(lay: TokenLayout) -> torch.Tensor:
    """(S, 3) int32 (row, first token, token count) of the documents of packed rows (reads the GPU)."""
    ids, real = lay.document_ids, lay.real
    first = torch.ones_like(real)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    rows, starts = first.nonzero(as_tuple=True)
    flat = rows * lay.length + starts
    ends = torch.cat([flat[1:], flat.new_tensor([lay.batch_size * lay.length])])
    ends = torch.minimum(ends, (rows + 1) * lay.length)
    counts = real.reshape(-1).long().cumsum(0)
    counted = counts[ends - 1] - torch.where(flat > 0, counts[(flat - 1).clamp(min=0)], torch.zeros_like(flat))
    return torch.stack([rows, starts, counted], 1).to(torch.int32)


def _index_relation(lp):
    """The index relation of a layer whose one pattern covers every head, or None (several entries, some
    heads only, or a pattern that needs more than positions)."""
    if len(lp.entries) != 1 or lp.entries[0][0] is not None:
        return None
    return lp.entries[0][1].index_relation()


def _keep_from_positions(rel, q, kv, length, causal: bool):
    """What Pattern.mask keeps on an unpadded example of ``length`` tokens, from positions q and kv
    (broadcasting integer tensors, possibly beyond ``length``: those pairs are not kept): the relation on
    allowed pairs, and each real query's own position."""
    keep = rel(q, kv) & (q < length) & (kv < length)
    if causal:
        keep = keep & (kv <= q)
    return keep | ((q == kv) & (q < length))


register_backend("block", BlockSparseBackend)
