"""FlashAttention-4's block-sparse kernels (CuTe DSL, Hopper path) on sparseattn's benchmark layouts.

    PYTHONPATH=src python benchmarks/flash_attn4_block_sparse.py [--lengths 8192,16384] [--head-dims 64,128]

Issue 6 asks for 0.8 of the ideal speed-up (1 / block density) for forward+backward at 8k tokens and longer.
sparseattn's Triton kernel computes a tile at about 0.75 of cuDNN's dense rate. FlashAttention-4
(``pip install flash-attn-4``, package ``flash_attn.cute``) has Hopper kernels in FlashAttention-3's design
(warpgroup MMA, TMA, producer and consumer warpgroups) that walk FlexAttention-style block lists. This script
asks how close *that* gets, on the same layouts, in one process, against named baselines:

- ``cudnn``:        dense SDPA without a mask (cuDNN on an H100 with torch 2.11): every speed-up is over this;
- ``fa4_dense``:    FlashAttention-4 without a mask: its dense rate against cuDNN's;
- ``cudnn_packed``, ``fa4_packed``: the dense kernel over the layout's kept tiles arranged as short sequences
  as long as the layout's mean row (``sparseattn.bench.attention.packed_shape``; time scaled to the exact tile
  count): what each kernel reaches on the same work with nothing lost to walking lists (the ceiling);
- ``triton``:       sparseattn's own block-sparse Triton kernel (the block backend's default on a GPU);
- ``fa4_sparse``:   FlashAttention-4 over the layout: full tiles in its ``full`` lists, partial tiles in its
  ``mask`` lists with a CuTe ``mask_mod`` reading the layout's (H, L, L) keep-mask: exact;
- ``fa4_unmasked``: the same lists with every kept tile computed whole, no ``mask_mod``: exact only where every
  kept tile is full (the BigBird layout); elsewhere it times the walk alone, what partial tiles cost.

Layouts: ``sparseattn bench attention``'s sliding window, BigBird with random blocks, and the AP-like
arbitrary per-head layout, at 90% target block sparsity, 128 x 128 tiles. Each sparse method's output and
q/k/v gradients are checked against fp32 SDPA with the mask it computes (batch element 0), max abs error
printed. Needs a Hopper GPU and flash-attn-4 (tried with 4.0.0b36 and nvidia-cutlass-dsl 4.8.1).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from sparseattn.backends.tile_mask import TileMask
from sparseattn.backends.triton_kernel import TileLists, block_sparse_attention_triton
from sparseattn.bench.attention import device_meta, make_layout, packed_shape, time_ms

try:
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils as fa_utils
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func
except ImportError:  # pragma: no cover
    sys.exit("needs flash-attn-4 (pip install flash-attn-4) and a CUDA GPU")

BS = 128


@cute.jit
def keep_table_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
    """mask_mod: the pair is kept where the (H, L, L) uint8 table says so."""
    table = aux_tensors[0]
    kept = fa_utils.scalar_to_ssa(cutlass.Int32(table[head[0], m_idx[0], n_idx[0]]), cutlass.Int32)
    return kept != fa_utils.scalar_to_ssa(0, cutlass.Int32)


def block_lists(tiles: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H, rows, cols) bool -> per-row counts (B, H, rows) and column indices (B, H, rows, cols), kept first."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts.expand(batch, -1, -1).contiguous(), order.expand(batch, -1, -1, -1).contiguous()


def fa4_block_sparse(full: torch.Tensor, partial: torch.Tensor, batch: int, *, transpose: bool = False):
    """FlashAttention-4's block lists: forward by query tile rows, backward (``transpose``) by key tile columns."""
    if transpose:
        full, partial = full.transpose(-1, -2), partial.transpose(-1, -2)
    mask_cnt, mask_idx = block_lists(partial, batch)
    full_cnt, full_idx = block_lists(full, batch)
    return BlockSparseTensorsTorch(mask_block_cnt=mask_cnt, mask_block_idx=mask_idx, full_block_cnt=full_cnt,
                                   full_block_idx=full_idx, block_size=(BS, BS))


def is_dense(method: str) -> bool:
    """A method that computes every tile (no fraction of the ideal applies)."""
    return method == "cudnn" or method.endswith("_dense")


