"""Where the host time of `bench model`'s encoder step goes, mode by mode (GPU).

    PYTHONPATH=src python benchmarks/profile_model_step.py --length 16k --modes eager,compile --batches unpadded

The tenth round (docs/benchmarks.md) measured the sparse step at 18.9 ms under `torch.compile(model)` against 13.0
under `mode="reduce-overhead"`, which replays the same kernels as CUDA graphs: the difference is host time the GPU
waits for. For each batch kind, attention (dense, sparse) and mode, this profiles a few steps after warm-up and
prints per step: wall time, GPU kernel time, kernel launches, host-device synchronizations (a synchronizing call or
a copy to the host, which stop the host from running ahead), the host operators with the most self time and the GPU
kernels with the most time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "cuStreamSynchronize", "cuCtxSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _length(text: str) -> int:
    """One length as ``bench``'s options take them (16384 or 16k), with their error for anything else."""
    from sparseattn.bench.commands import _ints

    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one length (16384 or 16k), got {text!r}")
    return values[0]


def profile_steps(run, steps: int) -> dict:
    """Profile ``steps`` calls of ``run`` (one step each): per-step figures and the top host operators."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA")
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    syncs = {e.key: e.count / steps for e in events if any(e.key.startswith(s) for s in SYNCS)}
    # a cudaMemcpyAsync above waits for the GPU only when it reads back (DtoH) or stages pageable memory (HtoD
    # Pageable); device-to-device ones (a clone, a contiguous copy) do not: the GPU's own records say which
    copies = {e.key: e.count / steps for e in events if e.key.startswith("Memcpy") and e.self_device_time_total > 0}
    host = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)[:15]
    gpu = sorted((e for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA"),
                 key=lambda e: -e.self_device_time_total)[:15]
    return {"wall_ms": wall, "gpu_kernel_ms": gpu_us / steps / 1e3, "launches": launches / steps, "syncs": syncs,
            "copies": copies, "top_host": [(e.key, e.count / steps, e.self_cpu_time_total / steps / 1e3) for e in host],
            "top_gpu": [(e.key, e.count / steps, e.self_device_time_total / steps / 1e3) for e in gpu]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=_length, default=16384)
    ap.add_argument("--modes", default="eager,compile", help="eager, compile, reduce-overhead")
    ap.add_argument("--batches", default="unpadded", help="bench model's batch kinds")
    ap.add_argument("--attention", default="dense,triton", help="dense and/or triton")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=128, help="the block backend's tile size")
    ap.add_argument("--backward", default="auto", help="the Triton kernel's backward pass: auto, two-pass or fused")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch._dynamo
    import transformers

    from sparseattn.backends.block import BlockSparseBackend
    from sparseattn.bench.model import _Bench
    from sparseattn.integrations.hf import sparsify

    transformers.logging.set_verbosity_error()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
    out = []
    for batch in args.batches.split(","):
        bench = _Bench.make("encoder", args.length, batch, tokens=args.length, decoder_layers=4,
                            block_size=args.block_size)
        for attention in args.attention.split(","):
            if attention != "dense":
                sparsify(bench.model, bench.plan, backend=BlockSparseBackend(args.block_size, kernel=attention,
                                                                             backward=args.backward))
            inputs = bench.inputs(attention)
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                fwd = bench.model if mode == "eager" else torch.compile(
                    bench.model, **({"mode": "reduce-overhead"} if mode == "reduce-overhead" else {}))
                run = bench.step(fwd, inputs, mark=mode == "reduce-overhead")
                for _ in range(3):
                    run()
                res = profile_steps(run, args.steps)
                res.update(batch=batch, attention=attention, mode=mode, length=args.length)
                out.append(res)
                print(f"\n{batch} {attention} {mode}: {res['wall_ms']:.1f} ms/step wall, {res['gpu_kernel_ms']:.1f} "
                      f"ms of GPU kernels, {res['launches']:.0f} launches, syncs per step {res['syncs'] or 'none'}, "
                      f"copies by direction {res['copies'] or 'none'}")
                for name, count, ms in res["top_host"]:
                    print(f"  {ms:8.2f} ms  x{count:<6.0f} {name[:90]}")
                print("  GPU kernels with the most time:")
                for name, count, ms in res["top_gpu"]:
                    print(f"  {ms:8.3f} ms  x{count:<6.0f} {name[:90]}")
                bench.zero_grad()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
