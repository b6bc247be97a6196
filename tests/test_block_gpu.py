"""The block backend on a CUDA GPU against the reference backend.

Every case compares the output and the gradients of query, key and value with the reference computed in
fp32, and accepts an error of at most twice that of the same math done by PyTorch at the kernel's
precision (the reference's explicit softmax path in bf16 minus the fp32 reference), as flash-attention's
tests do. Only real (non-padding) queries count: the block backend gives padding queries no keys.
"""

import functools

import pytest
import torch

from sparseattn import Plan
from sparseattn.backends import BlockSparseBackend, ReferenceBackend
from sparseattn.backends.base import AttentionCall
from sparseattn.backends.block import DENSE_TILES_LENGTH
from sparseattn.layout import TokenLayout
from sparseattn.patterns import static_mask

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"


def _per_head_table(heads: int, n: int, seed: int) -> torch.Tensor:
    """An arbitrary per-head keep-table (AP-like): random tiles of random density per head, some rows left
    with nothing (the pattern keeps their diagonal only)."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(heads, 1, 1, generator=g) * 0.3
    table = torch.rand(heads, n, n, generator=g) < density
    table[:, 5:40] = False  # empty-but-diagonal rows
    table[0, :, :3] = True  # a dense column band in head 0
    return table


CASES = [
    # name, plan spec (or a callable of heads -> Plan), lengths, causal, heads, kv heads, head dim
    ("one token", "all: neighbour(4)", [1], False, 4, 4, 64),
    ("17 tokens", "all: neighbour(2) | global_tokens(1)", [17], False, 4, 4, 64),
    ("200 with padding", "all: bigbird(1, 3, 2)", [200, 117, 1], False, 4, 4, 64),
    ("1000 random blocks", "all: neighbour(64) | random_blocks(2, block=128) | global_tokens(2)", [1000], False,
     4, 4, 64),
    ("1100 per-head arbitrary", lambda h: Plan.everywhere(static_mask(_per_head_table(h, 1300, 0), key="ap")),
     [1100, 903], False, 4, 4, 64),
    ("empty-but-diagonal rows", "heads=0,2@all: neighbour(0)", [300, 257], False, 4, 4, 64),
    ("causal with grouped-query heads", "all: neighbour(100) | global_tokens(4)", [777, 640], True, 8, 2, 64),
    ("head dim 128", "all: neighbour(50) | random_blocks(1, block=128)", [1500], False, 4, 4, 128),
    ("head dim 32 (MiniLM)", "all: neighbour(30) | global_tokens(1)", [513, 400], False, 4, 4, 32),
]


def _inputs(lengths, causal, heads, kv_heads, dim, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    layout = TokenLayout.from_lengths(lengths, causal=causal, device=DEVICE)
    B, L = layout.batch_size, layout.length
    q = torch.randn(B, heads, L, dim, generator=g, device=DEVICE)
    k, v = (torch.randn(B, kv_heads, L, dim, generator=g, device=DEVICE) for _ in range(2))
    grad = torch.randn(B, heads, L, dim, generator=g, device=DEVICE) * layout.real[:, None, :, None]
    return layout, q, k, v, grad


def _run(backend, lp, layout, q, k, v, grad, dtype, need_weights=False):
    """Output and (dq, dk, dv) of one backend, computed at ``dtype``, returned in fp32."""
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    call = AttentionCall(qd, kd, vd, lp, layout, layout.allowed(), q.shape[-1] ** -0.5, 0.0, {},
                         need_weights=need_weights)
    out, _ = backend.attention(call)
    grads = torch.autograd.grad(out, (qd, kd, vd), grad.to(dtype))
    return [out.float()] + [g.float() for g in grads]


def _half_tile_programs(monkeypatch):
    """The fixed launch configurations with each program owning 64 rows of a tile (query rows: forward, dQ; key rows:
    dK/dV), whatever the autotuner would choose."""
    from sparseattn.backends import triton_kernel

    monkeypatch.setenv("SPARSEATTN_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(triton_kernel, "_FIXED", {name: (*c[:3], 64) for name, c in triton_kernel._FIXED.items()})


@pytest.mark.parametrize("name,spec,lengths,causal,heads,kv_heads,dim", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", [*BlockSparseBackend.KERNELS, "triton-split", "triton-fused", "triton-fused-split",
                                    "triton-rows64-split", "triton-rows64-fused", "triton-split-fwd",
                                    "triton-rows64-split-fwd", "triton-tile64-fwd", "triton-tile64-split-fwd"])
def test_outputs_and_gradients_match_reference(name, spec, lengths, causal, heads, kv_heads, dim, dtype, kernel,
                                               monkeypatch):
    """triton: the two-pass backward (dQ from a pass over the rows); -fused: dQ added atomically by the dK/dV
    pass; -split: the backward walks every list in one-tile chunks that add atomically; -fwd: the forward walks
    the rows in the same chunks, merging their partial softmax; -rows64: each program owns 64 rows of a 128-row tile
    (the autotuner's half-tile candidates); -tile64: layout tiles of 64 (``BlockSparseBackend(64)``, the faster tile at
    head size 32 in docs/benchmarks.md's twenty-third to twenty-sixth rounds)."""
    tile = {"block_size": 64} if "tile64" in kernel else {}  # the others keep the backend's default tile
    if kernel.startswith("triton-"):
        from sparseattn.backends import triton_kernel

        if "rows64" in kernel:
            _half_tile_programs(monkeypatch)
        monkeypatch.setenv("SPARSEATTN_TRITON_SPLIT_FORWARD", "1" if kernel.endswith("-fwd") else "0")
        if "split" in kernel:
            monkeypatch.setattr(triton_kernel, "SPLIT_MIN", 1)
            monkeypatch.setattr(triton_kernel, "SPLIT_FACTOR", 0)
        if "fused" in kernel:
            monkeypatch.setattr(triton_kernel, "block_sparse_attention_triton",
                                functools.partial(triton_kernel.block_sparse_attention_triton, backward="fused"))
        kernel = "triton"
    plan = spec(heads) if callable(spec) else Plan.parse(spec)
    lp = plan.resolve(1, heads)[0]
    layout, q, k, v, grad = _inputs(lengths, causal, heads, kv_heads, dim, seed=len(name))
    backend = BlockSparseBackend(**tile, force=True, kernel=kernel)
    got = _run(backend, lp, layout, q, k, v, grad, dtype)
    assert backend.stats["block"] == 1
    ref32 = _run(ReferenceBackend(), lp, layout, q, k, v, grad, torch.float32)
    torch_lp = _run(ReferenceBackend(), lp, layout, q, k, v, grad, dtype, need_weights=True)  # explicit math
    real_q = layout.real[:, None, :, None]
    for what, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref32, torch_lp):
        if what in ("out", "dq"):  # rows of padding queries are not compared
            a, r, p = a * real_q, r * real_q, p * real_q
        assert torch.isfinite(a).all(), f"{name}: {what} has non-finite values"
        err = (a - r).abs().max().item()
        base = (p - r).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{name} {dtype} {kernel}: {what} error {err:.3g} > 2 x PyTorch's {base:.3g}"


