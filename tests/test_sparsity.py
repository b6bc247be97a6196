"""Sparsity accounting (sparseattn.sparsity): per head, per layer, overall, applied, and block density,
against counts made by loops over pairs and tiles, with padding and for decoders."""

from __future__ import annotations

import pytest
import torch

import sparseattn as sa
from sparseattn import sparsity
from sparseattn.layout import TokenLayout
from sparseattn.plans import Plan
from sparseattn.sparsity import block_counts, measure_plan, pair_counts

from conftest import hand_mask, make_layout, real_positions, tiny_bert, tiny_llama

NUM_LAYERS, NUM_HEADS = 3, 3
PLAN = "heads=0@layers=0: neighbour(1); heads=1-2@layers=1: random(1, seed=2); layers=2: global_tokens(1)"


def _hand_layer_masks(layout):
    """Each layer's (B, H, L, L) keep-mask for PLAN, built without LayerPlan."""
    real, causal = layout.real, layout.causal
    dense = hand_mask(real, lambda *a: True, causal=causal, num_heads=NUM_HEADS)
    l0 = dense.clone()
    l0[:, 0] = hand_mask(real, lambda b, h, i, j, *_: abs(i - j) <= 1, causal=causal)[:, 0]
    l1 = dense.clone()
    rnd = sa.random(1, seed=2).mask(layout, layer=1, num_heads=NUM_HEADS)  # checked by test_patterns
    l1[:, 1:] = rnd[:, 1:]
    l2 = hand_mask(real, lambda b, h, i, j, *_: i == 0 or j == 0, causal=causal, num_heads=NUM_HEADS)
    return [l0, l1, l2]


def _brute_report(masks, layout):
    """kept and allowed counts per (layer, head) by a loop over every pair of every example."""
    kept = torch.zeros(len(masks), NUM_HEADS, dtype=torch.long)
    allowed = torch.zeros_like(kept)
    for li, m in enumerate(masks):
        for b in range(layout.batch_size):
            pos = real_positions(layout.real[b])
            for i in range(layout.length):
                for j in range(layout.length):
                    if pos[i] < 0 or pos[j] < 0 or (layout.causal and pos[j] > pos[i]):
                        continue
                    for h in range(NUM_HEADS):
                        allowed[li, h] += 1
                        kept[li, h] += int(m[b, h, i, j])
    return kept, allowed


@pytest.mark.parametrize("side,causal", [("right", False), ("left", False), ("left", True), ("right", True)])
def test_per_head_layer_overall_and_applied(side, causal):
    layout = make_layout([5, 2, 7, 1], side, 2, causal=causal)
    rep = measure_plan(Plan.parse(PLAN).resolve(NUM_LAYERS, NUM_HEADS), layout)
    kept, allowed = _brute_report(_hand_layer_masks(layout), layout)
    assert torch.equal(rep.kept, kept) and torch.equal(rep.allowed, allowed)
    kf, af = kept.double(), allowed.double()
    assert torch.allclose(rep.per_head, 1 - kf / af)
    assert torch.allclose(rep.per_layer, 1 - kf.sum(1) / af.sum(1))
    assert rep.overall == pytest.approx(1 - float(kf.sum() / af.sum()))
    applied = torch.tensor([[True, False, False], [False, True, True], [True, True, True]])
    assert torch.equal(rep.applied, applied)
    assert rep.applied_sparsity == pytest.approx(1 - float(kf[applied].sum() / af[applied].sum()))
    # dense heads count with sparsity 0
    assert (rep.per_head[~applied] == 0).all()
    assert rep.examples == 4
    d = rep.to_dict()
    assert d["overall"] == rep.overall and d["applied"] == rep.applied_sparsity
    assert d["allowed_pairs"] == int(allowed.sum()) and d["kept_pairs"] == int(kept.sum())


