"""The host time Triton's autotuner adds to each launch of an autotuned kernel, against sparseattn's remembered
choice (``triton_kernel._Chosen``), on the CPU: the kernel's launch is replaced by nothing, so what is timed is the
Python around it (no GPU needed).

    PYTHONPATH=src python benchmarks/autotuner_overhead.py

The forward kernel's arguments are built as ``forward_pass`` builds them (34 positional ones) for an encoder layer
of 4k tokens, 12 heads, head size 32; the autotuner's cache holds a choice for their key, as after tuning.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def per_call_us(fn, calls: int) -> float:
    """The fastest of five rounds of ``calls`` calls, microseconds per call."""
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args(argv)

    import triton

    from sparseattn import Plan
    from sparseattn.backends import triton_kernel as tk
    from sparseattn.backends.tile_mask import TileMask
    from sparseattn.layout import TokenLayout

    os.environ["SPARSEATTN_TRITON_AUTOTUNE"] = "1"
    tk.interpreted = lambda: False  # the autotuned path, as on a GPU
    chosen, _ = tk._kernel("fwd", 128)
    tuner = chosen.tuner

    class NoLaunch:  # the JIT function with its launch replaced by nothing
        def __getitem__(self, grid):
            return lambda *a, **kw: None

        def run(self, *a, **kw):
            return None

    tuner.fn = chosen.fn = NoLaunch()
    L, H, D = 4096, 12, 32
    lp = Plan.parse("all: neighbour(200)").resolve(1, H)[0]
    lists = tk.TileLists.from_layout(TileMask.from_mask(lp.mask(TokenLayout.from_lengths([L])), 128))
    q = torch.zeros(1, H, L, D, dtype=torch.bfloat16)
    lse = torch.zeros(1, H, L)
    launch = (q, q, q, q, lse, q, *q.stride()[:3] * 4, *tk.list_args(lists, lists.row_full, lists.row_part), H, 1, L,
              tk.tune_length(lists.num_q_blocks), 0.1)
    consts = dict(HEAD_DIM=D, BS=128, PREC=None, VARLEN=False)
    grid = (H, lists.num_q_blocks)
    config = triton.Config({"BLOCK_N": 64, "ROWS": 128}, num_warps=4, num_stages=3)
    named = {**dict(zip(tuner.arg_names, launch)), **consts}  # the autotuner's key, as Autotuner.run makes it
    key = [named[k] for k in tuner.keys if k in named] + [str(a.dtype) for a in named.values() if hasattr(a, "dtype")]
    tuner.cache[tuple(key)] = config

    rows = {"Triton's Autotuner.run": per_call_us(lambda: tuner[grid](*launch, **consts), args.calls)}
    chosen[grid](*launch, **consts)  # its first call asks the autotuner
    rows["sparseattn's _Chosen.run"] = per_call_us(lambda: chosen[grid](*launch, **consts), args.calls)
    rows["the launch alone (nothing)"] = per_call_us(
        lambda: tuner.fn[grid](*launch, **consts, **config.all_kwargs()), args.calls)
    print(f"host microseconds per launch of the forward kernel ({len(launch)} positional arguments), launch "
          f"replaced by nothing, best of five rounds of {args.calls} calls:")
    for name, us in rows.items():
        print(f"  {name:<28} {us:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
