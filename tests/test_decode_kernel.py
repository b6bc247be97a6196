"""The decode kernel (backends/decode_kernel.py) against an fp64 softmax over the kept keys: odd context lengths,
grouped-query heads, batch > 1, per-head and shared rows, rows that keep nothing, a few queries per step, head
sizes that are not powers of two. On the CPU in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py);
the same cases compiled for the GPU, in bf16 and fp16 against the flash-attention bound (at most twice the error
of the same math in PyTorch at that precision), carry the gpu marker."""

import pytest
import torch

triton = pytest.importorskip("triton")

from sparseattn.backends import decode_kernel  # noqa: E402
from sparseattn.backends.decode_kernel import decode_attention, tile_lists  # noqa: E402
from sparseattn.layout import TokenLayout  # noqa: E402
from sparseattn.plans.plan import Plan  # noqa: E402

INTERPRETER = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no GPU")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def reference(q, k, v, keep, scale, dtype=torch.float64):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).to(dtype), v.repeat_interleave(rep, 1).to(dtype)
    s = (q.to(dtype) @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~keep, float("-inf")).float(), -1).nan_to_num(0.0).to(dtype) @ v


CASES = [
    # B, H, H_kv, Lq, Lk, D, mask heads
    (2, 4, 2, 1, 197, 24, 1),  # odd length, GQA, one row for every head, head size 24 (padded to 32)
    (3, 8, 2, 1, 1001, 32, 8),  # per-head rows, batch 3
    (1, 6, 6, 3, 130, 16, 6),  # three queries a step (speculative decoding), no grouping
    (2, 32, 8, 1, 777, 64, 1),  # the 1B Llama's heads
]


