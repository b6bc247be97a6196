"""Whether a `torch.compile(model)` step is slower once a `reduce-overhead` step has run in the same process (GPU).

    PYTHONPATH=src python benchmarks/compile_after_capture.py [--modes compile,reduce-overhead,compile]

The thirty-third round (docs/benchmarks.md) timed the compiled sparse 16k encoder step at 15.2 ms in a process that
captured nothing (`eager_floor.py`) and at 25.7 ms in `bench model`, where it ran after a `reduce-overhead` cell, on
the same machine within minutes; the JIT-launched kernels (`SPARSEATTN_TRITON_DIRECT=0`) had taken 24.9. This runs
`bench model`'s unpadded encoder cells one mode at a time in one process and prints, after each, how many kernel
launches took their compiled binaries (`triton_launch.DirectLaunch`): a count that stops growing in the compiled
cell after the capture would say the direct launches fell back to the JIT there.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    from sparseattn.backends import triton_kernel
    from sparseattn.bench.model import _result_line, run_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="compile,reduce-overhead,compile", help="run in this order, comma-separated")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    for mode in args.modes.split(","):
        for res in run_model("encoder", args.length, modes=(mode,), batches=("unpadded",), steps=args.steps,
                             log=lambda line: None):
            print(_result_line(res), flush=True)
        direct = sum(launcher.direct_launches for launcher in triton_kernel._LAUNCHERS.values())
        print(f"after {mode}: {direct} launches through compiled binaries so far", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
