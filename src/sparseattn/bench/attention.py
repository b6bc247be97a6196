"""``sparseattn bench attention``: block-sparse attention against dense attention, kernel by kernel.

For each layout (sliding window, BigBird with random blocks, an AP-like arbitrary per-head layout), length,
block sparsity and head size, times the forward and the forward+backward pass (median, CUDA events) and
the peak memory above the inputs of:

- ``dense``:     SDPA without a mask (flash attention): the baseline every speed-up is relative to;
- ``sdpa_mask``: SDPA with the boolean keep-mask, (1, H, L, L): how the papers' masks ran;
- ``flex_full``: FlexAttention with no block mask (every tile computed, no mask evaluated): the same
  Triton kernel's dense speed, the ceiling a block-sparse run of it approaches (its rate per tile);
- ``flex_mask``: FlexAttention with a plain ``mask_mod`` as a user would write it, through
  ``create_block_mask`` (analytic for the window, a table lookup for BigBird's random blocks and for
  the AP-like mask);
- ``block``:     the block backend's FlexAttention kernel: FlexAttention over the compiled `TileMask`;
- ``triton_full``: the Triton kernel over a layout of all-full tiles: its own dense speed;
- ``triton``:    the block backend's own Triton kernel over the same layout (``backends.triton_kernel``):
  partial tiles read a table of the distinct partial tiles, no L x L table; sub-tile shapes autotuned per
  head size and length; the backward splits lists far longer than the mean (global tokens') and runs two
  passes (dK/dV over tile columns, then dQ over tile rows, recomputing the probabilities);
- ``triton_fused``: the same kernel with the fused backward (one pass over the columns computes dK and dV
  and adds dQ atomically in fp32): what fusing gains;
- ``triton_whole``: two passes with every backward list walked whole by one program, no atomics (what
  ``torch.use_deterministic_algorithms(True)`` runs): what splitting long lists gains;
- ``dense_packed``: not sparse attention but its ceiling. Dense SDPA (the same cuDNN/flash kernel as
  ``dense``) over the kept tiles' *count*, arranged as many short sequences whose rows are as long as the
  layout's mean row (kept tiles per query tile row, rounded to whole tiles); its time is scaled to exactly
  the layout's number of kept tiles. A block-sparse kernel with the dense kernel's rate per tile and
  nothing lost to walking tile lists would take this long: rows of a few tiles pay the dense kernel's own
  per-row cost (loading Q, the epilogue) over fewer tiles, which no layout avoids. Its fraction of the
  ideal is what the fastest dense kernel reaches on the same work.

Layouts are made at a target *block* sparsity (1 - kept tiles / all tiles, tiles of ``block_size``); the
ideal speed-up is 1 / block density. "kernel / ideal" compares the block kernel with ``flex_full`` instead of
dense SDPA: flex_full time x density / block time, the fraction of the ideal that the sparse iteration
reaches, apart from how fast the underlying kernel computes a tile. FLOPs: a dense forward is 4 B H L^2 D (two matrix products), the
backward 2.5 times that; a sparse kernel's "effective" rate counts only kept tiles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..backends.flex_kernel import block_sparse_attention, flex_attention_fn
from ..backends.tile_mask import TileMask

LAYOUTS = ("sliding", "bigbird", "ap")
METHODS = ("dense", "sdpa_mask", "flex_full", "flex_mask", "block", "triton_full", "triton", "triton_fused",
           "triton_whole", "dense_packed", "backend")
SPARSE = ("block", "flex_mask", "triton", "triton_fused", "triton_whole",
          "dense_packed", "backend")  # methods that pay for kept tiles only
# methods that compute exactly the layout's attention (the backend's choice is measured against the fastest)
EXACT = ("sdpa_mask", "flex_mask", "block", "triton", "triton_fused", "triton_whole", "backend")


# -- layouts at a target block sparsity ------------------------------------------------------------------
def _band_tiles(n: int, w: int, bs: int) -> int:
    """Tiles of an n x n tile grid touched by the band |i - j| <= w (token units)."""
    reach = (w + bs - 1) // bs  # tile distance the band reaches
    return sum(n - d for d in range(1, min(reach, n - 1) + 1)) * 2 + n


def sliding_window(L: int, sparsity: float, bs: int, device):
    """keep |i - j| <= w with w the largest window whose block density is at most 1 - sparsity (or the
    narrowest, w = block size, when that is denser).
    Returns (keep (1, 1, L, L) bool, mask_mod, description)."""
    n = L // bs
    target = (1 - sparsity) * n * n
    reach = 1  # tiles either side of the diagonal; any window of w >= 1 reaches one
    while reach + 1 < n and _band_tiles(n, (reach + 1) * bs, bs) <= target:
        reach += 1
    w = reach * bs  # the widest window with that reach
    keep = torch.ones(L, L, dtype=torch.bool, device=device).tril(w).triu(-w)[None, None]

    def sliding_window_mask(b, h, q, kv):
        return (q - kv).abs() <= w

    return keep, sliding_window_mask, f"window {w}"


def _random_tiles(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(H, n, n) bool: the `count` highest-scoring tiles per head."""
    H, n, _ = scores.shape
    flat = scores.reshape(H, -1)
    top = flat.topk(max(0, min(count, n * n)), dim=-1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True).view(H, n, n)