@pytest.mark.parametrize("mode", ["split by heads", "packed bits"])
def test_mask_tables_beyond_32_bit_indexing(mode, monkeypatch):
    """Large per-head tables, made large by lowering the limit: split into groups of whole key/value head
    groups (bool tables), or, where one group does not fit, read as packed bits; outputs and gradients as
    the other cases."""
    import sparseattn.backends.tile_mask as bl_mod

    heads, kv_heads, lengths = 8, 2, [1100, 903]
    lp = Plan.everywhere(static_mask(_per_head_table(heads, 1300, 1), key="ap")).resolve(1, heads)[0]
    layout, q, k, v, grad = _inputs(lengths, False, heads, kv_heads, 64, seed=3)
    per_head = 2 * 1152 * 1152  # examples x padded length^2 (a per-example table: padding differs)
    monkeypatch.setattr(bl_mod, "MAX_TABLE_ELEMENTS", 4 * per_head if mode == "split by heads" else per_head)
    backend = BlockSparseBackend(force=True, kernel="flex")  # FlexAttention's tables (the Triton kernel has none)
    got = _run(backend, lp, layout, q, k, v, grad, torch.bfloat16)
    (entry,) = backend._layouts.values()
    groups = [(a, b) for a, b, _ in entry.block_mask]
    names = {m.mask_mod.__name__ for _, _, m in entry.block_mask}
    if mode == "split by heads":
        assert groups == [(0, 4), (4, 8)] and names == {"mask_table_mask"}
    else:
        assert groups == [(0, 8)] and names == {"bit_table_mask"}
    ref32 = _run(ReferenceBackend(), lp, layout, q, k, v, grad, torch.float32)
    torch_lp = _run(ReferenceBackend(), lp, layout, q, k, v, grad, torch.bfloat16, need_weights=True)
    real_q = layout.real[:, None, :, None]
    for what, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref32, torch_lp):
        if what in ("out", "dq"):
            a, r, p = a * real_q, r * real_q, p * real_q
        err, base = (a - r).abs().max().item(), (p - r).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{mode}: {what} error {err:.3g} > 2 x PyTorch's {base:.3g}"


