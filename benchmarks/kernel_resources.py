"""The Triton kernel's compiled resources per autotuner candidate, for a Hopper GPU, on any machine (no GPU needed).

    PYTHONPATH=src python benchmarks/kernel_resources.py                 # every kernel, head sizes 32, 64, 128
    PYTHONPATH=src python benchmarks/kernel_resources.py --kernels fwd --head-dims 64 --varlen

Triton ships ptxas and cuobjdump, so each kernel compiles for sm_90 here as the JIT would launch it (pointers and
strides specialized as multiples of 16) and this prints, per candidate configuration of the autotuner
(``triton_kernel._CANDIDATES``: the rows of a tile a program owns, the sub-tile, warps, stages): registers per thread, the stack frame (spilled registers: a frame above 0 means
the configuration keeps more live values than 255 registers hold), shared memory, and the asynchronous copies in
the compiled TTGIR (the loop's loads that Triton pipelines; 0 means its loads wait for memory at every step, see
tests/test_kernel_pipelining.py). Which candidate is fastest is the autotuner's measurement on the GPU; this says
why some lose.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, whatever the caller's environment says

KERNELS = {"fwd": ("_fwd_kernel", "BLOCK_N", {"SPLIT": False}), "dq": ("_dq_kernel", "BLOCK_N", {"SPLIT": False}),
           "dkdv": ("_dkdv_kernel", "BLOCK_M", {"SPLIT": False, "FUSED": False})}
TENSORS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
FLOATS = {"LSE", "DELTA", "DQ_ACC", "SCR_K", "SCR_V", "SCR_Q", "SCR_O", "SCR_M", "SCR_L"}
INTS = {"SEG", "FCNT", "FIDX", "PCNT", "PIDX", "PTILE", "ORDER", "PROG", "CHUNK"}


def compile_for_hopper(fn, consts: dict, num_warps: int, num_stages: int):
    """``fn`` compiled for sm_90 with bf16 tensors, its pointers and strides specialized as multiples of 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for arg in fn.arg_names:
        sig[arg] = ("constexpr" if arg in consts else "*u8" if arg == "TILES" else "*fp32" if arg in FLOATS
                    else "*i32" if arg in INTS else "fp32" if arg in ("qk_scale", "sm_scale")
                    else "*bf16" if arg in TENSORS else "i32")
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
               if sig[arg].startswith("*") or re.fullmatch(r"s[a-z]{2,4}", arg)}
    src = ASTSource(fn=fn, signature=sig, attrs=aligned,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(compiled) -> dict:
    """Registers, stack frame and shared memory of a compiled kernel (cuobjdump), and its asynchronous copies."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2)), "shared_bytes": compiled.metadata.shared,
            "async_copies": compiled.asm["ttgir"].count("ttg.async_copy_global_to_local")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="fwd,dq,dkdv", help="fwd, dq, dkdv (default: all)")
    ap.add_argument("--head-dims", default="32,64,128")
    ap.add_argument("--block-size", type=int, default=128, help="the layout's tile (default 128)")
    ap.add_argument("--varlen", action="store_true", help="the kernels for padded and packed batches (segments)")
    ap.add_argument("--split", action="store_true",
                    help="the kernels for split lists (the forward: long rows in chunks, SPARSEATTN_TRITON_SPLIT_FORWARD)")
    ap.add_argument("--configs", choices=("candidates", "fixed"), default="candidates",
                    help="the autotuner's candidates, or the fixed configuration (SPARSEATTN_TRITON_AUTOTUNE=0)")
    ap.add_argument("--rows", type=int, default=None,
                    help="only the configurations whose programs own this many rows of a tile (capped at the tile)")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of a table")
    args = ap.parse_args(argv)

    from sparseattn.backends import triton_kernel

    rows = []
    for name in args.kernels.split(","):
        fn_name, sub, extra = KERNELS[name]
        fn = getattr(triton_kernel, fn_name)
        configs = triton_kernel._CANDIDATES[name] if args.configs == "candidates" else [triton_kernel._FIXED[name]]
        for d in (int(x) for x in args.head_dims.split(",")):
            for s, warps, stages, own in configs:
                own = triton_kernel._rows(own, args.block_size)
                if args.rows is not None and own != triton_kernel._rows(args.rows, args.block_size):
                    continue
                row = {"kernel": name, "head_dim": d, "sub": s, "warps": warps, "stages": stages, "rows": own}
                consts = {"HEAD_DIM": d, "BS": args.block_size, sub: min(s, args.block_size), "ROWS": own,
                          "PREC": None, "VARLEN": args.varlen, **extra, **({"SPLIT": True} if args.split else {})}
                try:
                    row.update(resources(compile_for_hopper(fn, consts, warps, stages)))
                except Exception as e:  # a candidate that does not compile (shared memory): say so, go on
                    row["error"] = str(e)[:200]
                rows.append(row)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'kernel':<6} {'D':>4} {'rows':>4} {'sub':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>8} "
          f"{'smem KiB':>9} {'async':>6}")
    for r in rows:
        head = f"{r['kernel']:<6} {r['head_dim']:>4} {r['rows']:>4} {r['sub']:>4} {r['warps']:>5} {r['stages']:>6}"
        if "error" in r:
            print(f"{head} does not compile: {r['error'][:60]}")
        else:
            print(f"{head} {r['registers']:>5} {r['stack_bytes']:>8} {r['shared_bytes'] / 1024:>9.1f} "
                  f"{r['async_copies']:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
