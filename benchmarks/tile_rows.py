"""Half-tile programs against whole-tile ones: the Triton kernel with the autotuner's candidates restricted to
programs that own a whole 128-row tile, then with the half-tile candidates (``rows`` 64) added, in one process,
against the packed ceiling (``dense_packed``) of the same cells.

    PYTHONPATH=src python benchmarks/tile_rows.py --head-dims 128 --lengths 16k,32k [--layouts sliding,bigbird,ap]
    PYTHONPATH=src python benchmarks/tile_rows.py --model -- --models encoder --lengths 16k --modes reduce-overhead

``--model`` runs ``sparseattn bench model`` with the arguments after ``--`` twice, one process each, one after the
other: with whole-tile candidates only, then with every candidate (the step of a model rather than one call).

At head size 128 most whole-tile programs at 4 warps spill registers (fp32 accumulators of 128 x 128 per pass,
``benchmarks/kernel_resources.py``), and the 8-warp ones lost to them all the same in the twenty-first round; the
half-tile programs at 4 warps spill little or nothing. Each pass autotunes afresh (its own candidates, the on-disk autotuning
cache off), so the second pass may still choose a whole-tile candidate. Prints, per cell, milliseconds forward /
forward+backward, the ratio of the two passes and each pass against ``dense_packed``, and the configurations chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["SPARSEATTN_TRITON_AUTOTUNE_CACHE"] = "0"  # each pass times its own candidates

import torch  # noqa: E402

from sparseattn.backends import triton_kernel as tk  # noqa: E402
from sparseattn.bench.attention import device_meta, run_config  # noqa: E402
from sparseattn.bench.commands import _ints  # noqa: E402


def one_pass(cell, candidates, methods):
    tk._TUNED.clear()
    saved = tk._CANDIDATES
    tk._CANDIDATES = candidates
    try:
        layout, L, D = cell
        return {r.method: r for r in run_config(layout, L, 0.9, D, methods=methods)}
    finally:
        tk._CANDIDATES = saved


def whole_tiles_only() -> dict:
    return {name: [c for c in cs if c[3] is None] for name, cs in tk._CANDIDATES.items()}


def model_steps(bench_args: list[str]) -> int:
    """``sparseattn bench model`` in two processes: whole-tile candidates only, then all of them."""
    import subprocess

    rc = 0
    for which in ("whole", "all"):
        print(f"== bench model, {which} candidates: {' '.join(bench_args)}", flush=True)
        rc |= subprocess.run([sys.executable, __file__, "--child", which, "--", *bench_args]).returncode
    return rc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="store_true", help="time bench model's steps instead (arguments after --)")
    ap.add_argument("--child", choices=("whole", "all"), help=argparse.SUPPRESS)
    ap.add_argument("--head-dims", default="128")
    ap.add_argument("--lengths", default="16k,32k")
    ap.add_argument("--layouts", default="sliding,bigbird,ap")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.child:
        from sparseattn.cli import main as cli

        if args.child == "whole":
            tk._CANDIDATES = whole_tiles_only()
        return cli(["bench", "model", *rest])
    if args.model:
        return model_steps(rest)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    whole = whole_tiles_only()
    rows = []
    print(f"{'layout':<8} {'L':>6} {'D':>4} {'whole f/fb ms':>15} {'half f/fb ms':>15} {'whole/half f/fb':>15} "
          f"{'packed f/fb ms':>15} {'whole/packed':>12} {'half/packed':>12}", flush=True)
    for D in (int(d) for d in args.head_dims.split(",")):
        for L in _ints(args.lengths):
            for layout in args.layouts.split(","):
                t0 = time.time()
                a = one_pass((layout, L, D), whole, ("dense_packed", "triton"))
                chosen_a = tk.tuned_configs()
                b = one_pass((layout, L, D), tk._CANDIDATES, ("triton",))
                chosen_b = tk.tuned_configs()
                p, w, h = a["dense_packed"], a["triton"], b["triton"]
                if w.note or h.note or p.note:
                    print(f"{layout:<8} {L:>6} {D:>4} {w.note or '-'} | {h.note or '-'} | {p.note or '-'}", flush=True)
                    continue
                row = {"layout": layout, "length": L, "head_dim": D, "block_density": w.block_density,
                       "whole_ms": [w.fwd_ms, w.fwdbwd_ms], "half_ms": [h.fwd_ms, h.fwdbwd_ms],
                       "packed_ms": [p.fwd_ms, p.fwdbwd_ms], "whole_configs": chosen_a, "half_configs": chosen_b,
                       "seconds": time.time() - t0}
                rows.append(row)
                f = lambda x, y: f"{x:6.3f}/{y:7.3f}"  # noqa: E731
                r = lambda x, y: f"{x[0] / y[0]:5.2f}/{x[1] / y[1]:5.2f}"  # noqa: E731
                print(f"{layout:<8} {L:>6} {D:>4} {f(*row['whole_ms']):>15} {f(*row['half_ms']):>15} "
                      f"{r(row['whole_ms'], row['half_ms']):>15} {f(*row['packed_ms']):>15} "
                      f"{r(row['packed_ms'], row['whole_ms']):>12} {r(row['packed_ms'], row['half_ms']):>12}",
                      flush=True)
                for name, chosen in (("whole", chosen_a), ("half", chosen_b)):
                    for kernel, keys in chosen.items():
                        for cfg in keys.values():
                            print(f"    {name:<5} {kernel}: {cfg}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": device_meta(), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
