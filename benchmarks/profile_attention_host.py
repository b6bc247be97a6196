"""Where the host time of one eager sparse attention call goes, layer by layer of the call (GPU).

    PYTHONPATH=src python benchmarks/profile_attention_host.py --json out/profile_attention_host.json

The nineteenth round (docs/benchmarks.md) measured 256-356 us of host time per attention forward call in `bench
model`'s eager encoder step on an H200 (54 calls a step: most of the gap between the eager step, 24.6 ms, and the
same kernels as CUDA graphs, 13.3 ms), where the backend's own Python took 44 us on the CPU with the launch
replaced by nothing. This times, with the GPU's queue drained before each call so that no launch waits for room
in it, the host time of each layer of the call from the bottom up:

- ``empty``: allocating the output (the floor of any call);
- ``launch_compiled``: the forward kernel's compiled binary launched directly (Triton's ``CompiledKernel``), no
  argument binding, specialization or autotuner;
- ``launch_jit``: the kernel through Triton's JIT with a fixed configuration (binding and specialization of its
  arguments, cache lookup);
- ``launch_direct``: the same through sparseattn's launcher (``triton_launch.DirectLaunch``: its arguments
  specialized, then the compiled binary);
- ``forward_pass``: sparseattn's launch through the autotuner (its key and argument dictionary on top), the chosen
  configuration's binary launched directly (``triton_launch``); ``forward_pass_jit`` the same through Triton's JIT;
- ``kernel_call``: ``block_sparse_attention_triton`` without autograd (input checks, padding of the head, the
  operator's eager path);
- ``kernel_call_grad``: the same with inputs that need gradients (autograd's bookkeeping);
- ``backend_call``: ``BlockSparseBackend.attention`` as a model calls it (what `bench model` reports);
- ``backend_call_packed``, ``backward_packed``: the same on a padding-free row (two examples' tokens and padding,
  as `bench model`'s padding-free batch: the segmented kernels);
- ``backward``: one backward pass of the kernel (the delta, dK/dV and dQ kernels; timed from the backward call);
- ``backward_pass``: the same kernels launched directly (``triton_kernel.backward_pass``), without autograd's engine;
  ``backward_pass_jit`` through Triton's JIT;
- ``sdpa``: dense SDPA's forward, for scale.

Then a cProfile of ``backend_call``'s and ``backward_pass``'s calls, the functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch


def host_us(fn, calls: int) -> float:
    """Median host microseconds of ``fn`` over ``calls`` calls, the GPU's queue drained before each."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def profile_text(fn, calls: int) -> str:
    """cProfile of ``calls`` calls of ``fn``: the 25 functions with the most own time."""
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=32, help="32: bench model's encoder (MiniLM's shape)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--global-tokens", type=int, default=0,
                    help="add global_tokens(n) to the plan, as bench model's (its long lists split in the backward)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_attention_host.py times GPU launches: it needs a CUDA GPU")

    from sparseattn.backends import BlockSparseBackend, triton_kernel
    from sparseattn.backends.base import AttentionCall
    from sparseattn.backends.tile_mask import TileMask
    from sparseattn.backends.triton_kernel import TileLists, block_sparse_attention_triton
    from sparseattn.layout import TokenLayout
    from sparseattn.patterns import global_tokens, neighbour
    from sparseattn.plans.plan import Plan

    dev = torch.device("cuda")
    L, H, D = args.length, args.heads, args.head_dim
    pattern = neighbour(L // 20)
    plan = Plan.everywhere(pattern | global_tokens(args.global_tokens) if args.global_tokens else pattern)
    lp = plan.resolve(1, H)[0]
    lay = TokenLayout.from_lengths([L], device=dev)
    lay.unpadded = True
    keep = lp.mask(TokenLayout.from_lengths([L], device=dev))
    lists = TileLists.from_layout(TileMask.from_mask(keep, 128))
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    scale = D ** -0.5
    rows = {}

    rows["empty"] = host_us(lambda: torch.empty_like(q), args.calls)

    # the forward kernel with a fixed configuration, through the JIT and as its compiled binary
    os.environ["SPARSEATTN_TRITON_AUTOTUNE"] = "0"
    # forward_pass's own first launch, as it makes it (with the split forward's scratch where the lists split rows)
    kernel, grid, launch_args, consts, o, lse, _ = triton_kernel.forward_launch(q, k, v, lists, scale)
    grid = grid(consts)  # the compiled launcher needs a tuple
    jit = kernel.fn  # the JIT function behind sparseattn's launcher (triton_launch.DirectLaunch)
    compiled = jit[grid](*launch_args, **consts)
    rows["launch_jit"] = host_us(lambda: jit[grid](*launch_args, **consts), args.calls)
    rows["launch_direct"] = host_us(lambda: kernel[grid](*launch_args, **consts), args.calls)
    # the compiled binary's launcher takes every argument in order, compile-time constants too (it skips them)
    full = [*launch_args, *(consts[name] for name in jit.arg_names[len(launch_args):])]
    try:
        compiled[(*grid, 1)](*full)
        rows["launch_compiled"] = host_us(lambda: compiled[(*grid, 1)](*full), args.calls)
    except Exception as e:  # Triton's internals differ from 3.6's: say so, keep the other rows
        rows["launch_compiled"] = None
        print(f"launch_compiled: not timed ({type(e).__name__}: {e})")
    os.environ["SPARSEATTN_TRITON_AUTOTUNE"] = "1"

    rows["forward_pass"] = host_us(lambda: triton_kernel.forward_pass(q, k, v, lists, scale), args.calls)
    os.environ["SPARSEATTN_TRITON_DIRECT"] = "0"
    rows["forward_pass_jit"] = host_us(lambda: triton_kernel.forward_pass(q, k, v, lists, scale), args.calls)
    os.environ["SPARSEATTN_TRITON_DIRECT"] = "1"
    with torch.no_grad():
        rows["kernel_call"] = host_us(lambda: block_sparse_attention_triton(q, k, v, lists, scale=scale), args.calls)
    rows["kernel_call_grad"] = host_us(lambda: block_sparse_attention_triton(qg, kg, vg, lists, scale=scale),
                                       args.calls)

    be = BlockSparseBackend()
    # a padding-free row as `bench model` makes it: two examples' real tokens, then padding to the row's end
    cu = torch.tensor([0, L * 5 // 8, L * 31 // 32], device=dev, dtype=torch.int32)
    packed = TokenLayout.from_cu_seqlens(cu, 1, L)

    def backend_call(layout=lay):
        call = AttentionCall(query=qg, key=kg, value=vg, layer_plan=lp, layout=layout, model_mask=None, scale=scale,
                             dropout_p=0.0, cache={})
        return be.attention(call)[0]

    rows["backend_call"] = host_us(backend_call, args.calls)
    rows["backend_call_packed"] = host_us(lambda: backend_call(packed), args.calls)
    out = block_sparse_attention_triton(qg, kg, vg, lists, scale=scale)
    grad = torch.randn_like(out)
    for name, result in (("backward", out), ("backward_packed", backend_call(packed))):
        rows[name] = host_us(lambda: torch.autograd.grad(result, (qg, kg, vg), grad, retain_graph=True), args.calls)
    o, lse = triton_kernel.forward_pass(q, k, v, lists, scale)
    do = grad.detach()

    def backward_pass():
        triton_kernel.backward_pass(do, q, k, v, o, lse, lists, scale)

    rows["backward_pass"] = host_us(backward_pass, args.calls)
    os.environ["SPARSEATTN_TRITON_DIRECT"] = "0"
    rows["backward_pass_jit"] = host_us(backward_pass, args.calls)
    os.environ["SPARSEATTN_TRITON_DIRECT"] = "1"
    rows["sdpa"] = host_us(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.calls)
    text, text_bwd = profile_text(backend_call, args.calls), profile_text(backward_pass, args.calls)

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; L={L}, H={H}, D={D}, "
          f"{args.calls} calls each, host microseconds per call (median):")
    for name, us in rows.items():
        print(f"  {name:<18} {'-' if us is None else f'{us:8.1f}'}")
    print(f"\ncProfile of {args.calls} backend calls (own time):")
    print(text)
    print(f"\ncProfile of {args.calls} backward_pass calls (own time):")
    print(text_bwd)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": L, "heads": H,
                       "head_dim": D, "host_us": rows, "cprofile": text,
                       "cprofile_backward_pass": text_bwd}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