def make(B, H, Hkv, Lq, Lk, D, mh, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k, v = torch.randn(B, Hkv, Lk, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    keep = torch.rand(B, mh, Lq, Lk, generator=g) < 0.04
    keep[..., :1] = True  # a sink
    keep[..., Lk - 9:] |= torch.rand(B, mh, Lq, 9, generator=g) < 0.8  # a window at the end
    if B > 1:
        keep[1, :, :, Lk // 2:] = False  # a long run of empty tiles
    if B > 2:
        keep[2, 0] = False  # a row that keeps nothing: zeros
    return [t.to(device) for t in (q, k, v, keep)]


@INTERPRETER
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_decode_kernel_matches_the_reference(case):
    q, k, v, keep = make(*case)
    got = decode_attention(q, k, v, keep)
    want = reference(q, k, v, keep, q.shape[-1] ** -0.5)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@INTERPRETER
@INTERPRETER
@pytest.mark.parametrize("B, H, Hkv, Lq, S, D, Dp", [(2, 8, 2, 3, 5, 24, 32), (1, 32, 8, 1, 3, 64, 64),
                                                    (2, 16, 2, 3, 1, 16, 16)])
def test_the_merge_kernel_computes_the_readable_merge(B, H, Hkv, Lq, S, D, Dp):
    """``_merge_splits`` (one launch) against ``_merge`` (PyTorch, readable): splits that kept nothing (max -inf),
    rows that kept nothing anywhere (zeros), rows in two blocks of 16 (8 heads per key head x 3 queries), head
    sizes padded for the kernel."""
    from sparseattn.backends.triton_kernel import _mend_interpreter

    G = H // Hkv
    rows = G * Lq
    R = max(16, 1 << (rows - 1).bit_length())
    g = torch.Generator().manual_seed(1)
    o_part = torch.randn(B, Hkv, S, R, Dp, generator=g)
    m_part = torch.randn(B, Hkv, S, R, generator=g) * 3
    l_part = torch.rand(B, Hkv, S, R, generator=g) + 0.5
    m_part[:, :, 0, ::3] = float("-inf")  # a split that kept nothing for these rows
    l_part[:, :, 0, ::3] = 0.0
    o_part[:, :, 0, ::3] = 0.0
    m_part[0, 0, :, 1] = float("-inf")  # a row that kept nothing in any split
    l_part[0, 0, :, 1] = 0.0
    o_part[0, 0, :, 1] = 0.0
    want = decode_kernel._merge(o_part, m_part, l_part, B, H, Lq, D, rows)
    got = torch.full((B, H, Lq, D), float("nan"))
    _mend_interpreter()
    decode_kernel._merge_splits[(B * Hkv, -(-rows // 16))](
        o_part, m_part, l_part, got, *o_part.stride()[:4], *m_part.stride()[:3], *got.stride()[:3],
        Hkv, Lq, rows, S, G=G, BLOCK_R=16, D=Dp, D_OUT=D)
    assert not got.isnan().any()  # every (head, query) written
    assert (got[0, 1 // Lq, 1 % Lq] == 0).all()  # row 1 of key head 0: query head 1 // Lq, query 1 % Lq
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_decode_kernel_in_fp16_is_within_twice_pytorchs_error():
    q, k, v, keep = make(2, 4, 2, 1, 333, 32, 4, seed=1)
    want = reference(q, k, v, keep, 32 ** -0.5)
    half = [t.half() for t in (q, k, v)]
    got = decode_attention(*half, keep).double()
    torch_err = (reference(*half, keep, 32 ** -0.5, dtype=torch.float16).double() - want).abs().max()
    assert (got - want).abs().max() <= 2 * torch_err + 1e-4


@INTERPRETER
def test_splits_see_every_kept_tile(monkeypatch):
    """Whatever the number of programs sharing a list (more than its tiles too), the result is the same."""
    q, k, v, keep = make(2, 4, 2, 1, 900, 32, 1, seed=2)
    want = reference(q, k, v, keep, 32 ** -0.5)
    for splits in (1, 3, 40):
        monkeypatch.setattr(decode_kernel, "num_splits", lambda *a, s=splits: s)
        torch.testing.assert_close(decode_attention(q, k, v, keep).double(), want, atol=1e-5, rtol=1e-5)


def test_tile_lists_hold_the_kept_tiles_of_a_key_head_first_in_order():
    keep = torch.zeros(1, 4, 1, 300, dtype=torch.bool)  # 4 query heads over 2 key heads, tiles of 64
    keep[0, 0, 0, 10] = True  # key head 0: tile 0 (from query head 0) and tile 4 (from query head 1)
    keep[0, 1, 0, 290] = True
    keep[0, 3, 0, 130] = True  # key head 1: tile 2
    tiles, count = tile_lists(keep, 2)
    assert count.tolist() == [[2, 1]]
    assert tiles[0, 0, :2].tolist() == [0, 4] and tiles[0, 1, :1].tolist() == [2]
    assert tiles.shape == (1, 2, 5)  # fixed: every tile has a place, whatever is kept


def test_bad_inputs_are_named():
    q, k, v, keep = make(1, 4, 2, 1, 50, 16, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(q[:, :3], k, v, keep)
    with pytest.raises(ValueError, match=r"keep must be a \(B=1, 1 or 4, Lq=1, Lk=50\) bool"):
        decode_attention(q, k, v, keep[..., :49])
    with pytest.raises(ValueError, match="rows > 128"):
        decode_attention(q.expand(1, 4, 70, 16), k, v, keep.expand(1, 1, 70, 50))


@INTERPRETER
def test_plan_rows_through_the_kernel_equal_the_reference_backend():
    """The block backend's incremental path end to end: rows of a left-padded layout at odd positions."""
    from sparseattn.backends.base import AttentionCall
    from sparseattn.backends.block import BlockSparseBackend
    from sparseattn.backends.reference import ReferenceBackend

    lp = Plan.parse("heads=0-1@all: global_tokens(2) | neighbour(5); heads=2-3@all: strided(7)").resolve(1, 4)[0]
    real = torch.ones(2, 261, dtype=torch.bool)
    real[1, :37] = False  # left padding
    layout = TokenLayout(real=real, causal=True)
    q, k, v, _ = make(2, 4, 2, 1, 261, 16, 1, seed=3)
    outs = []
    block = BlockSparseBackend(force=True)
    for backend in (block, ReferenceBackend()):
        call = AttentionCall(q, k, v, lp, layout, None, 0.25, 0.0, {})
        outs.append(backend.attention(call)[0])
    assert call.incremental
    assert block.stats["decode"] == 1 and block.stats["reference"] == 0  # the kernel ran, not the fallback
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU)])
def test_decode_kernel_on_the_gpu(case, dtype, device):
    q, k, v, keep = make(*case, device=device)
    want = reference(q, k, v, keep, q.shape[-1] ** -0.5)
    low = [t.to(dtype) for t in (q, k, v)]
    got = decode_attention(*low, keep).double()
    torch_err = (reference(*low, keep, q.shape[-1] ** -0.5, dtype=dtype).double() - want).abs().max()
    assert (got - want).abs().max() <= 2 * torch_err + 1e-4


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU)])
def test_decode_kernel_captures_in_a_cuda_graph(device):
    q, k, v, keep = make(2, 32, 8, 1, 4099, 64, 1, device=device)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    eager = decode_attention(q, k, v, keep)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_attention(q, k, v, keep)
    keep.zero_()
    keep[..., 5] = True  # new rows, same shapes: the replay reads them
    graph.replay()
    torch.testing.assert_close(captured, v[:, :, 5:6].repeat_interleave(4, 1))
    assert not torch.equal(eager, captured)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU)])