def run(layout: str, L: int, D: int, heads: int, tokens: int) -> list[dict]:
    B = max(1, tokens // L)
    n = L // BS
    scale = D ** -0.5
    keep, _, desc = make_layout(layout, L, 0.9, BS, heads, "cuda")
    blocks = keep.view(1, keep.shape[1], n, BS, n, BS)
    any_kept = blocks.any(5).any(3).expand(1, heads, n, n)
    all_kept = blocks.all(5).all(3).expand(1, heads, n, n)
    density = any_kept.float().mean().item()
    g = torch.Generator(device="cuda").manual_seed(0)
    # (B, L, H, D) storage, FlashAttention's layout; the (B, H, L, D) views for SDPA and Triton are strided
    q, k, v = (torch.randn(B, L, heads, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(B, L, heads, D, device="cuda", dtype=torch.bfloat16, generator=g)
    bhld = lambda x: x.transpose(1, 2)  # noqa: E731

    def sdpa(a, b, c):
        return bhld(F.scaled_dot_product_attention(bhld(a), bhld(b), bhld(c), scale=scale))

    def fa4(**kw):
        return lambda a, b, c: flash_attn_func(a, b, c, softmax_scale=scale, **kw)[0]

    table = keep[0].expand(heads, L, L)
    table = (table if keep.shape[1] == heads else table.contiguous()).view(torch.uint8)
    unmasked_keep = any_kept.repeat_interleave(BS, 2).repeat_interleave(BS, 3)
    lists = TileLists.from_layout(TileMask.from_mask(keep, BS))
    methods = {  # name -> (fn on (B, L, H, D), the mask it computes or None for dense, packed or not)
        "cudnn": (sdpa, None, False),
        "fa4_dense": (fa4(), None, False),
        "cudnn_packed": (sdpa, None, True),
        "fa4_packed": (fa4(), None, True),
        "triton": (lambda a, b, c: bhld(block_sparse_attention_triton(bhld(a), bhld(b), bhld(c), lists, scale=scale)),
                   keep, False),
        "fa4_sparse": (fa4(mask_mod=keep_table_mask, aux_tensors=[table],
                           block_sparse_tensors=fa4_block_sparse(all_kept, any_kept & ~all_kept, B),
                           block_sparse_tensors_bwd=fa4_block_sparse(all_kept, any_kept & ~all_kept, B,
                                                                     transpose=True)), keep, False),
        "fa4_unmasked": (fa4(block_sparse_tensors=fa4_block_sparse(any_kept, torch.zeros_like(any_kept), B),
                             block_sparse_tensors_bwd=fa4_block_sparse(any_kept, torch.zeros_like(any_kept), B,
                                                                       transpose=True)), unmasked_keep, False),
    }
    rows = []
    for name, (fn, mask, packed) in methods.items():
        row = dict(layout=layout, length=L, batch=B, head_dim=D, block_density=density, method=name, desc=desc)
        a, b, c, d, time_scale = q, k, v, dout, 1.0
        if packed:
            sequences, length, time_scale = packed_shape(any_kept, B, heads, BS)
            a, b, c = (torch.randn(sequences, length, heads, D, device="cuda", dtype=torch.bfloat16,
                                   generator=g).requires_grad_() for _ in range(3))
            d = torch.randn_like(a)
            row["packed"] = f"{sequences} x {length}"
        try:
            if mask is not None:  # exactness against fp32 SDPA with the mask this method computes
                out = fn(a, b, c)
                grads = torch.autograd.grad(out, (a, b, c), d)
                ref_in = [bhld(x[:1].detach()).float().requires_grad_() for x in (a, b, c)]
                ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask, scale=scale)
                ref_grads = torch.autograd.grad(ref, ref_in, bhld(d[:1]).float())
                row["max_err"] = [(bhld(out[:1]).float() - ref).abs().max().item()] + [
                    (bhld(x[:1]).float() - r).abs().max().item() for x, r in zip(grads, ref_grads)]
                del out, grads, ref_in, ref, ref_grads
            row["fwd_ms"] = time_ms(lambda: fn(a, b, c)) * time_scale

            def step():
                torch.autograd.grad(fn(a, b, c), (a, b, c), d)

            row["fwdbwd_ms"] = time_ms(step) * time_scale
        except Exception as e:  # a method that cannot run is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        torch.cuda.empty_cache()
        rows.append(row)
    base = next(r for r in rows if r["method"] == "cudnn")
    for r in rows:
        for key in ("fwd_ms", "fwdbwd_ms"):
            if r.get(key) and base.get(key):
                r["speedup_" + key[:-3]] = base[key] / r[key]
                r["ideal_" + key[:-3]] = base[key] / r[key] * (1.0 if is_dense(r["method"]) else density)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'layout':<8} {'L':>6} {'D':>4} {'dens':>6} {'method':<13} {'fwd ms':>8} {'f+b ms':>8} "
            f"{'speed-up f/fb':>14} {'of ideal f/fb':>14}  max err o, dq, dk, dv")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['layout']:<8} {r['length']:>6} {r['head_dim']:>4} {r['block_density']:>6.1%} "
                         f"{r['method']:<13} {r['error']}")
            continue
        ideal = "" if is_dense(r["method"]) else f"{r['ideal_fwd']:.2f}/{r['ideal_fwdbwd']:.2f}"
        err = ", ".join(f"{e:.1e}" for e in r.get("max_err", []))
        lines.append(f"{r['layout']:<8} {r['length']:>6} {r['head_dim']:>4} {r['block_density']:>6.1%} "
                     f"{r['method']:<13} {r['fwd_ms']:>8.3f} {r['fwdbwd_ms']:>8.3f} "
                     f"{r['speedup_fwd']:>6.2f}/{r['speedup_fwdbwd']:<7.2f} {ideal:>14}  {err}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,16384")
    ap.add_argument("--head-dims", default="64")
    ap.add_argument("--layouts", default="sliding,bigbird,ap")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens a batch (B = tokens // length)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for D in (int(x) for x in args.head_dims.split(",")):
        for L in (int(x) for x in args.lengths.split(",")):
            for layout in args.layouts.split(","):
                new = run(layout, L, D, args.heads, args.tokens)
                print(format_rows(new).split("\n", 2)[-1] if rows else format_rows(new), flush=True)
                rows += new
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": device_meta(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
