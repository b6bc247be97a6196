"""How many PyTorch operators one eager training step of `bench model`'s encoder dispatches, dense against sparse
(CPU, no GPU needed); with --decode, one eager decoding step of `bench generate`'s Llama with a dynamic cache, and
the bytes each operator touches.

    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/count_step_operators.py --length 1024
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/count_step_operators.py --decode --length 4096 --batch 4

An eager step launches its operators one by one from the host; where the GPU finishes them faster than the host
issues them, the step takes the host's time, whatever the attention. The fourteenth round (docs/benchmarks.md)
timed the sparse encoder step at 27.3 ms eagerly and 13.7 ms as CUDA graphs (`reduce-overhead`) on an H100: the
same kernels, so the eager step is host-bound. This counts the operators each step dispatches (the encoder of
`bench model`, hidden 384, 6 layers, 12 heads, bf16 autocast without its cache, fused AdamW, as there) with the
Triton kernels' launches replaced by allocating their outputs: what is counted is the host's work around them,
which the interpreter's own operators would otherwise swamp. The kernel launches themselves (one forward, two or
three backward per layer) come on top.

The decoding step (--decode) is counted for the sparse step's excess over dense: 42 ms against 21 at 32k, batch 16
(fourteenth round), with a tenth of the cache to read. Operators that read the device back (``.item()``, boolean
indexing) or touch as many bytes as the cache would show here; the decode kernel is replaced by allocating its
output, so its own reads are not counted.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(y) for y in x)
    return 0


class Count(TorchDispatchMode):
    """Operators dispatched, and the bytes of their tensor inputs and outputs (views count as if read)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[str(func)] += 1
        self.bytes[str(func)] += _bytes(args) + _bytes(list((kwargs or {}).values())) + _bytes(out)
        return out


def count_decode(attention: str, length: int, batch: int) -> tuple[Count, int]:
    """One eager decoding step of bench generate's tiny Llama after a prefill of ``length`` tokens, with a dynamic
    cache (dense SDPA, or the 90%-sparse plan on the block backend with the decode kernel stubbed); and one
    layer's cache in bytes."""
    from transformers import DynamicCache

    from sparseattn.backends import decode_kernel
    from sparseattn.backends.block import BlockSparseBackend
    from sparseattn.bench.generate import MODELS, _cache_kwarg, build_model, plan_for
    from sparseattn.integrations.hf import sparsify

    decode_kernel._decode = lambda q, k, v, keep, tiles, count, scale: torch.empty_like(q)
    torch.manual_seed(0)
    model = build_model("tiny", length + 64, attention, torch.device("cpu"), torch.float32)
    if attention == "sparse":
        sparsify(model, plan_for(length, 0.9), backend=BlockSparseBackend(force=True))
    cfg = MODELS["tiny"]
    ids = torch.randint(3, cfg["vocab_size"], (batch, length))
    kw = dict(use_cache=True, logits_to_keep=1, **_cache_kwarg(model, DynamicCache()))
    with torch.no_grad():
        nxt = model(input_ids=ids, **kw).logits[:, -1].argmax(-1, keepdim=True)
        nxt = model(input_ids=nxt, **kw).logits[:, -1].argmax(-1, keepdim=True)  # the decode path's first step
        with Count() as c:
            model(input_ids=nxt, **kw)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return c, 2 * batch * cfg["num_key_value_heads"] * length * head_dim * 4


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
    ap.add_argument("--decode", action="store_true", help="a decoding step of bench generate's tiny Llama instead")
    ap.add_argument("--batch", type=int, default=4, help="--decode's batch")
    args = ap.parse_args(argv)
    if args.decode:
        dense, layer_cache = count_decode("dense", args.length, args.batch)
        sparse, _ = count_decode("sparse", args.length, args.batch)
        for name, c in (("dense", dense), ("sparse", sparse)):
            print(f"{name}: {sum(c.ops.values())} operators, {sum(c.bytes.values()) / layer_cache:.2f} layers' caches "
                  f"of bytes touched per decoding step after {args.length} tokens (top: bytes in layers' caches, calls)")
            for op, b in c.bytes.most_common(args.top):
                print(f"  {b / layer_cache:7.2f} {c.ops[op]:4d} {op}")
        print("operators whose count differs (dense -> sparse):")
        for op in sorted(set(dense.ops) | set(sparse.ops)):
            if dense.ops[op] != sparse.ops[op]:
                print(f"  {dense.ops[op]:4d} -> {sparse.ops[op]:4d} {op}")
        return 0
    for attention in ("dense", "sparse"):
        ops = count(attention, args.length)
        print(f"{attention}: {sum(ops.values())} operators per eager training step at {args.length} tokens")
        for name, n in ops.most_common(args.top):
            print(f"  {n:5d} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
