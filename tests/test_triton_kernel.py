"""sparseattn's Triton block-sparse kernel on the CPU, through Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py where there is no GPU): outputs and all gradients against an fp64 softmax over the kept keys, at
odd lengths, with padding, per-head and per-example layouts, grouped-query heads, empty rows, head sizes that
are not powers of two; the tile lists; and the block backend running it. The same kernel compiled for the
GPU is tested in test_block_gpu.py. (The interpreter has no bf16 arithmetic: 16-bit is tested as fp16 here
and as bf16 and fp16 on the GPU.)"""

import itertools

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from sparseattn import Plan  # noqa: E402
from sparseattn.backends import BlockSparseBackend, ReferenceBackend  # noqa: E402
from sparseattn.backends.base import AttentionCall  # noqa: E402
from sparseattn.backends.tile_mask import TileMask  # noqa: E402
from sparseattn.backends import triton_kernel  # noqa: E402
from sparseattn.backends.triton_kernel import TileLists, block_sparse_attention_triton, entries_below  # noqa: E402
from sparseattn.layout import TokenLayout  # noqa: E402

tl = triton.language

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no GPU; "
                                "test_block_gpu.py covers the compiled kernel")


def _reference(q, k, v, keep, scale):
    """fp64 softmax over the kept keys (rows with none: zero), repeated key/value heads for GQA."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return p @ v.double()


def _lists(keep, bs):
    L = keep.shape[-1]
    Lp = -(-L // bs) * bs
    return TileLists.from_layout(TileMask.from_mask(F.pad(keep, (0, Lp - L, 0, Lp - L)), bs))


def _keep(B, H, L, seed):
    """Per-example, per-head masks mixing the tile kinds: a random mask (partial tiles), a band (full and
    partial), a block of full tiles with rows that keep nothing."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, L, L, generator=g) < 0.3
    band = torch.ones(L, L, dtype=torch.bool).tril(L // 4).triu(-L // 4)
    if H > 1:
        keep[:, 1] = band
    if H > 2:
        keep[:, 2] = False
        keep[:, 2, : L // 2, : L // 2] = True
        keep[:, 2, L - 5:, 3] = True  # rows L/2 .. L-6 of head 2 keep nothing
    return keep


CASES = [
    # B, H, H_kv, L, D, block, layout examples, layout heads
    (2, 3, 3, 150, 16, 32, 2, 3),  # per example and head, odd length, empty rows
    (2, 4, 2, 70, 24, 32, 1, 4),  # grouped-query heads, head size 24 (padded to 32 for the kernel)
    (1, 2, 1, 64, 32, 64, 1, 1),  # one layout for every head, block 64, no padding
    (3, 2, 2, 97, 16, 32, 3, 1),  # per example, shared by the heads
]


@pytest.mark.parametrize("B,H,Hk,L,D,bs,Bl,Hl", CASES, ids=[f"B{c[0]}H{c[1]}kv{c[2]}L{c[3]}D{c[4]}bs{c[5]}" for c in CASES])
@pytest.mark.parametrize("dtype,rows", [(torch.float32, None), (torch.float16, None), (torch.float32, 16)],
                         ids=["fp32-whole-tiles", "fp16-whole-tiles", "fp32-16-rows"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("backward", ["fused", "two-pass"])
def test_outputs_and_gradients_match_fp64_softmax(B, H, Hk, L, D, bs, Bl, Hl, dtype, split, backward, rows,
                                                  monkeypatch):
    """split: the backward walks every list in chunks of one tile whose gradients add atomically (at real
    sizes only lists far longer than the mean, a global token's, are split); with the two-pass backward the
    forward walks the rows' chunks too, merging their partial softmax. fused: dQ is added atomically
    by the dK/dV pass; two-pass: a pass over the rows computes it. rows: each program owns the whole tile, or 16
    of its query rows (forward, dQ) or key rows (dK/dV), as the autotuner's half-tile candidates do."""
    monkeypatch.setattr(triton_kernel, "INTERPRETER_ROWS", rows)
    keep = _keep(Bl, Hl, L, seed=L)
    if split:
        monkeypatch.setattr(triton_kernel, "SPLIT_MIN", 1)
        monkeypatch.setattr(triton_kernel, "SPLIT_FACTOR", 0)
        # the forward walks the split rows' chunks too with the two-pass backward (the fused cases: whole rows)
        monkeypatch.setenv("SPARSEATTN_TRITON_SPLIT_FORWARD", "1" if backward == "two-pass" else "0")
    lists = _lists(keep, bs)
    assert lists.split_rows == lists.split_cols == (split and lists.num_q_blocks > 1)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(B, Hk, L, D, generator=g).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(B, H, L, D, generator=g).to(dtype)
    scale = 0.7 * D ** -0.5
    out = block_sparse_attention_triton(q, k, v, lists, scale=scale, backward=backward)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    full_keep = keep.expand(B, H, L, L)
    ref = _reference(q, k, v, full_keep, scale)
    want = [ref, *torch.autograd.grad(ref, (q, k, v), grad.double())]
    if dtype == torch.float16:  # PyTorch's own fp16 math of the same softmax sets the bar (x2)
        qh, kh, vh = (t.detach().requires_grad_() for t in (q, k, v))
        rep = H // Hk
        s = (qh @ kh.repeat_interleave(rep, 1).transpose(-1, -2)).float() * scale
        p = torch.softmax(s.masked_fill(~full_keep, float("-inf")), -1).nan_to_num(0.0).to(dtype)
        o16 = p @ vh.repeat_interleave(rep, 1)
        torch16 = [o16, *torch.autograd.grad(o16, (qh, kh, vh), grad)]
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        a, r = got[i].double(), want[i]
        assert got[i].dtype == dtype and torch.isfinite(a).all(), what
        err = (a - r).abs().max().item()
        bar = 1e-5 if dtype == torch.float32 else 2 * (torch16[i].double() - r).abs().max().item() + 1e-4
        assert err <= bar, f"{what}: error {err:.3g} > {bar:.3g}"
    empty = ~full_keep.any(-1)  # rows that keep nothing: zero output, zero query gradient
    assert empty.any() == (Hl > 2)
    assert (got[0][empty] == 0).all() and (got[1][empty] == 0).all()


@pytest.mark.parametrize("long", ["row", "column"])
@pytest.mark.parametrize("backward", ["fused", "two-pass"])
@pytest.mark.parametrize("forward", ["whole rows", "split rows"])
def test_one_kind_of_long_list_splits_alone_and_its_scratch_reaches_the_gradients(long, backward, forward,
                                                                                  monkeypatch):
    """A global query's row (or a global key's column) alone is long enough to split: the one scratch-copy launch
    then copies dQ's scratch alone (or dK's and dV's alone), and no gradient misses its split list's sum. The
    forward walks the long row whole or in the same chunks (merging their partial softmax)."""
    monkeypatch.setenv("SPARSEATTN_TRITON_SPLIT_FORWARD", "1" if forward == "split rows" else "0")
    monkeypatch.setattr(triton_kernel, "SPLIT_MIN", 1)
    monkeypatch.setattr(triton_kernel, "SPLIT_FACTOR", 1)  # lists longer than the mean split
    L, bs, D = 8 * 32 - 5, 32, 16
    keep = torch.eye(L, dtype=torch.bool) | torch.ones(L, L, dtype=torch.bool).tril(3).triu(-3)
    keep[:2] = True  # two global queries: tile row 0 holds every tile, each column two
    if long == "column":
        keep = keep.T.contiguous()
    lists = _lists(keep[None, None], bs)
    assert (lists.split_rows, lists.split_cols) == (long == "row", long == "column")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, L, D, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(1, 2, L, D, generator=g)
    out = block_sparse_attention_triton(q, k, v, lists, scale=D ** -0.5, backward=backward)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref = _reference(q, k, v, keep.expand(1, 2, L, L), D ** -0.5)
    want = [ref, *torch.autograd.grad(ref, (q, k, v), grad.double())]
    for what, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.double() - r).abs().max().item()
        assert err <= 1e-5, f"{what}: error {err:.3g}"


def test_tile_lists_hold_each_kept_tile_once_partial_first_and_grow_with_kept_tiles():
    keep = _keep(1, 3, 150, seed=0)
    layout = TileMask.from_mask(F.pad(keep, (0, 10, 0, 10)), 32)
    lists = TileLists.from_layout(layout)
    for (fc, fi), (pc, pi, pt), code in ((lists.row_full, lists.row_part, layout.code),
                                         (lists.col_full, lists.col_part, layout.code.transpose(-1, -2))):
        for h in range(3):
            for r in range(code.shape[2]):
                full = [int(j) for j in fi[0, h, r, : fc[0, h, r]]]
                part = [int(j) for j in pi[0, h, r, : pc[0, h, r]]]
                assert full == sorted(j for j in range(code.shape[3]) if code[0, h, r, j] == -1)
                assert part == sorted(j for j in range(code.shape[3]) if code[0, h, r, j] >= 0)
                assert [int(t) for t in pt[0, h, r, : pc[0, h, r]]] == [int(code[0, h, r, j]) for j in part]

    order, total = lists.row_order, lists.row_full[0] + lists.row_part[0]
    for h in range(3):  # forward programs start with the longest lists; ties keep their order
        assert sorted(order[0, h].tolist()) == list(range(order.shape[-1]))
        ranked = total[0, h][order[0, h].long()].tolist()
        assert ranked == sorted(ranked, reverse=True)
        ties = [[int(r) for r in order[0, h] if total[0, h, r] == n] for n in set(ranked)]
        assert all(t == sorted(t) for t in ties)


@triton.jit
def _cut(IDX, LO, HI, BOUND, OUT):
    i = tl.program_id(0)
    tl.store(OUT + i, entries_below(IDX, tl.load(LO + i), tl.load(HI + i), tl.load(BOUND + i)))


def test_entries_below_cuts_an_ascending_list_where_a_segment_ends():
    """The segmented kernels walk their bucket's lists up to the first entry at or past the segment's last tile
    (``entries_below``, a binary search; the lists are ascending, as the test above checks): every range, bound and
    edge against counting by hand."""
    idx = [1, 3, 4, 7, 9, 9, 12]
    cases = [(lo, hi, bound) for lo in range(len(idx) + 1) for hi in range(lo, len(idx) + 1) for bound in range(14)]
    cases += [(3, 1, 5)]  # an empty range given backwards: nothing to walk
    lo, hi, bound = (torch.tensor(c, dtype=torch.int32) for c in zip(*cases))
    out = torch.full((len(cases),), -1, dtype=torch.int32)
    triton_kernel._mend_interpreter()
    _cut[(len(cases),)](torch.tensor(idx, dtype=torch.int32), lo, hi, bound, out)
    want = [a + sum(x < c for x in idx[a:b]) if b > a else b for a, b, c in cases]
    assert out.tolist() == want


def test_backward_programs_split_long_lists_into_chunks_that_cover_them_once():
    """A global token keeps a whole row and column: the backward walks those lists in chunks of about
    twice the mean list (sharing one scratch slot, where they add up), every other list whole; longest
    first."""
    L, bs = 2048, 32
    keep = torch.ones(L, L, dtype=torch.bool).tril(40).triu(-40)
    keep[:, :3] = keep[:3, :] = True  # tokens 0-2 are global: tile row and column 0 keep all 64 tiles
    keep = torch.stack([keep, torch.ones(L, L, dtype=torch.bool).tril(40).triu(-40)])[None]  # head 1: band only
    lists = TileLists.from_layout(TileMask.from_mask(keep, bs))
    assert lists.split_rows and lists.split_cols
    for prog, slots, (fc, pc) in ((lists.row_prog, lists.row_slots, (lists.row_full[0], lists.row_part[0])),
                                  (lists.col_prog, lists.col_slots, (lists.col_full[0], lists.col_part[0]))):
        length = (fc + pc)[0]  # (H, N)
        limit = max(triton_kernel.SPLIT_MIN, triton_kernel.SPLIT_FACTOR * -(-int(length.sum()) // length.numel()))
        for h in range(2):
            table = prog[0, h].tolist()
            real = [p for p in table if p[0] >= 0]
            assert all(p == [-1, 0, 0, -1] for p in table[len(real):])  # padding programs last
            spans = [end - first for _, first, end, _ in real]
            assert spans == sorted(spans, reverse=True)
            slot_of = {n: i for i, n in enumerate(slots[0, h].tolist()) if n >= 0}
            for n in range(length.shape[1]):
                chunks = sorted((first, end, slot) for blk, first, end, slot in real if blk == n)
                ln = int(length[h, n])
                bounds = [c[0] for c in chunks] + [chunks[-1][1]]
                assert bounds[0] == 0 and bounds[-1] == ln and bounds == sorted(bounds)  # cover 0..ln once
                want_slot = slot_of[n] if len(chunks) > 1 else -1  # a split list's chunks share its slot
                assert all(slot == want_slot for _, _, slot in chunks)
                assert (len(chunks) > 1) == (ln > limit) and all(end - first <= limit for first, end, _ in chunks)
        assert slots[0, 0].tolist() == [0] and slots[0, 1].tolist() == [-1]  # head 0: tile 0 split; head 1: none
    whole = TileLists.from_layout(TileMask.from_mask(keep, bs), split=False)  # the bench's triton_whole
    assert not whole.split_rows and not whole.split_cols
    for prog in (whole.row_prog, whole.col_prog):
        assert prog.shape[2] == L // bs and sorted(prog[0, 0, :, 0].tolist()) == list(range(L // bs))

    def lists_bytes(L):  # a window of 256 either side, one layout for the heads
        keep = torch.ones(L, L, dtype=torch.bool).tril(256).triu(-256)[None, None]
        return TileLists.from_layout(TileMask.from_mask(keep, 128)).nbytes()

    # kept tiles grow linearly with length for a window: so do the lists (and the distinct partial tiles stay few)
    small, large = lists_bytes(2048), lists_bytes(8192)
    assert large < 4.5 * small
    assert large < 8192 * 8192 / 64  # far below even a bit per pair


def test_deterministic_algorithms_run_two_passes_over_whole_lists(monkeypatch):
    """Atomics add in a varying order: under torch.use_deterministic_algorithms(True), backward="auto" runs
    the two passes over the lists' unsplit form, whose every program stores its own tile."""
    monkeypatch.setattr(triton_kernel, "SPLIT_MIN", 1)
    monkeypatch.setattr(triton_kernel, "SPLIT_FACTOR", 0)
    lists = _lists(_keep(1, 3, 150, seed=2), 32)
    assert lists.split_rows and lists.split_cols
    assert not lists.whole.split_rows and not lists.whole.split_cols and lists.whole.whole is lists.whole
    assert torch.equal(lists.whole.row_full[1], lists.row_full[1])  # the same tiles, walked whole
    seen = []
    backward = triton_kernel.backward_pass
    monkeypatch.setattr(triton_kernel, "backward_pass", lambda *a: seen.append(a[8]) or backward(*a))
    q = torch.randn(1, 3, 150, 16, requires_grad=True)
    ref = None
    for deterministic in (False, True):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            grad, = torch.autograd.grad(block_sparse_attention_triton(q, q, q, lists).sum(), q)
        finally:
            torch.use_deterministic_algorithms(previous)
        ref = grad if ref is None else ref
        assert torch.allclose(grad, ref, atol=1e-5)
    assert seen == ["two-pass", "deterministic"]
    with pytest.raises(ValueError, match="backward='fast'.*auto, fused, two-pass"):
        block_sparse_attention_triton(q, q, q, lists, backward="fast")


def test_bad_inputs_name_the_problem(monkeypatch):
    lists = _lists(_keep(1, 3, 64, seed=0), 32)
    q = torch.randn(1, 3, 64, 16)
    with monkeypatch.context() as m:  # outside the interpreter, CPU tensors are refused by name
        m.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="runs on CUDA tensors, got cpu ones"):
            block_sparse_attention_triton(q, q, q, lists)
    with pytest.raises(ValueError, match="layout has 3 heads, the query 2"):
        block_sparse_attention_triton(q[:, :2], q[:, :2], q[:, :2], lists)
    with pytest.raises(ValueError, match="covers 64 x 64 tokens, the input has 65"):
        x = torch.randn(1, 3, 65, 16)
        block_sparse_attention_triton(x, x, x, lists)
    with pytest.raises(ValueError, match="H a multiple of H_kv"):
        block_sparse_attention_triton(q, q[:, :2], q[:, :2], lists)
    with pytest.raises(ValueError, match="power-of-two block size"):
        TileLists.from_layout(TileMask.from_mask(torch.ones(1, 1, 48, 48, dtype=torch.bool), 48))
    with pytest.raises(ValueError, match="kernel must be one of flex, triton or auto, got .cuda."):
        BlockSparseBackend(kernel="cuda")
    with pytest.raises(ValueError, match="backward='one-pass': expected one of auto, fused, two-pass"):
        BlockSparseBackend(backward="one-pass")


def _calls(spec, layout, heads=4, kv_heads=2):
    """A function returning fresh AttentionCalls (their caches empty) of one layer of ``spec`` on random
    q, k, v (head size 16)."""
    g = torch.Generator().manual_seed(0)
    B, L = layout.batch_size, layout.length
    q = torch.randn(B, heads, L, 16, generator=g)
    k, v = (torch.randn(B, kv_heads, L, 16, generator=g) for _ in range(2))
    lp = Plan.parse(spec).resolve(1, heads)[0]
    return lambda: AttentionCall(q, k, v, lp, layout, layout.allowed(), 0.25, 0.0, {})


@pytest.mark.parametrize("spec", ["all: neighbour(3) | global_tokens(1)", "heads=1,3@all: neighbour(0)"])
def test_block_backend_runs_the_triton_kernel(spec):
    """BlockSparseBackend(kernel="triton") against the reference backend on real queries, with padding and
    grouped-query heads; padding queries get zero."""
    layout = TokenLayout.from_lengths([37, 20, 1])
    call = _calls(spec, layout)
    backend = BlockSparseBackend(block_size=32, force=True, kernel="triton")
    out, _ = backend.attention(call())
    ref, _ = ReferenceBackend().attention(call())
    real = layout.real[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real, atol=2e-6, rtol=1e-5)
    assert (out[~real.expand_as(out)] == 0).all()
    assert backend.stats["block"] == 1
    (entry,) = backend._layouts.values()
    assert entry.lists is not None and entry.block_mask is None  # tile lists, no FlexAttention mask or table


def test_auto_kernel_is_triton_where_installed_and_block_size_fits():
    assert BlockSparseBackend().kernel == "triton"
    assert BlockSparseBackend(block_size=48).kernel == "flex"  # not a power of two: FlexAttention takes it
    assert BlockSparseBackend(kernel="flex").kernel == "flex"


def test_backend_switches_to_flexattention_when_the_triton_kernel_does_not_fit(monkeypatch, caplog):
    """A GPU whose shared memory holds none of the kernel's tile shapes: Triton says "out of resource"; the
    backend says so once and runs FlexAttention (eager here) from then on, with the same results."""
    import logging

    import sparseattn.backends.triton_kernel as tk

    def no_fit(*args, **kwargs):
        raise triton.runtime.errors.OutOfResources(232448, 101376, "shared memory")

    monkeypatch.setattr(tk, "block_sparse_attention_triton", no_fit)
    layout = TokenLayout.from_lengths([37, 20])
    call = _calls("all: neighbour(3) | global_tokens(1)", layout, kv_heads=4)
    backend = BlockSparseBackend(block_size=32, force=True, kernel="triton")
    with caplog.at_level(logging.WARNING, logger="sparseattn"):
        out, _ = backend.attention(call())
        backend.attention(call())
    assert backend.kernel == "flex" and backend.stats["block"] == 2
    assert sum("does not fit this GPU" in r.message for r in caplog.records) == 1
    ref, _ = ReferenceBackend().attention(call())
    real = layout.real[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("spec", ["all: neighbour(3) | global_tokens(1)", "all: strided(5) | global_tokens(2)",
                                  "all: neighbour(6) & strided(2)", "all: full()"])
@pytest.mark.parametrize("causal", [False, True])
def test_positional_layouts_are_built_from_positions_without_the_mask(spec, causal, monkeypatch):
    """A positional layer on an unpadded batch: the Triton path builds its layout from the positions a slab
    of rows at a time; the plan's L x L mask is made only on the first POSITION_CHECK tokens, to check the
    pattern's index_relation. The layout is the mask's exactly; outputs equal the reference."""
    from sparseattn.plans.plan import LayerPlan

    L = 301  # bucketed to 320 with block 32: a cut last tile
    layout = TokenLayout.from_lengths([L, L], causal=causal)
    call = _calls(spec, layout)
    lp = call().layer_plan
    masked = []
    mask = LayerPlan.mask
    monkeypatch.setattr(LayerPlan, "mask", lambda self, lay, cache=None: masked.append(lay.length) or mask(self, lay, cache))
    monkeypatch.setattr(BlockSparseBackend, "POSITION_CHECK", 64)
    backend = BlockSparseBackend(block_size=32, force=True, kernel="triton")
    out, _ = backend.attention(call())
    assert backend.stats["position_builds"] == 1 and masked == [64]
    (entry,) = backend._layouts.values()
    keep = mask(lp, TokenLayout.from_lengths([L], causal=causal))
    want = TileMask.from_mask(F.pad(keep, (0, 320 - L, 0, 320 - L)), 32, pad_tiles_to_pow2=True)
    assert torch.equal(entry.layout.code, want.code) and torch.equal(entry.layout.bits, want.bits)
    ref, _ = ReferenceBackend().attention(call())
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_positions_that_disagree_with_the_mask_are_not_used(neighbour_positions_off_by_one, caplog):
    """An index_relation that says more than the pattern's mask: the check catches it, says so, and the
    layout is built from the mask."""
    import logging

    call = _calls("all: neighbour(3)", TokenLayout.from_lengths([100]))
    backend = BlockSparseBackend(block_size=32, force=True, kernel="triton")
    with caplog.at_level(logging.WARNING, logger="sparseattn"):
        out, _ = backend.attention(call())
    assert backend.stats["position_builds"] == 0 and "disagrees with its mask on 100 tokens" in caplog.text
    ref, _ = ReferenceBackend().attention(call())
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def _sparsified_step(arch: str, plan: str, backend: str, *, padded: bool, compiled: bool, tokenizer=None,
                     **call_kw):
    """One training step of a tiny BERT classifier or Llama sparsified with ``plan`` on the reference or block
    backend, eagerly or under torch.compile(fullgraph=True), over 2 x 37 tokens (the second example's first 29 real
    when ``padded``). With a ``tokenizer`` (special ids 1 and 2) each example starts with 1 and ends with 2.
    ``call_kw`` go to the model's call. Returns the logits of real tokens and every parameter's gradient."""
    import torch._dynamo

    import sparseattn as sa
    from conftest import tiny_bert, tiny_llama

    model = (tiny_bert("classify") if arch == "bert" else tiny_llama()).train()
    be = (ReferenceBackend() if backend == "reference"
          else BlockSparseBackend(block_size=32, force=True, kernel="triton"))
    sa.sparsify(model, plan, backend=be, tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 37), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 29:] = 0
    if tokenizer is not None:
        ids[:, 0] = 1
        ids[0, 36], ids[1, 28 if padded else 36] = 2, 2
    kw = ({"attention_mask": mask} if padded else {}) | call_kw
    labels = torch.tensor([0, 1]) if arch == "bert" else ids.masked_fill(mask == 0, -100)
    torch._dynamo.reset()
    fwd = torch.compile(model, fullgraph=True) if compiled else model
    out = fwd(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    logits = out.logits.detach()
    return (logits if arch == "bert" else logits[mask.bool()]), grads


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("arch,backend", [("bert", "reference"), ("bert", "block"), ("llama", "block")])
def test_sparsified_model_compiles_with_fullgraph_and_matches_eager(arch, backend, padded, monkeypatch):
    """torch.compile(model, fullgraph=True) over a sparsified model: no graph break anywhere (the block backend's
    kernel is the operator sparseattn::block_attention inside the graph, its lists found at run time). Outputs
    and every parameter gradient equal the eager model's, at an odd length, padded or not."""
    kernel_calls = []
    forward_pass = triton_kernel.forward_pass
    monkeypatch.setattr(triton_kernel, "forward_pass", lambda *a: kernel_calls.append(a[-1]) or forward_pass(*a))

    def run(compiled: bool):
        return _sparsified_step(arch, "all: neighbour(3) | global_tokens(1)", backend, padded=padded, compiled=compiled)

    eager, eager_grads = run(False)
    eager_calls = len(kernel_calls)
    compiled, compiled_grads = run(True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    if backend == "block":  # every layer ran the kernel, eagerly and compiled; padded batches as segments
        assert eager_calls == 2 and len(kernel_calls) == 4
        counts = [sorted(seg[:, 2].tolist()) if seg is not None else [37, 37] for seg in kernel_calls]
        assert all(c == ([29, 37] if padded else [37, 37]) for c in counts)


def test_a_decoder_called_without_a_cache_compiles_with_fullgraph_and_matches_eager():
    """With use_cache=False, transformers makes a packed-rows mask function while tracing (it cannot tell one
    document from several there); sparseattn's mask function lets it make that mask rather than read the
    function's closure, which dynamo cannot: no graph break, and the compiled step equals the eager one."""
    def run(compiled: bool):
        return _sparsified_step("llama", "all: neighbour(3) | global_tokens(1)", "block", padded=False,
                                compiled=compiled, use_cache=False)

    eager, eager_grads = run(False)
    compiled, compiled_grads = run(True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


SEGMENT_CASES = [
    # name, B, L, segments (row, first token, count): every sequence is attended to alone, tokens numbered from 0
    ("right-padded", 2, 150, [(0, 0, 150), (1, 0, 71)]),
    ("left-padded", 2, 150, [(0, 0, 150), (1, 79, 71)]),
    ("packed", 2, 150, [(0, 0, 40), (0, 40, 97), (0, 137, 13), (1, 0, 150)]),
    ("packed-and-padded", 1, 150, [(0, 0, 33), (0, 33, 65), (0, 98, 31)]),  # the last 21 tokens are padding
]


@pytest.mark.parametrize("name,B,L,segs", SEGMENT_CASES, ids=[c[0] for c in SEGMENT_CASES])
@pytest.mark.parametrize("backward", ["fused", "two-pass"])
@pytest.mark.parametrize("rows", [None, 16], ids=["whole-tiles", "16-rows"])
def test_segments_match_each_sequence_run_alone(name, B, L, segs, backward, rows, monkeypatch):
    """Padded and packed rows: each segment's outputs and gradients equal the kernel's on that sequence alone
    (the fp64 softmax over its own keep-mask), grouped-query heads, per-head layout, split backward lists; tokens
    outside every segment get zero outputs and gradients. rows: programs own whole tiles, or 16 rows of one (a
    segment may then end before a program's first row). With the two-pass backward, the forward walks the split
    rows' chunks too (a chunk's rows past its segment's end are never written: the merge must not read them)."""
    monkeypatch.setattr(triton_kernel, "INTERPRETER_ROWS", rows)
    monkeypatch.setenv("SPARSEATTN_TRITON_SPLIT_FORWARD", "1" if backward == "two-pass" else "0")
    monkeypatch.setattr(triton_kernel, "SPLIT_MIN", 1)
    monkeypatch.setattr(triton_kernel, "SPLIT_FACTOR", 0)
    H, Hk, D, bs = 4, 2, 16, 32
    Lp = 160
    keep = _keep(1, H, Lp, seed=3) | torch.eye(Lp, dtype=torch.bool)  # a layout over positions, one per head
    lists = TileLists.from_layout(TileMask.from_mask(keep, bs))
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, L, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Hk, L, D, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, H, L, D, generator=g)
    seg = torch.tensor(segs, dtype=torch.int32)
    out = block_sparse_attention_triton(q, k, v, lists, scale=0.3, backward=backward, segments=seg)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    want = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, q, k, v)]
    for b, s, n in segs:
        qs, ks, vs = (t[b:b + 1, :, s:s + n].detach().double().requires_grad_() for t in (q, k, v))
        o = _reference(qs, ks, vs, keep[:, :, :n, :n], 0.3)
        grads = torch.autograd.grad(o, (qs, ks, vs), grad[b:b + 1, :, s:s + n].double())
        for w, part in zip(want, (o, *grads)):
            w[b:b + 1, :, s:s + n] = part.detach()
    for what, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.double() - r).abs().max().item()
        assert err <= 1e-5, f"{name} {what}: error {err:.3g}"


def test_the_operator_passes_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT dispatch of
    sparseattn::block_attention, unpadded and with segments, grouped-query heads and not."""
    keep = _keep(1, 2, 64, seed=1) | torch.eye(64, dtype=torch.bool)
    lists = TileLists.from_layout(TileMask.from_mask(keep, 32))
    handle = triton_kernel.register_source(lists)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 64, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 1, 64, 16, generator=g, requires_grad=True) for _ in range(2))
    seg = torch.tensor([[0, 0, 64], [1, 3, 50]], dtype=torch.int32)
    for segments in (None, seg):
        torch.library.opcheck(torch.ops.sparseattn.block_attention.default, (q, k, v, segments, handle, 0.25, "auto"))
    # as many key/value heads as query heads: dK and dV come straight from the kernel, no reduction makes them
    # new tensors (gradients that share a buffer are aliased outputs, which the operator may not return)
    kh, vh = (torch.randn(2, 2, 64, 16, generator=g, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.sparseattn.block_attention.default, (q, kh, vh, seg, handle, 0.25, "two-pass"))
    x = torch.randn(2, 2, 50, 24, generator=g, requires_grad=True)  # odd length, a head size that is padded
    torch.library.opcheck(torch.ops.sparseattn.block_attention.default, (x, x, x, None, handle, 0.25, "two-pass"))
    # a model's layouts: projections (B, L, H, D) seen as (B, H, L, D); a value whose last dimension is strided
    qt, kt = (torch.randn(2, 64, 2, 16, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
    vs = torch.randn(2, 2, 16, 64, generator=g).transpose(-1, -2).requires_grad_()
    for args in ((qt, kt, kt.detach().clone().requires_grad_(), seg), (qt, kt, vs, None), (qt, k, v, None)):
        torch.library.opcheck(torch.ops.sparseattn.block_attention.default, (*args, handle, 0.25, "two-pass"))


@pytest.mark.parametrize("backward", ["two-pass", "fused"])
def test_gradients_come_back_in_the_inputs_layout(backward):
    """A model's query, key and value are views (B, H, L, D) of (B, L, H, D) projections: their gradients come back
    in that layout, so the projections' backward reads them without a transposing copy each (dense SDPA's do too)."""
    keep = _keep(1, 2, 64, seed=3) | torch.eye(64, dtype=torch.bool)
    lists = TileLists.from_layout(TileMask.from_mask(keep, 32))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 2, 16, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    out = block_sparse_attention_triton(q, k, v, lists, scale=0.25, backward=backward)
    # autograd.grad: the gradients as the operator returns them (a leaf's .grad would be re-laid out to match it)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g))
    for name, t, d in zip("qkv", (q, k, v), grads):
        assert d.stride() == t.stride(), f"d{name}: strides {d.stride()}, the input's {t.stride()}"


def test_device_tiles_lists_hold_the_layouts_tiles_without_reading_counts():
    """Lists built on the device from every tile's code (``device_tiles``, ``TileLists.from_codes``) hold, per tile
    row and column, the same full and partial tiles as the host-built lists, in a fixed capacity; the partial
    tiles' table entries are their token masks; the backward walks each list whole, longest first."""
    bs, L = 32, 96
    keep = _keep(2, 3, L, seed=4) | torch.eye(L, dtype=torch.bool)
    code, tiles = triton_kernel.device_tiles(keep, bs)
    dev = TileLists.from_codes(code, tiles)
    host = TileLists.from_layout(TileMask.from_mask(keep, bs), split=False)
    N = L // bs
    for got, want in ((dev.row_full, host.row_full), (dev.col_full, host.col_full),
                      (dev.row_part, host.row_part), (dev.col_part, host.col_part)):
        assert got[1].shape[-1] == N  # capacity: every tile of the row / column
        assert torch.equal(got[0], want[0])
        for idx in itertools.product(*map(range, got[0].shape)):
            n = int(got[0][idx])
            assert got[1][idx][:n].tolist() == want[1][idx][:n].tolist()
    pc, pi, pt = dev.row_part
    for idx in itertools.product(*map(range, pc.shape)):  # each partial tile's table entry is its mask
        b, h, i = idx
        for j, t in zip(pi[idx][:int(pc[idx])].tolist(), pt[idx][:int(pc[idx])].tolist()):
            assert torch.equal(tiles[t].bool(), keep[b, h, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs])
    length = dev.col_full[0] + dev.col_part[0]
    prog = dev.col_prog
    assert prog.shape[2] == N and (prog[..., 1] == 0).all() and (prog[..., 3] == -1).all()
    assert torch.equal(prog[..., 2], length.sort(-1, descending=True).values)
    assert torch.equal(length.gather(-1, prog[..., 0].long()), prog[..., 2])
    assert not dev.split_rows and not dev.split_cols
    with pytest.raises(ValueError, match="70 x 70 tokens, expected multiples of the block size 32"):
        triton_kernel.device_tiles(keep[..., :70, :70], bs)
    with pytest.raises(ValueError, match="keep-mask is torch.int64, expected torch.bool"):
        triton_kernel.device_tiles(keep.long(), bs)


def _new_storages_of_at_least(numel: int, fn, *args):
    """How many tensors of at least ``numel`` elements with storage of their own (not views of the arguments or
    of each other) ``fn(*args)`` makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
    made = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= numel:
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in seen:
                        seen.add(ptr)
                        made.append(func)
            return out

    with Count():
        fn(*args)
    return made


def test_device_tiles_copy_the_mask_once():
    """The tile table is the one mask-sized tensor ``device_tiles`` makes (at long lengths each copy of the mask is
    B x H' x L x L bytes): the bool tiles are read as bytes in place, not copied again."""
    keep = _keep(2, 3, 128, seed=1)
    made = _new_storages_of_at_least(keep.numel(), triton_kernel.device_tiles, keep, 32)
    assert len(made) == 1, made


@pytest.mark.parametrize("backward", ["two-pass", "fused"])
def test_device_tiles_attention_matches_fp64_softmax(backward):
    """The operator over device-made lists: outputs and gradients equal the fp64 softmax over the kept keys, at an odd
    length inside the layout, per-example and per-head layouts, grouped-query heads, rows that keep nothing."""
    B, H, Hk, L, D, bs = 2, 4, 2, 70, 24, 32
    keep = _keep(B, H, L, seed=1)
    code, tiles = triton_kernel.device_tiles(F.pad(keep, (0, 96 - L, 0, 96 - L)), bs)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Hk, L, D, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, H, L, D, generator=g)
    out = triton_kernel.block_attention_tiles(q, k, v, code, tiles, 0.3, backward)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference(qd, kd, vd, keep, 0.3)
    want = [ref, *torch.autograd.grad(ref, (qd, kd, vd), grad.double())]
    for what, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.double() - r).abs().max().item()
        assert err <= 1e-5, f"{what}: error {err:.3g}"


def test_the_device_tiles_operator_passes_opcheck():
    keep = _keep(2, 2, 64, seed=2) | torch.eye(64, dtype=torch.bool)
    code, tiles = triton_kernel.device_tiles(keep, 32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 64, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 1, 64, 16, generator=g, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.sparseattn.block_attention_tiles.default, (q, k, v, code, tiles, 0.25, "auto"))
    x = torch.randn(2, 2, 50, 24, generator=g, requires_grad=True)  # odd length, a head size that is padded
    torch.library.opcheck(torch.ops.sparseattn.block_attention_tiles.default,
                          (x, x, x, code, tiles, 0.25, "two-pass"))


BATCH_DEPENDENT = [  # plan, arch, padded: layouts that change with the batch
    ("all: random(3)", "bert", True),  # an encoder's random keys depend on each example's length
    ("all: global_tokens('special') | neighbour(1)", "bert", False),  # input-dependent: which tokens are special
    ("all: global_tokens('special') | neighbour(1)", "bert", True),
    ("all: global_tokens('special') | neighbour(2)", "llama", True),  # grouped-query heads, causal
]


@pytest.mark.parametrize("plan,arch,padded", BATCH_DEPENDENT)
def test_batch_dependent_layouts_compile_with_fullgraph_and_match_eager_and_reference(plan, arch, padded,
                                                                                      monkeypatch):
    """Layouts made from each batch run the Triton kernel over lists built on the device: torch.compile(model,
    fullgraph=True) traces them without a graph break (a host read of the GPU would be one), and outputs and every
    parameter gradient equal the eager model's and the reference backend's, at an odd length, padded or not."""
    import types


    built = []
    from_codes = TileLists.from_codes.__func__
    monkeypatch.setattr(TileLists, "from_codes", classmethod(lambda cls, *a: built.append(1) or from_codes(cls, *a)))
    tokenizer = types.SimpleNamespace(all_special_ids=[1, 2])  # all sparsify reads of a tokenizer

    def run(backend: str, compiled: bool):
        return _sparsified_step(arch, plan, backend, padded=padded, compiled=compiled, tokenizer=tokenizer)

    reference, reference_grads = run("reference", False)
    eager, eager_grads = run("block", False)
    # per layer a forward and a backward over device-made lists; eagerly, a padded batch of a pattern of positions
    # runs a layout cached by its padding instead (one read of the GPU per batch keys that cache)
    eagerly = 0 if "random" in plan else 4
    assert len(built) == eagerly
    compiled, compiled_grads = run("block", True)
    assert len(built) == eagerly + 4
    for got, got_grads in ((eager, eager_grads), (compiled, compiled_grads)):
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
        assert got_grads.keys() == reference_grads.keys() and len(reference_grads) > 10
        for name, grad in reference_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_device_tiles_follow_each_layers_own_model_mask():
    """Layers of one forward pass share a device-made layout only where the model passes no mask: a model whose
    layers pass masks of their own (a sliding window in one) gets each layer's, as the reference does."""
    layout = TokenLayout.from_lengths([70, 55], special_first=1, special_last=1)
    lps = Plan.parse("all: global_tokens('special') | neighbour(8)").resolve(2, 2)
    i = torch.arange(70)
    window = (i[:, None] - i[None, :]).abs() <= 4
    masks = [layout.allowed(), layout.allowed() & window]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 70, 16, generator=g)
    k, v = (torch.randn(2, 2, 70, 16, generator=g) for _ in range(2))
    backend = BlockSparseBackend(block_size=32, force=True, kernel="triton")
    cache: dict = {}
    for lp, mask in zip(lps, masks):
        out, _ = backend.attention(AttentionCall(q, k, v, lp, layout, mask, 0.25, 0.0, cache))
        ref, _ = ReferenceBackend().attention(AttentionCall(q, k, v, lp, layout, mask, 0.25, 0.0, {}))
        real = layout.real[:, None, :, None]
        torch.testing.assert_close(out * real, ref * real, atol=2e-6, rtol=1e-5)
    assert backend.stats["layout_builds"] == 2


