"""How many PyTorch operators one eager training step of `bench model`'s encoder dispatches, dense against sparse
(CPU, no GPU needed).

    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/count_step_operators.py --length 1024

An eager step launches its operators one by one from the host; where the GPU finishes them faster than the host
issues them, the step takes the host's time, whatever the attention. The fourteenth round (docs/benchmarks.md)
timed the sparse encoder step at 27.3 ms eagerly and 13.7 ms as CUDA graphs (`reduce-overhead`) on an H100: the
same kernels, so the eager step is host-bound. This counts the operators each step dispatches (the encoder of
`bench model`, hidden 384, 6 layers, 12 heads, bf16 autocast without its cache, fused AdamW, as there) with the
Triton kernels' launches replaced by allocating their outputs: what is counted is the host's work around them,
which the interpreter's own operators would otherwise swamp. The kernel launches themselves (one forward, two or
three backward per layer) come on top.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count(attention: str, length: int) -> collections.Counter:
    from sparseattn.backends import triton_kernel
    from sparseattn.backends.block import BlockSparseBackend
    from sparseattn.bench.model import encoder, sparse_plan
    from sparseattn.integrations.hf import sparsify

    triton_kernel.forward_pass = lambda q, k, v, lists, scale, segments=None: (
        torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32))
    triton_kernel.backward_pass = lambda do, q, k, v, o, lse, lists, scale, mode="two-pass", segments=None: (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    torch.manual_seed(0)
    model = encoder(length)  # dense attention as bench model runs it (sa.use_dense_sdpa)
    if attention == "sparse":
        sparsify(model, sparse_plan(length, causal=False), backend=BlockSparseBackend(force=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(3, model.config.vocab_size, (1, length))
    labels = torch.tensor([1])

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()  # layouts built, the optimizer's state made
    with Count() as c:
        step()
    return c.ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    for attention in ("dense", "sparse"):
        ops = count(attention, args.length)
        print(f"{attention}: {sum(ops.values())} operators per eager training step at {args.length} tokens")
        for name, n in ops.most_common(args.top):
            print(f"  {n:5d} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
