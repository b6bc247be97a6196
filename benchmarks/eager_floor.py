"""How fast an eager or compiled training step of `bench model`'s encoder can be, whatever attention costs (GPU).

    PYTHONPATH=src python benchmarks/eager_floor.py --length 16k --batches unpadded,padding-free [--modes eager,compile,graph]

Issue 24 asks the eager encoder step at 16k for 2x the fastest dense step. The nineteenth round (docs/benchmarks.md)
measured it at 24.6 ms eagerly against 13.3 ms for the same kernels as CUDA graphs: the eager step is host-bound.
This bounds what any attention kernel can reach eagerly, in one process, on one batch kind at a time:

- ``dense``: dense SDPA (the model's own attention), eagerly and as one CUDA graph captured by hand;
- ``sparse``: ``sparsify(model, plan, backend=BlockSparseBackend())``, the same two ways;
- ``jit``: the sparse model with every kernel launched through Triton's JIT (``SPARSEATTN_TRITON_DIRECT=0``), as
  before ``triton_launch.DirectLaunch``: what launching the compiled binaries directly saves;
- ``launchless``: the sparse model with the kernels' launches taken out (``triton_kernel.forward_pass`` and
  ``backward_pass`` return uninitialized tensors): sparseattn's operators, their dispatch and Python, the graph split
  they make under torch.compile, without their GPU work or launches;
- ``free``: the same sparsified model whose backend returns the value tensor as the attention output, launching
  nothing: the model's own host and GPU work around attention, with attention's cost taken out entirely (under
  torch.compile the query and key projections, then unused, are compiled away: a floor, below what any attention
  keeps).

The ``free`` step's eager time is the floor of an eager step with any attention: a kernel that cost nothing on the
host and the GPU would still take it. Its ratio to the fastest dense step is the largest eager speed-up any
attention could give on this machine; its graph time is the GPU time of the model's work outside attention. With
``compile`` in ``--modes``, each variant also runs as ``torch.compile(model)`` (as `bench model`'s compile mode): the
``free`` row's compiled time is the same floor for a compiled step, Inductor's and the optimizer's host work
included.

Each cell also has the host's time to issue one step from an idle GPU (``host ms``, median of a few steps each
waited for; above the queued step time only where the step itself waits for the GPU), the synchronizing calls torch
reports in one step (``torch.cuda.set_sync_debug_mode``) and the caching allocator's cudaMalloc and cudaFree calls in
it (a cudaFree waits for the device, and the debug mode does not see it): a step that is host-bound takes its host
time, a step that waits for the GPU inside takes more than the larger of its host and GPU times.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
from profile_attention_host import host_us  # this folder is the script's first import path


VARIANTS = ("dense", "sparse", "jit", "launchless", "free")
_ALLOCATOR = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def _host_and_syncs(step, n: int = 5) -> tuple[float, int, dict]:
    """(median ms the host takes to issue ``step`` from an idle GPU, synchronizing calls torch reports in one step,
    the caching allocator's cudaMalloc and cudaFree calls, retries and stream synchronizations in that step). The
    allocator's counts are here because its waits are not calls the sync debug mode sees: a cache that cannot serve a
    request frees its blocks, and cudaFree waits for the whole device."""
    ms = host_us(step, n) / 1e3
    before = torch.cuda.memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in {str(w.message) for w in syncs}:
        print(f"  sync: {w}")
    return ms, len(syncs), {k: after.get(k, 0) - before.get(k, 0) for k in _ALLOCATOR}


def _launchless(triton_kernel):
    """Replace the kernels' two passes by allocations of their outputs; returns the function that restores them."""
    fwd, bwd = triton_kernel.forward_pass, triton_kernel.backward_pass

    def forward_pass(q, k, v, lists, scale, segments=None):  # the operators' fakes: their outputs' layouts
        return triton_kernel._fake_attention(q)

    def backward_pass(do, q, k, v, o, lse, lists, scale, mode="two-pass", segments=None):
        return triton_kernel._fake_grads(q, k, v)

    triton_kernel.forward_pass, triton_kernel.backward_pass = forward_pass, backward_pass

    def restore():
        triton_kernel.forward_pass, triton_kernel.backward_pass = fwd, bwd
    return restore


def main(argv=None) -> int:
    from sparseattn.backends import triton_kernel
    from sparseattn.backends.block import BlockSparseBackend
    from sparseattn.bench import model as bench_model
    from sparseattn.bench.commands import _ints
    from sparseattn.bench.model import _Bench, _time_mode
    from sparseattn.integrations.hf import sparsify

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=_ints, default=[16384], help="one length (16384 or 16k)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per batch (rows = tokens // length)")
    ap.add_argument("--batches", default="unpadded", help="bench model's batch kinds, comma-separated")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="eager,graph", help="eager, compile (torch.compile(model)), graph (captured by "
                    "hand); the fastest dense step is taken over all of them")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="dense and any of the others, comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    bad = sorted(set(modes) - {"eager", "compile", "graph"})
    if bad:
        raise SystemExit(f"--modes: unknown mode(s) {', '.join(bad)}; expected eager, compile, graph")
    if not torch.cuda.is_available():
        raise SystemExit("eager_floor.py times CUDA steps; no GPU is visible")
    length = args.length[0]
    rows = []
    host = {}  # what the step bench model times last took on the host, and its syncs
    time_steps = bench_model._time_steps

    def timed(step, *a, **kw):  # bench model's timing, then the same step's host time and syncs
        t = time_steps(step, *a, **kw)
        host["ms"], host["syncs"], host["allocator"] = _host_and_syncs(step)
        return t
    bench_model._time_steps = timed
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if "dense" not in variants or len(variants) != len(args.variants.split(",")):
        raise SystemExit(f"--variants {args.variants}: expected dense and any of {', '.join(VARIANTS[1:])}")
    for batch_kind in args.batches.split(","):
        bench = _Bench.make("encoder", length, batch_kind, tokens=args.tokens, decoder_layers=4)
        tokens_per_s = {}
        backend = None
        restore = None
        for variant in variants:
            if variant != "dense" and backend is None:
                backend = BlockSparseBackend()
                sparsify(bench.model, bench.plan, backend=backend)
            os.environ["SPARSEATTN_TRITON_DIRECT"] = "0" if variant == "jit" else "1"
            if variant == "launchless":
                restore = _launchless(triton_kernel)
            elif variant == "free":
                if restore is not None:
                    restore()
                # attention's output is its value tensor: no launch, no host work beyond the model's own call
                backend.attention = lambda call: (call.value, None)
            ms, extra = {}, {}
            for mode in modes:  # as `bench model` times them
                res = bench.result("dense" if variant == "dense" else "triton", mode, False)
                _time_mode(bench, res, backend if variant in ("sparse", "jit") else None, warmup=args.warmup,
                           steps=args.steps, log=print)
                if res.step_ms is None:
                    raise SystemExit(f"{batch_kind} {variant} {mode}: {res.note}")
                ms[mode], tokens_per_s[variant, mode] = res.step_ms, res.tokens_per_s
                extra[f"{mode}_host_ms"], extra[f"{mode}_syncs"] = host.pop("ms"), host.pop("syncs")
                extra[f"{mode}_allocator"] = host.pop("allocator")
            alloc = {m: extra[f"{m}_allocator"] for m in modes}
            print(f"{batch_kind:<13} {variant:<10} " + "   ".join(
                f"{m} {ms[m]:7.2f} ms (host {extra[m + '_host_ms']:6.2f}, syncs {extra[m + '_syncs']}, cudaMalloc "
                f"{alloc[m]['num_device_alloc']}, cudaFree {alloc[m]['num_device_free']}, allocator syncs "
                f"{alloc[m]['num_sync_all_streams']})" for m in modes), flush=True)
            rows.append({"batch": batch_kind, "variant": variant, **{f"{m}_ms": ms[m] for m in modes}, **extra})
        best_dense = max(tokens_per_s["dense", mode] for mode in modes)  # real tokens/s
        for r in rows[-len(variants):]:
            for m in modes:
                r[f"{m}_over_fastest_dense"] = tokens_per_s[r["variant"], m] / best_dense
        del bench, backend
    print(f"\n{'batch':<13} {'variant':<10} " + " ".join(f"{m + ' ms':>12} {'host ms':>8}" for m in modes) + " "
          + " ".join(f"{m + ' x fastest dense':>24}" for m in modes))
    for r in rows:
        print(f"{r['batch']:<13} {r['variant']:<10} "
              + " ".join(f"{r[m + '_ms']:12.2f} {r[m + '_host_ms']:8.2f}" for m in modes) + " "
              + " ".join(f"{r[m + '_over_fastest_dense']:23.2f}x" for m in modes))
    print("free: attention replaced by its value tensor (no work); its row bounds every attention kernel in each mode. "
          "launchless: sparseattn's operators without their kernels. jit: the kernels launched through Triton's JIT. "
          "host ms: one step issued from an idle GPU. "
          "Fastest dense: the fastest dense step of the modes run, same batch kind, real tokens/s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": length,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