def test_allowed_pairs_by_formula():
    # an encoder allows n^2 pairs per example, a decoder n(n+1)/2; padding never counts
    lengths = [5, 2, 7]
    for causal, per in [(False, lambda n: n * n), (True, lambda n: n * (n + 1) // 2)]:
        layout = make_layout(lengths, "left", 3, causal=causal)
        _, allowed = pair_counts(sa.full().mask(layout), layout)
        assert allowed.tolist() == [sum(per(n) for n in lengths)]
        assert sa.mask_sparsity(sa.full().mask(layout), layout) == 0.0
        assert sa.mask_sparsity(sa.neighbour(0).mask(layout), layout) == pytest.approx(
            1 - sum(lengths) / sum(per(n) for n in lengths))


def _brute_block_density(mask, layout, bs):
    """Over tiles of the padded grid, per example and head: tiles with an allowed pair, and with a kept one."""
    allowed = hand_mask(layout.real, lambda *a: True, causal=layout.causal)
    B, H, L, _ = mask.shape
    kept_tiles = allowed_tiles = 0
    for b in range(B):
        for h in range(H):
            for ti in range(0, L, bs):
                for tj in range(0, L, bs):
                    pairs = [(i, j) for i in range(ti, min(ti + bs, L)) for j in range(tj, min(tj + bs, L))]
                    if any(allowed[b, 0, i, j] for i, j in pairs):
                        allowed_tiles += 1
                        kept_tiles += any(bool(mask[b, h, i, j]) for i, j in pairs)
    return kept_tiles, allowed_tiles


@pytest.mark.parametrize("bs", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("side,causal", [("right", False), ("left", True)])
def test_block_density(bs, side, causal):
    layout = make_layout([9, 4, 1], side, 2, causal=causal)
    lps = Plan.parse(PLAN).resolve(NUM_LAYERS, NUM_HEADS)
    rep = measure_plan(lps, layout, block_size=bs)
    masks = _hand_layer_masks(layout)
    total_k = total_a = 0
    for li, m in enumerate(masks):
        k, a = _brute_block_density(m, layout, bs)
        kb, ab = block_counts(m, layout, bs)
        assert (int(kb.sum()), int(ab.sum())) == (k, a)
        assert float(rep.block_density_per_layer[li]) == pytest.approx(k / a)
        total_k, total_a = total_k + k, total_a + a
    assert rep.block_density == pytest.approx(total_k / total_a)
    if bs == 1:  # single-pair tiles: block density is the kept fraction
        assert rep.block_density == pytest.approx(1 - rep.overall)
    if bs >= layout.length:  # one tile per example and head, always holding the diagonal
        assert rep.block_density == 1.0
    assert rep.to_dict()["block_size"] == bs


def test_block_size_must_be_positive():
    layout = make_layout([3])
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        block_counts(sa.full().mask(layout), layout, 0)


def test_reports_add_up_over_batches():
    lps = Plan.parse(PLAN).resolve(NUM_LAYERS, NUM_HEADS)
    a, b = make_layout([5, 2], "right", 2), make_layout([7, 3, 1], "right", 0)
    both = make_layout([5, 2, 7, 3, 1], "right", 0)
    total = measure_plan(lps, a, block_size=2) + measure_plan(lps, b, block_size=2)
    one = measure_plan(lps, both, block_size=2)
    assert torch.equal(total.kept, one.kept) and torch.equal(total.allowed, one.allowed)
    assert torch.equal(total.block_kept, one.block_kept) and torch.equal(total.block_allowed, one.block_allowed)
    assert total.examples == 5
    with pytest.raises(ValueError, match="block sizes 2 and None"):
        measure_plan(lps, a, block_size=2) + measure_plan(lps, a)


def test_dense_plan_reports_zero():
    rep = measure_plan(Plan.dense().resolve(2, 2), make_layout([4, 3]))
    assert rep.overall == 0.0 and rep.applied_sparsity == 0.0 and not rep.applied.any()
    assert "(dense)" in rep.summary()


def test_measure_sparsity_on_a_sparsified_encoder(tokenizer):
    model = tiny_bert(num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, hidden_size=24,
                      vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match="not sparsified"):
        sa.measure_sparsity(model, {})
    sa.sparsify(model, PLAN)
    batches = [sa.encode(tokenizer, ["A man is playing a guitar.", "Dogs bark."]),
               sa.encode(tokenizer, ["The cat sat on the windowsill in the sun."])]
    rep = sa.measure_sparsity(model, batches, block_size=4)
    want = None
    for enc in batches:
        layout = make_layout(enc["attention_mask"].sum(1).tolist())
        r = measure_plan(Plan.parse(PLAN).resolve(NUM_LAYERS, NUM_HEADS), layout, block_size=4)
        want = r if want is None else want + r
    assert torch.equal(rep.kept, want.kept) and torch.equal(rep.allowed, want.allowed)
    assert rep.block_density == want.block_density and rep.examples == 3
    assert sa.measure_sparsity(model, batches[0]).examples == 2  # one batch (a mapping) works too
    with pytest.raises(ValueError, match="no batches"):
        sa.measure_sparsity(model, [])


def test_measure_sparsity_counts_only_the_past_for_a_decoder():
    model = tiny_llama()
    sa.sparsify(model, "all: neighbour(1)")
    ids = torch.randint(5, 100, (2, 6))
    am = torch.ones_like(ids)
    am[1, :2] = 0  # left padding
    rep = sa.measure_sparsity(model, {"input_ids": ids, "attention_mask": am})
    # per head and layer: 6*7/2 + 4*5/2 = 31 allowed pairs; neighbour(1) keeps the diagonal and one back
    assert rep.allowed.unique().tolist() == [31]
    assert rep.kept.unique().tolist() == [6 + 5 + 4 + 3]
    assert rep.overall == pytest.approx(1 - 18 / 31)


@pytest.mark.parametrize("expanded", [False, True])
def test_counts_in_small_chunks_equal_whole_counts(monkeypatch, expanded):
    """pair_counts and block_counts visit the query rows in chunks (a whole count at 32k tokens needs hundreds of
    GiB): chunks of a few rows, an odd length, padding, a decoder and packed documents give the whole counts, per
    head, for a mask of distinct heads and for one expanded over them; pair_and_block_counts gives both at once."""
    g = torch.Generator().manual_seed(3)
    real = torch.tensor([[1] * 37 + [0] * 4, [1] * 41], dtype=torch.bool)
    docs = torch.tensor([[0] * 20 + [1] * 21, [0] * 9 + [1] * 32])
    for layout in (TokenLayout(real=real, causal=False), TokenLayout(real=real, causal=True, document_ids=docs)):
        keep = torch.rand(2, 1 if expanded else 3, 41, 41, generator=g) < 0.3
        keep = keep.expand(-1, 3, -1, -1)
        allowed = layout.allowed()
        want_pairs = (keep & allowed).sum(dim=(0, 2, 3))
        want_blocks = block_counts(keep.contiguous(), layout, 8)
        monkeypatch.setattr(sparsity, "CHUNK_PAIRS", 2 * 3 * 41 * 5)  # 5 query rows a chunk, 8 for tiles
        kept, total = pair_counts(keep, layout)
        assert kept.tolist() == want_pairs.tolist() and total.tolist() == [int(allowed.sum())] * 3
        kb, ab = block_counts(keep, layout, 8)
        assert kb.tolist() == want_blocks[0].tolist() and ab.tolist() == want_blocks[1].tolist()
        pairs, blocks = sparsity.pair_and_block_counts(keep, layout, 8)  # measure_plan's one pass over both
        assert [t.tolist() for t in (*pairs, *blocks)] == [t.tolist() for t in (kept, total, kb, ab)]
        monkeypatch.undo()