def test_the_autotuner_keys_on_length_classes_not_buckets():
    """Prompts of new lengths within a factor of two reuse the tuned configuration (generate() pays no re-timing)."""
    from sparseattn.backends.triton_kernel import tune_length

    assert [tune_length(n) for n in (1, 2, 3, 96, 128, 129, 256)] == [1, 2, 4, 128, 128, 256, 256]


def test_a_padding_mask_with_holes_under_torch_compile_gives_nan_not_a_wrong_answer():
    """Traced, the block backend takes each row's real tokens as one run (left or right padding) without reading
    the GPU to check. A row whose mask has holes would attend across them: its outputs are NaN instead, while
    the other rows stay exact (eagerly the check runs and such batches take another path)."""
    import torch._dynamo

    import sparseattn as sa
    from conftest import tiny_bert

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:14] = 0  # a hole
    mask[1, 30:] = 0

    def logits(backend, compiled):
        torch.manual_seed(0)
        model = tiny_bert("classify").eval()
        sa.sparsify(model, "all: neighbour(3) | global_tokens(1)", backend=backend)
        torch._dynamo.reset()
        with torch.no_grad():
            return (torch.compile(model, fullgraph=True) if compiled else model)(input_ids=ids, attention_mask=mask).logits

    ref = logits(ReferenceBackend(), False)
    block = lambda: BlockSparseBackend(block_size=32, force=True, kernel="triton")  # noqa: E731
    torch.testing.assert_close(logits(block(), False), ref, atol=1e-6, rtol=1e-5)
    compiled = logits(block(), True)
    assert compiled[1].isnan().all()
    torch.testing.assert_close(compiled[0], ref[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ours, tritons, expected", [("1", None, True), ("0", None, False), ("0", "1", False)])
def test_the_autotune_cache_setting_is_sparseattns_whatever_tritons_knob_says(monkeypatch, ours, tritons, expected):
    """SPARSEATTN_TRITON_AUTOTUNE_CACHE=0 turns the on-disk autotuning cache off even where Triton's own
    TRITON_CACHE_AUTOTUNING=1 is set (Triton ORs the two)."""
    tk = triton_kernel
    monkeypatch.setattr(tk, "interpreted", lambda: False)  # the autotuned path, as on a GPU
    monkeypatch.setattr(tk, "_TUNED", {})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SPARSEATTN_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("SPARSEATTN_TRITON_AUTOTUNE_CACHE", ours)
    if tritons is None:
        monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", tritons)
    tuner, extra = tk._kernel("fwd", 64)
    assert extra == {} and tuner.tuner.cache_results is expected


def test_a_chosen_configuration_launches_directly_and_each_new_key_is_tuned():
    """_Chosen asks the autotuner once per tuning key (the length class, the constants, the tensors' dtypes) and
    then launches its choice through the JIT function; a key it has not seen goes to the autotuner again."""
    launches = []

    class Config:
        def __init__(self, warps):
            self.warps = warps

        def all_kwargs(self):
            return {"BLOCK_N": 64, "num_warps": self.warps}

    class Fn:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append(("jit", grid, a[1], kw))

    class Tuner:
        fn = Fn()
        arg_names = ["Q", "TUNE_LEN", "HEAD_DIM"]
        cache = {}

        def __getitem__(self, grid):
            def run(*a, **kw):
                self.best_config = Config(len(launches) + 4)
                launches.append(("tuner", grid, a[1], kw))
            return run

    chosen = triton_kernel._Chosen(Tuner())
    q16, q32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    chosen[(1, 2)](q16, 8, HEAD_DIM=64)
    chosen[(3, 2)](q16, 8, HEAD_DIM=64)
    chosen[(1, 2)](q16, 16, HEAD_DIM=64)  # another length class
    chosen[(1, 2)](q32, 8, HEAD_DIM=64)  # another dtype
    chosen[(1, 2)](q16, 8, HEAD_DIM=32)  # another constant
    chosen[(5, 5)](q16, 16, HEAD_DIM=64)
    assert [(how, grid, n) for how, grid, n, _ in launches] == [
        ("tuner", (1, 2), 8), ("jit", (3, 2), 8), ("tuner", (1, 2), 16), ("tuner", (1, 2), 8), ("tuner", (1, 2), 8),
        ("jit", (5, 5), 16)]
    assert launches[1][3] == {"HEAD_DIM": 64, "BLOCK_N": 64, "num_warps": 4}  # the first key's choice
    assert launches[5][3] == {"HEAD_DIM": 64, "BLOCK_N": 64, "num_warps": 6}  # the second key's


def test_bench_models_host_timer_times_every_forward_and_backward_call_and_restores_them(monkeypatch):
    """bench model's host time per attention call and per backward call of the kernel: one sample per layer for
    each, in an eager training step of a tiny sparsified BERT (interpreter); the wrapped functions come back."""
    import sparseattn as sa
    from conftest import tiny_bert
    from sparseattn.bench import model as bench_model

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)  # the timer drains the GPU's queue; none here
    model = tiny_bert("classify").train()
    backend = BlockSparseBackend(block_size=32, force=True, kernel="triton")
    sa.sparsify(model, "all: neighbour(3) | global_tokens(1)", backend=backend)
    ids = torch.randint(3, 120, (2, 37), generator=torch.Generator().manual_seed(0))
    attention, backward = backend.attention, triton_kernel._backward_over

    def step():
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()

    timer = bench_model._HostTimer(backend)
    step()
    fwd_us, bwd_us = timer.us_per_call()
    layers = model.config.num_hidden_layers
    assert len(timer.times) == layers and len(timer.bwd_times) == layers
    assert fwd_us > 0 and bwd_us > 0
    timer.remove()
    assert backend.attention == attention and triton_kernel._backward_over is backward


def test_zeroed_views_are_zero_separate_and_aligned_for_the_kernels():
    """triton_kernel._zeroed: views of one buffer, each of its shape and the dtype, zero, not overlapping, 16-byte
    aligned (the kernels' pointer specialization), for the backward's scratch."""
    shapes = [(2, 3, 37, 16), (2, 3, 37, 16), (1, 5, 64, 24), (3, 1, 32, 32)]
    views = triton_kernel._zeroed(shapes, torch.float32, "cpu")
    assert [tuple(t.shape) for t in views] == shapes and all(t.dtype == torch.float32 for t in views)
    assert len({t.untyped_storage().data_ptr() for t in views}) == 1  # one buffer
    assert all(t.is_contiguous() and not t.any() and t.data_ptr() % 16 == 0 for t in views)
    for i, t in enumerate(views):
        t.fill_(i + 1)
    assert [int(t.float().mean()) for t in views] == [1, 2, 3, 4]


@pytest.mark.parametrize("cache", [True, False])
def test_bench_models_decoder_step_calls_the_model_with_or_without_its_cache(cache):
    """bench model's decoder forward: with the model's default cache (use_cache=True, as users call a model) unless
    --no-decoder-cache; the sparsified decoder's logits are the same either way."""
    from conftest import tiny_llama
    from sparseattn.bench import model as bench_model

    import sparseattn as sa

    model = tiny_llama().eval()
    sa.sparsify(model, "all: neighbour(3) | global_tokens(1)",
                backend=BlockSparseBackend(block_size=32, force=True, kernel="triton"))
    ids = torch.randint(3, 120, (1, 37), generator=torch.Generator().manual_seed(0))
    seen = []

    def fwd(**kw):
        out = model(**kw)
        seen.append((kw["use_cache"], out.past_key_values is not None, out.logits))
        return out

    bench = bench_model._Bench("decoder", 37, "unpadded", 1, model, None, None, 0.9, 0.1, {}, {}, cache, 32)
    bench.step(fwd, {"input_ids": ids}, mark=False)()
    assert [(c, has) for c, has, _ in seen] == [(cache, cache)]
    with torch.no_grad():
        other = model(input_ids=ids, use_cache=not cache).logits
    torch.testing.assert_close(seen[0][2], other, atol=1e-6, rtol=1e-5)