@pytest.mark.parametrize("kernel", BlockSparseBackend.KERNELS)
def test_static_plan_builds_once_and_does_not_recompile(kernel):
    import torch._dynamo.utils as dyn

    lp = Plan.parse("all: neighbour(64) | random_blocks(1, block=128)").resolve(1, 4)[0]
    backend = BlockSparseBackend(force=True, kernel=kernel)
    frames = []
    for seed in range(4):  # new data, same lengths: the cached layout and the compiled kernel serve
        layout, q, k, v, grad = _inputs([1500, 1200], False, 4, 4, 64, seed)
        _run(backend, lp, layout, q, k, v, grad, torch.bfloat16)
        frames.append(dyn.counters["stats"]["unique_graphs"])
    assert backend.stats["layout_builds"] == 1 and backend.stats["cache_hits"] == 3
    assert frames[-1] == frames[0], f"recompiled: unique graphs went {frames}"


def test_position_masks_match_reference_and_share_one_kernel_per_bucket():
    """Unpadded batches of a positional plan: partial tiles evaluate positions (no table); lengths within one
    bucket (1536) reuse one compiled kernel although each length gets its own layout."""
    import torch._dynamo.utils as dyn

    lp = Plan.parse("all: neighbour(100) | global_tokens(2)").resolve(1, 8)[0]
    backend = BlockSparseBackend(force=True, kernel="flex")  # position mask_mods are FlexAttention's
    frames = []
    for n in (1500, 1450, 1411):
        layout, q, k, v, grad = _inputs([n, n], True, 8, 2, 64, n)  # causal, grouped-query heads
        got = _run(backend, lp, layout, q, k, v, grad, torch.bfloat16)
        ref32 = _run(ReferenceBackend(), lp, layout, q, k, v, grad, torch.float32)
        torch_lp = _run(ReferenceBackend(), lp, layout, q, k, v, grad, torch.bfloat16, need_weights=True)
        for what, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref32, torch_lp):
            err, base = (a - r).abs().max().item(), (p - r).abs().max().item()
            assert err <= 2 * base + 1e-5, f"{n}: {what} error {err:.3g} > 2 x PyTorch's {base:.3g}"
        frames.append(dyn.counters["stats"]["unique_graphs"])
    assert backend.stats["analytic_masks"] == 3 and backend.stats["layout_builds"] == 3
    assert all(m.mask_mod.__name__ == "position_mask" for e in backend._layouts.values() for _, _, m in e.block_mask)
    assert frames[-1] == frames[0], f"recompiled per length: unique graphs went {frames}"


