"""Block layouts on the CPU: plans compiled to tiles cover every kept pair and nothing else, full tiles are
full, densities agree with sparseattn.sparsity; the block backend's decisions, caching and (eager
FlexAttention) outputs against the reference backend."""

import logging

import pytest
import torch
import torch.nn.functional as F

from sparseattn import Plan
from sparseattn.backends import BlockSparseBackend, ReferenceBackend, get_backend
from sparseattn.backends.base import AttentionCall
from sparseattn.backends.block import bucket_length
from sparseattn.backends.tile_mask import EMPTY, FULL, TileMask, kv_lists, pack_bits, unpack_bits
from sparseattn.layout import TokenLayout
from sparseattn.patterns import neighbour, random_blocks
from sparseattn.sparsity import block_counts

PLANS = [
    "all: neighbour(3)",
    "all: neighbour(2) | global_tokens(1)",
    "all: bigbird(1, 2, 3)",
    "all: random_blocks(2, block=16) | neighbour(1)",
    "all: strided(4)",
    "heads=0,2@all: neighbour(1)",  # per-head: the other heads stay dense
]
LAYOUTS = {
    "odd lengths, right padding": lambda causal: TokenLayout.from_lengths([45, 17, 1], causal=causal),
    "no padding": lambda causal: TokenLayout.from_lengths([64, 64], causal=causal),
    "left padding": lambda causal: TokenLayout(real=torch.arange(50)[None].expand(2, 50) >= torch.tensor([[0], [21]]),
                                               causal=causal),
}


def _keep(spec, layout, heads=4, layer=1):
    lp = Plan.parse(spec).resolve(2, heads)[layer]
    return lp.mask(layout).expand(-1, heads, -1, -1)


