"""What reading the partial tiles' masks costs the Triton kernel, against FlexAttention's analytic mask_mod (GPU).

    PYTHONPATH=src python benchmarks/partial_tile_cost.py [--lengths 16k] [--head-dims 64,128] [--layouts sliding,ap]

At 16k tokens, sliding window, D 128, sparseattn's kernel runs forward+backward at 0.93-0.96 of `flex_mask`'s speed
(FlexAttention with the window's mask_mod), while it is ahead at D 64 and on the other layouts (docs/benchmarks.md,
twenty-sixth and twenty-ninth rounds). Both walk the same tiles; where they differ is the partial tiles along the
window's edges: the kernel loads each one's mask from a table of distinct partial tiles (a byte a pair), FlexAttention
computes |q - kv| <= w in registers. This times, in one process per variant, the same layouts with:

- ``table``: the kernel as it is (``triton``), beside ``flex_mask``, ``triton_full`` and ``dense`` for scale;
- ``no-mask``: the kernel with ``tile_keep`` replaced by a constant (every pair of a partial tile kept, nothing
  loaded). Its outputs are wrong: it is the time the kernel would take if masking partial tiles were free, the
  bound on what an analytic mask (or any cheaper table) could gain.

A separate process for each variant, because Triton resolves ``tile_keep`` when it first compiles the kernels. The
no-mask variant runs first and the kernel before the other methods (``flex_mask`` compiles for minutes a cell), and each
row is printed as it is measured, so a run cut short by a time limit still answers the question asked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _check_variant(variant: str) -> None:
    """The kernel masks partial tiles as the variant says: exact with the table, wrong without a mask."""
    import torch
    import torch.nn.functional as F

    from sparseattn.backends.tile_mask import TileMask
    from sparseattn.backends.triton_kernel import TileLists, block_sparse_attention_triton

    L = 1024
    keep = torch.ones(L, L, dtype=torch.bool, device="cuda").tril(200).triu(-200)[None, None]
    q, k, v = (torch.randn(1, 2, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    err = (block_sparse_attention_triton(q, k, v, TileLists.from_layout(TileMask.from_mask(keep, 128)))
           - F.scaled_dot_product_attention(q, k, v, attn_mask=keep)).abs().max().item()
    if (err < 0.02) != (variant == "table"):
        raise SystemExit(f"variant {variant}: max difference {err} from the masked reference, not as the variant says")


def child(args) -> list[dict]:
    # Triton resolves a kernel's names in its module's globals, not the enclosing function's: tl is global here
    global tl
    import torch

    import triton
    import triton.language as tl

    from sparseattn.backends import triton_kernel

    if args.variant == "no-mask":
        @triton.jit
        def keep_all(TILES, tile, rows, cols, BS: tl.constexpr):
            return (rows + cols) >= 0

        triton_kernel.tile_keep = keep_all
    from sparseattn.bench.attention import run_config

    _check_variant(args.variant)

    methods = args.methods.split(",") if args.variant == "table" else ["triton"]
    for layout in args.layouts.split(","):
        for L in args.lengths:
            for D in args.head_dims:
                for method in methods:  # one method at a time, so that each row is out before the next compiles
                    for r in run_config(layout, L, 0.9, D, methods=(method,), block_size=args.block_size):
                        print(json.dumps({"variant": args.variant, "layout": layout, "L": L, "D": D,
                                          "method": r.method, "fwd_ms": r.fwd_ms, "fwdbwd_ms": r.fwdbwd_ms,
                                          "note": r.note, "desc": r.description}), flush=True)
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    from sparseattn.bench.commands import _ints

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=_ints, default=[16384], help="comma-separated (16384 or 16k)")
    ap.add_argument("--head-dims", type=_ints, default=[64, 128])
    ap.add_argument("--layouts", default="sliding,ap")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--methods", default="triton,triton_full,dense,flex_mask",
                    help="what the table variant times beside nothing else, in this order (default: %(default)s)")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # a child process's variant
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.variant is not None:
        child(args)
        return 0
    unknown = set(args.methods.split(",")) - {"dense", "flex_mask", "triton_full", "triton"}
    if unknown:
        ap.error(f"--methods {args.methods!r}: {sorted(unknown)} not among dense, flex_mask, triton_full, triton")
    rows = []
    for variant in ("no-mask", "table"):
        cmd = [sys.executable, __file__, "--variant", variant, "--lengths", ",".join(map(str, args.lengths)),
               "--head-dims", ",".join(map(str, args.head_dims)), "--layouts", args.layouts,
               "--block-size", str(args.block_size), "--methods", args.methods]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ) as proc:
            for line in proc.stdout:  # the child's rows as they are measured; its warnings go to stderr as they come
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    r = rows[-1]
                    print(f"{variant:8s} {r['layout']} L={r['L']} D={r['D']} {r['method']:12s} "
                          f"fwd {r['fwd_ms'] or float('nan'):.3f} ms  fwd+bwd {r['fwdbwd_ms'] or float('nan'):.3f} ms"
                          + (f"  ({r['note']})" if r["note"] else ""), flush=True)
                    if args.json:  # rewritten after every row: a run cut short keeps what it measured
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
        if proc.returncode:
            raise SystemExit(f"the {variant} process failed ({proc.returncode})")

    def get(variant, layout, L, D, method):
        return next((r for r in rows if (r["variant"], r["layout"], r["L"], r["D"], r["method"])
                     == (variant, layout, L, D, method)), None)

    print("| layout | L | D | pass | dense | flex_mask | triton_full | triton | triton, no mask | flex_mask / triton "
          "| no mask / triton |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted({(r["layout"], r["L"], r["D"]) for r in rows}):
        for field, name in (("fwd_ms", "fwd"), ("fwdbwd_ms", "fwd+bwd")):
            t = {m: (get("table", *key, m) or {}).get(field) for m in ("dense", "flex_mask", "triton_full", "triton")}
            free = (get("no-mask", *key, "triton") or {}).get(field)
            cells = [f"{v:.3f}" if v else "-" for v in (*t.values(), free)]

            def ratio(a, b):
                return f"{a / b:.3f}" if a and b else "-"

            print(f"| {key[0]} | {key[1]} | {key[2]} | {name} | " + " | ".join(cells)
                  + f" | {ratio(t['flex_mask'], t['triton'])} | {ratio(free, t['triton'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