def bigbird_blocks(L: int, sparsity: float, bs: int, heads: int, device, seed: int = 0):
    """BigBird at block level (Zaheer et al.): one global tile row and column, a window of three tiles, and
    random tiles per query tile row, drawn per head, as many as the target density allows.
    Returns (keep (1, H, L, L), mask_mod indexing a (H, n, n) table of random tiles, description)."""
    n = L // bs
    g = torch.Generator(device="cpu").manual_seed(seed)
    I = torch.arange(n)
    base = (I[:, None] == 0) | (I[None, :] == 0) | ((I[:, None] - I[None, :]).abs() <= 1)
    budget = max(0.0, (1 - sparsity) * n * n - base.sum().item())  # tiles left for random ones
    r = int(budget // max(1, n - 1))  # random tiles per row
    scores = torch.rand(heads, n, n, generator=g).masked_fill(base, -1.0)
    rand = torch.zeros(heads, n, n, dtype=torch.bool)
    if r > 0:
        rand = scores >= scores.topk(min(r, n), dim=-1).values[..., -1:]
        rand &= ~base
    tiles = (base | rand).to(device)
    keep = tiles.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[None]
    table = rand.to(device)

    def bigbird_mask(b, h, q, kv):
        glob = (q < bs) | (kv < bs)
        near = (q // bs - kv // bs).abs() <= 1
        return glob | near | table[h, q // bs, kv // bs]

    return keep, bigbird_mask, f"global 1 tile, window 3 tiles, {r} random tiles per row"


# FlexAttention's generated kernels index a tensor a mask_mod captures with 32-bit offsets
FLAT_TABLE_LIMIT = 2**31


def ap_like(L: int, sparsity: float, bs: int, heads: int, device, seed: int = 0):
    """An arbitrary per-head layout like Attention Pruning's thresholded average attention: per head, tiles
    ranked by a score (decay from the diagonal at a per-head rate, a few per-head 'sink' key columns, noise),
    the top (1 - sparsity) kept; half of the kept off-diagonal tiles (the lower-scoring) hold a token-level
    mask keeping about half their pairs (drawn from a bank of 64 random tiles), so the kernel meets about as
    many partial tiles as full ones.
    Returns (keep (1, H, L, L), mask_mod indexing the (H, L, L) table, or the tile codes and the bank where that
    table exceeds 2^31 elements, description)."""
    n = L // bs
    g = torch.Generator(device="cpu").manual_seed(seed)
    I = torch.arange(n).float()
    dist = (I[:, None] - I[None, :]).abs()
    rate = 0.5 + 4 * torch.rand(heads, 1, 1, generator=g)
    scores = torch.exp(-dist[None] / rate) + 0.3 * torch.rand(heads, n, n, generator=g)
    sinks = torch.rand(heads, 1, n, generator=g) < 0.03
    scores = scores + sinks * 2.0 + torch.eye(n)[None] * 10  # the diagonal always
    kept = _random_tiles(scores, max(n, round((1 - sparsity) * n * n)))
    ranked = torch.where(kept, scores, torch.full_like(scores, float("inf"))).reshape(heads, -1)
    half = ranked.kthvalue(max(1, int(kept[0].sum()) // 2), dim=-1).values[:, None, None]
    partial = kept & (scores <= half) & (dist[None] > 0)
    bank = torch.rand(64, bs, bs, generator=g) < 0.5
    pick = torch.randint(0, 64, (heads, n, n), generator=g)
    keep = torch.empty(1, heads, L, L, dtype=torch.bool, device=device)
    bank, pick, kept_d, partial_d = bank.to(device), pick.to(device), kept.to(device), partial.to(device)
    for h in range(heads):  # one head at a time: a few bytes per pair of temporaries
        tiles = torch.where(partial_d[h][..., None, None], bank[pick[h]], kept_d[h][..., None, None])  # (n,n,bs,bs)
        keep[0, h] = tiles.permute(0, 2, 1, 3).reshape(L, L)
        del tiles
    if heads * L * L < FLAT_TABLE_LIMIT:
        table = keep[0]

        def ap_table_mask(b, h, q, kv):
            return table[h, q, kv]
    else:
        # a (H, L, L) table this large (12 heads at 16k) would be read out of bounds (FLAT_TABLE_LIMIT). What a user
        # does instead: look the tile up, then the pair within the bank's tile (-1 empty, -2 full, else the bank's)
        code = torch.where(partial_d, pick, torch.where(kept_d, -2, -1)).to(torch.int32)

        def ap_table_mask(b, h, q, kv):
            c = code[h, q // bs, kv // bs]
            return (c == -2) | ((c >= 0) & bank[c.clamp(min=0), q % bs, kv % bs])

    return keep, ap_table_mask, f"{int(kept.sum()) // heads} tiles per head, {int(partial.sum()) // heads} partial"


def _count(keep: torch.Tensor, rows: int = 4096) -> int:
    """True entries of a (1, H, L, L) mask, a slab of rows at a time: a sum over the whole 32k mask would
    widen its 12 Gi elements to int64 at once (96 GiB)."""
    return sum(int(keep[:, h, i:i + rows].sum()) for h in range(keep.shape[1]) for i in range(0, keep.shape[2], rows))


def make_layout(name: str, L: int, sparsity: float, bs: int, heads: int, device):
    if name == "sliding":
        return sliding_window(L, sparsity, bs, device)
    if name == "bigbird":
        return bigbird_blocks(L, sparsity, bs, heads, device)
    if name == "ap":
        return ap_like(L, sparsity, bs, heads, device)
    raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}")


# -- timing ---------------------------------------------------------------------------------------------
def time_ms(fn, *, warmup: float = 25.0, min_ms: float = 150.0) -> float:
    """Median time of one call of fn on the GPU (CUDA events; ``triton.testing.do_bench``, for at least min_ms
    after warmup ms). The calls are queued back to back, as a model's layers queue theirs, each after a clear of
    the L2 cache: a call's host work (Python, launches) counts only where it outlasts the GPU's work, not in
    full as it would if every call waited for the last (the host cost of an eager call is measured by `bench
    model`, in microseconds per attention call)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=min_ms, return_mode="median")


def peak_mib(fn) -> float:
    """Peak memory allocated while fn runs, above what was allocated before (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@dataclass
class Result:
    layout: str
    length: int
    batch: int
    heads: int
    head_dim: int
    target_sparsity: float
    block_density: float
    pair_sparsity: float
    description: str
    method: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_peak_mib: float | None = None
    fwdbwd_peak_mib: float | None = None
    build_ms: float | None = None
    note: str = ""
    speedup_fwd: float | None = None
    speedup_fwdbwd: float | None = None
    frac_ideal_fwd: float | None = None
    frac_ideal_fwdbwd: float | None = None
    frac_kernel_ideal_fwd: float | None = None  # block only: against flex_full x density
    frac_kernel_ideal_fwdbwd: float | None = None
    tflops_fwd: float | None = None
    extra: dict = field(default_factory=dict)


def packed_shape(tiles: torch.Tensor, batch: int, heads: int, bs: int) -> tuple[int, int, float]:
    """The dense stand-in for a layout's kept tiles (``dense_packed``): ``(sequences, length, time_scale)``.
    tiles: (1, heads or 1, n, n) bool, the layout's kept tiles for one batch element (one head standing for
    all). The sequences, of ``heads`` heads, are as long as the mean row (kept tiles per query tile row,
    rounded, at least one tile), and as many as hold the same number of tiles as ``batch`` copies of the
    layout; ``time_scale`` (kept / packed tiles) corrects a measured time for the rounding."""
    n = tiles.shape[2]
    kept = batch * int(tiles.sum()) * (heads // tiles.shape[1])
    row = max(1, round(kept / (batch * heads * n)))  # mean kept tiles per query tile row
    sequences = max(1, round(kept / (heads * row * row)))
    return sequences, row * bs, kept / (sequences * heads * row * row)


def _methods(keep, mask_mod, bs, scale, device, kernel_options=None, *, tiles=None, like=None):
    """name -> (setup() -> attention fn(q, k, v), build time in ms or None). ``dense_packed`` needs the
    layout's tiles and an input to copy shape and dtype from (``like``, (B, H, L, D)); its setup leaves its
    own inputs (q, k, v, grad) in ``info["inputs"]`` and its time correction in ``info["time_scale"]``."""
    from torch.nn.attention.flex_attention import create_block_mask

    flex = flex_attention_fn(True)
    H, L = keep.shape[1], keep.shape[-1]
    info = {}  # what a method's setup wants reported

    def dense():
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)

    def sdpa_mask():
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)

    def flex_full():
        return lambda q, k, v: flex(q, k, v, scale=scale, kernel_options=kernel_options)

    def flex_mask():
        # compiled, as PyTorch advises (what create_block_mask(_compile=True) does, deprecated since torch 2.6):
        # eager, it evaluates the mask_mod over all L x L pairs at once
        bm = torch.compile(create_block_mask)(mask_mod, 1, H, L, L, device=device, BLOCK_SIZE=bs)
        return lambda q, k, v: flex(q, k, v, block_mask=bm, scale=scale, kernel_options=kernel_options)

    def block():
        layout = TileMask.from_mask(keep, bs, pad_tiles_to_pow2=True)
        bm = layout.flex_block_masks()
        info["mask_table_mib"] = layout.mask_table_nbytes() / 2**20
        return lambda q, k, v: block_sparse_attention(q, k, v, layout, block_mask=bm, scale=scale,
                                                      kernel_options=kernel_options)

    def triton_on(mask, split=True, backward="two-pass"):
        from ..backends.triton_kernel import TileLists, block_sparse_attention_triton

        lists = TileLists.from_layout(TileMask.from_mask(mask, bs), split=split)
        return lists, lambda q, k, v: block_sparse_attention_triton(q, k, v, lists, scale=scale, backward=backward)

    def triton():
        lists, fn = triton_on(keep)
        info["mask_table_mib"] = 0.0
        info["tile_lists_mib"] = lists.nbytes() / 2**20
        return fn

    def triton_full():
        return triton_on(torch.ones(1, 1, L, L, dtype=torch.bool, device=device))[1]

    def triton_fused():
        return triton_on(keep, backward="fused")[1]

    def triton_whole():
        return triton_on(keep, split=False, backward="two-pass")[1]

    def dense_packed():
        sequences, length, time_scale = packed_shape(tiles, like.shape[0], like.shape[1], bs)
        g = torch.Generator(device=device).manual_seed(1)
        shape = (sequences, like.shape[1], length, like.shape[-1])
        q, k, v = (torch.randn(shape, device=device, dtype=like.dtype, generator=g).requires_grad_()
                   for _ in range(3))
        info.update(inputs=(q, k, v, torch.randn(shape, device=device, dtype=like.dtype, generator=g)),
                    time_scale=time_scale, packed=f"{sequences} x {length} tokens")
        return dense()

    def backend():
        """What sparsify(model, plan, backend="block") runs for this layout (its own choice, default thresholds):
        the layout as a stored per-head mask, the call as a model makes it."""
        from ..backends.base import AttentionCall
        from ..backends.block import BlockSparseBackend
        from ..layout import TokenLayout
        from ..patterns import static_mask
        from ..plans.plan import Plan

        be = BlockSparseBackend()
        lp = Plan.everywhere(static_mask(keep[0], key="bench")).resolve(1, H)[0]
        # once, as a model's forward makes it for all its layers: the time is the attention call's alone
        lay = TokenLayout.from_lengths([L] * like.shape[0], device=device)
        lay.unpadded = True

        def run(q, k, v):
            call = AttentionCall(query=q, key=k, value=v, layer_plan=lp, layout=lay, model_mask=None, scale=scale,
                                 dropout_p=0.0, cache={})
            before = dict(be.stats)
            out = be.attention(call)[0]
            ran = [n for n in ("block", "dense", "reference") if be.stats[n] > before.get(n, 0)]
            info["chose"] = {"block": "triton", "dense": "dense", "reference": "sdpa_mask"}[ran[0]]
            return out

        return run

    return {"dense": dense, "sdpa_mask": sdpa_mask, "flex_full": flex_full, "flex_mask": flex_mask, "block": block,
            "triton_full": triton_full, "triton": triton, "triton_fused": triton_fused,
            "triton_whole": triton_whole, "dense_packed": dense_packed, "backend": backend}, info


def run_config(layout_name, L, sparsity, head_dim, *, heads=12, tokens=32768, block_size=128, methods=METHODS,
               device="cuda", dtype=torch.bfloat16, fwd_only=False, kernel_options=None) -> list[Result]:
    bs = block_size
    if L % bs:
        raise ValueError(f"length {L} must be a multiple of the block size {bs}")
    B = max(1, tokens // L)
    keep, mask_mod, desc = make_layout(layout_name, L, sparsity, bs, heads, device)
    tiles = keep.view(1, keep.shape[1], L // bs, bs, L // bs, bs).any(5).any(3)
    density = tiles.sum().item() / tiles.numel()
    pair_sparsity = 1 - _count(keep) / keep.numel()
    scale = head_dim ** -0.5
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, heads, L, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    grad = torch.randn(B, heads, L, head_dim, device=device, dtype=dtype, generator=g)
    flops_fwd = 4 * B * heads * L * L * head_dim
    results = []
    setups, info = _methods(keep, mask_mod, bs, scale, device, kernel_options, tiles=tiles, like=q)
    for name in methods:
        r = Result(layout_name, L, B, heads, head_dim, sparsity, density, pair_sparsity, desc, name)
        try:
            torch.cuda.synchronize()
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            fn = setups[name]()
            t1.record()
            t1.synchronize()
            r.build_ms = t0.elapsed_time(t1) if name in SPARSE else None
            inputs = info.pop("inputs", (q, k, v, grad))  # dense_packed brings its own
            time_scale = info.pop("time_scale", 1.0)
            r.extra.update(info)
            info.clear()
            a, b, c, dout = inputs
            with torch.no_grad():
                fn(a, b, c)  # compile outside the timed and measured region
            r.fwd_ms = time_ms(lambda: fn(a, b, c)) * time_scale
            with torch.no_grad():
                r.fwd_peak_mib = peak_mib(lambda: fn(a, b, c))
            if not fwd_only:
                def step():
                    out = fn(a, b, c)
                    torch.autograd.grad(out, (a, b, c), dout)
                r.fwdbwd_ms = time_ms(step) * time_scale
                r.fwdbwd_peak_mib = peak_mib(step)
            if "chose" in info:
                r.extra["chose"] = info.pop("chose")
            if name == "triton":
                from ..backends.triton_kernel import tuned_configs

                r.extra["tuned_configs"] = tuned_configs()
        except torch.OutOfMemoryError:
            r.note = "out of memory"
        except Exception as e:  # a method that cannot run this config is reported, not fatal
            r.note = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        finally:
            fn = inputs = a = b = c = dout = None
            torch.cuda.empty_cache()
        results.append(r)
    add_ratios(results, density, flops_fwd)
    return results  # the inputs and masks go with this frame; the next config's empty_cache returns them


def add_ratios(results: list[Result], density: float, flops_fwd: float) -> None:
    """Fill in one config's speed-ups over dense, fractions of the ideal and effective TFLOP/s."""
    dense = next((r for r in results if r.method == "dense"), None)
    for r in results:
        if r.fwd_ms:
            kept_flops = flops_fwd * (density if r.method in SPARSE else 1.0)
            r.tflops_fwd = kept_flops / r.fwd_ms / 1e9
        if dense is not None and dense.fwd_ms and r.fwd_ms:
            r.speedup_fwd = dense.fwd_ms / r.fwd_ms
            r.frac_ideal_fwd = r.speedup_fwd * density
        if dense is not None and dense.fwdbwd_ms and r.fwdbwd_ms:
            r.speedup_fwdbwd = dense.fwdbwd_ms / r.fwdbwd_ms
            r.frac_ideal_fwdbwd = r.speedup_fwdbwd * density
    for kernel, dense_name in (("block", "flex_full"), ("triton", "triton_full")):
        full = next((r for r in results if r.method == dense_name and not r.note), None)
        r = next((r for r in results if r.method == kernel), None)
        if r is not None and full is not None:
            if r.fwd_ms and full.fwd_ms:
                r.frac_kernel_ideal_fwd = full.fwd_ms * density / r.fwd_ms
            if r.fwdbwd_ms and full.fwdbwd_ms:
                r.frac_kernel_ideal_fwdbwd = full.fwdbwd_ms * density / r.fwdbwd_ms


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def format_table(results: list[Result]) -> str:
    """One line per config: density, ideal speed-up, each method's speed-up fwd / fwd+bwd over dense; for each
    block kernel (``block``: FlexAttention, ``triton``: sparseattn's own) its fraction of the ideal; peak
    fwd+bwd memory of dense and of the block kernels."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r.layout, r.length, r.target_sparsity, r.head_dim), {})[r.method] = r
    methods = [m for m in METHODS if any(m in g for g in groups.values())]
    kernels = [m for m in ("block", "triton") if m in methods]
    ideal_fracs = [*kernels, *(["dense_packed"] if "dense_packed" in methods else [])]
    ceiling = [m for m in kernels if "dense_packed" in methods]  # kernels compared with the packed ceiling
    head = (f"{'layout':<8} {'L':>6} {'B':>3} {'D':>4} {'spars':>5} {'dens':>5} {'ideal':>5} {'dense ms':>8} "
            + " ".join(f"{m + ' f/fb':>13}" for m in methods if m != "dense")
            + "".join(f" {m + '/ideal f/fb':>17}" for m in ideal_fracs)
            + "".join(f" {m + '/packed f/fb':>18}" for m in ceiling)
            + f" {'mem MiB ' + '/'.join(['dense', *kernels]):>26}"
            + (f" {'backend chose':<13} {'of best f+b':>11}" if "backend" in methods else ""))
    lines = [head, "-" * len(head)]

    def x(v):
        return f"{v:5.2f}" if v is not None else "  -  "

    for (lay, L, s, D), g in groups.items():
        any_r = next(iter(g.values()))
        d = g.get("dense")
        cells = []
        for m in methods:
            if m == "dense":
                continue
            r = g.get(m)
            cells.append(f"{x(r.speedup_fwd if r else None)}/{x(r.speedup_fwdbwd if r else None)}".rjust(13)
                         if r and not r.note else f"{(r.note[:13] if r else '-'):>13}")
        fracs = ""
        for m in ideal_fracs:
            b = g.get(m)
            fracs += f" {(f'{x(b.frac_ideal_fwd)}/{x(b.frac_ideal_fwdbwd)}' if b and not b.note else '-'):>17}"
        p = g.get("dense_packed")
        for m in ceiling:
            b = g.get(m)
            ok = b and p and not b.note and not p.note
            fracs += f" {(f'{x(_ratio(p.fwd_ms, b.fwd_ms))}/{x(_ratio(p.fwdbwd_ms, b.fwdbwd_ms))}' if ok else '-'):>18}"
        mem = "/".join(f"{(g[m].fwdbwd_peak_mib or 0) if m in g else 0:.0f}" for m in ["dense", *kernels])
        chose = ""
        if "backend" in methods:  # the backend's pick against the fastest exact method of this cell
            b = g.get("backend")
            exact = [r.fwdbwd_ms for m, r in g.items() if m in EXACT and r.fwdbwd_ms and not r.note]
            share = _ratio(min(exact), b.fwdbwd_ms) if b and b.fwdbwd_ms and exact else None
            chose = f" {(b.extra.get('chose', '-') if b else '-'):<13} {x(share):>11}"
        lines.append(f"{lay:<8} {L:>6} {any_r.batch:>3} {D:>4} {s:>5.0%} {any_r.block_density:>5.1%} "
                     f"{1 / max(any_r.block_density, 1e-9):>5.1f} {(d.fwd_ms if d and d.fwd_ms else float('nan')):>8.2f} "
                     + " ".join(cells) + fracs + f" {mem:>26}" + chose)
    return "\n".join(lines)


def results_to_json(results: list[Result], meta: dict) -> dict:
    return {"meta": meta, "results": [asdict(r) for r in results]}


def device_meta() -> dict:
    import datetime
    import platform

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        meta.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            pass
    return meta

