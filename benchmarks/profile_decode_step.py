"""Where a decoding step's time goes, dense against sparse, with transformers' dynamic cache (GPU); with --prefill,
where the prefill's goes.

    PYTHONPATH=src python benchmarks/profile_decode_step.py --length 32k --batch 16
    PYTHONPATH=src python benchmarks/profile_decode_step.py --length 32k --batch 16 --prefill --methods dense,sparse

The fourteenth round (docs/benchmarks.md) measured, on the 1B shape at 32k and batch 16, 754 tokens/s for dense
SDPA kept off cuDNN and 381 for the sparse plan, whose decode kernel reads a tenth of the cache: a step of 42 ms
where reading the tenth and the dynamic cache's concatenation (a copy of the whole cache each step, which dense
pays too) come to about 11. The fifteenth round profiled dense: 12.2 of its 20.3 ms of GPU time per step are that
concatenation. For each method this profiles a few steps after warm-up and prints per step: wall
time, GPU kernel time, kernel launches, host-device synchronizations, the GPU kernels and the host operators with
the most time. A wall time far above the GPU time is host-bound; a GPU time far above the estimate is a slow kernel.

The sparse prefill at 32k, batch 16 took 3.0 s against dense's 5.1 (1.69x; issue 25 asks 1.8x). A fit of the dense
prefill's times at two lengths with the same token count (docs/benchmarks.md, seventeenth round) puts the work
outside attention at 2.7 s on either path and dense attention at 2.4 s (`benchmarks/prefill_ceiling.py`): the sparse
attention takes about a third of a second, near the dense kernel's rate over the plan's 12% of the tiles, and 1.8x
would lie above any exact kernel.
--prefill profiles whole prefill calls (after one untimed call: compilation, autotuning, the layout) the same way:
its attention kernels' times against the other kernels' check that fit.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
from profile_model_step import _length, profile_steps


def top_kernels(run, steps: int, n: int = 12) -> list[tuple[str, float, float]]:
    """(kernel, calls per step, ms per step) of the GPU kernels with the most time over ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    return [(e.key[:80], e.count / steps, e.self_device_time_total / steps / 1e3) for e in events[:n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b", help="bench generate's model shapes: 1b, 135m, tiny")
    ap.add_argument("--length", type=_length, default=32768)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--methods", default="dense-flash,sparse", help="dense, dense-flash, sparse")
    ap.add_argument("--steps", type=int, default=5, help="profiled calls (decoding steps, or prefills)")
    ap.add_argument("--prefill", action="store_true", help="profile the prefill (one forward of the whole prompt)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_step profiles CUDA kernels: it needs a GPU")
    from transformers import DynamicCache

    from sparseattn.backends.block import BlockSparseBackend
    from sparseattn.bench.generate import MODELS, _cache_kwarg, build_model, plan_for, sdpa_backends
    from sparseattn.integrations.hf import sparsify

    device, out = torch.device("cuda"), {}
    for method in args.methods.split(","):
        model = build_model(args.model, args.length + 64, method, device, torch.bfloat16)
        if method == "sparse":
            sparsify(model, plan_for(args.length, 0.9), backend=BlockSparseBackend())
        ids = torch.randint(3, MODELS[args.model]["vocab_size"], (args.batch, args.length), device=device)
        with torch.no_grad(), sdpa_backends(method):
            if args.prefill:
                kw = nxt = cache = None

                def step(model=model, ids=ids):  # a fresh cache each call, as each generate() call makes
                    model(input_ids=ids, use_cache=True, logits_to_keep=1, **_cache_kwarg(model, DynamicCache()))

                step()  # compilation, autotuning, the layout: what the first call at a length pays
            else:
                cache = DynamicCache()
                kw = dict(use_cache=True, logits_to_keep=1, **_cache_kwarg(model, cache))
                nxt = [model(input_ids=ids, **kw).logits[:, -1].argmax(-1, keepdim=True)]

                def step(model=model, kw=kw, nxt=nxt):
                    nxt[0] = model(input_ids=nxt[0], **kw).logits[:, -1].argmax(-1, keepdim=True)

                for _ in range(3):  # the decode kernel's compilation, the allocator's warm-up
                    step()
            prof = profile_steps(step, args.steps)
            prof["top_kernels"] = top_kernels(step, args.steps)
        out[method] = prof
        what = "prefill" if args.prefill else "step"
        print(f"\n{method}: {prof['wall_ms']:.2f} ms/{what} wall, {prof['gpu_kernel_ms']:.2f} ms GPU kernels, "
              f"{prof['launches']:.0f} launches, syncs per {what} {prof['syncs']}, copies by "
              f"direction {prof['copies'] or 'none'}")
        print(f"  GPU kernels (calls/{what}, ms/{what}):")
        for name, calls, ms in prof["top_kernels"]:
            print(f"    {ms:8.3f} {calls:6.1f}  {name}")
        print(f"  host operators (calls/{what}, self ms/{what}):")
        for name, calls, ms in prof["top_host"]:
            print(f"    {ms:8.3f} {calls:6.1f}  {name}")
        # everything that holds the cache (the step's defaults too) goes before the next method's prefill: the
        # fourteenth round's cache of 17 GiB outlived its method and the next one ran out of memory on an H100
        del model, cache, kw, step, nxt, ids
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