def test_a_growing_cache_compiles_the_decode_kernel_once(device):
    """Decoding step after step over a cache that grows by one key (its length crossing multiples of 16 and tile
    boundaries, the split count going from 15 to 17 on a GPU of 132 multiprocessors: all new classes of Triton's
    integer arguments) runs the compiled variants of the first step: no compilation in the middle of decoding."""
    B, H, Hkv, D, start, stop = 2, 32, 8, 64, 1900, 2200
    q, k, v, keep = make(B, H, Hkv, 1, stop, D, 1, device=device)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    decode_attention(q, k[:, :, :start].contiguous(), v[:, :, :start].contiguous(), keep[..., :start].contiguous())
    variants = decode_kernel.compiled_variants(q.device)
    assert variants >= 2  # the split and merge kernels of that first step: the count sees them
    for n in range(start + 1, stop):  # a cache's rows are contiguous at each length, as transformers' caches hand them
        decode_attention(q, k[:, :, :n].contiguous(), v[:, :, :n].contiguous(), keep[..., :n].contiguous())
    assert decode_kernel.compiled_variants(q.device) == variants


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU)])
def test_decode_kernels_launched_through_their_binaries_match_the_jit(device, monkeypatch):
    """After its first launch each decode kernel takes its compiled binary's launcher (triton_launch.DirectLaunch)
    and computes bit for bit what Triton's JIT launches compute, also as the cache grows: the key length, the
    keep-mask's strides and the split count are left unspecialized, so a longer cache keeps the binary."""
    from sparseattn.backends import triton_kernel

    q, k, v, keep = make(2, 32, 8, 1, 2100, 64, 1, device=device)
    q, k, v = (t.bfloat16() for t in (q, k, v))

    def run(direct: bool, n: int):
        monkeypatch.setenv("SPARSEATTN_TRITON_DIRECT", "1" if direct else "0")
        return decode_attention(q, k[:, :, :n].contiguous(), v[:, :, :n].contiguous(), keep[..., :n].contiguous())

    lengths = (1999, 2000, 2049, 2100)
    jit = [run(False, n) for n in lengths]
    run(True, lengths[0])  # the first launch through the launcher compiles or finds the binary by the JIT
    launchers = [triton_kernel._LAUNCHERS.get(fn) for fn in (decode_kernel._decode_split, decode_kernel._merge_splits)]
    assert all(launchers)
    before = [launcher.direct_launches for launcher in launchers]
    direct = [run(True, n) for n in lengths]
    assert [launcher.direct_launches - b for launcher, b in zip(launchers, before)] == [len(lengths)] * 2
    for n, a, b in zip(lengths, direct, jit):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU)])
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_decoding_a_layer_on_the_second_gpu_while_the_first_is_current(device):
    """device_map="auto" puts later layers on cuda:1 while cuda:0 stays current: the decode kernels run on cuda:1."""
    q, k, v, keep = make(2, 32, 8, 1, 1001, 64, 1, device="cuda:1")
    q, k, v = (t.bfloat16() for t in (q, k, v))
    assert torch.cuda.current_device() == 0
    elsewhere = decode_attention(q, k, v, keep)
    with torch.cuda.device(1):
        here = decode_attention(q, k, v, keep)
    assert elsewhere.device == q.device and torch.equal(elsewhere, here)