def test_automatic_choice_on_gpu():
    lp = Plan.parse("all: neighbour(16)").resolve(1, 4)[0]
    backend = BlockSparseBackend()  # defaults: min_length, max_density
    short = _inputs([256, 200], False, 4, 4, 64, 0)
    _run(backend, lp, *short, torch.bfloat16)
    assert backend.stats["reference"] == 1 and backend.stats["block"] == 0
    long = _inputs([backend.min_length + 100], False, 4, 4, 64, 0)
    _run(backend, lp, *long, torch.bfloat16)
    assert backend.stats["block"] == 1
    wide = Plan.parse("all: neighbour(4000)").resolve(1, 4)[0]  # nearly every tile kept
    _run(backend, wide, *long, torch.bfloat16)
    assert backend.stats["reference"] == 2
    if backend.kernel == "triton":  # from DENSE_TILES_LENGTH tokens it beats SDPA with a mask at any density
        longer = _inputs([DENSE_TILES_LENGTH], False, 4, 4, 64, 0)
        _run(backend, wide, *longer, torch.bfloat16)
        assert backend.stats["block"] == 2 and backend.stats["reference"] == 2


@pytest.mark.parametrize("kernel", BlockSparseBackend.KERNELS)
def test_tiny_bert_sparsified_with_block_matches_reference(kernel):
    transformers = pytest.importorskip("transformers")
    from sparseattn import sparsify

    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=200, max_position_embeddings=1024, attention_probs_dropout_prob=0.0,
                                  hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).to(DEVICE)
    ids = torch.randint(5, 200, (2, 700), device=DEVICE)
    mask = torch.ones(2, 700, dtype=torch.long, device=DEVICE)
    mask[1, 450:] = 0
    plan = "layers=1: neighbour(20) | random_blocks(1, block=128) | global_tokens(1)"
    results = {}
    for name, backend in (("block", BlockSparseBackend(force=True, kernel=kernel)), ("reference", "reference")):
        sparsify(model, plan, backend=backend)
        model.zero_grad()
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask[..., None].float()
        loss = ((h * real) ** 2).sum() / real.sum()  # padding positions do not count
        loss.backward()
        results[name] = (h * real, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (hb, gb), (hr, gr) = results["block"], results["reference"]
    torch.testing.assert_close(hb, hr, atol=2e-4, rtol=1e-3)
    for n in gr:
        torch.testing.assert_close(gb[n], gr[n], atol=1e-4, rtol=2e-3, msg=lambda m: f"{n}: {m}")


def _tiny_bert(layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=200, max_position_embeddings=2048,
                                  attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).to(DEVICE)


def test_training_step_captured_as_a_cuda_graph_matches_eager():
    """An unpadded batch without an attention mask, and a padded one: after one eager step builds the layouts,
    forward and backward capture as one CUDA graph; replayed (on new ids) it gives the eager step's outputs and
    gradients."""
    from sparseattn import sparsify

    model = _tiny_bert()
    backend = BlockSparseBackend(force=True, kernel="triton")
    sparsify(model, "all: neighbour(20) | global_tokens(1)", backend=backend)
    ids = torch.randint(5, 200, (2, 1100), device=DEVICE)

    def step(**kw):
        h = model(input_ids=ids, **kw).last_hidden_state
        (h.float() ** 2).mean().backward()
        return h

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # layouts are built here, eagerly
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_static = step()
    builds = backend.stats["layout_builds"]
    ids.copy_(torch.randint(5, 200, (2, 1100), device=DEVICE))
    graph.replay()
    got = h_static.clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want = step(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert got[1].keys() == want[1].keys() and len(want[1]) > 10
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert backend.stats["layout_builds"] == builds == 1  # capture and replay built nothing

    # a padded batch captures too: its examples are segments made on the GPU, nothing is read back
    mask = torch.ones_like(ids)
    mask[1, 900:] = 0
    model.zero_grad(set_to_none=True)
    step(attention_mask=mask)  # eagerly first, as any new shape
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_static = step(attention_mask=mask)
    graph.replay()
    got = h_static[mask.bool()].clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want = step(attention_mask=mask)[mask.bool()], {n: p.grad for n, p in model.named_parameters()
                                                    if p.grad is not None}
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert backend.stats["layout_builds"] == 1  # one layout (the bucket's) serves padded and unpadded batches


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("batch", ["unpadded", "padded", "packed"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compiled_model_runs_the_operator_in_one_graph(arch, batch, mode, monkeypatch):
    """torch.compile(model, fullgraph=True) over a sparsified model (mode="reduce-overhead": CUDA graphs recorded
    by torch.compile): the Triton kernel runs as the operator inside the graph, for unpadded, padded and packed
    batches, and the compiled step's outputs and gradients equal the eager step's."""
    import torch._dynamo

    from sparseattn import sparsify
    from sparseattn.backends import triton_kernel
    from conftest import tiny_llama

    calls = []
    forward_pass = triton_kernel.forward_pass

    def record(*a):
        # the segments' token counts, read while nothing is being captured (CUDA graphs reuse the tensor's memory)
        seg = a[-1]
        capturing = torch.cuda.is_current_stream_capturing()
        calls.append("captured" if capturing else None if seg is None else sorted(seg[:, 2].tolist()))
        return forward_pass(*a)

    monkeypatch.setattr(triton_kernel, "forward_pass", record)
    g = torch.Generator(DEVICE).manual_seed(0)
    ids = torch.randint(5, 100, (2, 1100), device=DEVICE, generator=g)
    kw = {}
    if batch == "padded":
        kw["attention_mask"] = (torch.arange(1100, device=DEVICE)[None] < torch.tensor([[1100], [777]],
                                                                                         device=DEVICE)).long()
    elif batch == "packed":
        docs = [300, 500, 300, 1100]
        kw["position_ids"] = torch.cat([torch.arange(n, device=DEVICE) for n in docs]).view(2, 1100)
        cu = torch.tensor([0, 300, 800, 1100, 2200], dtype=torch.int32, device=DEVICE)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=1100, max_length_k=1100)
    results = {}
    for compiled in (False, True):
        model = (_tiny_bert() if arch == "bert" else
                 tiny_llama(max_position_embeddings=1200, hidden_size=256, num_attention_heads=4).to(DEVICE))
        backend = BlockSparseBackend(force=True, kernel="triton")
        sparsify(model, "all: neighbour(20) | global_tokens(1)", backend=backend)
        torch._dynamo.reset()
        fwd = torch.compile(model, fullgraph=True, mode=None if mode == "default" else mode) if compiled else model
        for _ in range(2 if compiled else 1):  # reduce-overhead records its graphs on a later call
            model.zero_grad(set_to_none=True)
            if compiled and mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            out = fwd(input_ids=ids, **kw)
            h = out.last_hidden_state if arch == "bert" else out.logits
            real = h if batch != "padded" else h[kw["attention_mask"].bool()]
            (real.float() ** 2).mean().backward()
        results[compiled] = real.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}
    (he, ge), (hc, gc) = results[False], results[True]
    torch.testing.assert_close(hc, he, atol=1e-4, rtol=1e-4)
    # AOTAutograd gives parameters behind outputs the loss ignores (BERT's pooler) zero gradients, eager none
    assert ge.keys() <= gc.keys() and len(ge) > 10
    for n in gc.keys() - ge.keys():
        assert not gc[n].any(), f"{n}: a gradient only under torch.compile"
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")
    assert len(calls) >= 2 * 2  # both layers, eagerly and compiled: the kernel, not a fallback
    # 1100 tokens run as whole rows of the 1152-token bucket; padded and packed rows as their sequences
    want = {"unpadded": [1100, 1100], "padded": [777, 1100], "packed": [300, 300, 500, 1100]}[batch]
    assert all(c == want for c in calls if c != "captured"), calls


SEGMENT_CASES = [
    ("right-padded", 2, 3000, [(0, 0, 3000), (1, 0, 1711)]),
    ("left-padded, grouped-query heads", 2, 3000, [(0, 0, 3000), (1, 1289, 1711)]),
    ("packed", 2, 3000, [(0, 0, 600), (0, 600, 1777), (0, 2377, 623), (1, 0, 2999)]),
]


@pytest.mark.parametrize("name,B,L,segs", SEGMENT_CASES, ids=[c[0] for c in SEGMENT_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ["whole tiles", "rows64", "rows64-split-fwd"])
def test_kernel_segments_match_each_sequence_alone(name, B, L, segs, dtype, rows, monkeypatch):
    """The Triton kernel over padded and packed rows (segments) against the fp32 reference of each sequence alone,
    at most twice PyTorch's own error at the kernel's precision, outputs and every gradient; programs that own a
    whole tile or half of one; the forward walking the global tokens' long rows in chunks (split forward)."""
    from sparseattn.backends.tile_mask import TileMask
    from sparseattn.backends.triton_kernel import TileLists, block_sparse_attention_triton

    if rows.startswith("rows64"):
        _half_tile_programs(monkeypatch)
    monkeypatch.setenv("SPARSEATTN_TRITON_SPLIT_FORWARD", "1" if rows.endswith("split-fwd") else "0")
    H, Hk, D = 8, (2 if "grouped" in name else 8), 64
    lp = Plan.parse("all: neighbour(100) | global_tokens(2) | random(3)").resolve(1, H)[0]
    keep = lp.mask(TokenLayout.from_lengths([3072], causal=True, device=DEVICE))  # causal random: prefix-stable
    lists = TileLists.from_layout(TileMask.from_mask(keep, 128))
    g = torch.Generator(DEVICE).manual_seed(1)
    q = torch.randn(B, H, L, D, generator=g, device=DEVICE)
    k, v = (torch.randn(B, Hk, L, D, generator=g, device=DEVICE) for _ in range(2))
    grad = torch.randn(B, H, L, D, generator=g, device=DEVICE)
    seg = torch.tensor(segs, dtype=torch.int32, device=DEVICE)
    x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention_triton(*x, lists, segments=seg)
    got = [out, *torch.autograd.grad(out, x, grad.to(dtype))]
    for b, s, n in segs:
        sl = (slice(b, b + 1), slice(None), slice(s, s + n))
        parts = []
        for prec in (torch.float32, dtype):
            xs = [t[sl].to(prec).detach().requires_grad_() for t in (q, k, v)]
            kk, vv = (t.repeat_interleave(H // Hk, 1) for t in xs[1:])
            o = torch.nn.functional.scaled_dot_product_attention(xs[0], kk, vv, attn_mask=keep[:, :, :n, :n])
            parts.append([o, *torch.autograd.grad(o, xs, grad[sl].to(prec))])
        ref, torch_lp = parts
        for what, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref, torch_lp):
            a = a[sl].float()
            err, base = (a - r).abs().max().item(), (p.float() - r).abs().max().item()
            assert err <= 2 * base + 1e-5, f"{name} segment {(b, s, n)}: {what} error {err:.3g} > 2 x {base:.3g}"


@pytest.mark.parametrize("name,spec,lengths,causal,heads,kv_heads,dim", [CASES[6], CASES[8]],
                         ids=[CASES[6][0], CASES[8][0]])
def test_autotuned_launches_match_reference_before_and_after_the_choice(name, spec, lengths, causal, heads, kv_heads,
                                                                        dim, monkeypatch):
    """With the autotuner on (as users run it; the other GPU tests fix the configuration), the first call goes
    through Triton's autotuner and later ones launch its choice directly (triton_kernel._Chosen): both match the
    reference, outputs and gradients."""
    from sparseattn.backends import triton_kernel

    monkeypatch.setenv("SPARSEATTN_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("SPARSEATTN_TRITON_AUTOTUNE_CACHE", "0")
    monkeypatch.setattr(triton_kernel, "_TUNED", {})
    lp = Plan.parse(spec).resolve(1, heads)[0]
    layout, q, k, v, grad = _inputs(lengths, causal, heads, kv_heads, dim, seed=3)
    ref32 = _run(ReferenceBackend(), lp, layout, q, k, v, grad, torch.float32)
    torch_lp = _run(ReferenceBackend(), lp, layout, q, k, v, grad, torch.bfloat16, need_weights=True)
    real_q = layout.real[:, None, :, None]
    backend = BlockSparseBackend(force=True, kernel="triton")
    for call in ("tuning", "chosen"):
        got = _run(backend, lp, layout, q, k, v, grad, torch.bfloat16)
        for what, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref32, torch_lp):
            if what in ("out", "dq"):
                a, r, p = a * real_q, r * real_q, p * real_q
            err, base = (a - r).abs().max().item(), (p - r).abs().max().item()
            assert err <= 2 * base + 1e-5, f"{name} ({call}): {what} error {err:.3g} > 2 x PyTorch's {base:.3g}"
    chosen = [t for t in triton_kernel._TUNED.values() if isinstance(t, triton_kernel._Chosen)]
    assert len(chosen) == 3 and all(t._chosen for t in chosen)  # forward, dK/dV and dQ, each with its choice


def _split_everywhere(monkeypatch, length: int):
    """(lists, q, k, v, output gradient): a 300-token band with two global tokens over 2048 tokens in tiles of 128,
    every long list split into one-tile chunks (rows and columns alike); inputs of ``length`` tokens, 2 x 4 heads of
    64."""
    from sparseattn.backends import triton_kernel
    from sparseattn.backends.tile_mask import TileMask

    monkeypatch.setattr(triton_kernel, "SPLIT_MIN", 1)
    monkeypatch.setattr(triton_kernel, "SPLIT_FACTOR", 0)
    n = 2048
    keep = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril(300).triu(-300)
    keep[:, :2] = keep[:2, :] = True
    lists = triton_kernel.TileLists.from_layout(TileMask.from_mask(keep[None, None], 128))
    assert lists.split_rows and lists.split_cols
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, grad = (torch.randn(2, 4, length, 64, device=DEVICE, generator=g, dtype=torch.bfloat16) for _ in range(4))
    return lists, q, k, v, grad


@pytest.mark.parametrize("length", [2048, 2001], ids=["whole tiles", "segments"])
def test_kernels_launched_through_their_binaries_match_the_jit(length, monkeypatch):
    """Every kernel of a forward and backward with split lists (forward, merge, delta, dK/dV, dQ, scratch copy) takes
    its compiled binary's launcher after its first launch (triton_launch.DirectLaunch), and computes what Triton's JIT
    launches compute: the forward bit for bit, the gradients within the split lists' atomic reordering."""
    from sparseattn.backends import triton_kernel

    lists, q, k, v, grad = _split_everywhere(monkeypatch, length)  # the merge and scratch kernels run

    def run(direct: bool):
        monkeypatch.setenv("SPARSEATTN_TRITON_DIRECT", "1" if direct else "0")
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        out = triton_kernel.block_sparse_attention_triton(*qkv, lists)
        return (out, *torch.autograd.grad(out, qkv, grad))

    jit = run(False)
    names = ("_fwd_kernel", "_fwd_merge", "_delta_kernel", "_dkdv_kernel", "_dq_kernel", "_scratch_kernel")
    launchers = [triton_kernel._LAUNCHERS.get(getattr(triton_kernel, name)) for name in names]
    assert all(launchers), [name for name, launcher in zip(names, launchers) if launcher is None]
    before = [launcher.direct_launches for launcher in launchers]
    for _ in range(2):
        direct = run(True)
    assert not [name for name, launcher, b in zip(names, launchers, before) if launcher.direct_launches == b]
    assert torch.equal(direct[0], jit[0])
    for what, a, b in zip(("dq", "dk", "dv"), direct[1:], jit[1:]):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2), what


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_layer_on_the_second_gpu_runs_there_while_the_first_is_current(monkeypatch):
    """A model spread over GPUs (device_map="auto") calls a layer on cuda:1 with cuda:0 current: its kernels run on
    cuda:1 (triton_launch.on_device_of_first_input) and compute what they compute with cuda:1 current."""
    from sparseattn.backends import triton_kernel

    with torch.cuda.device(1):
        lists, q, k, v, grad = _split_everywhere(monkeypatch, 2001)  # every kernel, segments included

    def run():
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        out = triton_kernel.block_sparse_attention_triton(*qkv, lists)
        return (out, *torch.autograd.grad(out, qkv, grad))

    assert q.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    elsewhere = run()
    with torch.cuda.device(1):
        here = run()
    assert torch.equal(elsewhere[0], here[0])
    for what, a, b in zip(("dq", "dk", "dv"), elsewhere[1:], here[1:]):
        assert a.device == q.device and torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2), what


def test_deterministic_algorithms_give_bitwise_repeatable_gradients(monkeypatch):
    """Split lists (and the fused backward) add with atomics, in an order that varies; under
    torch.use_deterministic_algorithms(True) the kernel's gradients repeat bit for bit, and agree with the
    default ones within rounding."""
    from sparseattn.backends import triton_kernel

    lists, q, k, v, grad = _split_everywhere(monkeypatch, 2048)

    def grads():
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        out = triton_kernel.block_sparse_attention_triton(*qkv, lists)
        return torch.autograd.grad(out, qkv, grad)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(previous)
    default = grads()
    for what, a, b, f in zip(("dq", "dk", "dv"), first, second, default):
        assert torch.equal(a, b), f"{what} differs between two deterministic runs"
        assert torch.allclose(a.float(), f.float(), atol=2e-2, rtol=2e-2), what


@pytest.mark.parametrize("spec,causal,kv_heads", [("all: global_tokens('special') | neighbour(64)", False, 4),
                                                  ("all: global_tokens('special') | neighbour(32)", True, 2)])
def test_input_dependent_layouts_never_wait_for_the_gpu(spec, causal, kv_heads):
    """An input-dependent layer on the Triton kernel: its layout is made from the batch on the GPU and its lists
    built there (``device_tiles``, ``TileLists.from_codes``), forward and backward without one read back
    (torch.cuda.set_sync_debug_mode("error") turns any into an error); outputs and gradients as the reference's."""
    lp = Plan.parse(spec).resolve(1, 4)[0]
    layout, q, k, v, grad = _inputs([1500, 1211], causal, 4, kv_heads, 64, 7)
    layout = TokenLayout.from_lengths([1500, 1211], causal=causal, device=DEVICE, special_first=1, special_last=1)

    def run(backend, dtype):
        qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        call = AttentionCall(qd, kd, vd, lp, layout, None, 64 ** -0.5, 0.0, {})
        out, _ = backend.attention(call)
        grads = torch.autograd.grad(out, (qd, kd, vd), grad.to(dtype))
        return [out.float()] + [g.float() for g in grads]

    backend = BlockSparseBackend(force=True, kernel="triton")
    run(backend, torch.bfloat16)  # the kernels' first compilation and autotuning may read the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run(backend, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert backend.stats["layout_builds"] == 2 and backend.stats["block"] == 2
    ref32 = run(ReferenceBackend(), torch.float32)
    ref16 = run(ReferenceBackend(), torch.bfloat16)
    real_q = layout.real[:, None, :, None]
    for what, a, r, p in zip(("out", "dq", "dk", "dv"), got, ref32, ref16):
        if what in ("out", "dq"):  # rows of padding queries are not compared (the kernel gives them zeros)
            a, r, p = a * real_q, r * real_q, p * real_q
        err, base = (a - r).abs().max().item(), (p - r).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{what}: error {err:.3g} > 2 x PyTorch's {base:.3g}"


_AUTOTUNE_SCRIPT = """
import torch
from sparseattn import Plan
from sparseattn.backends.tile_mask import TileMask
from sparseattn.backends.triton_kernel import TileLists, block_sparse_attention_triton
from sparseattn.layout import TokenLayout
lp = Plan.parse("all: neighbour(100) | global_tokens(2)").resolve(1, 4)[0]
keep = lp.mask(TokenLayout.from_lengths([1024], causal=True, device="cuda"))
lists = TileLists.from_layout(TileMask.from_mask(keep, 128))
q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
block_sparse_attention_triton(q, k, v, lists)
torch.cuda.synchronize()
"""


@pytest.mark.parametrize("cached", [True, False])
def test_autotuned_timings_are_kept_for_the_next_process(tmp_path, cached):
    """A second process finds the first one's autotuning on disk and times nothing (generate()'s first prefill in
    a new process); SPARSEATTN_TRITON_AUTOTUNE_CACHE=0 times again."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "TRITON_PRINT_AUTOTUNING": "1",
           "SPARSEATTN_TRITON_AUTOTUNE": "1", "SPARSEATTN_TRITON_AUTOTUNE_CACHE": "1" if cached else "0"}
    timed = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _AUTOTUNE_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        timed.append("Triton autotuning for function" in run.stdout)
    assert timed == ([True, False] if cached else [True, True])
