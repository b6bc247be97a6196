"""FlexAttention over a `TileMask`: the block backend's second kernel (``kernel="flex"``).

What it needs: a layout's FlexAttention BlockMask (``TileMask.flex_block_masks``), whose partial tiles read
a bool table over positions or a mask_mod computing them from positions. How it runs: ``flex_attention``,
compiled once per process; a layout whose table would exceed 32-bit indexing runs one call per group of heads.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from .tile_mask import TileMask

log = logging.getLogger("sparseattn")

# FlexAttention options for GPUs whose shared memory does not hold the default tiles.
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2}

_flex_compiled = None
_compile_mode: str | None = None


def set_compile_mode(mode: str | None) -> None:
    """torch.compile mode for FlexAttention (e.g. "max-autotune-no-cudagraphs": tunes the kernel's tile
    shapes per input shape, at a much longer first call). Takes effect for kernels compiled afterwards."""
    global _flex_compiled, _compile_mode
    _compile_mode, _flex_compiled = mode, None


def flex_attention_fn(compiled: bool):
    """FlexAttention, compiled once per process (eager on request: slow, for tests on CPU)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _flex_compiled is None:
        # Each (length bucket, head size, batch, dtype) is one compiled kernel; a model with several
        # buckets exceeds dynamo's default of 8 entries and would fall back to the unfused eager path.
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name) and getattr(cfg, name) < 64:
                setattr(cfg, name, 64)
        _flex_compiled = torch.compile(flex_attention, dynamic=False, mode=_compile_mode)
    return _flex_compiled


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TileMask, *,
                           scale: float | None = None, block_mask=None, compiled: bool = True,
                           kernel_options: dict | None = None) -> torch.Tensor:
    """Attention over the kept tiles of ``layout``.

    query: (B, H, L, D); key, value: (B, H_kv, L, D) with H % H_kv == 0; layout: over (B or 1, H or 1)
    and L' >= L tokens padded to whole tiles (the extra positions are padding); block_mask: the layout's
    ``flex_block_masks(H // H_kv)`` (or one FlexAttention BlockMask) if already built. Returns (B, H, L, D);
    rows without a kept key are zero. A layout whose mask table is split by heads runs one kernel call per
    group of heads.
    """
    B, H, L, D = query.shape
    Lp = layout.num_q_blocks * layout.block_size
    if layout.q_len < L or layout.kv_len < L:
        raise ValueError(f"block layout covers {layout.q_len} x {layout.kv_len} tokens, the input has {L}")
    if Lp > L:  # pad to the layout's length (a bucket): padding keys are never kept
        pad = (0, 0, 0, Lp - L)
        query, key, value = F.pad(query, pad), F.pad(key, pad), F.pad(value, pad)
    rep = H // key.shape[1]
    if block_mask is None:
        block_mask = layout.flex_block_masks(rep)
    groups = block_mask if isinstance(block_mask, list) else [(0, layout.code.shape[1], block_mask)]
    if len(groups) == 1:
        out = _flex(query, key, value, groups[0][2], scale, compiled, kernel_options)
    else:  # heads a..b-1 read key/value heads a/rep..b/rep-1 (groups are whole multiples of rep)
        out = torch.cat([_flex(query[:, a:b], key[:, a // rep:b // rep], value[:, a // rep:b // rep], bm, scale,
                               compiled, kernel_options) for a, b, bm in groups], dim=1)
    return out[:, :, :L] if Lp > L else out


def _flex(query, key, value, block_mask, scale, compiled, kernel_options):
    flex = flex_attention_fn(compiled)
    gqa = key.shape[1] != query.shape[1]
    with warnings.catch_warnings():  # eager use is deliberate (CPU tests); its performance warning is noise
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        try:
            return flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                        kernel_options=kernel_options)
        except Exception as e:  # the default tiles need more shared memory than the GPU has: smaller ones
            if not compiled or "out of resource" not in str(e) or kernel_options:
                raise
            log.warning("block backend: FlexAttention's default tiles do not fit this GPU's shared memory (%s); "
                        "retrying with 64x64 tiles and 2 stages", str(e).splitlines()[0][:120])
            return flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                        kernel_options=SMALL_TILES)