@pytest.mark.parametrize("spec", PLANS)
@pytest.mark.parametrize("which", sorted(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [16, 32])
def test_layout_is_the_mask_exactly(spec, which, causal, block_size):
    layout = LAYOUTS[which](causal)
    keep = _keep(spec, layout)
    bl = TileMask.from_mask(keep, block_size)
    assert torch.equal(bl.to_dense(), keep)  # every kept pair is in a kept tile, nothing else is kept
    # full tiles are truly full, partial tiles neither empty nor full, empty tiles empty
    L = keep.shape[-1]
    pad = (-L) % block_size
    padded = torch.nn.functional.pad(keep, (0, pad, 0, pad))
    n = padded.shape[-1] // block_size
    tiles = padded.view(*keep.shape[:2], n, block_size, n, block_size)
    assert torch.equal(bl.full, tiles.all(5).all(3))
    assert torch.equal(bl.kept, tiles.any(5).any(3))
    assert torch.equal(bl.partial, tiles.any(5).any(3) & ~tiles.all(5).all(3))
    # per-head kept tiles = sparseattn.sparsity.block_counts (keep holds only allowed pairs)
    kept_blocks, allowed_blocks = block_counts(keep, layout, block_size)
    assert torch.equal(bl.kept_blocks(), kept_blocks)
    assert bl.density(allowed_blocks) == pytest.approx(kept_blocks.sum().item() / allowed_blocks.sum().item())


@pytest.mark.parametrize("rows_per_slab", [1, 3])
@pytest.mark.parametrize("pow2", [False, True])
def test_layouts_built_a_slab_of_rows_at_a_time_equal_the_whole_masks(rows_per_slab, pow2):
    """from_rows over slabs of 1 or 3 tile rows gives from_mask's codes and distinct tiles (stored once even
    where they recur in several slabs), for per-example and per-head masks at odd lengths."""
    g = torch.Generator().manual_seed(0)
    Lq, Lk, bs = 150, 90, 16
    keep = torch.rand(2, 3, Lq, Lk, generator=g) < 0.2
    keep[:, 1] = torch.ones(Lq, Lk, dtype=torch.bool).tril(8).triu(-8)  # a band: recurring partial tiles
    keep[1, 2, :64, :32] = True  # full tiles
    whole = TileMask.from_mask(keep, bs, pad_tiles_to_pow2=pow2)
    asked = []

    def rows(start, stop):
        asked.append((start, stop))
        return keep[:, :, start:stop]

    sliced = TileMask.from_rows(rows, Lq, Lk, bs, pad_tiles_to_pow2=pow2,
                                   slab_pairs=rows_per_slab * bs * bs * -(-Lk // bs))
    assert [b - a for a, b in asked[:-1]] == [rows_per_slab * bs] * (len(asked) - 1) and asked[-1][1] == Lq
    assert torch.equal(sliced.code, whole.code) and torch.equal(sliced.bits, whole.bits)
    assert torch.equal(sliced.to_dense(), keep)
    with pytest.raises(ValueError, match=r"rows\(0, 16\) gave torch.bool \(2, 3, 16, 89\), expected a bool \(B, H, 16, 90\)"):
        TileMask.from_rows(lambda a, b: keep[:, :, a:b, :89], Lq, Lk, bs, slab_pairs=1)


def test_flex_lists_match_tiles():
    layout = TokenLayout.from_lengths([70, 33])
    keep = _keep("all: neighbour(4) | random_blocks(1, block=16)", layout)
    bl = TileMask.from_mask(keep, 16)
    bm = bl.flex_block_mask()
    for count, idx, want in ((bm.kv_num_blocks, bm.kv_indices, bl.partial),
                             (bm.full_kv_num_blocks, bm.full_kv_indices, bl.full)):
        rebuilt = torch.zeros_like(want)
        B, H, Nq, _ = want.shape
        for b in range(B):
            for h in range(H):
                for i in range(Nq):
                    cols = idx[b, h, i, :count[b, h, i]].long()
                    assert torch.all(cols[1:] > cols[:-1])  # ascending, no repeats
                    rebuilt[b, h, i, cols] = True
        assert torch.equal(rebuilt, want)
    # the mask_mod is exact everywhere (FULL -> True, EMPTY -> False, partial -> its bits)
    mm = bl.mask_mod()
    b, h, q, kv = torch.meshgrid(*(torch.arange(n) for n in keep.shape), indexing="ij")
    assert torch.equal(mm(b, h, q, kv), keep)


def test_large_layouts_read_packed_bits(monkeypatch):
    """Above the kernels' 32-bit indexing the mask_mod reads the bit table: the same mask."""
    import sparseattn.backends.tile_mask as bl_mod

    layout = TokenLayout.from_lengths([70, 33])
    keep = _keep("all: neighbour(4) | random_blocks(1, block=16)", layout)
    bl = TileMask.from_mask(keep, 16)
    b, h, q, kv = torch.meshgrid(*(torch.arange(n) for n in keep.shape), indexing="ij")
    monkeypatch.setattr(bl_mod, "MAX_TABLE_ELEMENTS", keep.numel() // 2)
    assert bl.mask_mod().__name__ == "bit_table_mask"
    assert torch.equal(bl.mask_mod()(b, h, q, kv), keep)
    monkeypatch.setattr(bl_mod, "MAX_TABLE_ELEMENTS", keep.numel() // 64)
    with pytest.raises(ValueError, match="32-bit indexing"):
        bl.mask_mod()


def test_tables_beyond_32_bit_indexing_are_split_by_heads(monkeypatch):
    """A per-head layout whose bool table would exceed the kernels' indexing runs as groups of heads (whole
    key/value groups), each reading its own bool table: the same outputs and gradients as the reference."""
    import sparseattn.backends.tile_mask as bl_mod

    layout = TokenLayout.from_lengths([45, 30])
    call = _call("heads=0@all: neighbour(2); heads=1,2@all: random(3); heads=3@all: strided(4)", layout,
                 kv_heads=2)
    keep = call.keep_mask() & layout.real[:, None, :, None]
    per_head = 2 * 48 * 48  # B x padded L^2
    monkeypatch.setattr(bl_mod, "MAX_TABLE_ELEMENTS", 2 * per_head + 5)  # two heads fit, not four
    bl = TileMask.from_mask(keep, 16)
    assert bl.head_groups() == [(0, 2), (2, 4)] and bl.head_groups(multiple=2) == [(0, 2), (2, 4)]
    assert bl.head_groups(multiple=4) == [(0, 4)]  # a whole key/value group does not fit: one call on bits
    monkeypatch.setattr(bl_mod, "MAX_TABLE_ELEMENTS", 3 * per_head)
    assert bl.head_groups() == [(0, 3), (3, 4)] and bl.head_groups(multiple=2) == [(0, 2), (2, 4)]
    groups = bl.flex_block_masks(multiple=2)
    assert [(a, b) for a, b, _ in groups] == [(0, 2), (2, 4)]
    assert all(m.mask_mod.__name__ == "mask_table_mask" for _, _, m in groups)  # bool tables, not bits
    from sparseattn.backends.flex_kernel import block_sparse_attention

    out = block_sparse_attention(call.query, call.key, call.value, bl, scale=call.scale, compiled=False)
    real = layout.real[:, None, :, None]
    ref = torch.nn.functional.scaled_dot_product_attention(  # gradients: tests/test_block_gpu.py (no CPU backward)
        call.query, call.key.repeat_interleave(2, 1), call.value.repeat_interleave(2, 1),
        attn_mask=keep | ~real, scale=call.scale)
    torch.testing.assert_close(out * real, ref * real, atol=2e-6, rtol=1e-5)


def test_pack_bits_round_trip_and_dedupe():
    g = torch.Generator().manual_seed(0)
    for bs in (16, 32, 48, 64):
        tiles = torch.rand(5, bs, bs, generator=g) < 0.5
        tiles[0] = True  # the sign bit of every word set
        assert torch.equal(unpack_bits(pack_bits(tiles), bs), tiles)
    keep = torch.ones(1, 1, 256, 256, dtype=torch.bool).triu(-20).tril(20)  # a band: many equal tiles
    bl = TileMask.from_mask(keep, 32)
    assert bl.bits.shape[0] <= 3 and torch.equal(bl.to_dense(), keep)
    padded = TileMask.from_mask(keep, 32, pad_tiles_to_pow2=True)
    assert padded.bits.shape[0] in (1, 2, 4) and torch.equal(padded.to_dense(), keep)


def test_kv_lists_order():
    blocks = torch.tensor([[[[False, True, False, True], [False, False, False, False]]]])
    count, idx = kv_lists(blocks)
    assert count.tolist() == [[[2, 0]]]
    assert idx[0, 0, 0, :2].tolist() == [1, 3]


def test_layout_codes():
    keep = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    keep[..., :16, :16] = True  # full
    keep[..., 16:, :16] = torch.eye(16, dtype=torch.bool)  # partial
    bl = TileMask.from_mask(keep, 16)
    assert bl.code[0, 0].tolist() == [[FULL, EMPTY], [0, EMPTY]]
    b, h, q, kv = torch.meshgrid(*(torch.arange(n) for n in keep.shape), indexing="ij")
    assert torch.equal(bl.mask_mod()(b, h, q, kv), keep)  # through the bit table
    tiles_only = torch.zeros(1, 2, 48, 48, dtype=torch.bool)
    tiles_only[:, 0, :16, 16:32] = tiles_only[:, 1, 32:, :] = True
    full_only = TileMask.from_mask(tiles_only, 16)
    assert not full_only.has_partial()
    b, h, q, kv = torch.meshgrid(*(torch.arange(n) for n in tiles_only.shape), indexing="ij")
    assert torch.equal(full_only.mask_mod()(b, h, q, kv), tiles_only)  # no token table needed
    with pytest.raises(ValueError, match="multiple of 16"):
        TileMask.from_mask(keep, 24)
    with pytest.raises(ValueError, match="4-D bool"):
        TileMask.from_mask(keep.float(), 16)


def test_bucket_length():
    assert [bucket_length(n, 128) for n in (1, 128, 129, 1000, 1024, 1025, 16384, 16385)] == \
        [128, 128, 256, 1024, 1024, 1152, 16384, 18432]
    for n in range(1, 5000, 37):
        b = bucket_length(n, 64)
        assert b >= n and b % 64 == 0 and (b - n) <= max(63, n // 8)


# -- random_blocks ------------------------------------------------------------------------------------
def test_random_blocks_is_block_structured_and_padding_independent():
    p = random_blocks(2, block=8)
    alone = p.mask(TokenLayout.from_lengths([40]), layer=3, num_heads=2)
    batched = p.mask(TokenLayout.from_lengths([40, 64, 9]), layer=3, num_heads=2)
    assert torch.equal(batched[0, :, :40, :40], alone[0])  # same draws whatever the batch
    rel = p.relation(TokenLayout.from_lengths([64]), layer=3, num_heads=2)[0]  # (H, L, L)
    blocks = rel.view(2, 8, 8, 8, 8)
    assert torch.equal(blocks.any(4).any(2), blocks.all(4).all(2))  # whole blocks or nothing
    per_row = blocks.any(4).any(2).sum(-1)  # (H, 8) random blocks per query block
    assert (per_row == 2).all()
    assert not torch.equal(rel[0], rel[1])  # drawn per head
    causal = p.relation(TokenLayout.from_lengths([64], causal=True), layer=3, num_heads=2)[0]
    cb = causal.view(2, 8, 8, 8, 8).any(4).any(2)
    assert not cb.triu().any()  # only earlier blocks
    assert random_blocks(2, block=8) == Plan.parse("random_blocks(2, block=8)").rules[0].pattern
    with pytest.raises(ValueError, match="block"):
        random_blocks(2, block=0)


# -- the backend -----------------------------------------------------------------------------------
def _call(spec, layout, heads=4, dim=16, kv_heads=None, dtype=torch.float32, seed=0, layer=1):
    g = torch.Generator().manual_seed(seed)
    B, L = layout.batch_size, layout.length
    kv_heads = kv_heads or heads
    q = torch.randn(B, heads, L, dim, generator=g, dtype=dtype)
    k, v = (torch.randn(B, kv_heads, L, dim, generator=g, dtype=dtype) for _ in range(2))
    lp = Plan.parse(spec).resolve(2, heads)[layer]
    return AttentionCall(q, k, v, lp, layout, layout.allowed(), dim ** -0.5, 0.0, {})


def _fresh(call):
    return AttentionCall(call.query, call.key, call.value, call.layer_plan, call.layout, call.model_mask,
                         call.scale, call.dropout_p, {})


@pytest.mark.parametrize("spec", ["all: neighbour(3) | global_tokens(1)", "all: random_blocks(1, block=16)",
                                  "heads=1,3@all: neighbour(0)", "all: strided(5)"])
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_reference_on_real_queries(spec, causal):
    """Eager FlexAttention (the CPU's slow path) with the backend's layouts against the reference."""
    layout = TokenLayout.from_lengths([37, 20, 1], causal=causal)
    call = _call(spec, layout, kv_heads=2)  # grouped-query attention too
    out, _ = BlockSparseBackend(block_size=16, force=True).attention(call)
    ref, _ = ReferenceBackend().attention(_fresh(call))
    real = layout.real[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real, atol=2e-6, rtol=1e-5)
    assert (out[~layout.real[:, None, :, None].expand_as(out)] == 0).all()  # padding queries: zero


POSITIONAL = ["all: neighbour(3) | global_tokens(1)", "all: strided(5) | global_tokens(2)",
              "all: neighbour(6) & strided(2)", "all: causal() | neighbour(2)", "all: full()"]


@pytest.mark.parametrize("spec", POSITIONAL)
@pytest.mark.parametrize("causal", [False, True])
def test_positional_layers_of_unpadded_batches_evaluate_positions_not_a_table(spec, causal):
    """A layer whose pattern is a function of positions, on a batch without padding, gets a mask_mod computed
    from the indices (checked on every partial tile), and no L x L table; outputs equal the reference."""
    layout = TokenLayout.from_lengths([45, 45], causal=causal)  # 45: the last tile is cut by the bucket
    call = _call(spec, layout, kv_heads=2)
    backend = BlockSparseBackend(block_size=16, force=True)
    out, _ = backend.attention(call)
    ref, _ = ReferenceBackend().attention(_fresh(call))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    (entry,) = backend._layouts.values()
    if entry.layout.has_partial():
        assert backend.stats["analytic_masks"] == 1
        assert [m.mask_mod.__name__ for _, _, m in entry.block_mask] == ["position_mask"]


def test_positions_are_not_used_where_they_would_be_wrong(neighbour_positions_off_by_one, caplog):
    """Padding, a pattern without index_relation, or an index_relation that disagrees with the pattern's
    mask: the stored table serves (the last with a warning), and the outputs stay right."""
    padded = TokenLayout.from_lengths([45, 30])
    for spec, layout in (("all: neighbour(3)", padded), ("all: random(2)", TokenLayout.from_lengths([45]))):
        backend = BlockSparseBackend(block_size=16, force=True)
        call = _call(spec, layout)
        out, _ = backend.attention(call)
        assert backend.stats["analytic_masks"] == 0
    layout = TokenLayout.from_lengths([45])
    call = _call("all: neighbour(3)", layout)
    backend = BlockSparseBackend(block_size=16, force=True)
    with caplog.at_level(logging.WARNING, logger="sparseattn"):
        out, _ = backend.attention(call)
    assert backend.stats["analytic_masks"] == 0 and "disagrees with its mask" in caplog.text
    ref, _ = ReferenceBackend().attention(_fresh(call))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_backend_caches_static_layouts_and_rebuilds_input_dependent_ones():
    backend = BlockSparseBackend(block_size=16, force=True)
    layout = TokenLayout.from_lengths([40, 40])
    for _ in range(3):
        backend.attention(_call("all: neighbour(2)", layout))
    assert backend.stats["layout_builds"] == 1 and backend.stats["cache_hits"] == 2
    backend.attention(_call("all: neighbour(2)", TokenLayout.from_lengths([40, 31])))  # new padding
    assert backend.stats["layout_builds"] == 2
    # no padding: one example's layout serves the whole batch
    entry = next(iter(backend._layouts.values()))
    assert entry.layout.code.shape[0] == 1
    # input-dependent (special tokens): built per forward pass, shared by that pass's layers
    special = TokenLayout.from_lengths([40, 40], special_first=1, special_last=1)
    cache: dict = {}
    for layer in (0, 1):
        call = _call("all: global_tokens('special') | neighbour(1)", special, layer=layer)
        call.cache = cache
        backend.attention(call)
    assert backend.stats["layout_builds"] == 3


def test_backend_falls_back_and_says_so(caplog):
    layout = TokenLayout.from_lengths([40, 30])
    backend = BlockSparseBackend(block_size=16)  # not forced: CPU and short sequences run dense
    with caplog.at_level(logging.INFO, logger="sparseattn"):
        out, _ = backend.attention(_call("all: neighbour(2)", layout))
        backend.attention(_call("all: neighbour(2)", layout))
    ref, _ = ReferenceBackend().attention(_call("all: neighbour(2)", layout))
    assert torch.equal(out, ref)
    assert backend.stats["reference"] == 2
    assert sum("block backend" in r.getMessage() for r in caplog.records) == 1  # said once
    forced = BlockSparseBackend(block_size=16, force=True)
    with caplog.at_level(logging.INFO, logger="sparseattn"):
        call = _call("all: neighbour(2)", layout)
        call.dropout_p = 0.1
        forced.attention(call)
    assert any("dropout" in r.getMessage() for r in caplog.records)
    assert forced.stats["reference"] == 1
    # a dense layer of a batch without padding: SDPA without a mask, same numbers as the reference
    full = TokenLayout.from_lengths([32, 32], causal=True)
    out, _ = forced.attention(_call("layers=0: neighbour(1)", full))  # layer 1 is dense
    ref, _ = ReferenceBackend().attention(_call("layers=0: neighbour(1)", full))
    torch.testing.assert_close(out, ref)
    assert forced.stats["dense"] == 1


def test_dense_tile_threshold():
    layout = TokenLayout.from_lengths([64])
    backend = BlockSparseBackend(block_size=16, max_density=0.5, min_length=0, force=False)
    entry = backend._entry(_call("all: neighbour(40)", layout))
    assert entry.density > 0.5  # a wide window keeps most tiles: this layer would run dense
    narrow = backend._entry(_call("all: neighbour(1)", layout))
    assert narrow.density == pytest.approx(10 / 16)  # 4 diagonal + 6 off-diagonal tiles of 16


def test_max_density_default_depends_on_kernel_and_length():
    from sparseattn.backends import block as block_module
    from sparseattn.backends import triton_kernel

    flex = BlockSparseBackend(kernel="flex")
    assert flex.max_density_for(512) == flex.max_density_for(32768) == block_module.MAX_DENSITY
    with pytest.raises(ValueError, match="max_density must be in"):
        BlockSparseBackend(max_density=1.5)
    if not triton_kernel.available():
        pytest.skip("the Triton kernel's thresholds need the triton package")
    tri = BlockSparseBackend(kernel="triton")
    assert tri.max_density_for(block_module.DENSE_TILES_LENGTH - 128) == block_module.MAX_DENSITY
    assert tri.max_density_for(block_module.DENSE_TILES_LENGTH) == 1.0  # no layer falls back for density there
    assert BlockSparseBackend(kernel="triton", max_density=0.5).max_density_for(32768) == 0.5  # the user's value


def test_sparsify_with_block_backend_matches_reference():
    transformers = pytest.importorskip("transformers")
    from sparseattn import sparsify

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=128, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(5, 100, (2, 50))
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 31:] = 0
    plan = "layers=1: neighbour(3) | random_blocks(1, block=16)"
    with torch.no_grad():
        sparsify(model, plan, backend=BlockSparseBackend(block_size=16, force=True))
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        sparsify(model, plan, backend="reference")
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()[..., None]
    torch.testing.assert_close(out * real, ref * real, atol=1e-5, rtol=1e-5)
    assert isinstance(get_backend("block"), BlockSparseBackend)


def test_block_size_is_chosen_by_head_size_unless_given():
    transformers = pytest.importorskip("transformers")
    from sparseattn import sparsify
    from sparseattn.backends import triton_kernel
    from sparseattn.backends.block import default_block_size

    assert [default_block_size(d) for d in (8, 32, 33, 64, 128)] == [64, 64, 128, 128, 128]
    assert default_block_size(32, "flex") == 128
    with pytest.raises(ValueError, match="head_dim must be a positive int, got 0"):
        default_block_size(0)
    fresh = BlockSparseBackend()
    with pytest.raises(RuntimeError, match="chosen by head size .* no head size has reached it"):
        fresh.block_size
    with pytest.raises(RuntimeError, match="no head size"):  # nothing to build the lists with yet
        fresh.tile_density(Plan.everywhere(neighbour(3)).resolve(1, 2)[0], 256, causal=False)

    def bert(hidden, heads):
        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=64)
        return transformers.BertModel(cfg).eval()

    if not triton_kernel.available():
        pytest.skip("the tile by head size is the Triton kernel's")
    for hidden, heads, tile in ((64, 2, 64), (256, 2, 128)):  # head sizes 32 and 128: sparsify tells the backend
        backend = BlockSparseBackend()
        sparsify(bert(hidden, heads), "all: neighbour(3)", backend=backend)
        assert backend.block_size == tile
    flex = BlockSparseBackend(kernel="flex")  # FlexAttention's default kernel tiles (128) must divide the layout's
    sparsify(bert(64, 2), "all: neighbour(3)", backend=flex)
    assert flex.block_size == 128
    given = BlockSparseBackend(block_size=32)
    sparsify(bert(64, 2), "all: neighbour(3)", backend=given)
    assert given.block_size == 32  # the user's tile is kept
    # without sparsify, the first call's head size chooses, and the tile stays for later calls
    direct = BlockSparseBackend(force=True)
    lp = Plan.everywhere(neighbour(3)).resolve(1, 2)[0]
    for d in (16, 128):
        q = torch.randn(1, 2, 40, d)
        call = AttentionCall(query=q, key=q, value=q, layer_plan=lp, layout=TokenLayout.from_lengths([40]),
                             model_mask=None, scale=d ** -0.5, dropout_p=0.0, cache={})
        ref, _ = ReferenceBackend().attention(call)
        torch.testing.assert_close(direct.attention(call)[0], ref, atol=1e-5, rtol=1e-5)
        assert direct.block_size == 64


# -- the benchmark's layouts and arguments ------------------------------------------------------------
@pytest.mark.parametrize("name", ["sliding", "bigbird", "ap", "ap-tiles"])
def test_bench_layouts_meet_their_block_density_and_mask_mod(name, monkeypatch):
    from sparseattn.bench import attention
    from sparseattn.bench.attention import make_layout

    if name == "ap-tiles":  # the mask_mod of tables too large for FlexAttention's 32-bit offsets: tile codes and bank
        name = "ap"
        monkeypatch.setattr(attention, "FLAT_TABLE_LIMIT", 0)

    L, bs = 4096, 128
    keep, mask_mod, _ = make_layout(name, L, 0.78, bs, 4, "cpu")
    n = L // bs
    density = keep.view(1, keep.shape[1], n, bs, n, bs).any(5).any(3).float().mean().item()
    assert density <= 0.22 + 1e-9 and density > 0.1  # at most the target, not far below it
    g = torch.Generator().manual_seed(0)
    h, q, kv = (torch.randint(0, m, (5000,), generator=g) for m in (keep.shape[1], L, L))
    assert torch.equal(mask_mod(torch.zeros_like(h), h, q, kv), keep[0, h, q, kv])  # the plain mask_mod agrees


@pytest.mark.parametrize("name", ["sliding", "ap"])
def test_every_bench_method_computes_the_layouts_attention(name, monkeypatch):
    """Each method the attention bench times, set up as the bench does, gives the attention it stands for:
    the layout's masked softmax, or unmasked softmax for the dense and the *_full methods (FlexAttention
    eager and the Triton kernel in its interpreter, on the CPU)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the Triton methods run in the interpreter only where there is no GPU")
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13):
        # `make test-image` (torch 2.11 on the CPU): the process aborts inside torch ("munmap_chunk(): invalid
        # pointer") in the sliding layout's FlexAttention on the CPU; the GPU image never runs FlexAttention there
        pytest.skip("FlexAttention on the CPU aborts the process under torch < 2.13")
    from torch.nn.attention.flex_attention import flex_attention

    from sparseattn.bench import attention as bench

    monkeypatch.setattr(bench, "flex_attention_fn", lambda compiled: flex_attention)
    L, bs, H, D = 256, 128, 2, 16
    keep, mask_mod, _ = bench.make_layout(name, L, 0.5, bs, H, "cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    tiles = keep.view(1, keep.shape[1], L // bs, bs, L // bs, bs).any(5).any(3)
    setups, _ = bench._methods(keep, mask_mod, bs, D ** -0.5, "cpu", tiles=tiles, like=q)
    assert set(setups) == set(bench.METHODS)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    full = F.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(masked, full, atol=1e-3)
    for method, setup in setups.items():
        want = full if method in ("dense", "flex_full", "triton_full", "dense_packed") else masked
        torch.testing.assert_close(setup()(q, k, v), want, atol=2e-5, rtol=1e-4, msg=method)


def test_bench_packed_ceiling_holds_the_layouts_kept_tiles_in_rows_of_its_mean_length():
    from sparseattn.bench.attention import make_layout, packed_shape

    L, bs, H, B = 8192, 128, 12, 4
    for name in ("sliding", "bigbird", "ap"):
        keep, _, _ = make_layout(name, L, 0.9, bs, H, "cpu")
        n = L // bs
        tiles = keep.view(1, keep.shape[1], n, bs, n, bs).any(5).any(3)  # the window: one head for all
        sequences, length, scale = packed_shape(tiles, B, H, bs)
        kept = B * int(tiles.expand(1, H, n, n).sum())
        row = kept / (B * H * n)  # mean kept tiles per query tile row
        assert length % bs == 0 and abs(length // bs - row) <= 0.5, name
        packed = sequences * H * (length // bs) ** 2
        assert scale == pytest.approx(kept / packed) and 0.9 < scale < 1.1, name  # rounding only
    # a layout keeping one tile per row packs into one-tile sequences, one per kept tile
    diagonal = torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4)
    assert packed_shape(diagonal, 3, 2, 64) == (12, 64, 1.0)
    assert packed_shape(diagonal[:, :1], 3, 2, 64) == (12, 64, 1.0)  # one head standing for both


def test_bench_arguments():
    import argparse

    from sparseattn.bench.commands import _fractions, _ints, _names

    assert _ints("512,1k,16K") == [512, 1024, 16384]
    assert _fractions("50,0.9,95%") == [0.5, 0.9, 0.95]
    for bad, parse in (("4x", _ints), ("100", _fractions), ("abc", _fractions), ("window", _names(("sliding",)))):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_bench_ratios_against_dense_and_the_kernels_own_dense_speed():
    from sparseattn.bench.attention import Result, add_ratios, format_table

    def r(method, fwd, fb, note=""):
        return Result("sliding", 8192, 4, 12, 64, 0.9, 0.1, 0.9, "window", method, fwd_ms=fwd, fwdbwd_ms=fb, note=note)

    dense, full, block = r("dense", 2.0, 8.0), r("flex_full", 4.0, 16.0), r("block", 0.8, 4.0)
    failed = r("flex_mask", None, None, note="out of memory")
    results = [dense, full, failed, block]
    add_ratios(results, density=0.1, flops_fwd=4e12)
    assert block.speedup_fwd == pytest.approx(2.5) and block.speedup_fwdbwd == pytest.approx(2.0)
    assert block.frac_ideal_fwd == pytest.approx(0.25) and block.frac_ideal_fwdbwd == pytest.approx(0.2)
    # against the same kernel's dense speed: 4.0 ms x 0.1 / 0.8 ms
    assert block.frac_kernel_ideal_fwd == pytest.approx(0.5) and block.frac_kernel_ideal_fwdbwd == pytest.approx(0.4)
    assert block.tflops_fwd == pytest.approx(4e12 * 0.1 / 0.8 / 1e9) and dense.tflops_fwd == pytest.approx(2000)
    assert failed.speedup_fwd is None and full.frac_kernel_ideal_fwd is None
    line = format_table(results).splitlines()[-1]
    assert "0.25/ 0.20" in line and "out of memory" in line
    # the packed ceiling: its own fraction of the ideal, and the block kernel's fraction of it
    packed = r("dense_packed", 0.4, 2.0)
    add_ratios(results + [packed], density=0.1, flops_fwd=4e12)
    assert packed.frac_ideal_fwd == pytest.approx(0.5) and packed.frac_ideal_fwdbwd == pytest.approx(0.4)
    table = format_table(results + [packed])
    assert "dense_packed/ideal" in table and "block/packed" in table
    assert " 0.50/ 0.40" in table.splitlines()[-1]  # block 0.8 / 4.0 ms against packed 0.4 / 2.0 ms


def test_bench_model_times_every_eager_step_before_compiling_anything(monkeypatch):
    """``run_models`` runs the eager mode of every length and batch kind before any compiled or captured mode, and
    every compiled one before any captured one (each leaves state behind in the process), then lists the rows by
    length, batch kind, attention and mode, with each row's speed-up over the fastest dense step of its length and
    batch kind, and of its length."""
    from sparseattn.bench import model as bm

    calls = []

    def fake(kind, length, batch, *, modes, kernels, **_):
        calls.append((length, batch, tuple(modes)))
        speed = {"eager": 1.0, "compile": 2.0, "reduce-overhead": 3.0}
        rows = []
        for attention in (None, *kernels):
            for mode in modes:
                tps = speed[mode] * (4 if attention else 1) * (0.5 if batch == "padded" else 1) * 1024 / length
                rows.append(bm.ModelResult(kind, length, 1, attention or "dense", None, None, 1e3 / tps, tps, None,
                                           kernel=attention, mode=mode, batch=batch))
        return rows

    monkeypatch.setattr(bm, "_run_batch", fake)
    modes, batches = ["reduce-overhead", "eager", "compile"], ["unpadded", "padded"]
    kept = []
    out = bm.run_models([("encoder", 1024), ("encoder", 2048)], modes=modes, batches=batches, log=lambda *a: None,
                        done=lambda so_far: kept.append(len(so_far)))
    assert calls == [(n, b, (m,)) for m in ("eager", "compile", "reduce-overhead") for n in (1024, 2048)
                     for b in batches]
    assert kept == list(range(2, 26, 2))
    assert [(r.length, r.batch, r.kernel, r.mode) for r in out] == [
        (n, b, k, m) for n in (1024, 2048) for b in batches for k in (None, "triton") for m in modes]
    for n in (1024, 2048):  # the same ratios at each length: each is taken over its own length's dense steps
        sparse_eager = next(r for r in out if (r.length, r.batch, r.mode) == (n, "padded", "eager") and r.kernel)
        assert sparse_eager.baseline == "dense reduce-overhead" and sparse_eager.speedup == pytest.approx(4 / 3)
        assert sparse_eager.speedup_any == pytest.approx(2 / 3)  # over unpadded dense reduce-overhead


def test_bench_model_times_queued_steps_and_steps_waited_for(monkeypatch):
    """A step's time is that of steps queued back to back (the host prepares the next step while the GPU runs this
    one), and, apart, that of a step waited for alone: on a fake clock where each step costs 0.3 ms of host time
    before its 1 ms of GPU work, queued steps take 1 ms plus the first step's 0.3 spread over the block, and a step
    waited for 1.3 ms."""
    import types

    from sparseattn.bench import model as bm

    clock = {"host": 0.0, "gpu": 0.0}  # seconds: where the host is, and when the GPU's queued work ends

    def step():
        clock["host"] += 0.3e-3
        clock["gpu"] = max(clock["gpu"], clock["host"]) + 1e-3

    def synchronize():
        clock["host"] = max(clock["host"], clock["gpu"])

    monkeypatch.setattr(bm, "time", types.SimpleNamespace(perf_counter=lambda: clock["host"]))
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    queued, synced, peak, gc_ms, full, synced_mean = bm._time_steps(step, warmup=2, steps=10, reset_peak=False)
    assert queued == pytest.approx(1.03)
    assert synced == pytest.approx(1.3) and synced_mean == pytest.approx(1.3)  # no step pauses
    assert peak == 3
    assert (gc_ms, full) == (0, 0)  # the fake clock stands still while any collection runs


def test_bench_model_counts_the_garbage_collectors_share_of_queued_steps(monkeypatch):
    """Steps that make a full collection every other step: half a full collection per queued step, its time counted
    (a pause every few steps counts in the queued blocks' mean, not in the median of single steps)."""
    import gc

    from sparseattn.bench import model as bm

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    garbage = [[[] for _ in range(2000)]]
    count = {"n": 0}

    def step():
        count["n"] += 1
        garbage.append([[] for _ in range(200)])
        if count["n"] % 2:
            gc.collect()

    t = bm._time_steps(step, warmup=1, steps=4, reset_peak=False)
    assert t.full_gcs == 0.5
    assert 0 < t.gc_ms < t.queued_ms
    assert t.synced_mean_ms > t.synced_ms  # half the steps pause: the median is a step without a collection
    assert not any(isinstance(c, bm._CollectorClock) for c in gc.callbacks)  # removed after timing


def test_bench_model_padding_free_batch_holds_the_padded_batchs_tokens_and_dense_runs_them_unpadded():
    """``padding-free``: the padded batch's real tokens (the same draw as ``padded``) as one packed row rounded up to
    128 tokens; dense runs each sequence in its own row, without a mask where none needs padding."""
    from sparseattn.bench.model import make_batch, unpacked

    padded = make_batch("padded", 300, 3, 5000, "cpu", seed=1)
    free = make_batch("padding-free", 300, 3, 5000, "cpu", seed=1)
    lengths = padded["inputs"]["attention_mask"].sum(1)
    assert free["real"] == padded["real"] == int(lengths.sum())
    ids = free["inputs"]["input_ids"]
    assert ids.shape == (1, -(-free["real"] // 128) * 128)
    assert free["inputs"]["cu_seq_lens_q"].tolist() == [0, *lengths.cumsum(0).tolist(), ids.shape[1]]
    for (r, s, n), row in zip(free["documents"], padded["inputs"]["input_ids"]):
        assert r == 0 and torch.equal(ids[0, s:s + n], row[:n])
    dense = unpacked(free, "cpu")["inputs"]
    assert torch.equal(dense["attention_mask"], padded["inputs"]["attention_mask"][:, :int(lengths.max())])
    one = make_batch("padding-free", 300, 1, 5000, "cpu", seed=1)
    assert set(unpacked(one, "cpu")["inputs"]) == {"input_ids"}  # one sequence: no padding, no mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", ["unpadded", "padded", "packed", "padding-free"])
def test_bench_model_plan_is_90_percent_sparse_on_the_batch_it_runs_on(batch, causal):
    """The benchmark's plan is chosen for the batch's own sequences (real lengths, packed documents): its measured
    sparsity on that batch's allowed pairs is 90% (not 90% on an unpadded row of L, which would keep more of a
    shorter sequence's pairs), and one more neighbour would fall below it."""
    from sparseattn.bench.model import _kept, _measure, batch_layout, make_batch, sparse_plan
    from sparseattn.plans.plan import Plan

    b = make_batch(batch, 3000, 2, 5000, "cpu", seed=2)
    seqs = [n for _, _, n in b["documents"]]
    plan = sparse_plan(3000, causal=causal, sequences=seqs)
    layout = batch_layout(b, causal=causal)
    assert int(layout.allowed().sum()) == sum(n * (n + 1) // 2 if causal else n * n for n in seqs)
    sparsity, density = _measure(plan, layout, 2)
    w = int(plan.spec().split("neighbour(")[1].split(")")[0])
    wider = Plan.parse(f"all: neighbour({w + 1}) | global_tokens(1)")
    assert sparsity >= 0.9 > _measure(wider, layout, 2)[0]
    assert 0 < density < 1
    # the count the search uses is the one measure_plan makes
    allowed = sum(n * (n + 1) // 2 if causal else n * n for n in seqs)
    assert sum(_kept(n, w, causal, 1) for n in seqs) == round((1 - sparsity) * allowed)


@pytest.mark.parametrize("causal", [False, True])
def test_tile_density_counts_the_kernel_layout_among_allowed_tiles(causal):
    """``tile_density`` (what benchmarks quote as a plan's block density) equals kept / allowed tiles of the plan's
    own mask, padding tiles of a length off the tile grid not counted."""
    plan = Plan.parse("all: neighbour(40) | global_tokens(1)")
    lp = plan.resolve(1, 2)[0]
    backend = BlockSparseBackend(block_size=32)
    layout = TokenLayout.from_lengths([300], causal=causal)
    kept, allowed = block_counts(lp.mask(layout), layout, 32)
    assert backend.tile_density(lp, 300, causal=causal) == pytest.approx(kept.sum().item() / allowed.sum().item())
    assert backend.tile_density(Plan.parse("all: full").resolve(1, 2)[0], 300, causal=causal) == 1.0
    assert backend.tile_density(Plan.parse("all: lexical()").resolve(1, 2)[0], 300, causal=causal) is None
